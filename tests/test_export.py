"""python -m regioncap.export on a real small run (the CLI, engine=fake, on the COCO
fixture of test_adapters): hf and parquet loaded back with datasets/pyarrow, the
conversations JSONL checked line by line, exclusions counted, and a push to an
unreachable hub failing with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from regioncap.records import read_jsonl
from test_adapters import make_coco


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A CLI run over the COCO fixture: rows 1 and 2 captioned (region 2 of row 1 left
    unanswered), three error rows (missing image, bad annotation, unknown image id)."""
    root = tmp_path_factory.mktemp("export")
    path = make_coco(root)
    out = root / "run"
    proc = run_cli(["engine=fake", "progress=false", "max_error_rate=1.0", "data=coco", f"data.path={path}",
                    "data.images_dir=../images", "engine.skip_regions=[2]", "engine.answer_on_reask=false",
                    f"hydra.run.dir={out}"], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def export(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "regioncap.export", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_run_has_what_the_export_leaves_out(run_dir):
    recs = {r["id"]: r for r in read_jsonl(run_dir / "captions.jsonl")}
    assert recs["1"]["status"] == "partial" and recs["1"]["regions"][1]["missing"]
    assert recs["2"]["status"] == "ok" and len(recs["2"]["regions"]) == 1
    assert sum(r["status"] == "error" for r in recs.values()) == 3


def test_hf_export_loads_back(run_dir, tmp_path):
    import datasets

    proc = export(run_dir, "--format", "hf", "--out", tmp_path / "ds")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("2 of 5 rows, 2 regions; left out: 3 error rows, 0 rows without a caption, 0 rows whose image is "
            "gone, 1 regions without a caption") in proc.stdout
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert ds.num_rows == 2 and ds["id"] == ["1", "2"]
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert first["image"].size == (96, 64)  # decoded from the embedded bytes
    (region,) = first["regions"]
    assert region["id"] == 1 and region["references"] == ["circle"] and region["flags"] == []
    assert region["bbox"] == [4.0, 4.0, 34.0, 24.0] and region["caption"].startswith("fake caption")
    assert sum(len(r) for r in ds["regions"]) == 2


def test_parquet_export_reads_with_pyarrow(run_dir, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "captions.parquet"
    proc = export(run_dir, "--format", "parquet", "--out", out, "--images", "path")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out)
    assert table.num_rows == 2
    assert set(table.column_names) >= {"id", "image", "image_path", "image_size", "input_size", "regions"}
    rows = table.to_pylist()
    assert rows[0]["image"] == rows[0]["image_path"] and Path(rows[0]["image"]).is_file()
    assert [len(r["regions"]) for r in rows] == [1, 1]
    assert rows[1]["regions"][0]["references"] == ["square"]


def test_conversations_export(run_dir, tmp_path):
    out = tmp_path / "conv.jsonl"
    proc = export(run_dir, "--format", "conversations", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 conversation lines" in proc.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    recs = {r["id"]: r for r in read_jsonl(run_dir / "captions.jsonl")}
    assert [x["id"] for x in lines] == ["1/1", "2/1"]
    for line in lines:
        rec = recs[line["row_id"]]
        reg = next(r for r in rec["regions"] if r["id"] == line["region_id"])
        user, assistant = line["messages"]
        assert user["role"] == "user" and user["content"][0] == {"type": "image", "image": rec["image_path"]}
        # Qwen2.5-VL grounding: absolute pixels of the model's input image.
        assert line["coords"] == "qwen2_5_vl" and line["input_size"] == rec["input_size"]
        assert line["bbox_2d"] == [round(v) for v in reg["input_bbox"]]
        assert json.dumps({"bbox_2d": line["bbox_2d"]}) in user["content"][1]["text"]
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": reg["caption"]}]}
    qwen2 = tmp_path / "conv2.jsonl"
    assert export(run_dir, "--format", "conversations", "--out", qwen2, "--family", "qwen2_vl").returncode == 0
    first = json.loads(qwen2.read_text().splitlines()[0])
    assert "<|box_start|>(" in first["messages"][0]["content"][1]["text"]
    assert first["coords"] == "qwen2_vl" and all(0 <= v <= 1000 for v in first["bbox_2d"])
    # Florence-2 is asked in its own region task, the box as four location tokens.
    florence = tmp_path / "conv3.jsonl"
    assert export(run_dir, "--format", "conversations", "--out", florence, "--family", "florence2").returncode == 0
    first = json.loads(florence.read_text().splitlines()[0])
    assert first["coords"] == "florence2" and all(0 <= v <= 999 for v in first["bbox_2d"])
    assert first["messages"][0]["content"][1]["text"] == "<REGION_TO_DESCRIPTION>" + "".join(
        f"<loc_{v}>" for v in first["bbox_2d"])


def test_push_to_an_unreachable_hub_is_a_clear_error(run_dir, tmp_path):
    proc = export(run_dir, "--format", "hf", "--out", tmp_path / "ds", "--push-to-hub", "someone/regioncap-test")
    assert proc.returncode == 1
    assert "could not push to the Hugging Face hub repo 'someone/regioncap-test'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "ds" / "dataset_info.json").is_file()  # written locally before the push


def test_a_run_without_captions_is_refused(tmp_path):
    proc = export(tmp_path, "--format", "conversations", "--out", tmp_path / "c.jsonl")
    assert proc.returncode == 1 and "has no captions.jsonl" in proc.stderr


def test_a_run_with_nothing_to_export_is_refused(tmp_path):
    rec = {"id": "a", "index": 0, "status": "error", "regions": [],
           "error": {"stage": "visualize", "kind": "image_not_found", "message": "m"}}
    (tmp_path / "captions.jsonl").write_text(json.dumps(rec) + "\n")
    for fmt, out in (("hf", tmp_path / "ds"), ("conversations", tmp_path / "c.jsonl")):
        proc = export(tmp_path, "--format", fmt, "--out", out)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "nothing to export" in proc.stderr and "0 of 1 rows, 0 regions" in proc.stderr
        assert "left out: 1 error rows" in proc.stderr
        assert not out.exists()

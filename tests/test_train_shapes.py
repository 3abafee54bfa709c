"""scripts/train_shapes.py, the script that made the shipped model, on a few scenes.

Training runs by hand (an hour and more); here it runs for a handful of steps
with a much smaller model so the script cannot rot: the data it prepares, the
output folder regioncap can load, the record it writes, and the claim of the
model card that a re-run gives the same weights.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

from conftest import REPO, run_cli
from regioncap.records import read_jsonl

SMALL = ["--train-rows", "12", "--chunk-rows", "5", "--prep-procs", "2", "--crop-steps", "4", "--crop-batch", "4",
         "--marked-steps", "4", "--marked-batch", "4", "--coords-share", "0.3", "--ground-share", "0.3", "--width", "64",
         "--text-layers", "1", "--vision-depth", "1", "--threads", "1"]


def _train(out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_shapes.py"), "--out", str(out),
                           "--work", str(work), *SMALL, *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Tuple[Path, subprocess.CompletedProcess]:
    """One small training run (data prepared in 2 processes), shared by the tests that read its output."""
    base = tmp_path_factory.mktemp("train")
    return base, _train(base / "model", base / "work")


@pytest.mark.slow
def test_train_writes_a_model_regioncap_runs(trained, tmp_path):
    base, proc = trained
    out = base / "model"
    # Chunked scenes, every strategy prepared in 2 shards.
    assert sorted(p.name for p in (base / "work" / "train").glob("chunk-*")) == ["chunk-000", "chunk-001",
                                                                                  "chunk-002"]
    for strategy in ("crop", "marked", "coords", "ground"):
        shards = sorted((base / "work" / f"vis_{strategy}").glob("shard-*/visualize.jsonl"))
        assert len(shards) == 2, strategy
        assert sum(len(s.read_text().splitlines()) for s in shards) == 12
    record = json.loads((out / "training.json").read_text())
    assert record["data"]["marked_samples"] == 12 and record["data"]["coords_samples"] == 12
    assert record["data"]["ground_samples"] == 12
    assert record["data"]["crop_samples"] == sum(
        len(json.loads(line)["bbox"]) for line in (base / "work" / "train" / "shapes.jsonl").read_text().splitlines())
    assert [record["phases"][p]["steps"] for p in ("crop", "marked")] == [4, 4]
    assert record["text_dims"]["hidden_size"] == 64 and record["vision_dims"]["depth"] == 1
    assert str(base) not in json.dumps(record), "machine paths in the record"
    assert "saved" in proc.stdout
    # The folder is a model regioncap runs end to end (its captions are noise after 8 steps).
    run_dir = tmp_path / "run"
    cli = run_cli(["model=shapes", f"model.path={out}", "data=shapes", "data.limit=2", "prompt=marked",
                   f"hydra.run.dir={run_dir}", "progress=false"], pin=False)
    assert cli.returncode == 0, cli.stderr[-3000:]
    recs = list(read_jsonl(run_dir / "captions.jsonl"))
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), recs


@pytest.mark.slow
def test_retraining_gives_the_same_weights(trained, tmp_path):
    """The model card's claim: fixed seeds and a batch plan drawn up front give bit-identical weights on a CPU,
    also when the data is prepared by another number of processes."""
    base, _ = trained  # the first run, its data prepared by 2 processes
    _train(tmp_path / "b", tmp_path / "wb", "--prep-procs", "1")
    assert _sha(base / "model" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert (base / "work" / "train" / "shapes.jsonl").read_text() == (tmp_path / "wb" / "train" / "shapes.jsonl").read_text()


def test_grounding_targets_are_the_answer_regioncap_reads():
    """The training answer of a grounding request: the compact layout the regex constraint allows, in reading
    order, which parse_grounding reads back into the same boxes and labels."""
    import re

    sys.path.insert(0, str(REPO / "scripts"))
    from train_shapes import grounding_answer

    from regioncap.families.qwen import Qwen25VL
    from regioncap.families.grounding import grounding_regex

    boxes = [(120.4, 30.0, 170.6, 80.2), (10.0, 30.0, 50.0, 70.0), (60.0, 5.0, 100.0, 40.0)]
    labels = ["a red star", "a blue circle", "an orange square"]
    answer = grounding_answer(boxes, labels)
    assert re.fullmatch(grounding_regex(), answer), answer
    props = Qwen25VL().parse_grounding(answer, 224, 224)
    assert [p.label for p in props] == ["an orange square", "a blue circle", "a red star"]
    assert [p.bbox for p in props] == [(60, 5, 100, 40), (10, 30, 50, 70), (120, 30, 171, 80)]


def test_set_rope_theta_changes_the_base_transformers_and_vllm_read(tmp_path):
    """--rope-theta rewrites both spellings of the language model's M-RoPE base in a copied model folder."""
    import shutil

    sys.path.insert(0, str(REPO / "scripts"))
    from train_shapes import set_rope_theta
    from transformers import AutoConfig

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(REPO / "regioncap" / "weights" / "shapes" / "config.json", folder / "config.json")
    assert AutoConfig.from_pretrained(folder).text_config.rope_parameters["rope_theta"] == 1e6
    set_rope_theta(folder, 10.0)
    text = json.loads((folder / "config.json").read_text())["text_config"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"] == 10.0
    assert text["rope_parameters"]["mrope_section"] == [4, 6, 6]
    assert AutoConfig.from_pretrained(folder).text_config.rope_parameters["rope_theta"] == 10.0

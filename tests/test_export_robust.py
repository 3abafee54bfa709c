"""regioncap.export, the hard cases: relative image paths from any folder, images
that do not decode as stored, and a killed export (atomic outputs, no work dir left)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_cli
from regioncap.export import embeddable_image
from regioncap.records import read_jsonl


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(color=(10, 200, 30), size=(64, 48)) -> bytes:
    """A valid PNG plus, after its image data, a zTXt chunk inflating to 50 MB:
    Pillow decodes the pixels, then fails at the end of ``load()``."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    png = buf.getvalue()
    end = png.rindex(b"IEND") - 4
    bomb = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\0" * (50 * 2**20), 9))
    return png[:end] + bomb + png[end:]


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_an_image_that_does_not_decode_as_stored_is_reencoded():
    data = bomb_png()
    with pytest.raises(ValueError):  # what datasets does when it reads the row back
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    got = embeddable_image(data)
    # The pipeline's decoder decides: the pixels it reads, re-encoded, or None (left
    # out) where it refuses the file; never the bytes that fail to read back.
    if got is not None:
        out, reencoded = got
        assert reencoded and out != data
        with Image.open(io.BytesIO(out)) as im:
            im.load()
            assert im.size == (64, 48) and im.convert("RGB").getpixel((5, 5)) == (10, 200, 30)
    ok = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ok, "JPEG")
    assert embeddable_image(ok.getvalue()) == (ok.getvalue(), False)  # a good file is embedded as it is
    assert embeddable_image(b"not an image at all") is None


@pytest.fixture(scope="module")
def rel_run(tmp_path_factory) -> Path:
    """A run started from the images' folder (datasets then finds a file of the image's
    bare name in the current folder and stores that name instead of the bytes); one of
    the images is the PNG of :func:`bomb_png`."""
    root = tmp_path_factory.mktemp("export_rel")
    imgs = root / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(6):
        name = f"img{i}.png"
        if i == 3:
            (imgs / name).write_bytes(bomb_png())
        else:
            Image.new("RGB", (96, 64), (40 * i, 90, 200 - 20 * i)).save(imgs / name)
        rows.append({"id": f"r{i}", "image": name, "bbox": [[4, 4, 40, 30]]})
    (imgs / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    proc = run_cli(["engine=fake", "progress=false", "data=jsonl", "data.path=rows.jsonl", "workers=0",
                    "max_error_rate=1.0", f"hydra.run.dir={out}"], cwd=imgs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # JSONL rows get absolute image paths; a `datasets` source given by a relative
    # data.path records them relative to the folder the run started from. Half the
    # rows are made so, as such a run would have written them.
    recs = list(read_jsonl(out / "captions.jsonl"))
    assert all(Path(r["image_path"]).is_absolute() for r in recs)
    for r in recs[::2]:
        r["image_path"] = Path(r["image_path"]).name
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def export(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "regioncap.export", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=full, cwd=str(cwd))


def _read_back_every_row(path: Path, fmt: str) -> list:
    """Every row through datasets, its image decoded (what a training job does)."""
    import datasets

    ds = datasets.load_from_disk(str(path)) if fmt == "hf" else datasets.Dataset.from_parquet(
        str(path), cache_dir=str(path.parent / ".read_cache"))
    rows = [ds[i] for i in range(ds.num_rows)]
    for row in rows:
        row["image"].load()
    return rows


@pytest.mark.cli
@pytest.mark.parametrize("where", ["images_folder", "elsewhere"])
@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_relative_images_are_embedded_from_any_folder(rel_run, tmp_path, where, fmt):
    cwd = rel_run.parent / "imgs" if where == "images_folder" else tmp_path
    out = tmp_path / ("ds.parquet" if fmt == "parquet" else "ds")
    proc = export(rel_run, "--format", fmt, "--out", out, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok_rows = [r for r in read_jsonl(rel_run / "captions.jsonl") if r["status"] != "error"]
    rows = _read_back_every_row(out, fmt)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in ok_rows) and len(rows) >= 5
    if fmt == "parquet":  # the bytes are in the file, not a path to them
        import pyarrow.parquet as pq

        images = pq.read_table(out).column("image").to_pylist()
        assert all(img["bytes"] for img in images)
    for row in rows:
        assert row["image"].size == (96, 64) or row["image"].size == (64, 48)
    if "r3" in {r["id"] for r in rows}:  # the run accepted the bomb PNG: embedded re-encoded
        assert "1 images re-encoded as PNG" in proc.stdout


@pytest.mark.cli
def test_a_moved_export_still_reads_back(rel_run, tmp_path):
    """The images are in the file: moved elsewhere and read from another folder, every row decodes."""
    out = tmp_path / "ds.parquet"
    proc = export(rel_run, "--format", "parquet", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = tmp_path / "moved.parquet"
    out.rename(moved)
    other = tmp_path / "other"
    other.mkdir()
    import datasets

    ds = datasets.Dataset.from_parquet(str(moved), cache_dir=str(other))
    for i in range(ds.num_rows):
        ds[i]["image"].load()


@pytest.mark.cli
@pytest.mark.parametrize("fmt", ["parquet", "hf", "conversations"])
@pytest.mark.parametrize("point", ["export.row:2", "export.before_rename:1"])
def test_a_killed_export_leaves_nothing_behind(rel_run, tmp_path, fmt, point):
    """SIGKILL mid-way: no file at the final path, nothing in the temp folder; the
    next export to the same path succeeds and removes what the killed one left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    outdir = tmp_path / "out"
    out = outdir / {"parquet": "ds.parquet", "hf": "ds", "conversations": "ds.jsonl"}[fmt]
    env = {"TMPDIR": str(tmp), "REGIONCAP_FAILPOINT": f"{point}:sigkill", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = export(rel_run, "--format", fmt, "--out", out, cwd=tmp_path, env=env)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    assert not out.exists()
    assert list(tmp.iterdir()) == []
    left = sorted(p.name for p in outdir.iterdir())
    assert left and all(name.startswith(f".{out.name}.") for name in left), left  # beside the output only
    env.pop("REGIONCAP_FAILPOINT")
    proc = export(rel_run, "--format", fmt, "--out", out, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in outdir.iterdir()) == [out.name]
    assert list(tmp.iterdir()) == []
    if fmt != "conversations":
        assert len(_read_back_every_row(out, fmt)) >= 5
    else:
        assert len(out.read_text().splitlines()) >= 5


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """An in-process run of the default data with the fake engine, and a second one beside it."""
    from conftest import compose
    from regioncap.job import execute

    root = tmp_path_factory.mktemp("targets")
    for name in ("run", "other"):
        execute(compose(["engine=fake", "progress=false"], output_dir=root / name))
    return root / "run"


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("target", ["captions.jsonl", "visualize.jsonl", "metrics.json", "manifest.json",
                                    "report.html", "images/export.parquet", ".hydra/x.jsonl",
                                    "../other/captions.jsonl", "../other/run_key.json"])
@pytest.mark.parametrize("fmt", ["conversations", "parquet"])
def test_an_export_never_writes_over_a_runs_own_files(fake_run, target, fmt, capsys):
    """``--out RUN/captions.jsonl`` once replaced the records it exported with the export."""
    from regioncap.export import main

    out = fake_run / target
    before = {p: p.read_bytes() for p in fake_run.parent.rglob("*") if p.is_file()}
    assert main([str(fake_run), "--format", fmt, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--out {out} would write over" in err and "which a run wrote" in err, err
    assert {p: p.read_bytes() for p in fake_run.parent.rglob("*") if p.is_file()} == before


def test_an_export_beside_the_runs_files_is_written(fake_run, tmp_path):
    from regioncap.export import main

    out = fake_run / "exports" / "train.jsonl"
    assert main([str(fake_run), "--format", "conversations", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 18
    assert main([str(fake_run), "--format", "conversations", "--out", str(tmp_path / "c.jsonl")]) == 0


def test_a_report_never_writes_over_a_runs_own_files_but_its_report(fake_run, capsys):
    from regioncap.report import main

    before = (fake_run / "captions.jsonl").read_bytes()
    assert main([str(fake_run), "--out", str(fake_run / "captions.jsonl")]) == 2
    assert "which a run wrote" in capsys.readouterr().err
    assert (fake_run / "captions.jsonl").read_bytes() == before
    assert main([str(fake_run), "--out", str(fake_run / "report.html")]) == 0
    assert "<html" in (fake_run / "report.html").read_text()[:400].lower()


def test_exporting_a_killed_run_leaves_out_its_torn_tail_and_counts_it(fake_run, tmp_path, capsys):
    import shutil

    from regioncap.export import main

    run = tmp_path / "killed"
    shutil.copytree(fake_run, run)
    data = (run / "captions.jsonl").read_bytes()
    (run / "captions.jsonl").write_bytes(data[:-50])  # the last record, cut mid-line
    assert main([str(run), "--format", "conversations", "--out", str(tmp_path / "c.jsonl")]) == 0
    out = capsys.readouterr().out
    lines = data.splitlines(keepends=True)
    whole = len(lines) - 1
    assert f"{whole} of {whole} rows" in out and "the torn last line of a killed run" in out, out
    (run / "captions.jsonl").write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]))
    assert main([str(run), "--format", "conversations", "--out", str(tmp_path / "d.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "captions.jsonl:2: not JSON" in err and "Traceback" not in err
    assert not (tmp_path / "d.jsonl").exists()

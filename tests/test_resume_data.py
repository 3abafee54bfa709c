"""A resume over data that changed, and a run that runs out of disk or file handles.

Rows without an ``id`` are keyed by position (``row-0000000``), so only the
record's ``digest`` (of the input line) can tell that the row at an index is
not the one captioned before: a row inserted at the top or edited in place is
refused, naming the row. A full disk while writing the marked images stops the
run (it is the machine's problem, not the row's) and a resume, once space is
freed, completes every row exactly once (docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, compose, run_cli
from regioncap.errors import RunError
from regioncap.job import execute
from regioncap.records import read_jsonl
from regioncap.stages.visualize import ResourceError

DEMO = REPO / "regioncap" / "demo"
BASE = [json.loads(line) for line in (DEMO / "demo.jsonl").read_text().splitlines() if line.strip()]


def rows_without_ids(n: int, start: int = 0) -> List[dict]:
    """``n`` demo rows (from demo row ``start`` on) with no ``id`` field and absolute image paths."""
    out = []
    for i in range(start, start + n):
        row = {k: v for k, v in BASE[i % len(BASE)].items() if k != "id"}
        row["image"] = str(DEMO / row["image"])
        out.append(row)
    return out


def write_rows(path: Path, rows: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fake(out: Path, rows: Path, *extra: str):
    return compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "engine.batch_size=2",
                    "commit_every=2", *extra], output_dir=out)


def exactly_once(path: Path, n: int) -> Dict[int, dict]:
    """Records of ``path`` by index, checking every input index is there exactly once."""
    records = list(read_jsonl(path))
    indexes = sorted(r["index"] for r in records)
    assert indexes == list(range(n)), f"{path.name}: indexes {indexes}"
    return {r["index"]: r for r in records}


# ------------------------------------------------------------------ rows without ids


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("stages", [["visualize", "caption"], ["visualize"]])
def test_a_row_inserted_at_the_top_is_refused_naming_the_row(tmp_path, stages):
    rows, out = write_rows(tmp_path / "rows.jsonl", rows_without_ids(3)), tmp_path / "run"
    stage = f"stages=[{','.join(stages)}]"
    execute(fake(out, rows, stage))
    first = exactly_once(out / ("captions.jsonl" if "caption" in stages else "visualize.jsonl"), 3)
    assert [first[i]["id"] for i in range(3)] == ["row-0000000", "row-0000001", "row-0000002"]
    assert all(len(r["digest"]) >= 16 for r in first.values())
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}

    write_rows(rows, rows_without_ids(1, start=3) + rows_without_ids(3))  # a new row 0, the old ones shifted
    with pytest.raises(RunError, match=r"input row 0 \(id 'row-0000000'\) has other content .*digest .*data changed"):
        execute(fake(out, rows, stage, "resume=true"))
    # Refused before anything was written: no row captioned twice, none under another row's id.
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_a_row_edited_in_place_is_refused(tmp_path):
    rows, out = write_rows(tmp_path / "rows.jsonl", rows_without_ids(3)), tmp_path / "run"
    execute(fake(out, rows))
    edited = rows_without_ids(3)
    edited[1]["bbox"] = [[1, 1, 20, 20]]  # same position, same (positional) id, other content
    write_rows(rows, edited)
    with pytest.raises(RunError, match=r"input row 1 \(id 'row-0000001'\) has other content"):
        execute(fake(out, rows, "resume=true"))


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_an_unchanged_file_resumes_and_an_appended_row_is_added(tmp_path):
    rows, out = write_rows(tmp_path / "rows.jsonl", rows_without_ids(3)), tmp_path / "run"
    execute(fake(out, rows))
    before = (out / "captions.jsonl").read_bytes()
    execute(fake(out, rows, "resume=true"))
    assert (out / "captions.jsonl").read_bytes() == before
    # Rows appended at the end keep every earlier position: the resume does only the new one.
    write_rows(rows, rows_without_ids(4))
    metrics = execute(fake(out, rows, "resume=true"))
    got = exactly_once(out / "captions.jsonl", 4)
    assert got[3]["id"] == "row-0000003" and metrics["rows"] == 4
    assert (out / "captions.jsonl").read_bytes().startswith(before)


# ------------------------------------------------------------------ disk full


def _demo_rows(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        row = dict(BASE[i % len(BASE)])
        row["id"] = f"{row['id']}-{i}"
        row["image"] = str(DEMO / row["image"])
        rows.append(row)
    return write_rows(path, rows)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EMFILE, errno.EDQUOT])
def test_a_full_disk_stops_the_run_and_a_resume_completes_every_row_once(tmp_path, monkeypatch, code):
    import regioncap.stages.visualize as visualize

    n, fail_from = 9, 4
    rows, out = _demo_rows(tmp_path / "rows.jsonl", n), tmp_path / "run"
    real = visualize.save_image

    def full(image, path, **kw):
        if int(Path(path).name[:7]) >= fail_from:  # images are named after the row index
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "resource exhausted",
                          str(path))
        return real(image, path, **kw)

    monkeypatch.setattr(visualize, "save_image", full)
    with pytest.raises(ResourceError, match=rf"row {fail_from} .*errno {code}.*resume=true"):
        execute(fake(out, rows, "workers=0"))
    done = list(read_jsonl(out / "visualize.jsonl"))
    # Only rows before the failing one were committed, none as an error row of this failure.
    assert [r["index"] for r in done] == list(range(len(done))) and len(done) <= fail_from
    assert not any(r["status"] == "error" for r in done)

    monkeypatch.setattr(visualize, "save_image", real)  # space freed
    metrics = execute(fake(out, rows, "workers=0", "resume=true"))
    for name in ("visualize.jsonl", "captions.jsonl"):
        got = exactly_once(out / name, n)
        assert not any(r.get("error") for r in got.values()), name
    assert metrics["rows"] == n and metrics["error_rows"] == 0


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_retry_errors_after_a_full_disk_redoes_only_caption_errors(tmp_path, monkeypatch):
    import regioncap.stages.visualize as visualize

    n = 8
    rows = _demo_rows(tmp_path / "rows.jsonl", n)
    lines = rows.read_text().splitlines()
    broken = json.loads(lines[2])
    broken["image"] = str(tmp_path / "gone.jpg")  # a visualize error: a row problem, not the machine's
    lines[2] = json.dumps(broken)
    rows.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    real = visualize.save_image

    def full(image, path, **kw):
        if int(Path(path).name[:7]) >= 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(image, path, **kw)

    monkeypatch.setattr(visualize, "save_image", full)
    with pytest.raises(ResourceError):
        execute(fake(out, rows, "workers=0", "max_error_rate=1"))
    monkeypatch.setattr(visualize, "save_image", real)
    # Resume with the failing engine key still set: row 1 gets a caption error row.
    execute(fake(out, rows, "workers=0", "resume=true", "max_error_rate=1",
                 f"engine.fail_keys=[{json.loads(lines[1])['id']}/]"))
    got = exactly_once(out / "captions.jsonl", n)
    assert got[1]["error"]["stage"] == "caption" and got[2]["error"]["kind"] == "missing_file"
    kept_visualize = (out / "visualize.jsonl").read_bytes()
    # retry_errors redoes the caption error row, keeps the visualize error row as it was.
    execute(fake(out, rows, "workers=0", "resume=true", "retry_errors=true", "max_error_rate=1"))
    got = exactly_once(out / "captions.jsonl", n)
    assert got[1]["status"] == "ok" and got[2]["error"]["kind"] == "missing_file"
    assert sum(1 for r in got.values() if r["status"] == "error") == 1
    assert (out / "visualize.jsonl").read_bytes() == kept_visualize


#: Installed as ``sitecustomize`` in every process of a CLI run (main, fork server, workers):
#: while the flag file exists, creating an image file of a row from the given index on fails
#: with ENOSPC, as a full disk would; removing the flag file "frees the space".
_FULL_DISK = '''
import errno, os
_flag = os.environ.get("REGIONCAP_TEST_FULL_FLAG")
_from = int(os.environ.get("REGIONCAP_TEST_FULL_FROM", "0"))
_open = os.open
def _full_open(path, flags, *args, **kw):
    name = os.path.basename(os.fspath(path))
    if (_flag and os.path.exists(_flag) and name.startswith(".") and name[1:8].isdigit()
            and int(name[1:8]) >= _from):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
    return _open(path, flags, *args, **kw)
if _flag:
    os.open = _full_open
'''


@pytest.mark.cli
@pytest.mark.parametrize("workers", [0, 1])
def test_a_full_disk_in_a_worker_process_stops_the_cli_run(tmp_path, workers):
    n = 12
    rows, out = _demo_rows(tmp_path / "rows.jsonl", n), tmp_path / "run"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FULL_DISK)
    flag = tmp_path / "disk_is_full"
    flag.touch()
    env = {"PYTHONPATH": f"{site}:{REPO}", "REGIONCAP_TEST_FULL_FLAG": str(flag), "REGIONCAP_TEST_FULL_FROM": "5"}
    args = ["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", f"workers={workers}",
            "commit_every=2", "engine.batch_size=2", f"hydra.run.dir={out}"]
    proc = run_cli(args, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "No space left on device while preparing row 5" in log and "resume=true" in log
    done = list(read_jsonl(out / "visualize.jsonl"))
    assert len(done) <= 5 and not any(r["status"] == "error" for r in done)
    assert not any(p.name.endswith(".tmp") for p in (out / "images").iterdir())

    flag.unlink()  # space freed
    proc = run_cli([*args, "resume=true"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for name in ("visualize.jsonl", "captions.jsonl"):
        got = exactly_once(out / name, n)
        assert not any(r.get("error") for r in got.values()), name
    assert all(r["status"] == "ok" for r in exactly_once(out / "captions.jsonl", n).values())



@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_a_full_disk_while_drawing_grounded_regions_stops_the_run(tmp_path, monkeypatch):
    """propose=vlm draws the proposed regions in the caption stage: a full disk there stops the run too."""
    import regioncap.stages.visualize as visualize

    n = 6
    rows = tmp_path / "rows.jsonl"
    write_rows(rows, [{k: v for k, v in r.items() if k != "bbox"} | {"id": f"g{i}"}
                      for i, r in enumerate(rows_without_ids(n))])
    out = tmp_path / "run"
    real = visualize.save_image

    def full(image, path, **kw):
        name = Path(path).name
        if "_ground" not in name and int(name[:7]) >= 3:  # the clean images are written; the marked ones fail
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(image, path, **kw)

    monkeypatch.setattr(visualize, "save_image", full)
    with pytest.raises(ResourceError, match=r"row 3 .*errno 28.*resume=true"):
        execute(fake(out, rows, "workers=0", "propose=vlm"))
    assert not any(r.get("error") for r in read_jsonl(out / "captions.jsonl"))
    monkeypatch.setattr(visualize, "save_image", real)
    execute(fake(out, rows, "workers=0", "propose=vlm", "resume=true"))
    got = exactly_once(out / "captions.jsonl", n)
    assert all(r["status"] == "ok" for r in got.values())

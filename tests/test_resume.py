"""Crash and resume: a run killed at any commit point, then resumed, ends with the
same records as a run that was never interrupted; a resume that would mix
settings, an overwrite, a stop signal and retried errors behave as documented
(docs/reliability.md)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Dict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, compose, run_cli
from regioncap.job import execute
from regioncap.records import CorruptRecordsError, read_jsonl, scan_records
from regioncap.rundir import shell_word
from regioncap.run import RunError

DEMO = REPO / "regioncap" / "demo"


def demo_rows(path: Path, n: int = 8) -> Path:
    """``n`` rows: the demo rows over and over, with distinct ids and absolute image paths."""
    base = [json.loads(line) for line in (DEMO / "demo.jsonl").read_text().splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row = dict(base[i % len(base)])
            row["id"] = f"{row['id']}-{i}"
            row["image"] = str(DEMO / row["image"])
            fh.write(json.dumps(row) + "\n")
    return path


def by_id(path: Path) -> Dict[str, dict]:
    """Records of ``path`` by id, checking that each row is there exactly once."""
    records = list(read_jsonl(path))
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"a row is in {path.name} twice: {ids}"
    assert sorted(r["index"] for r in records) == list(range(len(records)))
    return {r["id"]: r for r in records}


def assert_same_answers(run: Path, reference: Path, n: int) -> None:
    for name in ("visualize.jsonl", "captions.jsonl"):
        got, want = by_id(run / name), by_id(reference / name)
        assert len(got) == len(want) == n and set(got) == set(want), name
    got, want = by_id(run / "captions.jsonl"), by_id(reference / "captions.jsonl")
    for rid, rec in want.items():
        assert got[rid]["status"] == rec["status"], rid
        assert [r["caption"] for r in got[rid]["regions"]] == [r["caption"] for r in rec["regions"]], rid


# ------------------------------------------------------------------ the records file


def test_scan_cuts_a_torn_tail_and_refuses_damage_in_the_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"ind')
    records, cut = scan_records(path)
    assert records == [{"index": 0}, {"index": 1}] and "line 3" in cut and "torn" in cut
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'
    assert scan_records(path) == ([{"index": 0}, {"index": 1}], None)
    path.write_bytes(b'{"index": 0}\n\x00\x00\x00\n')  # a page the crash left as zeros
    assert scan_records(path)[0] == [{"index": 0}] and path.read_bytes() == b'{"index": 0}\n'
    path.write_bytes(b'{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(CorruptRecordsError, match="r.jsonl:2"):
        scan_records(path)


@pytest.mark.parametrize("tail", [b'{"ind', b'\x00\x00\x00\n', b'{"index": 2, "s": "\xff', b"[1, 2]\n"])
def test_reading_a_killed_runs_records_leaves_out_the_torn_tail_and_says_so(tmp_path, tail):
    """export, report and reproduce read run files that a kill may have torn: the good records
    come back, the tail is reported (not a JSONDecodeError), and the file is left as it is."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n' + tail)
    told = []
    assert list(read_jsonl(path, torn=told.append)) == [{"index": 0}, {"index": 1}]
    assert len(told) == 1 and "r.jsonl: left out line 3 on" in told[0]
    assert path.read_bytes().endswith(tail)
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n')
    told.clear()
    assert len(list(read_jsonl(path, torn=told.append))) == 2 and told == []
    path.write_bytes(b'{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(CorruptRecordsError, match="r.jsonl:2"):
        list(read_jsonl(path))


# --------------------------------------------------------- kill at every commit point

# Small images and short answers keep the tiny model's runs to seconds on two cores.
TINY = ["engine=transformers", "engine.device=cpu", "engine.batch_size=2", "sampling.max_tokens=12", "seed=0",
        "model.max_pixels=12544", "commit_every=3", "progress=false", "data=jsonl"]
ROWS = 8


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_model_dir):
    """Rows, the CLI arguments, and the records of one uninterrupted run."""
    base = tmp_path_factory.mktemp("resume")
    rows = demo_rows(base / "rows.jsonl", ROWS)
    args = [*TINY, f"data.path={rows}", f"model.path={tiny_model_dir}"]
    reference = base / "reference"
    proc = run_cli([*args, f"hydra.run.dir={reference}"], cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args, reference


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    "visualize.before_commit:2", "visualize.mid_line:2", "visualize.after_commit:1",
    "caption.before_commit:2", "caption.mid_line:2", "caption.after_commit:2",
])
def test_killed_run_resumes_to_the_same_records(tmp_path, tiny_setup, point):
    args, reference = tiny_setup
    out = tmp_path / "run"
    proc = run_cli([*args, f"hydra.run.dir={out}"], env={"REGIONCAP_FAILPOINT": point}, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    stage = point.split(".")[0]
    stage_file = out / f"{'visualize' if stage == 'visualize' else 'captions'}.jsonl"
    if "mid_line" in point:
        assert not stage_file.read_bytes().endswith(b"\n")  # the torn line is there to be cut
    if point == "caption.after_commit:2":  # once is enough for the slow model (the fast tests cover the rest)
        # Without resume=true the run dir is not overwritten.
        refused = run_cli([*args, f"hydra.run.dir={out}"], cwd=tmp_path)
        assert refused.returncode == 1 and "resume=true" in refused.stdout + refused.stderr
    proc = run_cli([*args, f"hydra.run.dir={out}", "resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    if "mid_line" in point:
        assert "cut" in log and "torn" in log
    assert "resume:" in log
    assert_same_answers(out, reference, ROWS)
    if point != "caption.after_commit:2":
        return
    # A second resume of a finished run redoes nothing (and loads no model).
    before = (out / "captions.jsonl").read_bytes()
    proc = run_cli([*args, f"hydra.run.dir={out}", "resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "captions.jsonl").read_bytes() == before
    assert "engine:" not in proc.stdout + proc.stderr


# ------------------------------------------------------- refusals (fast, fake engine)


def fake(out: Path, rows: Path, *extra: str):
    return compose(["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "engine.batch_size=2",
                    "commit_every=3", *extra], output_dir=out)


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_run_dir_with_outputs_is_refused_without_resume(tmp_path):
    rows, out = demo_rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    execute(fake(out, rows))
    before = (out / "captions.jsonl").read_bytes()
    with pytest.raises(RunError, match=r"already holds visualize.jsonl and captions.jsonl.*resume=true.*new hydra.run.dir"):
        execute(fake(out, rows))
    # A caption-only run would overwrite captions.jsonl: refused as well.
    with pytest.raises(RunError, match="already holds captions.jsonl"):
        execute(fake(out, rows, "stages=[caption]"))
    with pytest.raises(RunError, match="go with resume=true"):
        execute(fake(tmp_path / "other", rows, "retry_errors=true"))
    assert (out / "captions.jsonl").read_bytes() == before
    key = json.loads((out / "run_key.json").read_text())
    assert key["values"]["max_boxes"] == 10 and len(key["hash"]) == 16


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_resume_with_changed_settings_is_refused_unless_forced(tmp_path):
    rows, out = demo_rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    execute(fake(out, rows, "data.limit=4"))
    with pytest.raises(RunError, match=r"resume refused(.|\n)*max_boxes: 10 -> 2(.|\n)*resume_force=true"):
        execute(fake(out, rows, "resume=true", "max_boxes=2"))
    # Settings that do not change answers (limit, batch size, fail_keys) do not block a resume.
    execute(fake(out, rows, "resume=true", "engine.batch_size=5", "engine.fail_keys=[nothing]"))
    assert len(by_id(out / "captions.jsonl")) == ROWS
    execute(fake(out, rows, "resume=true", "max_boxes=2", "resume_force=true", "data.limit=9"))
    key = json.loads((out / "run_key.json").read_text())
    assert key["values"]["max_boxes"] == 2 and key["previous"][0]["values"]["max_boxes"] == 10


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_resume_refuses_data_that_changed_under_it(tmp_path):
    rows, out = demo_rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    execute(fake(out, rows, "data.limit=4"))
    text = rows.read_text().replace("chelsea-1", "someone-else")
    rows.write_text(text)
    with pytest.raises(RunError, match="input row 1 has id 'someone-else'.*data changed"):
        execute(fake(out, rows, "resume=true"))


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_retry_errors_redoes_caption_error_rows_once(tmp_path):
    rows, out = demo_rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    execute(fake(out, rows, "engine.fail_keys=[coffee-2/]", "max_error_rate=0.5"))
    first = by_id(out / "captions.jsonl")
    assert first["coffee-2"]["status"] == "error" and first["coffee-2"]["error"]["stage"] == "caption"
    # A plain resume keeps the error row as it is.
    execute(fake(out, rows, "resume=true", "max_error_rate=0.5"))
    assert by_id(out / "captions.jsonl")["coffee-2"]["status"] == "error"
    metrics = execute(fake(out, rows, "resume=true", "retry_errors=true"))
    records = list(read_jsonl(out / "captions.jsonl"))
    again = by_id(out / "captions.jsonl")
    assert len(again) == ROWS and all(r["status"] == "ok" for r in again.values())
    assert again["coffee-2"]["regions"][0]["caption"].startswith("fake caption of region 1 in coffee-2/c0")
    # The redone row is appended after the good ones: order differs, ``index`` keeps input order.
    assert records[-1]["id"] == "coffee-2"
    assert {k: v for k, v in again.items() if k != "coffee-2"} == {k: v for k, v in first.items() if k != "coffee-2"}
    assert metrics["rows"] == ROWS and metrics["error_rows"] == 0


def test_the_resume_scan_redoes_the_rows_whose_error_is_retryable(tmp_path):
    """``error.retryable`` decides; a caption-stage error written before the field existed is redone
    (as every one was then), one of another stage is not."""
    from regioncap.rundir import RunDir

    errors = [{"stage": "caption", "kind": "engine_error", "message": "m", "retryable": True},
              {"stage": "caption", "kind": "too_long", "message": "m", "retryable": False},
              {"stage": "visualize", "kind": "unreadable_file", "message": "m", "retryable": True},
              {"stage": "visualize", "kind": "missing_file", "message": "m", "retryable": False},
              {"stage": "caption", "kind": "engine_error", "message": "m"},
              {"stage": "visualize", "kind": "not_an_image", "message": "m"},
              None]
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "index": i, "status": "ok" if e is None else "error", "error": e}) + "\n"
        for i, e in enumerate(errors)))
    done, redo = RunDir(tmp_path).done_rows("caption", retry=True)
    assert sorted(done) == list(range(len(errors))) and redo == {0, 2, 4}
    assert RunDir(tmp_path).done_rows("caption", retry=False)[1] == set()


@pytest.mark.slow  # a few seconds: the slow tier (the unit tier stays under 2 min)
def test_retry_errors_redoes_exactly_the_retryable_rows(tmp_path, monkeypatch):
    """Every error row says whether it may pass another time; ``resume=true retry_errors=true``
    redoes those (in both stages' files) and keeps the others byte for byte."""
    import regioncap.stages.visualize as visualize
    from regioncap.images import ImageLoadError

    rows, out = demo_rows(tmp_path / "rows.jsonl", 5), tmp_path / "run"
    lines = rows.read_text().splitlines()
    gone = json.loads(lines[2])
    gone["image"] = str(tmp_path / "gone.jpg")  # bad input: no such file
    lines[2] = json.dumps(gone)
    rows.write_text("\n".join(lines) + "\n")
    ids = [json.loads(line)["id"] for line in lines]
    real = visualize.load_image

    flaky_image = json.loads(lines[3])["image"]  # the five rows have five different images

    def flaky(source, **kw):  # row 3's read fails, as an I/O error on a network mount does
        if str(source) == flaky_image:
            raise ImageLoadError("unreadable_file", f"{source}: cannot open (Input/output error)")
        return real(source, **kw)

    monkeypatch.setattr(visualize, "load_image", flaky)
    execute(fake(out, rows, "workers=0", "max_error_rate=1", f"engine.fail_keys=[{ids[1]}/]"))
    first = by_id(out / "captions.jsonl")
    assert {i: (r["error"] or {}).get("retryable") for i, r in first.items()} == {
        ids[0]: None, ids[1]: True, ids[2]: False, ids[3]: True, ids[4]: None}
    assert first[ids[1]]["error"]["kind"] == "engine_error" and first[ids[3]]["error"]["kind"] == "unreadable_file"

    monkeypatch.setattr(visualize, "load_image", real)  # the mount is back; the engine too
    metrics = execute(fake(out, rows, "workers=0", "resume=true", "retry_errors=true", "max_error_rate=1"))
    again, seen = by_id(out / "captions.jsonl"), by_id(out / "visualize.jsonl")
    assert len(again) == len(seen) == 5  # every row once in each file
    assert {i: r["status"] for i, r in again.items()} == {
        ids[0]: "ok", ids[1]: "ok", ids[2]: "error", ids[3]: "ok", ids[4]: "ok"}
    assert [r["id"] for r in read_jsonl(out / "captions.jsonl")][-2:] == [ids[1], ids[3]]  # redone: appended
    assert {i: again[i] for i in (ids[0], ids[2], ids[4])} == {i: first[i] for i in (ids[0], ids[2], ids[4])}
    assert metrics["rows"] == 5 and metrics["error_rows"] == 1


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_a_run_dir_in_use_is_refused(tmp_path):
    from regioncap.run import build_run

    rows, out = demo_rows(tmp_path / "rows.jsonl", 2), tmp_path / "run"
    holder = build_run(fake(out, rows, "stages=[visualize]"))
    out.mkdir()
    holder.rundir.check_start(holder.cfg)  # takes the lock, as a running job does
    try:
        with pytest.raises(RunError, match="another regioncap process is writing"):
            execute(fake(out, rows, "resume=true"))
    finally:
        holder.close()
    execute(fake(out, rows, "resume=true"))


def test_execute_restores_the_signal_handlers(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    execute(fake(tmp_path / "run", demo_rows(tmp_path / "rows.jsonl", 2)))
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("point,code,extra", [
    ("visualize.after_commit:1:sigterm", 143, []),
    ("caption.after_commit:1:sigterm", 143, []),
    ("caption.after_commit:1:sigterm", 143, ["engine.isolate=true"]),
])
def test_sigterm_stops_after_a_commit_with_the_resume_command(tmp_path, point, code, extra):
    rows, out = demo_rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    args = ["engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "engine.batch_size=2",
            "commit_every=3", "max_boxes=4", *extra]
    proc = run_cli([*args, f"hydra.run.dir={out}"], env={"REGIONCAP_FAILPOINT": point}, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == code, log[-3000:]
    assert "stopped by SIGTERM" in log
    # The hint names the interpreter that ran (no activated venv needed): ".../python -m regioncap ...".
    hint = next(line.strip() for line in log.splitlines() if " -m regioncap " in line and "resume=true" in line)
    assert hint.startswith(shell_word(sys.executable) + " -m regioncap ")
    assert "resume=true" in hint and f"hydra.run.dir={out}" in hint and "max_boxes=4" in hint
    stage_file = out / ("visualize.jsonl" if point.startswith("visualize") else "captions.jsonl")
    data = stage_file.read_bytes()
    # The first commit and nothing after it (visualize: 3 rows; caption: one batch of 2 requests).
    assert data.endswith(b"\n") and len(list(read_jsonl(stage_file))) == (3 if point.startswith("visualize") else 1)
    proc = run_cli([*args, f"hydra.run.dir={out}", "resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(by_id(out / "captions.jsonl")) == len(by_id(out / "visualize.jsonl")) == ROWS


def test_a_real_sigint_from_outside_stops_after_a_commit(tmp_path):
    import os
    import subprocess
    import sys
    import time

    rows, out = demo_rows(tmp_path / "rows.jsonl", 300), tmp_path / "run"
    args = ["model=tiny", "engine=fake", "progress=false", "data=jsonl", f"data.path={rows}", "commit_every=8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("REGIONCAP_FAILPOINT", None)
    proc = subprocess.Popen([sys.executable, "-m", "regioncap", *args, f"hydra.run.dir={out}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ((out / "visualize.jsonl").exists() and (out / "visualize.jsonl").stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, log[-3000:]
    assert "stopped by SIGINT" in log and "resume=true" in log
    done = len(list(read_jsonl(out / "visualize.jsonl")))
    assert 0 < done < 300 and (out / "visualize.jsonl").read_bytes().endswith(b"\n")
    proc = run_cli([*args, f"hydra.run.dir={out}", "resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(by_id(out / "captions.jsonl")) == len(by_id(out / "visualize.jsonl")) == 300


@pytest.mark.cli
def test_a_refused_run_leaves_the_finished_runs_files_as_they_were(tmp_path):
    rows, out = demo_rows(tmp_path / "rows.jsonl", 3), tmp_path / "run"
    args = ["engine=fake", "data=jsonl", f"data.path={rows}", f"hydra.run.dir={out}", "progress=false"]
    assert run_cli(args).returncode == 0
    kept = {p: p.read_bytes() for p in [*(out / ".hydra").glob("*.yaml"), out / "manifest.json", out / "report.html",
                                        out / "captions.jsonl", out / "run_key.json"]}
    again = run_cli([*args, "max_boxes=2", "seed=7"])  # other settings, no resume: refused
    assert again.returncode == 1 and "already holds" in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in kept} == kept
    # regioncap.reproduce replays the finished run's own overrides, not the refused run's.
    assert "max_boxes=2" not in (out / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.cli
def test_a_second_run_into_a_dir_in_use_is_refused_and_writes_nothing(tmp_path):
    import subprocess
    import sys
    import time

    rows, out = demo_rows(tmp_path / "rows.jsonl", 40), tmp_path / "run"
    args = ["engine=fake", "data=jsonl", f"data.path={rows}", f"hydra.run.dir={out}", "progress=false",
            "workers=0", "commit_every=1", "engine.batch_size=1"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "REGIONCAP_FAILPOINT": "caption.after_commit:1:slow"}
    first = subprocess.Popen([sys.executable, "-m", "regioncap", "model=tiny", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "captions.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        overrides_before = (out / ".hydra" / "overrides.yaml").read_bytes()
        second = run_cli([*args, "max_boxes=3"])
        assert second.returncode == 1 and "another regioncap process is writing" in second.stdout + second.stderr
        assert (out / ".hydra" / "overrides.yaml").read_bytes() == overrides_before
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "ok"
    assert "max_boxes=3" not in (out / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize("path", ["/data/run 1", "/data/ünï/run", "/data/a(b)/c", "/data/it's", '/data/say "hi"',
                                  "/data/$HOME/x", "/data/a,b=[c]{d}", "/data/tab\there", "/data/back\\slash/x",
                                  "/data/plain-run_1.2/x", "/data/#hash/!bang"])
def test_resume_args_give_back_the_exact_run_dir_through_the_shell_and_hydra(path):
    """The resume command a run prints must work when pasted: the shell's words, then Hydra's
    override grammar, must give back the very run dir (spaces, accents, quotes, brackets...)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from regioncap.rundir import resume_args

    words = shlex.split(resume_args(path))
    assert words[0] == "resume=true" and len(words) == 2
    override = OverridesParser.create().parse_overrides([words[1]])[0]
    assert override.key_or_group == "hydra.run.dir" and override.value() == path


@settings(max_examples=80, deadline=None)
@given(name=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20))
def test_resume_args_round_trip_any_folder_name(name):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from regioncap.rundir import resume_args

    path = "/runs/" + name
    words = shlex.split(resume_args(path))
    assert OverridesParser.create().parse_overrides([words[1]])[0].value() == path


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_a_resumed_runs_rates_are_of_the_rows_it_did(tmp_path):
    # Found by a kill loop: after a resume, the visualize stage's and the pipeline's regions/s were
    # every region of the file over the seconds of the resumed part (2.5x the uninterrupted run's
    # after one kill, and without bound as the resumed part shrinks).
    rows, out = demo_rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    execute(fake(out, rows, "data.limit=6"))
    metrics = execute(fake(out, rows, "resume=true"))
    records = list(read_jsonl(out / "captions.jsonl"))
    resumed = [r for r in records if r["index"] >= 6]
    regions = sum(len(r.get("regions") or []) for r in resumed)
    assert metrics["regions"] == sum(len(r.get("regions") or []) for r in records) > regions > 0
    vis = metrics["stages"]["visualize"]
    assert (vis["rows"], vis["regions"], vis["images"]) == (2, regions, len({r["image_path"] for r in resumed}))
    assert vis["regions_per_s"] == pytest.approx(regions / vis["seconds"], rel=0.01)
    assert metrics["stages"]["caption"]["regions_captioned"] == sum(
        1 for r in resumed for g in r.get("regions") or [] if g.get("caption"))
    pipe = metrics["pipeline"]
    assert pipe["regions_per_s"] == pytest.approx(metrics["stages"]["caption"]["regions_captioned"] / pipe["seconds"],
                                                  rel=0.01)

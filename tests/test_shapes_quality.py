"""Caption quality of the shipped offline model, measured through the whole pipeline.

``model=shapes`` was trained on synthetic coloured shapes (regioncap/shapes.py,
scripts/train_shapes.py). Here a held-out set of scenes, generated with a seed
the training never used, goes through the real CLI (visualize + caption with
the transformers engine, and once with vLLM) and every caption is compared
with its ground truth. A bug in box conversion, crops, marks, prompts, the
engines or answer parsing turns captions wrong, so these tests catch what
tests of a random-weight model cannot. The thresholds sit a little under the
accuracy measured when the model was committed (see the model card,
regioncap/weights/shapes/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest

from conftest import REPO, compose, run_cli
from regioncap import shapes
from regioncap.records import read_jsonl
from vllm_helpers import TEST_KV_CACHE_BYTES, TEST_MAX_MODEL_LEN, vllm_env, vllm_python

#: Never used by scripts/train_shapes.py (its data seed is 1000 + seed).
HELD_OUT_SEED = 777
HELD_OUT_ROWS = 40

#: Measured when the model was committed (model card): on these 40 held-out scenes crop 100%,
#: marked 97.7% exact (on 100 scenes: 99.7% and 95.6%). The bars sit a little lower.
CROP_MIN_EXACT = 0.95
MARKED_MIN_EXACT = 0.90
#: The bundled scenes (data=shapes) hold 18 of their 25 boxes in 6-shape scenes, the hardest
#: case of marked mode: 92% (23 of 25) measured.
DEFAULT_MIN_EXACT = 0.80


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return shapes.write_dataset(tmp_path_factory.mktemp("heldout"), HELD_OUT_ROWS, seed=HELD_OUT_SEED,
                                prefix="heldout", image_format="jpeg")


def score(run_dir: Path) -> Dict[str, float]:
    """Accuracy of every box of a run against its references (``shapes.score_records``)."""
    result = shapes.score_records(read_jsonl(run_dir / "captions.jsonl"))
    assert result["regions"], "no regions"
    return result


def _run(held_out: Path, out: Path, *args: str, python: str | None = None, env: dict | None = None,
         timeout: int = 600) -> Dict[str, float]:
    kwargs = {"python": python, "env": env} if python else {}
    proc = run_cli(["model=shapes", "data=jsonl", f"data.path={held_out}", "progress=false",
                    f"hydra.run.dir={out}", *args], pin=False, timeout=timeout, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return score(out)


@pytest.mark.slow
def test_crop_mode_captions_are_right(held_out, tmp_path):
    s = _run(held_out, tmp_path / "crop", "prompt=crop")
    assert s["exact"] >= CROP_MIN_EXACT, s


@pytest.mark.slow
def test_marked_mode_captions_are_right(held_out, tmp_path):
    s = _run(held_out, tmp_path / "marked", "prompt=marked")
    assert s["exact"] >= MARKED_MIN_EXACT, s


@pytest.mark.slow
def test_a_box_conversion_bug_is_caught(held_out, tmp_path):
    """The same boxes read as xyxy (a classic conversion bug) must fail the accuracy bar by far."""
    s = _run(held_out, tmp_path / "xyxy", "prompt=crop", "data.bbox_format=xyxy", "max_error_rate=1.0")
    assert s["regions"] == sum(len(json.loads(line)["bbox"]) for line in held_out.read_text().splitlines())
    assert s["exact"] < CROP_MIN_EXACT - 0.2, s


@pytest.mark.slow
def test_marks_drawn_on_the_wrong_boxes_are_caught(held_out, tmp_path, monkeypatch):
    """A bug that puts mark k around box k+1 must fail the marked bar by far. (The model tells boxes apart
    by the colour of the marks, not their digits, so this is the marking bug its test can see; a consistent
    renumbering is not, see the model card.)"""
    from regioncap import run as run_module
    from regioncap import strategies

    real = strategies.draw_marks

    def shifted(image, boxes, labels, style):
        return real(image, list(boxes[1:]) + list(boxes[:1]), labels, style)

    monkeypatch.setattr(strategies, "draw_marks", shifted)  # the marked strategy draws (workers=0: this process)
    cfg = compose(["model=shapes", "data=jsonl", f"data.path={held_out}", "prompt=marked", "progress=false",
                   "workers=0"], output_dir=tmp_path / "shifted", pin=False)
    run = run_module.build_run(cfg)
    try:
        run.run()
    finally:
        run.close()
    s = score(tmp_path / "shifted")
    assert s["exact"] < MARKED_MIN_EXACT - 0.3, s


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("prompt,bar", [("crop", CROP_MIN_EXACT), ("marked", MARKED_MIN_EXACT)])
def test_vllm_engine_captions_are_right(held_out, tmp_path, prompt, bar):
    """The real vLLM (CPU build) running the shipped model: crops, and marked scenes answered
    under vLLM's own structured outputs."""
    s = _run(held_out, tmp_path / "vllm", f"prompt={prompt}", "engine=vllm", "engine.enforce_eager=true",
             f"+engine.extra_args.kv_cache_memory_bytes={TEST_KV_CACHE_BYTES}", f"model.max_model_len={TEST_MAX_MODEL_LEN}",
             python=vllm_python(),
             env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=900)
    assert s["exact"] >= bar, s


def test_default_run_prints_right_captions(tmp_path):
    """``python -m regioncap`` with no arguments: the shipped domain and model, captions scored."""
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}", "progress=false"], pin=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["error_rows"] == 0
    printed = proc.stdout + proc.stderr
    assert "captions of the first 4 row(s)" in printed, printed[-2000:]
    # A clean default run warns about nothing (no false secret, no misnamed box field).
    assert "WARNING" not in printed, [ln for ln in printed.splitlines() if "WARNING" in ln]
    assert "<redacted>" not in "".join(p.read_text() for p in (out / ".hydra").glob("*.yaml"))
    rec = next(read_jsonl(out / "captions.jsonl"))
    assert f'{rec["id"]} [1] "{rec["regions"][0]["caption"]}"  (reference: {rec["references"][0]})' in printed
    s = score(out)
    assert s["regions"] == sum(len(json.loads(line)["bbox"]) for line in
                               (REPO / "regioncap" / "demo" / "shapes" / "shapes.jsonl").read_text().splitlines())
    assert s["exact"] >= DEFAULT_MIN_EXACT, s
    assert (out / "report.html").is_file()


def test_shapes_dataset_is_deterministic(tmp_path):
    a = shapes.write_dataset(tmp_path / "a", 3, seed=5)
    b = shapes.write_dataset(tmp_path / "b", 3, seed=5)
    assert a.read_text() == b.read_text()
    for name in (json.loads(line)["image"] for line in a.read_text().splitlines()):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    for row in rows:
        assert len(row["bbox"]) == len(row["references"]) >= 1
        for x, y, w, h in row["bbox"]:
            assert 0 <= x and 0 <= y and x + w <= shapes.SCENE_SIZE and y + h <= shapes.SCENE_SIZE


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_shapes_boxes_do_not_overlap(tmp_path):
    import random

    rng = random.Random(3)
    for _ in range(50):
        _, found = shapes.render_scene(rng, shapes.MAX_SHAPES)
        boxes = [s.box for s in found]
        for i, (x, y, w, h) in enumerate(boxes):
            for bx, by, bw, bh in boxes[i + 1:]:
                assert x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y

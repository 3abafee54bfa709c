"""The benchmark scripts import and prepare their work on a CPU machine (no vLLM, no GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataflow_mm_marked_draws_darkens_and_keeps_full_resolution(tmp_path):
    bench = _load("bench")
    src = tmp_path / "src.jpg"
    Image.fromarray(np.full((600, 800, 3), 200, np.uint8)).save(src, quality=95)
    out = bench.dataflow_mm_marked(str(src), [[100, 100, 200, 150], [400.7, 300.2, 100, 100]], str(tmp_path / "m.jpg"))
    marked = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert marked.shape == (600, 800, 3)  # written at full resolution
    assert abs(marked[550, 50] - 160).max() <= 3  # darkened to 80% outside the boxes
    g = marked[100, 150]  # on the first box's top edge: green
    assert g[1] > 200 and g[0] < 80 and g[2] < 80
    label = marked[105:122, 104:118]  # the label background is black with a white number
    assert (label.sum(axis=2) < 60).any() and (label.sum(axis=2) > 600).any()


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
def test_camera_dataset_is_camera_sized_and_noisy(tmp_path):
    bench = _load("bench")
    data = bench.make_camera_dataset(tmp_path, 1, rows=3)
    lines = data.read_text().splitlines()
    assert len(lines) == 3
    with Image.open(tmp_path / "cam0.jpg") as im:
        assert 8e6 <= im.width * im.height <= 12.5e6
        crop = np.asarray(im.crop((1000, 1000, 1064, 1064)).convert("L")).astype(float)
    # Sensor noise and texture: neighbouring pixels differ (an upscaled smooth photo would not).
    assert np.abs(np.diff(crop, axis=1)).mean() > 2.0
    assert (tmp_path / "cam0.jpg").stat().st_size > 2e6


@pytest.mark.slow  # builds camera-like images and prepares both sides: seconds
def test_bench_gpu_dry_run_prepares_both_sides(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONCAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench_gpu = _load("bench_gpu")
    args = bench_gpu.parse_args(["--dry-run", "--rows", "2", "--dataflow-rows", "1", "--camera-images", "1"])
    assert args.weights == "random" and args.max_tokens == 64
    overrides = bench_gpu.build_overrides(args)
    assert "model.weights=random" in overrides and "engine.structured_outputs=false" in overrides
    result = bench_gpu.main(["--dry-run", "--rows", "2", "--dataflow-rows", "1", "--camera-images", "1",
                             "--workers", "0"])
    assert result["dry_run"] and result["rows"] == 2 and result["requests"] == 2 and result["regions"] == 10
    # regioncap's requests carry ~1,230 visual tokens at the 3B budget, DataFlow-MM's ~10,000-16,384.
    assert 1000 < result["regioncap_prompt_tokens"]["max"] < 1500
    assert 8000 < result["dataflow_prompt_tokens"]["min"] <= 16384 + 200
    assert result["all_fit"] and Path(result["model_path"]).is_dir()


def test_a_shared_engine_serves_two_runs_and_stays_open(tmp_path):
    """The benchmarks' hook: ``LocalExecutor(cfg, engine=...)`` captions with an engine built once; the runs
    use it as is and leave closing it to whoever built it."""
    from conftest import compose
    from regioncap.engines import build_engine
    from regioncap.executors.local import LocalExecutor
    from regioncap.record_types import Record
    from regioncap.records import read_jsonl
    from regioncap.run import RegionCapRun
    from regioncap.stages.caption import Captioner

    closed = []
    engine = None
    for name in ("a", "b"):
        cfg = compose(["engine=fake", "progress=false", "workers=0"], output_dir=tmp_path / name)
        if engine is None:
            engine = build_engine(cfg.engine, cfg.model, None)
            engine.close = lambda: closed.append(True)
        run = RegionCapRun(cfg, executor=LocalExecutor(cfg, engine=engine))
        metrics = run.run()
        run.close()
        assert metrics["regions_captioned"] == metrics["regions"] > 0
        assert run.engine_info["engine"] == "fake"
    assert len(engine.calls) >= 2 and closed == []  # one engine answered both runs; neither closed it
    # Captioner.request: the engine request of a spec, its image resolved against the run dir.
    spec = Record.from_dict(next(read_jsonl(tmp_path / "b" / "visualize.jsonl"))).requests[0]
    request = Captioner(cfg, tmp_path / "b").request(spec)
    assert request.image_path == str(tmp_path / "b" / spec.image) and request.prompt == spec.prompt
    own = Captioner(cfg, tmp_path / "b")
    own.start_engine()
    own.engine.close = lambda: closed.append("own")
    own.close()
    assert closed == ["own"]  # an engine the stage built itself is closed with it


def test_coldstart_markdown_has_every_figure():
    bench = _load("bench")
    mode = {"load_average_1min": [0.5, 1.2], "floor_wall_s": 4.0, "floor_cpu_s": 3.0, "engine_floor_wall_s": 6.0,
            "engine_floor_cpu_s": 5.0, "run_wall_s": 7.0, "run_cpu_s": 6.5, "run_over_floor": 1.75,
            "engine_floor_over_floor": 1.5, "run_code_wall_s": 12.0, "run_code_cpu_s": 9.0, "run_code_over_floor": 3.0}
    text = bench.coldstart_markdown({"repeat": 3, "busy_processes": 2, "code": "../main", "cores": 2,
                                     "quiet": mode, "busy": {**mode, "run_over_floor": 1.9}})
    # run / engine floor: 7.0 / 6.0
    assert "| quiet | 0.5 / 1.2 | 4.0 (3.0) | 6.0 (5.0) | 7.0 (6.5) | 1.75 | 1.17 | 12.0 (9.0) | 3.0 |" in text
    assert "| busy |" in text and "1.9" in text and bench.IMPORT_FLOOR in text

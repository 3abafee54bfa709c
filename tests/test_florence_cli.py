"""Florence-2 end to end as a user runs it: the tiny random-weight build, one photo, each way of asking."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from regioncap.records import read_jsonl


@pytest.mark.cli
@pytest.mark.slow
def test_florence_runs_one_row_end_to_end(tmp_path, tiny_florence_dir):
    # One process, two jobs (the imports paid once): its own region task, and DataFlow-MM's marked prompt.
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", f"hydra.sweep.dir={sweep}", "model=florence2_tiny", f"model.path={tiny_florence_dir}",
                    "model.weights=random", "engine=transformers", "data=demo", "data.limit=1", "workers=0",
                    "prompt=region,dataflow", "draw=dataflow",
                    # Random weights never stop, and their free text names no region (an error row, counted).
                    "sampling.max_tokens=12", "max_error_rate=1.0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, prompt in ((sweep / "0", "region"), (sweep / "1", "dataflow")):
        (rec,) = list(read_jsonl(job / "captions.jsonl"))  # every row out once
        requests = rec["requests"]
        if prompt == "region":
            assert rec["status"] in ("ok", "partial"), rec.get("error")
            # One request per region, each naming its box with location tokens, on one clean image.
            assert len(requests) == len(rec["regions"]) > 1
            assert all(r["prompt"].startswith("<REGION_TO_DESCRIPTION><loc_") for r in requests)
            assert len({r["image"] for r in requests}) == 1
        else:
            assert requests[0]["prompt"].startswith("Describe the content of each marked region in the image.")
        # The engine's prompt tokens: 5 visual tokens (the tiny 64 px square) and the text.
        assert all(r["prompt_tokens"] > 5 and r["output_tokens"] > 0 for r in requests)
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["model_weights"] == "random"
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["model"]["family"] == "florence2" and manifest["model"]["weights"] == "random"

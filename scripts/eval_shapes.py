"""Measure model=shapes through the whole pipeline on held-out synthetic scenes.

    .venv/bin/python scripts/eval_shapes.py --rows 200 --prompt crop marked ground [--model-path DIR] [OVERRIDE ...]

Generates scenes with a seed the training never used, runs ``python -m
regioncap`` on them (visualize + caption, the transformers engine), and prints
exact-match, colour and shape accuracy, overall and broken down by the number
of shapes in the scene and by region number: what the model card reports.
``ground`` runs ``propose=vlm propose.when=always``: the model grounds every
scene itself (its boxes replace the given ones, which become the truth) and
captions its own boxes in marked mode; it reports the proposals' recall,
precision and mean best IoU at IoU 0.5 (overall and by scene size), and the
captions and labels of the matched proposals against the truth's references.
Extra Hydra overrides (``draw=thin``, ``engine=vllm``, ...) go to every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regioncap import shapes  # noqa: E402
from regioncap.records import read_jsonl  # noqa: E402


def score(run_dir: Path) -> Dict[str, Any]:
    """Accuracy of every box of a run against its references, with breakdowns (rounded)."""
    result = shapes.score_records(read_jsonl(run_dir / "captions.jsonl"))
    for k in ("exact", "colour", "shape"):
        result[k] = round(result[k], 4)
    result["by"] = {k: {**v, "exact": round(v["exact"], 4)} for k, v in result["by"].items()}
    return result


def score_grounding(run_dir: Path) -> Dict[str, Any]:
    """Proposal quality of a ``propose.when=always`` run (from metrics.json), with recall by scene size."""
    from regioncap.boxes import proposal_quality

    metrics = json.loads((run_dir / "metrics.json").read_text())
    prop = metrics.get("proposals") or {}
    by: Dict[str, list] = {}
    for rec in read_jsonl(run_dir / "captions.jsonl"):
        truth = (rec.get("proposals") or {}).get("truth_bbox") or []  # xyxy, original pixels
        regions = [r["bbox"] for r in rec.get("regions") or []]
        q = proposal_quality(regions, truth)
        tally = by.setdefault(f"scene_shapes={len(truth)}", [0, 0, 0])
        tally[0] += q["matched"]
        tally[1] += q["n_truth"]
        tally[2] += q["n_proposed"]
    return {**(prop.get("quality") or {}), "proposals": prop.get("regions"), "per_image": prop.get("per_image"),
            "error_rows": metrics.get("error_rows"),
            "by": {k: {"recall": round(m / t, 4) if t else None, "precision": round(m / n, 4) if n else None,
                       "truth": t} for k, (m, t, n) in sorted(by.items())}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--prompt", nargs="+", default=["crop", "marked"])
    p.add_argument("--model-path", default=None, help="another model folder (default: the shipped one)")
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for every run, e.g. draw=thin engine=vllm")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="eval-shapes-"))
    data = shapes.write_dataset(work / "data", a.rows, seed=a.seed, prefix="heldout", image_format="jpeg")
    results = {}
    for prompt in a.prompt:
        out = work / f"run-{prompt}"
        mode = ["prompt=marked", "propose=vlm", "propose.when=always"] if prompt == "ground" else [f"prompt={prompt}"]
        args = [sys.executable, "-m", "regioncap", "model=shapes", "data=jsonl", f"data.path={data}",
                *mode, "progress=false", f"hydra.run.dir={out}"]
        if a.model_path:
            args.append(f"model.path={a.model_path}")
        args += a.overrides
        proc = subprocess.run(args, capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        metrics = json.loads((out / "metrics.json").read_text())
        scored = score_grounding(out) if prompt == "ground" else score(out)
        results[prompt] = {**scored, "caption_seconds": round(metrics.get("stages", {}).get("caption", {})
                                                                   .get("seconds", 0.0), 1)}
        print(prompt, json.dumps(results[prompt], indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": a.rows, "seed": a.seed, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Measure a region proposer against known boxes, and its cost against the visualize work.

    .venv/bin/python scripts/eval_proposals.py [--rows 100] [--seed 777] [--repeat 3] [--json OUT] [OVERRIDE ...]

Composes the real config tree (``model=shapes propose=contours`` unless the
overrides say otherwise; ``propose.threshold_c=6`` etc. change the proposer),
then for each image does what the visualize stage does (decode, resize to the
model's input size with its rule, draw the marks, encode the JPEG) and, apart,
runs the proposer on the resized image. Proposals are mapped back to the
original image's pixels and matched one-to-one (greedy, IoU >= 0.5) against
the row's boxes, which here are the ground truth.

Two sets: held-out shapes scenes (``regioncap.shapes`` with a seed the
training never used, the same as ``python -m regioncap.shapes --out DIR
--rows 100 --seed 777``) and the bundled demo photos against their hand-placed
boxes (objects and parts of objects, which a contour heuristic is not made for).

Recall and precision are pooled over all boxes of a set (matched truths /
truths, matched proposals / proposals); mean best IoU is over truth boxes.
Times are the median of ``--repeat`` passes per image, summed over the set;
the ratio is proposer time / visualize time. CPU only, one process.

``propose=vlm`` builds the configured caption engine (``engine=transformers``
unless overridden) and grounds each resized image with one request (batch 1,
greedy, under the grounding regex where the engine enforces it); in a run the
grounding requests share the caption engine's batches instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regioncap import boxes as bx  # noqa: E402
from regioncap import shapes  # noqa: E402
from regioncap.components import plain  # noqa: E402
from regioncap.draw import DrawStyle, draw_marks  # noqa: E402
from regioncap.families.base import build_family  # noqa: E402
from regioncap.images import encode_image, load_image, resize_to  # noqa: E402
from regioncap.propose import build_proposer, proposer_name  # noqa: E402


def compose(overrides: Sequence[str]) -> Any:
    """The config ``python -m regioncap OVERRIDES`` would run with, typed as a job types it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from regioncap.config import register_configs

    register_configs()
    chosen = {o.split("=", 1)[0] for o in overrides if "=" in o}
    base = [o for o in ("model=shapes", "propose=contours") if o.split("=")[0] not in chosen]
    from regioncap.settings import typed_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=base + list(overrides))
    cfg.output_dir = "."  # nothing is written there: only read by the typing (Hydra's run dir is not set here)
    return typed_config(cfg)  # what a job hands the run: the typed config


def _median_time(fn: Any, repeat: int) -> tuple:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def build(cfg: Any) -> tuple:
    """``(proposer, engine or None)``: a proposer that needs the caption engine gets the configured one."""
    from regioncap.propose import proposer_type

    if not getattr(proposer_type(cfg.propose), "needs_engine", False):
        return build_proposer(cfg.propose), None
    from regioncap.engines import build_engine
    from regioncap.models import resolve_model_path

    engine = build_engine(cfg.engine, cfg.model, resolve_model_path(cfg.model))
    return build_proposer(cfg.propose, engine=engine, family=build_family(cfg.model)), engine


def evaluate(rows: List[Dict[str, Any]], folder: Path, cfg: Any, repeat: int, proposer: Any) -> Dict[str, Any]:
    """Pooled quality and summed times of ``proposer`` over ``rows`` (JSONL rows with xywh ``bbox``)."""
    model = cfg.model
    style = DrawStyle(palette=list(cfg.draw.palette), line_width=float(cfg.draw.line_width),
                      min_line_px=int(cfg.draw.min_line_px), label_size=float(cfg.draw.label_size),
                      min_label_px=int(cfg.draw.min_label_px), dim=float(cfg.draw.dim))
    n_truth = n_prop = matched = 0
    best_sum = 0.0
    vis_s = prop_s = 0.0
    per_image = []
    family = build_family(model)
    for row in rows:
        path = folder / row["image"]

        def size_rule(w: int, h: int) -> tuple:
            return family.input_size(w, h)

        def visualize() -> tuple:
            loaded = load_image(path, draft_target=size_rule)
            w, h = loaded.original_size
            tw, th = size_rule(w, h)
            resized = resize_to(loaded.image, (tw, th))
            truth = [bx.Box(*bx.to_xyxy(b, "xywh", w, h)) for b in row["bbox"]]
            marks = [b.scale(tw / w, th / h).round_int() for b in truth]
            encode_image(draw_marks(resized, marks, [str(i + 1) for i in range(len(marks))], style),
                         cfg.draw.image_format, cfg.draw.jpeg_quality)
            return resized, (w, h), truth

        t_vis, (resized, (w, h), truth) = _median_time(visualize, repeat)
        t_prop, props = _median_time(lambda: proposer.propose(resized), repeat)
        tw, th = resized.size
        in_original = [p.scale(w / tw, h / th).bbox for p in props]
        q = bx.proposal_quality(in_original, truth, 0.5)
        n_truth += q["n_truth"]
        n_prop += q["n_proposed"]
        matched += q["matched"]
        best_sum += (q["mean_best_iou"] or 0.0) * q["n_truth"]
        vis_s += t_vis
        prop_s += t_prop
        per_image.append({"id": row.get("id"), "n_truth": q["n_truth"], "n_proposed": q["n_proposed"],
                          "matched": q["matched"], "mean_best_iou": q["mean_best_iou"]})
    return {
        "images": len(rows), "n_truth": n_truth, "n_proposed": n_prop, "matched": matched,
        "recall": round(matched / n_truth, 4) if n_truth else None,
        "precision": round(matched / n_prop, 4) if n_prop else None,
        "mean_best_iou": round(best_sum / n_truth, 4) if n_truth else None,
        "proposals_per_image": round(n_prop / len(rows), 2) if rows else None,
        "visualize_ms_per_image": round(1000 * vis_s / len(rows), 3) if rows else None,
        "propose_ms_per_image": round(1000 * prop_s / len(rows), 3) if rows else None,
        "propose_over_visualize": round(prop_s / vis_s, 3) if vis_s else None,
        "per_image": per_image,
    }


def _read(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100, help="held-out shapes scenes")
    p.add_argument("--seed", type=int, default=777, help="seed of the held-out scenes (training used others)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per image (median kept)")
    p.add_argument("--json", type=Path, default=None, help="write the full results here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: model=..., propose=..., propose.KEY=VALUE")
    a = p.parse_args(argv)
    cfg = compose(a.overrides)
    results: Dict[str, Any] = {"overrides": list(a.overrides), "model": cfg.model.name,
                               "propose": plain(cfg.propose)}
    proposer, engine = build(cfg)
    try:
        with tempfile.TemporaryDirectory(prefix="regioncap-eval-proposals-") as tmp:
            jsonl = shapes.write_dataset(tmp, a.rows, seed=a.seed)
            results["shapes"] = evaluate(_read(jsonl), Path(tmp), cfg, a.repeat, proposer)
        demo = ROOT / "regioncap" / "demo" / "demo.jsonl"
        results["demo_photos"] = evaluate(_read(demo), demo.parent, cfg, a.repeat, proposer)
    finally:
        if engine is not None:
            engine.close()

    print(f"propose={proposer_name(cfg.propose)} model={cfg.model.name} overrides={' '.join(a.overrides) or '-'}")
    print("| set | images | truth | proposed | recall@0.5 | precision@0.5 | mean best IoU "
          "| proposals/image | visualize ms/image | propose ms/image | propose/visualize |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("shapes", "demo_photos"):
        r = results[name]
        print(f"| {name} | {r['images']} | {r['n_truth']} | {r['n_proposed']} | {r['recall']} | {r['precision']} "
              f"| {r['mean_best_iou']} | {r['proposals_per_image']} | {r['visualize_ms_per_image']} "
              f"| {r['propose_ms_per_image']} | {r['propose_over_visualize']} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

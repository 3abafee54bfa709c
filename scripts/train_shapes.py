"""Train the offline default model: a tiny Qwen2.5-VL that captions coloured shapes.

Run by hand, once, offline, on a CPU (not in CI):

    .venv/bin/python scripts/train_shapes.py --out regioncap/weights/shapes --work /tmp/shapes-train

What it does, in order (every step seeded, so a re-run with the same library
versions gives the same weights):

1. Generates a training set of synthetic scenes with ``regioncap.shapes``
   (and a separate held-out set, with another seed, for the evaluation).
2. Builds a random-weight Qwen2.5-VL with ``regioncap.tiny``'s builder: the
   real transformers architecture, a byte-level BPE tokenizer trained on the
   prompts and captions of this domain, Qwen's special tokens, chat template
   and image processor; dimensions below.
3. Runs regioncap's own *visualize* stage over the training scenes, once with
   ``prompt=crop`` and once with ``prompt=marked``: the training inputs are the
   exact images and prompts the pipeline will later send to the model (crop
   margin, resize rule, marks, prompt wording), so training and inference
   cannot drift apart.
4. Trains on (image, prompt) -> answer, loss on the answer tokens only:
   phase 1 crops only (shape and colour recognition), phase 2 marked scenes
   mixed with crops (reading the numbered marks, one ``N: caption`` line per
   box).
5. Saves the weights as float16 safetensors with a ``training.json`` record
   (versions, seeds, steps, losses, timings).

Faster: ``--chunk-rows 1000 --prep-procs N`` makes the scenes and runs the
visualize stage in N processes; ``--device cuda --loader-workers N`` trains on
a GPU with N processes building batches. ``--init-from`` continues from a
model folder; the model card (regioncap/weights/shapes/README.md) lists the
commands that made the shipped weights.

Evaluate through the whole pipeline afterwards (what the tests do):

    python -m regioncap data=shapes prompt=crop
    python -m regioncap data=shapes prompt=marked
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regioncap import shapes, tiny  # noqa: E402

#: Model dimensions. Text head_dim 32 (vLLM's CPU attention supports it);
#: mrope_section sums to head_dim / 2; the vision tower's output equals the
#: text hidden size.
TEXT_DIMS: Dict[str, Any] = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, mrope_section=[4, 6, 6],
)
VISION_DIMS: Dict[str, Any] = dict(
    depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=224, fullatt_block_indexes=[1],
    tokens_per_second=2,
)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224
VOCAB = 700


def domain_corpus() -> List[str]:
    """The text the tokenizer is trained on: this domain's prompts and answers, plus the tiny model's corpus."""
    from omegaconf import OmegaConf

    from regioncap import prompts

    lines = list(tiny.default_corpus())
    caps = [shapes.caption(c, k) for c in shapes.COLOURS for k in shapes.SHAPES]
    for _ in range(3):
        lines += caps
    for strategy in ("crop", "marked", "coords", "dataflow"):
        cfg = OmegaConf.load(ROOT / "conf" / "prompt" / f"{strategy}.yaml")
        for n in range(1, 11):
            nums = list(range(1, n + 1))
            text = prompts.build_prompt(
                cfg.template, numbers=nums, labels=[str(x) for x in nums],
                answer_format=cfg.get("answer_format", "lines"),
                regions_text="\n".join(f'{x}: {{"bbox_2d": [{10 * x}, {20 + x}, {100 + x}, {200 - x}]}}' for x in nums),
                noun="region" if strategy == "coords" else "box")
            lines += [text] * 3
            lines.append("\n".join(f"{x}: {caps[(x * 7 + n) % len(caps)]}" for x in nums))
    return lines


def dims(width: int, text_layers: int, vision_depth: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Text and vision dimensions for another model size (head_dim stays 32).

    The defaults (width 128, 4 text layers, vision depth 2) give TEXT_DIMS and VISION_DIMS."""
    heads = width // 32
    text = dict(TEXT_DIMS, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    vision = dict(VISION_DIMS, depth=vision_depth, hidden_size=width, intermediate_size=2 * width, num_heads=heads,
                  out_hidden_size=width, fullatt_block_indexes=[vision_depth - 1])
    return text, vision


def build_init(folder: Path, seed: int, text_dims: Dict[str, Any] = TEXT_DIMS,
               vision_dims: Dict[str, Any] = VISION_DIMS) -> Dict[str, Any]:
    """A random-weight model folder with the given dimensions and this script's tokenizer."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return tiny.build_seeded(folder, seed, text_dims=text_dims, vision_dims=vision_dims, corpus=domain_corpus(),
                             vocab=VOCAB, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def set_rope_theta(folder: Path, theta: float) -> None:
    """Give the language model of the model in ``folder`` another M-RoPE base (both config spellings).

    Qwen2.5-VL's M-RoPE gives the width of the image the slowest rotary
    frequencies: at this model's head size (16 frequencies, sections 4/6/6) and
    base 1e6, at most 1.8e-4 rad per column of visual tokens, so the language
    model cannot tell columns apart. A small base (10) makes them 0.12-0.24 rad.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config", config)
    text["rope_theta"] = theta
    if isinstance(text.get("rope_parameters"), dict):
        text["rope_parameters"]["rope_theta"] = theta
    path.write_text(json.dumps(config, indent=2) + "\n")


#: The pseudo-strategy of the grounding samples: ``propose=vlm propose.when=always`` over ``prompt=marked``.
GROUND = "ground"


def _visualize_shard(data_jsonl: Path, model_dir: Path, prompt: str, out_dir: Path, shards: int, index: int) -> Path:
    """Run regioncap's visualize stage (the real one) on one shard into ``out_dir`` (made empty by
    :func:`visualize`) and return its visualize.jsonl. ``prompt="ground"``: the stage leaves every
    row for the engine to ground (``propose=vlm propose.when=always``) with its clean image at the
    model's input size, the image the grounding request sends."""
    from hydra import compose, initialize_config_dir

    from regioncap.config import register_configs
    from regioncap.run import build_run

    register_configs()
    overrides = [
        "model=shapes", f"model.path={model_dir}", "data=jsonl", f"data.path={data_jsonl}",
        *([f"prompt={prompt}"] if prompt != GROUND else ["prompt=marked", "propose=vlm", "propose.when=always"]),
        "engine=fake", "stages=[visualize]", "progress=false", f"data.num_shards={shards}",
        f"data.shard_index={index}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.output_dir = str(out_dir)  # ${hydra:runtime.output_dir} does not resolve under the compose API
    run = build_run(cfg)
    try:
        run.run()
    finally:
        run.close()
    return out_dir / "visualize.jsonl"


def visualize(data_jsonl: Path, model_dir: Path, prompt: str, out_dir: Path, procs: int = 1) -> List[Path]:
    """The visualize stage over ``data_jsonl`` in ``procs`` shards run side by side (one folder each)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if procs <= 1:
        return [_visualize_shard(data_jsonl, model_dir, prompt, out_dir, 1, 0)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_visualize_shard, data_jsonl, model_dir, prompt, out_dir / f"shard-{i:02d}", procs, i)
                   for i in range(procs)]
        return [f.result() for f in futures]


def _chunk(folder: Path, rows: int, seed: int, prefix: str) -> Path:
    return shapes.write_dataset(folder, rows, seed=seed, prefix=prefix)


def generate(folder: Path, rows: int, seed: int, chunk_rows: int = 0, procs: int = 1) -> Path:
    """The training scenes as one JSONL. ``chunk_rows`` > 0 writes them in chunks seeded one by one
    (``seed * 1000 + chunk``), made side by side in ``procs`` processes; the scenes depend on
    ``chunk_rows``, not on ``procs``. ``chunk_rows`` 0: one sequence from ``seed``."""
    if not chunk_rows:
        return shapes.write_dataset(folder, rows, seed=seed, prefix="train")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(folder / f"chunk-{c:03d}", min(chunk_rows, rows - c * chunk_rows), seed * 1000 + c, f"train{c:03d}")
            for c in range(math.ceil(rows / chunk_rows))]
    with ProcessPoolExecutor(max(1, procs), mp_context=mp.get_context("spawn")) as pool:
        paths = list(pool.map(_chunk, *zip(*jobs)))
    lines = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            rec["image"] = f"{path.parent.name}/{rec['image']}"
            lines.append(json.dumps(rec) + "\n")
    out = folder / "shapes.jsonl"
    out.write_text("".join(lines), encoding="utf-8")
    return out


def prepared(folder: Path) -> List[Path]:
    """The visualize.jsonl files of a folder written by :func:`visualize` (one, or one per shard)."""
    if (folder / "visualize.jsonl").exists():
        return [folder / "visualize.jsonl"]
    return sorted(folder.glob("shard-*/visualize.jsonl"))


def samples(vis_jsonls: Sequence[Path], strategy: str) -> List[Tuple[str, str, str]]:
    """(image path, prompt, target answer) for every request of the given visualize.jsonl files:
    the bare caption for ``crop``, one ``N: caption`` line per box otherwise. In the input's row order,
    however many shards prepared them, so the batch plan does not depend on ``--prep-procs``."""
    out: List[Tuple[int, int, Tuple[str, str, str]]] = []
    for vis_jsonl in vis_jsonls:
        out += _samples(vis_jsonl, strategy)
    return [item for _, _, item in sorted(out, key=lambda x: x[:2])]


def _samples(vis_jsonl: Path, strategy: str) -> List[Tuple[int, int, Tuple[str, str, str]]]:
    out = []
    run_dir = vis_jsonl.parent
    for line in vis_jsonl.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("status") == "error":
            continue
        refs = rec["references"]
        by_id = {r["id"]: r for r in rec["regions"]}
        for req in rec["requests"]:
            regs = [by_id[i] for i in req["region_ids"]]
            if strategy == "crop":
                answer = refs[regs[0]["source_index"]]
            else:
                answer = "\n".join(f"{n}: {refs[r['source_index']]}" for n, r in zip(req["numbers"], regs))
            out.append((rec["index"], len(out), (str(run_dir / req["image"]), req["prompt"], answer)))
    return out


def grounding_answer(boxes: Sequence[Sequence[float]], labels: Sequence[str]) -> str:
    """The grounding answer for boxes (x1, y1, x2, y2, pixels of the model's input) and their labels:
    Qwen2.5-VL's JSON list in the compact layout of ``regioncap.propose.vlm.grounding_regex``, in
    reading order (top to bottom, then left to right), coordinates rounded to whole pixels."""
    items = sorted(((round(b[1]), round(b[0]), [round(v) for v in b], label) for b, label in zip(boxes, labels)),
                   key=lambda x: x[:2])
    return "[" + ", ".join('{"bbox_2d": [%d, %d, %d, %d], "label": "%s"}' % (*box, label)
                           for _, _, box, label in items) + "]"


def ground_samples(vis_jsonls: Sequence[Path], data_jsonl: Path) -> List[Tuple[str, str, str]]:
    """(image, grounding prompt, answer) for every row the visualize stage left ``grounding``: the
    scene's boxes (from ``data_jsonl``, xywh of the scene) scaled to the image the request sends."""
    from regioncap.families.qwen import Qwen25VL

    truth = {}
    for line in data_jsonl.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        truth[row["id"]] = row
    prompt = Qwen25VL().grounding_prompt()
    out: List[Tuple[int, Tuple[str, str, str]]] = []
    for vis_jsonl in vis_jsonls:
        for line in vis_jsonl.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("status") != "grounding":
                continue
            row = truth[rec["id"]]
            (w, h), (tw, th) = rec["image_size"], rec["grounding"]["image_size"]
            sx, sy = tw / w, th / h
            boxes = [(x * sx, y * sy, (x + bw) * sx, (y + bh) * sy) for x, y, bw, bh in row["bbox"]]
            out.append((rec["index"], (str(vis_jsonl.parent / rec["grounding"]["image"]), prompt,
                                       grounding_answer(boxes, row["references"]))))
    return [item for _, item in sorted(out, key=lambda x: x[0])]


class Batcher:
    """Turns (image, prompt, answer) triples into padded training batches (loss on the answer only)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.end = "<|im_end|>"
        self.im_start = self.tok.convert_tokens_to_ids("<|im_start|>")
        self.head_tail = len(self.tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])

    def __call__(self, items: Sequence[Tuple[str, str, str]]) -> Dict[str, Any]:
        import torch
        from PIL import Image

        images, texts = [], []
        for image, prompt, answer in items:
            with Image.open(image) as im:
                images.append(im.convert("RGB"))
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            head = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            texts.append(head + answer + self.end + "\n")
        self.tok.padding_side = "right"
        enc = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        labels = ids.clone()
        labels[enc["attention_mask"] == 0] = -100
        for row in range(ids.shape[0]):
            # The answer starts after the last "<|im_start|>assistant\n"; the "\n" after the
            # closing <|im_end|> is not something the model must say.
            starts = (ids[row] == self.im_start).nonzero().flatten().tolist()
            labels[row, : starts[-1] + self.head_tail] = -100
            labels[row, int(enc["attention_mask"][row].sum()) - 1] = -100
        enc["labels"] = labels
        return dict(enc)


class _Steps:
    """Map-style dataset: item ``i`` is the whole batch of step ``i`` (prepared in a DataLoader worker)."""

    def __init__(self, batcher: Batcher, plan: List[List[Tuple[str, str, str]]]) -> None:
        self.batcher, self.plan = batcher, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.batcher(self.plan[i])


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def train(model: Any, batcher: Batcher, pools: List[Tuple[float, List[Tuple[str, str, str]]]], *, steps: int,
          batch_size: int, lr: float, warmup: int, seed: int, log_every: int, name: str, device: str = "cpu",
          loader_workers: int = 1, budget_s: float = 0.0) -> Dict[str, Any]:
    """AdamW with warm-up and cosine decay; each batch drawn from ``pools`` by weight. Returns a log.

    The batches are drawn up front from a seeded RNG and built in one
    DataLoader worker (image decoding and the processor overlap the model's
    step), so the order, and with it the weights, do not depend on timing.
    With ``budget_s``, the number of steps is cut to what fits in that many
    seconds at the speed of the first 50 steps (decided before the warm-up
    ends, so the learning-rate schedule is that of a run with the final step
    count; the record says how many ran).
    """
    import torch
    from torch.utils.data import DataLoader

    rng = random.Random(seed)
    weights = [w for w, _ in pools]
    plan = []
    for _ in range(steps):
        pool = pools[rng.choices(range(len(pools)), weights=weights)[0]][1]
        plan.append([pool[rng.randrange(len(pool))] for _ in range(batch_size)])
    loader = DataLoader(_Steps(batcher, plan), batch_size=None, shuffle=False, num_workers=loader_workers,
                        worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False,
                        pin_memory=device != "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses: List[float] = []
    history = []
    t0 = time.perf_counter()
    model.train()
    probe = min(50, warmup)
    for step, batch in enumerate(loader, 1):
        if budget_s and step == probe + 1:
            per_step = (time.perf_counter() - t0) / probe
            steps = max(probe + 1, min(steps, int(budget_s / per_step)))
            print(f"[{name}] {per_step:.3f} s/step: {steps} steps fit in {budget_s:.0f} s", flush=True)
        if step > steps:
            break
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.02)
        if device != "cpu":
            batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if step % log_every == 0 or step == steps:
            avg = sum(losses[-log_every:]) / len(losses[-log_every:])
            el = time.perf_counter() - t0
            history.append({"step": step, "loss": round(avg, 4), "seconds": round(el, 1)})
            print(f"[{name}] step {step}/{steps} loss {avg:.4f} {el:.0f}s ({el / step:.3f} s/step)", flush=True)
    model.eval()
    del loader
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": round(time.perf_counter() - t0, 1),
            "device": device, "history": history}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "regioncap" / "weights" / "shapes"))
    p.add_argument("--work", required=True, help="scratch folder for the generated data and runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-rows", type=int, default=8000)
    p.add_argument("--crop-steps", type=int, default=2000)
    p.add_argument("--crop-batch", type=int, default=32)
    p.add_argument("--marked-steps", type=int, default=2400)
    p.add_argument("--marked-batch", type=int, default=16)
    p.add_argument("--marked-crop-share", type=float, default=0.25)
    p.add_argument("--small-share", type=float, default=0.0,
                   help="share of marked batches drawn from scenes of 2 to --small-max shapes (a curriculum "
                        "for binding numbers to boxes)")
    p.add_argument("--small-max", type=int, default=3)
    p.add_argument("--coords-share", type=float, default=0.0,
                   help="share of phase-2 batches from prompt=coords requests (clean scene, boxes as text)")
    p.add_argument("--ground-share", type=float, default=0.0,
                   help="share of phase-2 batches from grounding requests (clean scene -> JSON boxes and labels)")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="M-RoPE base of the language model (default 1e6, as Qwen2.5-VL); 10 lets it tell the "
                        "columns of the image apart, which grounding needs (see set_rope_theta)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", default=None, help="start from this model folder instead of random weights")
    p.add_argument("--width", type=int, default=TEXT_DIMS["hidden_size"], help="hidden size of both towers")
    p.add_argument("--text-layers", type=int, default=TEXT_DIMS["num_hidden_layers"])
    p.add_argument("--vision-depth", type=int, default=VISION_DIMS["depth"])
    p.add_argument("--device", default="cpu", help="cpu, or cuda to train on a GPU")
    p.add_argument("--loader-workers", type=int, default=1, help="processes that build the batches")
    p.add_argument("--prep-procs", type=int, default=1,
                   help="processes for the data: scene chunks and visualize-stage shards run side by side")
    p.add_argument("--chunk-rows", type=int, default=0,
                   help="generate the scenes in seeded chunks of this many rows (0: one sequence, as the shipped "
                        "model's first run did); needed for --prep-procs to speed up scene generation")
    p.add_argument("--crop-budget-s", type=float, default=0.0,
                   help="cut phase 1 to the steps that fit in this many seconds (0: no limit)")
    p.add_argument("--marked-budget-s", type=float, default=0.0,
                   help="cut phase 2 to the steps that fit in this many seconds (0: no limit)")
    p.add_argument("--reuse-data", action="store_true",
                   help="reuse the visualize outputs already in --work (same --train-rows and --seed)")
    a = p.parse_args(argv)

    import numpy as np
    import torch
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration

    from regioncap.engines.transformers_engine import load_processor

    torch.set_num_threads(a.threads)
    text_dims, vision_dims = dims(a.width, a.text_layers, a.vision_depth)
    if a.rope_theta is not None:
        text_dims["rope_theta"] = float(a.rope_theta)
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    record: Dict[str, Any] = {
        # No machine paths in the record: folders by their names only.
        "seed": a.seed, "args": {k: (Path(v).name if k in ("out", "work", "init_from") and v else v)
                                 for k, v in vars(a).items()}, "text_dims": text_dims, "vision_dims": vision_dims,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "tokenizer_vocab": VOCAB,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "pillow": __import__("PIL").__version__},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": a.threads},
    }
    t_all = time.perf_counter()
    init = work / "init"
    if a.init_from:
        shutil.rmtree(init, ignore_errors=True)
        shutil.copytree(a.init_from, init)
        if a.rope_theta is not None:
            set_rope_theta(init, float(a.rope_theta))
    else:
        build_init(init, a.seed, text_dims, vision_dims)
    strategies = ["crop", "marked"] + (["coords"] if a.coords_share else []) + ([GROUND] if a.ground_share else [])
    data = work / "train" / "shapes.jsonl"
    if a.reuse_data and all(prepared(work / f"vis_{s}") for s in strategies):
        print("reusing the prepared training data in", work, flush=True)
    else:
        if not (a.reuse_data and data.exists()):
            data = generate(work / "train", a.train_rows, 1000 + a.seed, a.chunk_rows, a.prep_procs)
        for strategy in strategies:
            if not (a.reuse_data and prepared(work / f"vis_{strategy}")):
                visualize(data, init, strategy, work / f"vis_{strategy}", a.prep_procs)
    crop = samples(prepared(work / "vis_crop"), "crop")
    marked = samples(prepared(work / "vis_marked"), "marked")
    coords = samples(prepared(work / "vis_coords"), "coords") if a.coords_share else []
    ground = ground_samples(prepared(work / f"vis_{GROUND}"), data) if a.ground_share else []
    if a.reuse_data:  # the rows of the data prepared earlier, whatever --train-rows says now
        a.train_rows = record["args"]["train_rows"] = len(marked)
    record["data"] = {"train_rows": a.train_rows, "crop_samples": len(crop), "marked_samples": len(marked),
                      **({"coords_samples": len(coords)} if coords else {}),
                      **({"ground_samples": len(ground)} if ground else {}),
                      "data_seed": 1000 + a.seed, "prepared_s": round(time.perf_counter() - t_all, 1)}
    print(f"{len(crop)} crop, {len(marked)} marked and {len(ground)} grounding training samples", flush=True)

    processor = load_processor(str(init))
    torch.manual_seed(a.seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32).to(a.device)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    if a.device != "cpu":
        record["host"]["device"] = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    run = dict(device=a.device, loader_workers=a.loader_workers)
    batcher = Batcher(processor)
    phases = {}
    if a.crop_steps:
        phases["crop"] = train(model, batcher, [(1.0, crop)], steps=a.crop_steps, batch_size=a.crop_batch,
                               lr=a.lr, warmup=100, seed=a.seed + 1, log_every=100, name="crop",
                               budget_s=a.crop_budget_s, **run)
    if a.marked_steps:
        small = [m for m in marked if 2 <= m[2].count("\n") + 1 <= a.small_max]
        rest = 1.0 - a.marked_crop_share - a.small_share - a.coords_share - a.ground_share
        if rest < 0:
            p.error("--marked-crop-share + --small-share + --coords-share + --ground-share must not exceed 1")
        pools = [(rest, marked), (a.marked_crop_share, crop)]
        if a.coords_share:
            pools.append((a.coords_share, coords))
        if a.small_share:
            pools.append((a.small_share, small))
        if a.ground_share:
            pools.append((a.ground_share, ground))
        phases["marked"] = train(
            model, batcher, pools,
            steps=a.marked_steps, batch_size=a.marked_batch, lr=a.lr, warmup=200, seed=a.seed + 2,
            log_every=100, name="marked", budget_s=a.marked_budget_s, **run)
    record["phases"] = phases

    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp, ignore=shutil.ignore_patterns("model.safetensors", tiny.MARKER))
    model.to("cpu", torch.float16).save_pretrained(tmp, safe_serialization=True)
    saved_cfg = json.loads((init / "config.json").read_text())
    # Keep the builder's config.json (readable by every version); only the dtype changes.
    saved_cfg["torch_dtype"] = saved_cfg["dtype"] = "float16"
    saved_cfg.get("text_config", {}).update({"dtype": "float16"})
    (tmp / "config.json").write_text(json.dumps(saved_cfg, indent=2, sort_keys=True) + "\n")
    record["total_s"] = round(time.perf_counter() - t_all, 1)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if (out / "README.md").exists():  # the model card is written by hand: keep it
        shutil.copy(out / "README.md", tmp / "README.md")
    for f in tmp.iterdir():
        f.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"saved {out} in {record['total_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

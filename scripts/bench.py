"""Benchmarks of the two stages against baselines measured in the same run.

    .venv/bin/python scripts/bench.py visualize --rows 60
    .venv/bin/python scripts/bench.py caption --rows 20
    .venv/bin/python scripts/bench.py memory --memory-rows 200
    .venv/bin/python scripts/bench.py references --memory-rows 2000 [--code DIR]
    .venv/bin/python scripts/bench.py overlap --rows 60
    .venv/bin/python scripts/bench.py all --write docs/benchmarks.md
    .venv/bin/python scripts/bench.py anchor --images 12 --repeat 3
    .venv/bin/python scripts/bench.py steady --rows 40 --repeat 3 [--code DIR]
    .venv/bin/python scripts/bench.py ray --rows 1000 --repeat 3 [--code DIR] [--replicas N]
    .venv/bin/python scripts/bench.py coldstart --repeat 5 [--code DIR] [--write FILE]
    .venv/bin/python scripts/bench.py visualize-small --rows 600 --repeat 5 [--code DIR] [--parts]

anchor: DataFlow-MM's own region-caption preparation (its operator's steps,
written out below from its published code: OpenCV decode for the size, a second
full-resolution decode, darkening, boxes and labels, full-resolution JPEG
write; then qwen-vl-utils' default pixel budget into the Qwen2-VL image
processor) against regioncap's visualize stage plus loading its marked image
into the processor at the model's budget, and against the floor (draft decode
+ resize + encode, then the processor), on camera-like JPEGs (8-12 MP, sensor
noise and texture). Measured through to ``pixel_values``: CPU seconds per
image (median of interleaved rounds) and visual tokens per image.

visualize: regioncap's visualize stage (decode with JPEG draft mode, resize to
the model's pixel budget, validate boxes, draw marks, encode, write records)
against
  - naive: the DataFlow-MM way: full-resolution decode, marks drawn at full
    resolution, full-resolution JPEG encode;
  - floor: decode + resize + encode at the model's input size and nothing else;
and the same stage on N preparation worker processes (``workers=N``) against
``workers=0`` (everything in the main process, one core).

visualize-small: the visualize stage (``workers=0``, the default ``model=shapes``) on
``--rows`` generated 224x224 shapes scenes (``regioncap.shapes``, JPEG) against a
plain Pillow floor in the same rounds: per row, open the file, draw the numbered
boxes with ``ImageDraw``, save a JPEG. CPU seconds of this process per row
(median of interleaved rounds) and their ratio stage/floor: what the stage's own
bookkeeping (config, records, prompts, file names) costs where images are small.
``--code DIR`` measures the regioncap package (and configs) of another checkout.

overlap: both stages in one streaming run (the tiny model's transformers engine
captions a batch while a worker prepares the next rows) against the two stages
run separately: end-to-end time over (visualize time + caption time), next to
the ideal max/sum.

memory: peak RSS of a whole run at 10x the rows over 1x (streaming: flat), for
the main process and for the sum over it and its preparation workers.

references: the same with references scored (the shipped shapes scenes and their
reference captions, cycled): peak RSS of the main process at 10x the rows over
1x; ``--code DIR`` measures another checkout's package beside this one (the
baseline) and says whether the two wrote the same scores.

caption: the caption stage's framework overhead with the offline tiny model and
the transformers engine on the CPU: the stage's wall time over the time of the
same engine calls made directly on the same prepared requests.

steady: the caption stage's regions/s of the shipped default run (model=shapes,
data=shapes: 8 scenes) against the same run on ``--rows`` generated scenes, each
a whole ``python -m regioncap`` (engine start-up included), the sizes
interleaved round by round: the ratio of the medians, for the steady rate
(``stages.caption.regions_per_s``) and for the all-in rate (captioned regions
over the stage's seconds); near 1 means the rate does not depend on how many
rows share the start-up. ``--code DIR`` runs the regioncap package of another
checkout (an older commit: only the all-in rate).

ray: the caption stage alone (``stages=[caption]``, fake engine) on ``--rows``
demo rows with ``executor=local`` and with ``executor=ray`` (a local cluster
per run, 2 CPUs, ``--replicas`` replicas), each a whole ``python -m regioncap``,
interleaved round by round: the stage's seconds, the Ray cluster's start-up
(the seconds inside ``ray.init``) apart, and the ratio of the medians, Ray
(without its cluster's start-up) over local. ``--code DIR`` interleaves the
same runs of another checkout (the code before a change).
coldstart: the shipped default run (``python -m regioncap``, a fresh run dir
each time) against the import floor ``python -c "import torch, transformers"``,
interleaved round by round, median wall and CPU seconds of ``--repeat`` rounds;
quiet (the machine as it is: the load average is printed with the figures) and
busy (``--busy`` CPU-burning processes beside it, started and killed by the
script). ``--code DIR`` adds the default run of another checkout's package to
the same rounds (before/after). ``--write FILE`` writes its Markdown section.

Nothing here is asserted in tests; results are ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def make_dataset(folder: Path, rows: int, megapixels: float = 10.0) -> Path:
    """Large JPEG photos (bundled photos upscaled to ~10 MP) with 5 boxes each."""
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    try:  # matplotlib's bundled photo, when matplotlib is there
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            sources.append(np.asarray(Image.open(fh).convert("RGB")))
    except Exception:  # noqa: BLE001 - four sources are enough
        pass
    lines = []
    for i in range(rows):
        src = Image.fromarray(sources[i % len(sources)])
        scale = (megapixels * 1e6 / (src.width * src.height)) ** 0.5
        w, h = int(src.width * scale), int(src.height * scale)
        path = folder / f"img{i % len(sources)}.jpg"
        if not path.exists():
            src.resize((w, h), Image.BICUBIC).save(path, quality=90)
        boxes = [[w * (0.05 + 0.18 * k), h * (0.1 + 0.15 * k), w * 0.15, h * 0.2] for k in range(5)]
        lines.append(json.dumps({"id": f"r{i}", "image": path.name, "bbox": [[round(v, 1) for v in b] for b in boxes]}))
    data = folder / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


#: Camera sensor sizes (8 to 12 MP), landscape and portrait.
CAMERA_SIZES = [(4000, 3000), (3264, 2448), (3648, 2736), (4032, 3024), (3024, 4032), (2448, 3264)]


def make_camera_dataset(folder: Path, images: int, seed: int = 0, boxes: int = 5, rows: int | None = None) -> Path:
    """Camera-like JPEGs (8-12 MP): a scene layout, mid-scale texture, fine detail and sensor noise.

    Upscaled smooth photos decode and encode far faster than real camera files
    (JPEG entropy coding dominates, and it grows with detail and noise), which
    flatters any full-resolution path; these files cost what camera files cost
    (about 3-6 MB each at quality 92, 4:2:0). ``rows`` (default ``images``) rows
    cycle over the ``images`` files.
    """
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(images):
        w, h = CAMERA_SIZES[i % len(CAMERA_SIZES)]
        path = folder / f"cam{i}.jpg"
        if not path.exists():
            layout = cv2.resize(rng.uniform(30, 225, (6, 8, 3)).astype(np.float32), (w, h),
                                interpolation=cv2.INTER_CUBIC)
            texture = cv2.resize(rng.normal(0, 22, (h // 16, w // 16, 3)).astype(np.float32), (w, h),
                                 interpolation=cv2.INTER_LINEAR)
            detail = cv2.resize(rng.normal(0, 10, (h // 2, w // 2, 3)).astype(np.float32), (w, h),
                                interpolation=cv2.INTER_LINEAR)
            noise = rng.normal(0, 3.5, (h, w, 3)).astype(np.float32)
            pixels = np.clip(layout + texture + detail + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=92)
    for r in range(rows or images):
        w, h = CAMERA_SIZES[(r % images) % len(CAMERA_SIZES)]
        bxs = [[round(w * (0.05 + 0.17 * k), 1), round(h * (0.08 + 0.16 * k), 1), round(w * 0.15, 1),
                round(h * 0.2, 1)] for k in range(boxes)]
        lines.append(json.dumps({"id": f"r{r}", "image": f"cam{r % images}.jpg", "bbox": bxs}))
    data = folder / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


# DataFlow-MM's operator, step by step, written from its published algorithm:
# OpenDCAI/DataFlow-MM, dataflow/operators/core_vision/generate/image_bbox_generator.py
# (ImageBboxGenerator.run and paint_text_box) at commit 34f3ad7ae38bd5a08243d4bd51e33f616e17b0ec, and
# dataflow/operators/core_vision/generate/image_region_caption_generator.py
# (ImageRegionCaptionGenerate.run: the same drawing, then qwen_vl_utils.process_vision_info on the
# marked file) at commit 8956b95202b303e0e0c60e61bbfa0de081eb59e8. Per row it:
#   1. decodes the source at full resolution with OpenCV only to read its height and width;
#   2. decodes it again at full resolution to draw on;
#   3. darkens the whole image to 80% (a weighted sum with a black image);
#   4. per box (x, y, w, h, cast to int): a green 2-px rectangle, then a filled black label
#      background and the 1-based number in white (Hershey simplex, scale 0.65, thickness 2) at
#      (x + 4, y + 20);
#   5. writes the marked image at full resolution as JPEG (OpenCV's default quality, 95);
#   6. (caption operator) qwen-vl-utils opens that file with PIL and resizes it to its default
#      budget (at most 16384 visual tokens, 12,845,056 px), which the Qwen2-VL processor turns into
#      pixel_values.
# No code is copied; the steps and their parameters are.
DATAFLOW_MAX_PIXELS = 16384 * 28 * 28


def dataflow_mm_marked(source: str, boxes: Sequence[Sequence[float]], out_path: str) -> str:
    """Steps 1-5 above for one row; returns the marked file's path."""
    import cv2

    probe = cv2.imread(source)  # step 1: full decode, used for its size only
    height, width = probe.shape[:2]
    del probe
    canvas = cv2.imread(source)  # step 2
    canvas = cv2.addWeighted(canvas, 0.8, np.zeros_like(canvas), 0.2, 0)  # step 3
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.65, 2
    for number, (x, y, bw, bh) in enumerate(boxes, start=1):  # step 4
        x, y, bw, bh = int(x), int(y), int(bw), int(bh)
        cv2.rectangle(canvas, (x, y), (x + bw, y + bh), (0, 255, 0), 2)
        label = str(number)
        (tw, th), base = cv2.getTextSize(label, font, scale, thick)
        lx, ly = x + 4, y + 20
        cv2.rectangle(canvas, (lx, ly - th - base), (lx + tw, ly + base), (0, 0, 0), -1)
        cv2.putText(canvas, label, (lx, ly), font, scale, (255, 255, 255), thick)
    assert width > 0 and height > 0  # the size feeds its normalised boxes (negligible work)
    cv2.imwrite(out_path, canvas)  # step 5
    return out_path


def dataflow_mm_visualize(data: Path, out: Path) -> List[str]:
    """DataFlow-MM's visualize step over every row of ``data``; the marked files' paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        paths.append(dataflow_mm_marked(str(data.parent / row["image"]), row["bbox"][:10],
                                        str(out / f"{i + 1}_bbox_vis.jpg")))
    return paths


def dataflow_mm_inputs(marked: Sequence[str], processor: object) -> List[int]:
    """Step 6: qwen-vl-utils' default budget, then the image processor; visual tokens per image."""
    from qwen_vl_utils import process_vision_info

    tokens = []
    for path in marked:
        messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "x"}]}]
        images = process_vision_info(messages)[0]
        out = processor(images=images, return_tensors="pt")
        tokens.append(int(np.prod(out["image_grid_thw"][0].tolist())) // 4)
    return tokens


def processor_inputs(paths: Sequence[Path], processor: object) -> List[int]:
    """Open each (already model-sized) image with PIL and run the image processor; visual tokens per image."""
    tokens = []
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        out = processor(images=[image], return_tensors="pt")
        tokens.append(int(np.prod(out["image_grid_thw"][0].tolist())) // 4)
    return tokens


def image_processor(min_pixels: int, max_pixels: int) -> object:
    """The Qwen2.5-VL image processor as transformers loads it from the published preprocessor config."""
    from transformers import AutoImageProcessor

    from regioncap.random_weights import ARCHS_DIR

    proc = AutoImageProcessor.from_pretrained(ARCHS_DIR / "qwen2_5_vl_3b")
    proc.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if hasattr(proc, "min_pixels"):
        proc.min_pixels, proc.max_pixels = min_pixels, max_pixels
    return proc


def bench_anchor(images: int, repeat: int, work: Path, model: str = "qwen25vl_3b") -> Dict[str, object]:
    """DataFlow-MM's operator vs regioncap vs the floor, through to pixel_values, on camera-like JPEGs."""
    from conftest import typed as compose  # composed, then typed as a job types it
    from regioncap.records import read_jsonl
    from regioncap.run import RegionCapRun

    data = make_camera_dataset(work / "camera", images)
    cfg = compose([f"model={model}", "engine=fake", "stages=[visualize]", "progress=false", "data=jsonl",
                   f"data.path={data}", "workers=0"], output_dir=work / "anchor-regioncap")
    mn, mx = int(cfg.model.min_pixels), int(cfg.model.max_pixels)
    ours_proc, df_proc = image_processor(mn, mx), image_processor(3136, DATAFLOW_MAX_PIXELS)
    marked: Dict[str, List[str]] = {}
    tokens: Dict[str, List[int]] = {}

    def df_vis() -> None:
        marked["dataflow"] = dataflow_mm_visualize(data, work / "anchor-dataflow")

    def df_input() -> None:
        tokens["dataflow"] = dataflow_mm_inputs(marked["dataflow"], df_proc)

    def rc_vis() -> None:
        RegionCapRun(cfg).visualize()

    def rc_input() -> None:
        out = Path(cfg.output_dir)
        paths = [out / req["image"] for rec in read_jsonl(out / "visualize.jsonl")
                 for req in rec.get("requests") or []]
        tokens["regioncap"] = processor_inputs(paths, ours_proc)

    def floor_vis() -> None:
        floor_visualize(data, work / "anchor-floor", mn, mx)

    def floor_input() -> None:
        tokens["floor"] = processor_inputs(sorted((work / "anchor-floor").glob("*.jpg")), ours_proc)

    fns = {"dataflow_visualize": df_vis, "dataflow_input": df_input, "regioncap_visualize": rc_vis,
           "regioncap_input": rc_input, "floor_visualize": floor_vis, "floor_input": floor_input}
    cpu: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            c0 = time.process_time()
            fn()
            cpu[name].append((time.process_time() - c0) / images)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    total = {k: med[f"{k}_visualize"] + med[f"{k}_input"] for k in ("dataflow", "regioncap", "floor")}
    mp = [w * h / 1e6 for w, h in (Image.open(p).size for p in sorted((work / "camera").glob("cam*.jpg")))]
    mb = [p.stat().st_size / 1e6 for p in sorted((work / "camera").glob("cam*.jpg"))]
    return {
        "images": images, "rounds": repeat, "boxes_per_image": 5, "model_budget": f"{mn}..{mx} px ({model})",
        "dataflow_max_pixels": DATAFLOW_MAX_PIXELS, "source_megapixels": [round(min(mp), 1), round(max(mp), 1)],
        "source_file_mb_median": round(statistics.median(mb), 2),
        "cpu_s_per_image": {k: round(v, 4) for k, v in med.items()},
        "cpu_s_per_image_total": {k: round(v, 4) for k, v in total.items()},
        "regioncap_cpu_speedup_vs_dataflow": round(total["dataflow"] / total["regioncap"], 2),
        "regioncap_over_floor": round(total["regioncap"] / total["floor"], 2),
        "visual_tokens_median": {k: int(statistics.median(v)) for k, v in tokens.items()},
    }


def naive_visualize(data: Path, out: Path) -> List[Dict[str, object]]:
    """DataFlow-MM-like: draw on the full-resolution image and write it at full resolution.

    Returns ``{"image", "regions"}`` per row (``scripts/bench_gpu.py`` captions them).
    """
    from PIL import ImageOps

    out.mkdir(parents=True, exist_ok=True)
    items: List[Dict[str, object]] = []
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        img = ImageOps.exif_transpose(Image.open(data.parent / row["image"])).convert("RGB")
        draw = ImageDraw.Draw(img)
        lw = max(2, int(min(img.size) * 0.008))
        for k, (x, y, w, h) in enumerate(row["bbox"]):
            draw.rectangle([x, y, x + w, y + h], outline=(230, 25, 75), width=lw)
            draw.text((x + lw, y + lw), f"<region{k + 1}>", fill=(255, 255, 255))
        path = out / f"{i}_bbox_vis.jpg"
        img.save(path, quality=95)
        items.append({"image": str(path), "regions": len(row["bbox"])})
    return items


def floor_visualize(data: Path, out: Path, min_pixels: int, max_pixels: int) -> None:
    """The least any approach must do: decode (draft), resize to the model's size, encode."""
    from regioncap.families.qwen import smart_resize
    from regioncap.images import load_image, resize_to, save_image

    out.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        budget = lambda w, h: smart_resize(w, h, min_pixels=min_pixels, max_pixels=max_pixels)  # noqa: E731
        loaded = load_image(str(data.parent / row["image"]), draft_target=budget)
        size = budget(*loaded.original_size)
        save_image(resize_to(loaded.image, size), out / f"{i}.jpg")


#: CPU seconds of this process per function, from the last call of :func:`timed`.
CPU_TIMES: Dict[str, float] = {}


def timed(fns: Dict[str, Callable[[], object]], repeat: int) -> Dict[str, float]:
    """Median wall time of each function over ``repeat`` rounds, the functions
    interleaved within each round so drift in machine load hits all alike.
    The median CPU time of this process goes to ``CPU_TIMES`` (on a loaded
    machine it compares one-process work more steadily than wall time)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    CPU_TIMES.clear()
    CPU_TIMES.update({name: statistics.median(ts) for name, ts in cpu.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_visualize(rows: int, repeat: int, work: Path, model: str = "qwen25vl_3b",
                    workers: Sequence[int] = (1, 2)) -> Dict[str, object]:
    """The visualize stage in the main process (``workers=0``: one core), against naive and floor,
    and on N worker processes against ``workers=0``; all interleaved in the same rounds."""
    from conftest import typed as compose  # composed, then typed as a job types it
    from regioncap.run import RegionCapRun

    data = make_dataset(work / "data", rows)
    overrides = [f"model={model}", "engine=fake", "stages=[visualize]", "progress=false",
                 "data=jsonl", f"data.path={data}"]
    cfgs = {n: compose([*overrides, f"workers={n}"], output_dir=work / f"regioncap-{model}-w{n}") for n in (0, *workers)}
    cfg = cfgs[0]
    mn, mx = int(cfg.model.min_pixels), int(cfg.model.max_pixels)

    def ours(n: int) -> Callable[[], None]:
        return lambda: RegionCapRun(cfgs[n]).visualize()

    fns: Dict[str, Callable[[], object]] = {"ours": ours(0), "naive": lambda: naive_visualize(data, work / "naive"),
                                            "floor": lambda: floor_visualize(data, work / "floor", mn, mx)}
    fns.update({f"workers={n}": ours(n) for n in workers})
    t = timed(fns, repeat)
    t_ours, t_naive, t_floor = t["ours"], t["naive"], t["floor"]
    return {
        "rows": rows, "source_megapixels": 10, "model_budget": f"{mn}..{mx} px ({model})",
        "regioncap_images_per_s": rows / t_ours, "naive_images_per_s": rows / t_naive,
        "floor_images_per_s": rows / t_floor,
        "speedup_vs_naive": t_naive / t_ours, "time_over_floor": t_ours / t_floor,
        "cpu_speedup_vs_naive": CPU_TIMES["naive"] / CPU_TIMES["ours"],
        "cpu_time_over_floor": CPU_TIMES["ours"] / CPU_TIMES["floor"],
        "workers": {n: {"images_per_s": rows / t[f"workers={n}"], "speedup": t_ours / t[f"workers={n}"]}
                    for n in workers},
    }


def pillow_floor(data: Path, out: Path, quality: int) -> None:
    """Per row of ``data`` (a shapes JSONL, xywh boxes): open, draw the numbered boxes, save a JPEG."""
    out.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        with Image.open(data.parent / row["image"]) as im:
            img = im.convert("RGB")
        draw = ImageDraw.Draw(img)
        for n, (x, y, w, h) in enumerate(row["bbox"], 1):
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline="red", width=2)
            draw.text((x + 2, y + 2), str(n), fill="white")
        img.save(out / f"{i:07d}.jpg", format="JPEG", quality=quality)


def bench_visualize_small(rows: int, repeat: int, work: Path, parts: bool = False) -> Dict[str, object]:
    """The visualize stage (``workers=0``) on ``rows`` 224 px shapes scenes against :func:`pillow_floor`:
    CPU seconds per row, median of interleaved rounds. ``parts``: also both with their image writes
    left out (the file system's cost of creating a file moves with the machine's I/O, in both alike)."""
    import shutil

    from conftest import typed as compose  # composed, then typed as a job types it
    from regioncap import shapes
    from regioncap.run import RegionCapRun

    data = shapes.write_dataset(work / "small-data", rows, seed=0, prefix="shapes", image_format="jpeg")
    out = work / "small-stage"
    cfg = compose(["engine=fake", "stages=[visualize]", "progress=false", "workers=0", "data=jsonl",
                   f"data.path={data}", "data.bbox_format=xywh"], output_dir=out)
    quality = int(cfg.draw.jpeg_quality)

    def stage() -> None:
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each round, not a resume with nothing to do
        RegionCapRun(cfg).visualize()

    def floor() -> None:
        shutil.rmtree(work / "small-floor", ignore_errors=True)
        pillow_floor(data, work / "small-floor", quality)

    fns: Dict[str, Callable[[], object]] = {"stage": stage, "floor": floor}
    if parts:
        import regioncap.stages.visualize as visualize

        def unwritten(fn: Callable[[], None], owner: Any, name: str) -> Callable[[], None]:
            def run() -> None:
                real = getattr(owner, name)
                setattr(owner, name, lambda *a, **k: None)
                try:
                    fn()
                finally:
                    setattr(owner, name, real)
            return run

        fns.update({"stage_unwritten": unwritten(stage, visualize, "save_image"),
                    "floor_unwritten": unwritten(floor, Image.Image, "save")})
    timed(fns, repeat)
    ms = {name: CPU_TIMES[name] / rows * 1e3 for name in fns}
    import regioncap

    out: Dict[str, object] = {
        "rows": rows, "rounds": repeat, "code": str(Path(regioncap.__file__).parent.parent),
        "stage_cpu_ms_per_row": round(ms["stage"], 3), "floor_cpu_ms_per_row": round(ms["floor"], 3),
        "stage_over_floor": round(ms["stage"] / ms["floor"], 3)}
    if parts:
        out.update({"unwritten_stage_cpu_ms_per_row": round(ms["stage_unwritten"], 3),
                    "unwritten_floor_cpu_ms_per_row": round(ms["floor_unwritten"], 3),
                    "unwritten_stage_over_floor": round(ms["stage_unwritten"] / ms["floor_unwritten"], 3),
                    "write_stage_over_floor": round((ms["stage"] - ms["stage_unwritten"])
                                                    / (ms["floor"] - ms["floor_unwritten"]), 3)})
    return out


def bench_overlap(rows: int, repeat: int, work: Path, torch_threads: int = 1, commit_every: int = 8
                  ) -> Dict[str, object]:
    """End-to-end time of one streaming run over the two stages' times measured separately.

    The tiny model's transformers engine on the CPU, built once and shared by
    every run (its load time is in none of them), torch on ``torch_threads``
    threads so the engine and the one preparation worker each have a core, as
    with an engine on a GPU. Images: the large JPEGs at the tiny model's budget.
    ``commit_every`` equals the engine's batch size (8), so the engine gets its
    first rows after one batch's worth, not after the default 32.
    """
    import torch

    from conftest import typed as compose  # composed, then typed as a job types it
    from regioncap.engines import build_engine
    from regioncap.executors.local import LocalExecutor
    from regioncap.run import RegionCapRun
    from regioncap.tiny import build_tiny_model

    torch.set_num_threads(torch_threads)
    model_dir = build_tiny_model(work / "tiny")
    data = make_dataset(work / "data", rows)
    base = ["progress=false", f"model.path={model_dir}", "engine.device=cpu", "data=jsonl", f"data.path={data}",
            "sampling.max_tokens=32", "prompt.reask_missing=false", "workers=1", f"commit_every={commit_every}"]
    engine_holder: Dict[str, object] = {}
    counter = iter(range(10 ** 6))

    def run(stages: str, out: Path) -> None:
        cfg = compose([*base, f"stages={stages}"], output_dir=out)
        if "engine" not in engine_holder:
            engine_holder["engine"] = build_engine(cfg.engine, cfg.model, str(model_dir))
        # The caption stage in this process, on the shared engine.
        executor = LocalExecutor(cfg, engine=engine_holder["engine"])
        RegionCapRun(cfg, model_path=str(model_dir), executor=executor).run()

    dirs: Dict[str, Path] = {}

    def visualize() -> None:
        dirs["sep"] = work / f"overlap-sep-{next(counter)}"
        run("[visualize]", dirs["sep"])

    def caption() -> None:
        run("[caption]", dirs["sep"])

    def both() -> None:
        run("[visualize,caption]", work / f"overlap-both-{next(counter)}")

    run("[visualize,caption]", work / "overlap-warmup")  # builds the engine, warms caches
    t = timed({"visualize": visualize, "caption": caption, "both": both}, repeat)
    engine_holder["engine"].close()
    t_vis, t_cap, t_both = t["visualize"], t["caption"], t["both"]
    return {"rows": rows, "engine": f"transformers (CPU, {torch_threads} torch thread), tiny model", "workers": 1,
            "commit_every": commit_every,
            "visualize_s": t_vis, "caption_s": t_cap, "both_s": t_both,
            "ratio_to_sum": t_both / (t_vis + t_cap), "ideal_ratio": max(t_vis, t_cap) / (t_vis + t_cap),
            "overlap_gain": (t_vis + t_cap) / t_both}


def write_demo_rows(path: Path, n: int) -> Path:
    """``n`` rows cycling the bundled demo rows (ids ``r0``..., image paths absolute) as JSONL at ``path``."""
    demo = REPO / "regioncap" / "demo" / "demo.jsonl"
    demo_rows = [json.loads(line) for line in demo.read_text().splitlines()]
    with open(path, "w") as fh:
        for i in range(n):
            row = dict(demo_rows[i % len(demo_rows)], id=f"r{i}")
            row["image"] = str(demo.parent / row["image"])
            fh.write(json.dumps(row) + "\n")
    return path


def bench_caption(rows: int, repeat: int, work: Path) -> Dict[str, object]:
    from conftest import typed as compose  # composed, then typed as a job types it
    from regioncap.engines import build_engine
    from regioncap.executors.local import LocalExecutor
    from regioncap.models import resolve_model_path
    from regioncap.record_types import Record
    from regioncap.records import read_jsonl
    from regioncap.run import RegionCapRun
    from regioncap.stages.caption import Captioner
    from regioncap.tiny import build_tiny_model

    model_dir = build_tiny_model(work / "tiny")
    big = write_demo_rows(work / "caption_rows.jsonl", rows)
    # No re-asks: the direct calls make none, so the two sides do the same generation work.
    cfg = compose(["progress=false", f"model.path={model_dir}", "data=jsonl", f"data.path={big}",
                   "sampling.max_tokens=64", "prompt.reask_missing=false"], output_dir=work / "caption")
    model_path = resolve_model_path(cfg.model)
    engine = build_engine(cfg.engine, cfg.model, model_path)
    # The caption stage in this process, on the engine the direct calls use too.
    run = RegionCapRun(cfg, model_path=model_path, executor=LocalExecutor(cfg, engine=engine))
    run.visualize()
    requests = Captioner(cfg, run.out).request  # spec -> engine request, as the caption stage builds it
    engine.generate([requests(s) for s in next(read_jsonl(run.rundir.visualize_file))["requests"]])  # warm-up

    def pipeline() -> None:
        run.caption()

    def direct() -> None:
        # The same requests, in the same batches, straight to the engine.
        specs = [s for rec in read_jsonl(run.rundir.visualize_file) for s in Record.from_dict(rec).requests or []]
        bs = int(cfg.engine.batch_size)
        for i in range(0, len(specs), bs):
            engine.generate([requests(s) for s in specs[i:i + bs]])

    t = timed({"direct": direct, "pipeline": pipeline}, repeat)
    t_direct, t_pipe = t["direct"], t["pipeline"]
    engine.close()
    return {"rows": rows, "engine": "transformers (CPU), tiny model", "pipeline_s": t_pipe, "direct_engine_s": t_direct,
            "overhead_ratio": t_pipe / t_direct}


def _peak_rss_mb(args: List[str], code: Path | None = None) -> float:
    """Peak resident memory (MiB) of one ``python -m regioncap`` process (of the
    regioncap package of the checkout ``code``: default this one).

    Linux keeps a process's ru_maxrss across fork and exec, so a child forked
    from this (large) benchmark process would report at least our own peak:
    a small launcher process starts the run and reports its child's peak.
    """
    import subprocess

    launcher = ("import resource, subprocess, sys; "
                "rc = subprocess.run([sys.executable, '-m', 'regioncap', *sys.argv[1:]], "
                "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
                "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    import os

    env = {**os.environ, "PYTHONPATH": str(code or REPO)}
    out = subprocess.run([sys.executable, "-c", launcher, *args], cwd=str(code or REPO), capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    if out[0] != "0":
        raise RuntimeError(f"regioncap {' '.join(args)} exited {out[0]}")
    return int(out[1]) / 1024.0


def _tree_rss_mb(args: List[str]) -> float:
    """Peak of the summed resident memory (MiB) of a ``python -m regioncap`` run and every process
    it starts (fork server, preparation workers), sampled every 20 ms."""
    import os
    import subprocess

    page = os.sysconf("SC_PAGE_SIZE")
    proc = subprocess.Popen([sys.executable, "-m", "regioncap", *args], cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    peak = 0
    while proc.poll() is None:
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[3]) != proc.pid:  # field 6: session id
                    continue
                with open(f"/proc/{entry}/statm") as fh:
                    total += int(fh.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
        peak = max(peak, total)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"regioncap {' '.join(args)} exited {proc.returncode}")
    return peak / 2 ** 20


def bench_memory(rows: int, work: Path) -> Dict[str, object]:
    """Peak RSS of a whole run at 10x the rows over 1x (both stages, fake engine: the framework's own memory)."""
    peaks, trees = {}, {}
    for n in (rows, 10 * rows):
        data = write_demo_rows(work / f"mem_rows_{n}.jsonl", n)
        args = ["engine=fake", "progress=false", "data=jsonl", f"data.path={data}"]
        peaks[n] = _peak_rss_mb([*args, f"hydra.run.dir={work / f'mem_run_{n}'}"])
        trees[n] = _tree_rss_mb([*args, f"hydra.run.dir={work / f'mem_tree_{n}'}"])
    return {"rows": rows, "peak_rss_mb_1x": peaks[rows], "peak_rss_mb_10x": peaks[10 * rows],
            "ratio": peaks[10 * rows] / peaks[rows], "tree_rss_mb_1x": trees[rows],
            "tree_rss_mb_10x": trees[10 * rows], "tree_ratio": trees[10 * rows] / trees[rows]}


def bench_references(rows: int, work: Path, code: Path | None = None) -> Dict[str, object]:
    """Peak RSS of a whole run with references scored at 10x the rows over 1x: the shipped
    shapes scenes (each with its reference captions) cycled to ``rows`` and ``10 * rows``
    rows, fake engine, both stages; with ``code``, the same runs of another checkout's
    package too (the baseline), and whether its ``metrics.json`` scores are the same."""
    demo = REPO / "regioncap" / "demo" / "shapes" / "shapes.jsonl"
    scenes = [json.loads(line) for line in demo.read_text().splitlines()]
    builds = {"this": None, **({"baseline": code} if code else {})}
    out: Dict[str, object] = {"rows": rows, "regions_per_row": sum(len(s["bbox"]) for s in scenes) / len(scenes)}
    scores: Dict[str, Dict[int, object]] = {name: {} for name in builds}
    for n in (rows, 10 * rows):
        data = work / f"ref_rows_{n}.jsonl"
        with open(data, "w") as fh:
            for i in range(n):
                fh.write(json.dumps(dict(scenes[i % len(scenes)], id=f"r{i}",
                                         image=str(demo.parent / scenes[i % len(scenes)]["image"]))) + "\n")
        for name, checkout in builds.items():
            run = work / f"ref_run_{name}_{n}"
            peak = _peak_rss_mb(["engine=fake", "progress=false", "data=jsonl", f"data.path={data}",
                                 "data.bbox_format=xywh", "data.references_key=references", f"hydra.run.dir={run}"],
                                checkout)
            refs = json.loads((run / "metrics.json").read_text())["references"]
            scores[name][n] = {k: v for k, v in refs.items() if not k.startswith("scoring")}
            out[f"{name}_peak_rss_mb_{n}"] = peak
            print(json.dumps({"build": name, "rows": n, "peak_rss_mb": peak}), flush=True)
    for name in builds:
        out[f"{name}_ratio"] = out[f"{name}_peak_rss_mb_{10 * rows}"] / out[f"{name}_peak_rss_mb_{rows}"]
    if code:
        out["same_scores"] = scores["this"] == scores["baseline"]
    return out


def environment() -> Dict[str, str]:
    import importlib.metadata as md

    def v(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "pillow": v("pillow"), "torch": v("torch"), "transformers": v("transformers")}


def to_markdown(results: Dict[str, Dict[str, object]], env: Dict[str, str], note: str = "") -> str:
    lines = ["# Benchmarks", "",
             "Measured by `scripts/bench.py`; every ratio compares numbers taken in the same run on the same machine.",
             f"Machine: {env['cpu']}, {env['cores']} cores, no GPU. Python {env['python']}, Pillow {env['pillow']}, "
             f"torch {env['torch']}, transformers {env['transformers']}.", ""]
    if note:
        lines += [note, ""]
    for key in [k for k in results if k.startswith("visualize/")]:
        r = results[key]
        lines += [f"## Visualize stage, {key.split('/')[1]} budget", "",
                  f"{r['rows']} rows of ~{r['source_megapixels']} MP JPEGs with 5 boxes each, model budget "
                  f"{r['model_budget']}. The first three lines run in one process (`workers=0`).", "",
                  "| what | images/s | ratio |", "|---|---|---|",
                  f"| regioncap visualize stage, `workers=0` | {r['regioncap_images_per_s']:.2f} | 1.00 |",
                  f"| naive (full-res decode, draw, encode; DataFlow-MM's way) | {r['naive_images_per_s']:.2f} | "
                  f"regioncap is {r['speedup_vs_naive']:.2f}x faster (target >= 3x) |",
                  f"| floor (draft decode + resize + encode only) | {r['floor_images_per_s']:.2f} | "
                  f"regioncap takes {r['time_over_floor']:.2f}x the floor's time (target <= 1.3x) |",
                  f"| same, in CPU seconds of the process (steadier on a loaded machine) | | regioncap is "
                  f"{r['cpu_speedup_vs_naive']:.2f}x faster than naive, {r['cpu_time_over_floor']:.2f}x the floor |"]
        for n, w in (r.get("workers") or {}).items():
            lines.append(f"| regioncap, `workers={n}` (N={n} worker processes) | {w['images_per_s']:.2f} | "
                         f"{w['speedup']:.2f}x `workers=0` (target >= {0.8 * int(n):.1f}x) |")
        lines.append("")
    if "anchor" in results:
        r = results["anchor"]
        c, t, v = r["cpu_s_per_image"], r["cpu_s_per_image_total"], r["visual_tokens_median"]
        lines += ["## Against DataFlow-MM's own operator, through to `pixel_values`", "",
                  f"{r['images']} camera-like JPEGs ({r['source_megapixels'][0]}-{r['source_megapixels'][1]} MP, "
                  f"median {r['source_file_mb_median']} MB), {r['boxes_per_image']} boxes each; CPU seconds of the "
                  f"process per image, median of {r['rounds']} interleaved rounds. regioncap and the floor at "
                  f"{r['model_budget']}; DataFlow-MM at qwen-vl-utils' default budget ({r['dataflow_max_pixels']} px).",
                  "", "| per image | DataFlow-MM | regioncap | floor |", "|---|---|---|---|",
                  f"| visualize (marked image written), CPU s | {c['dataflow_visualize']:.3f} | "
                  f"{c['regioncap_visualize']:.3f} | {c['floor_visualize']:.3f} |",
                  f"| marked image -> `pixel_values` (load + resize + image processor), CPU s | "
                  f"{c['dataflow_input']:.3f} | {c['regioncap_input']:.3f} | {c['floor_input']:.3f} |",
                  f"| file on disk -> `pixel_values`, CPU s | {t['dataflow']:.3f} | {t['regioncap']:.3f} | "
                  f"{t['floor']:.3f} |",
                  f"| visual tokens per image (median) | {v.get('dataflow', 0):,} | {v.get('regioncap', 0):,} | "
                  f"{v.get('floor', 0):,} |", "",
                  f"regioncap spends {r['regioncap_cpu_speedup_vs_dataflow']:.2f}x less CPU than DataFlow-MM from "
                  f"file to `pixel_values`, {r['regioncap_over_floor']:.2f}x the floor's.", ""]
    if "overlap" in results:
        r = results["overlap"]
        lines += ["## Overlap of the stages", "",
                  f"{r['rows']} rows of ~10 MP JPEGs at the tiny model's budget, {r['engine']}, "
                  f"`workers={r['workers']}`, `commit_every={r['commit_every']}` (the engine's batch size), "
                  "`sampling.max_tokens=32`, re-asks off; the engine is built once and "
                  "shared by every run, so no time below holds its loading.", "",
                  "| what | seconds |", "|---|---|",
                  f"| visualize stage alone (`stages=[visualize]`) | {r['visualize_s']:.2f} |",
                  f"| caption stage alone (`stages=[caption]`) | {r['caption_s']:.2f} |",
                  f"| both stages in one streaming run | {r['both_s']:.2f} |",
                  f"| end to end / (visualize + caption) | {r['ratio_to_sum']:.3f} |",
                  f"| ideal: max / (visualize + caption) | {r['ideal_ratio']:.3f} |", ""]
    if "caption" in results:
        r = results["caption"]
        lines += ["## Caption stage framework overhead", "",
                  f"{r['rows']} demo rows, {r['engine']}, `sampling.max_tokens=64`, re-asks off "
                  "(the direct calls make none).", "",
                  "| what | seconds |", "|---|---|",
                  f"| engine calls made directly on the prepared requests | {r['direct_engine_s']:.2f} |",
                  f"| the caption stage (read records, build requests, generate, parse, write) | {r['pipeline_s']:.2f} |",
                  f"| ratio (target <= 1.10) | {r['overhead_ratio']:.3f} |", ""]
    if "references" in results:
        r = results["references"]
        n = r["rows"]
        lines += ["## Memory with references", "",
                  f"Peak RSS of the main process (`ru_maxrss`) of a whole `python -m regioncap` run that scores "
                  f"references (BLEU-1..4, ROUGE-L, CIDEr-D, exact match, attribute accuracy, the bootstrap "
                  f"intervals; fake engine, both stages, report included) on the shipped shapes scenes cycled to "
                  f"{n} and {10 * n} rows ({r['regions_per_row']:.2f} regions per row).", "",
                  "| build | peak RSS (MiB), " + f"{n} rows | {10 * n} rows | ratio |", "|---|---|---|---|"]
        for name in ("baseline", "this"):
            if f"{name}_ratio" in r:
                lines.append(f"| {name} | {r[f'{name}_peak_rss_mb_{n}']:.0f} | {r[f'{name}_peak_rss_mb_{10 * n}']:.0f} "
                             f"| {r[f'{name}_ratio']:.3f} |")
        if "same_scores" in r:
            lines += ["", f"Same `metrics.json` reference scores in both builds: {r['same_scores']}."]
        lines.append("")
    if "memory" in results:
        r = results["memory"]
        lines += ["## Memory", "",
                  f"Peak RSS of a whole `python -m regioncap` run (both stages overlapped, the pool on with its "
                  f"default workers, fake engine, report and metrics included) on {r['rows']} and "
                  f"{10 * r['rows']} demo rows: the main process's own peak (`ru_maxrss`), and the peak of the "
                  "summed RSS of the main process, the fork server and the workers (sampled every 20 ms).", "",
                  "| rows | main process peak RSS (MiB) | all processes, peak of the sum (MiB) |", "|---|---|---|",
                  f"| {r['rows']} | {r['peak_rss_mb_1x']:.0f} | {r['tree_rss_mb_1x']:.0f} |",
                  f"| {10 * r['rows']} | {r['peak_rss_mb_10x']:.0f} | {r['tree_rss_mb_10x']:.0f} |",
                  f"| ratio (target <= 1.2) | {r['ratio']:.3f} | {r['tree_ratio']:.3f} |", ""]
    return "\n".join(lines)


def bench_steady(rows: int, repeat: int, work: Path, code: Path | None = None) -> Dict[str, object]:
    """Caption regions/s of the default run (8 scenes) and of ``rows`` generated scenes, ``repeat`` rounds."""
    import os
    import subprocess

    from regioncap import shapes

    data = shapes.write_dataset(work / "steady-data", rows, seed=0, prefix="shapes", image_format="jpeg")
    sizes = {"8": [], str(rows): [data]}
    env = {**os.environ, "PYTHONPATH": str(code or REPO)}
    runs: Dict[str, List[Dict[str, object]]] = {size: [] for size in sizes}
    for round_ in range(repeat):
        for size, data_args in sizes.items():
            out = work / f"steady-{size}-{round_}"
            extra = ["data=jsonl", f"data.path={data_args[0]}", "data.bbox_format=xywh",
                     "data.references_key=references"] if data_args else []
            subprocess.run([sys.executable, "-m", "regioncap", "progress=false", *extra, f"hydra.run.dir={out}"],
                           cwd=str(work), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            m = json.loads((out / "metrics.json").read_text())
            cap = m["stages"]["caption"]
            run = {"rows": cap["rows"], "regions": m["regions_captioned"], "seconds": cap["seconds"],
                   "all_in_regions_per_s": m["regions_captioned"] / cap["seconds"],
                   "steady_regions_per_s": cap["regions_per_s"] if "steady" in cap else None,
                   "startup": cap.get("startup"), "steady": cap.get("steady"),
                   "latency_p50_s": (m.get("latency_s") or {}).get("p50")}
            runs[size].append(run)
            print(json.dumps({"size": size, "round": round_, **run}), flush=True)

    def median(size: str, key: str) -> float | None:
        values = [r[key] for r in runs[size] if r[key] is not None]
        return statistics.median(values) if values else None

    out: Dict[str, object] = {"rows": rows, "repeat": repeat, "runs": runs}
    for key in ("all_in_regions_per_s", "steady_regions_per_s"):
        small, large = median("8", key), median(str(rows), key)
        out[key] = {"8": small, str(rows): large, "ratio": large / small if small and large else None}
    return out


#: Runs ``python -m regioncap`` with ``ray.init`` timed: its seconds (the Ray cluster's start-up,
#: measured the same way for any checkout) go to the file named by the first argument.
_TIMED_RAY_INIT = """
import runpy, sys, time
out, sys.argv = sys.argv[1], ["regioncap", *sys.argv[2:]]
if any(a == "executor=ray" for a in sys.argv):
    import ray
    init = ray.init
    def timed_init(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return init(*args, **kwargs)
        finally:
            with open(out, "a") as fh:
                fh.write(f"{time.perf_counter() - t0}\\n")
    ray.init = timed_init
runpy.run_module("regioncap", run_name="__main__", alter_sys=True)
"""


def bench_ray(rows: int, repeat: int, work: Path, code: Path | None = None, replicas: int = 1) -> Dict[str, object]:
    """The caption stage with ``executor=local`` and with ``executor=ray`` on the same rows (fake engine).

    The visualize stage runs once; then each round runs the caption stage alone
    (``stages=[caption]``) in a fresh run dir holding that ``visualize.jsonl``,
    as a whole ``python -m regioncap``, executors interleaved; with ``code``,
    that checkout's runs are interleaved with this one's (before and after).
    Figures per run: the stage's seconds (``stages.caption.seconds``: for Ray
    its cluster's start-up included), the seconds inside ``ray.init`` (the
    cluster's start-up: a local cluster for the run, 2 CPUs), and the stage
    without them; the ratio is of the medians, Ray over local.
    """
    import os
    import subprocess

    data = write_demo_rows(work / "ray_rows.jsonl", rows)
    base = ["engine=fake", "progress=false", "data=jsonl", f"data.path={data}"]
    vis = work / "ray_visualize"
    subprocess.run([sys.executable, "-m", "regioncap", *base, "stages=[visualize]", f"hydra.run.dir={vis}"],
                   cwd=str(REPO), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    executors = {"local": [], "ray": ["executor=ray", "executor.local_num_cpus=2", "executor.object_store_mb=100",
                                      f"executor.num_replicas={replicas}"]}
    codes = {"this": REPO, **({"other": code.resolve()} if code else {})}
    runs: Dict[str, Dict[str, List[Dict[str, float]]]] = {c: {e: [] for e in executors} for c in codes}
    counter = iter(range(10 ** 6))
    for round_ in range(repeat):
        for label, checkout in codes.items():
            for name, args in executors.items():
                out = work / f"ray-{label}-{name}-{next(counter)}"
                out.mkdir()
                for name_ in ("visualize.jsonl", "images"):  # the caption stage reads its marked images here
                    (out / name_).symlink_to(vis / name_)
                timing = work / f"{out.name}.init"
                env = {**os.environ, "PYTHONPATH": str(checkout)}
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", _TIMED_RAY_INIT, str(timing), *base, "stages=[caption]", *args,
                                f"hydra.run.dir={out}"], cwd=str(checkout), env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                stage = json.loads((out / "metrics.json").read_text())["stages"]["caption"]
                init_s = sum(float(x) for x in timing.read_text().split()) if timing.exists() else 0.0
                run = {"stage_s": stage["seconds"], "cluster_start_s": init_s,
                       "stage_without_cluster_s": stage["seconds"] - init_s, "process_wall_s": wall,
                       "replicas_start_s": (stage.get("startup") or {}).get("replicas_start_s")}
                runs[label][name].append(run)
                print(json.dumps({"code": label, "executor": name, "round": round_, **run}), flush=True)

    def median(label: str, name: str, key: str) -> float | None:
        values = [r[key] for r in runs[label][name] if r[key] is not None]
        return statistics.median(values) if values else None

    out: Dict[str, object] = {"rows": rows, "repeat": repeat, "replicas": replicas, "runs": runs}
    for label in codes:
        local = median(label, "local", "stage_s")
        ray_own = median(label, "ray", "stage_without_cluster_s")
        out[label] = {"local_stage_s": local, "ray_stage_s": median(label, "ray", "stage_s"),
                      "ray_cluster_start_s": median(label, "ray", "cluster_start_s"),
                      "ray_stage_without_cluster_s": ray_own,
                      "ray_replicas_start_s": median(label, "ray", "replicas_start_s"),
                      "ratio": ray_own / local if local else None,
                      "ratio_all_in": median(label, "ray", "stage_s") / local if local else None}
    return out


#: The import floor of the cold start (transformers imports its model code lazily: not in it).
IMPORT_FLOOR = "import torch, transformers"
#: What any caller of the default model in transformers imports besides: the model and processor code
#: (transformers' modeling pulls in torchvision, torch._dynamo, torch.distributed.tensor and sympy).
ENGINE_FLOOR = "import torch, transformers; from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration"


def _timed_command(args: List[str], env: Dict[str, str], cwd: Path) -> Tuple[float, float]:
    """Wall and CPU seconds (this process's children: the command and everything it started) of ``args``."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=str(cwd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:  # stopped (Ctrl-C, SIGTERM): leave no run behind
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_coldstart(repeat: int, work: Path, code: Path | None = None, busy: int = 2,
                    modes: Sequence[str] = ("quiet", "busy")) -> Dict[str, object]:
    """The default run (``python -m regioncap``, a fresh run dir each time) against the import floor
    (``python -c "import torch, transformers"``), interleaved round by round, median of ``repeat``;
    ``quiet`` as the machine is, ``busy`` with ``busy`` CPU-burning processes beside it (started and
    killed here). ``code``: also the regioncap package of another checkout (before/after in one run)."""
    import os
    import signal
    import subprocess

    # A SIGTERM unwinds like Ctrl-C, so the burners and the command in flight are killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Bytecode as an installed package has it: pip compiles site-packages at install, and a user's
    # checkout caches regioncap's own on the first run. With PYTHONDONTWRITEBYTECODE set (as some
    # shells and CI set it) every run would compile regioncap's modules from source again (about
    # 0.15 CPU s); the cache goes under the work dir, not into the checkouts.
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    sides: Dict[str, Tuple[List[str], Dict[str, str]]] = {
        "floor": ([sys.executable, "-c", IMPORT_FLOOR], env),
        "engine_floor": ([sys.executable, "-c", ENGINE_FLOOR], env),
        "run": ([sys.executable, "-m", "regioncap", "progress=false"], {**env, "PYTHONPATH": str(REPO)}),
    }
    if code is not None:
        sides["run_code"] = ([sys.executable, "-m", "regioncap", "progress=false"], {**env, "PYTHONPATH": str(code)})
    counter = iter(range(10 ** 6))
    for side, (args, side_env) in sides.items():  # untimed: writes the bytecode of each side
        extra = [f"hydra.run.dir={work / f'coldstart-{next(counter)}'}"] if side.startswith("run") else []
        _timed_command(args + extra, side_env, work)
    out: Dict[str, object] = {"repeat": repeat, "busy_processes": busy, "code": str(code) if code else None,
                              "cores": os.cpu_count()}
    for mode in modes:
        burners = []
        if mode == "busy":
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            load_before = os.getloadavg()[0]
            times: Dict[str, List[Tuple[float, float]]] = {k: [] for k in sides}
            for _ in range(repeat):
                for side, (args, side_env) in sides.items():
                    extra = [f"hydra.run.dir={work / f'coldstart-{next(counter)}'}"] if side.startswith("run") else []
                    times[side].append(_timed_command(args + extra, side_env, work))
                    print(json.dumps({"mode": mode, "side": side, "wall_s": round(times[side][-1][0], 2),
                                      "cpu_s": round(times[side][-1][1], 2)}), flush=True)
            load_after = os.getloadavg()[0]
        finally:
            for proc in burners:
                proc.kill()
                proc.wait()
        med = {side: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for side, v in times.items()}
        floor_wall = med["floor"][0]
        out[mode] = {"load_average_1min": [round(load_before, 2), round(load_after, 2)],
                     **{f"{side}_wall_s": round(w, 2) for side, (w, _) in med.items()},
                     **{f"{side}_cpu_s": round(c, 2) for side, (_, c) in med.items()},
                     **{f"{side}_over_floor": round(w / floor_wall, 2) for side, (w, _) in med.items()
                        if side != "floor"},
                     "walls": {side: [round(w, 2) for w, _ in v] for side, v in times.items()}}
    return out


def coldstart_markdown(r: Dict[str, object]) -> str:
    """The cold start section: wall (and CPU) seconds, medians, ratios to the import floor."""
    code = r.get("code")
    lines = ["## Cold start", "",
             f"The default run (`python -m regioncap progress=false`, a fresh run dir each time) against the "
             f"import floor (`python -c \"{IMPORT_FLOOR}\"`), run one after the other round by round, median of "
             f"{r['repeat']}; busy: {r['busy_processes']} CPU-burning processes beside them "
             f"({r['cores']} cores). Targets: run / floor <= 1.5 quiet, <= 2.0 busy. The engine floor "
             f"(`{ENGINE_FLOOR}`) is what any caller of the default model in transformers imports. "
             f"Bytecode cached (as installed), one untimed round first."
             + (f" `run (before)`: the regioncap package of `{code}`, in the same rounds." if code else ""), "",
             "| machine | load average (1 min, start/end) | floor wall s (CPU s) | engine floor wall s (CPU s) | "
             "run wall s (CPU s) | run / floor | run / engine floor |"
             + (" run (before) wall s (CPU s) | before / floor |" if code else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if code else "")]
    for mode in ("quiet", "busy"):
        m = r.get(mode)
        if not isinstance(m, dict):
            continue
        row = (f"| {mode} | {m['load_average_1min'][0]} / {m['load_average_1min'][1]} | "
               f"{m['floor_wall_s']} ({m['floor_cpu_s']}) | {m['engine_floor_wall_s']} ({m['engine_floor_cpu_s']}) | "
               f"{m['run_wall_s']} ({m['run_cpu_s']}) | "
               f"{m['run_over_floor']} | {round(m['run_wall_s'] / m['engine_floor_wall_s'], 2)} |")
        if code:
            row += f" {m['run_code_wall_s']} ({m['run_code_cpu_s']}) | {m['run_code_over_floor']} |"
        lines.append(row)
    return "\n".join(lines + [""])


def caption_corpus(n: int, seed: int = 0) -> List[str]:
    """``n`` COCO-like captions (capitals, periods, commas, possessives, numbers, a few
    brackets and quotes), nearly all distinct, for the tokenizer benchmark."""
    import random

    rnd = random.Random(seed)
    subjects = ["A man", "A woman", "Two dogs", "A child", "The cat", "A group of people", "An old bus", "A giraffe",
                "Three kids", "A player"]
    verbs = ["riding", "holding", "standing next to", "looking at", "eating", "sitting on", "playing with",
             "walking by"]
    things = ["a horse", "a red umbrella", "the woman's bike", "a 3.5-inch screen", "a sign that says \"STOP\"",
              "a plate of food", "a black-and-white cat", "a surfboard (blue)", "10 apples", "the U.S. flag",
              "a $5 bill", "a hot-dog", "the kids' toys"]
    places = ["on the beach", "in a park", "at 10:30", "near the street", "in the kitchen", "on a sunny day", ""]
    out = []
    for i in range(n):
        text = f"{rnd.choice(subjects)} {rnd.choice(verbs)} {rnd.choice(things)} {rnd.choice(places)}".strip()
        if rnd.random() < 0.5:
            text += f", {rnd.choice(verbs)} {rnd.choice(things)}"
        out.append(text + rnd.choice([".", "", " .", "!"]) + ("" if i % 3 else f" #{i}"))
    return out


def bench_ptb(n: int, repeat: int) -> Dict[str, object]:
    """The COCO toolkit's PTB tokenization: its Java tokenizer (one call on a batch, as
    COCOEvalCap runs it) against regioncap.ptb, on the same captions; CPU and wall seconds."""
    import resource
    import subprocess

    from regioncap.ptb import clear_cache, java_tokenize, ptb_tokenize_batch

    captions = caption_corpus(n)

    def java(texts: List[str]) -> Tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = java_tokenize(texts, isolate=False)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        java.out = out  # type: ignore[attr-defined]
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def python(texts: List[str], cold: bool) -> Tuple[float, float]:
        if cold:
            clear_cache()
        t0, c0 = time.perf_counter(), time.process_time()
        out = ptb_tokenize_batch(texts)
        python.out = out  # type: ignore[attr-defined]
        return time.perf_counter() - t0, time.process_time() - c0

    rows: Dict[str, List[Tuple[float, float]]] = {"java_1": [], "java_n": [], "python_cold": [], "python_warm": []}
    for _ in range(repeat):  # interleaved round by round
        rows["java_1"].append(java(captions[:1]))
        rows["java_n"].append(java(captions))
        rows["python_cold"].append(python(captions, cold=True))
        rows["python_warm"].append(python(captions, cold=False))
    same = java.out == python.out  # type: ignore[attr-defined]
    imp = subprocess.run([sys.executable, "-c", "import time; t = time.process_time(); import regioncap.ptb; "
                          "print(time.process_time() - t)"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    return {"captions": n, "repeat": repeat, "distinct": len(set(captions)), "same_output": same,
            "import_cpu_s": round(float(imp.stdout), 3),
            **{f"{k}_wall_s": round(w, 3) for k, (w, _) in med.items()},
            **{f"{k}_cpu_s": round(c, 3) for k, (_, c) in med.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["visualize", "visualize-small", "caption", "memory", "references", "overlap", "anchor", "ptb",
                                         "steady", "ray", "coldstart", "all"])
    parser.add_argument("--code", type=Path, default=None,
                        help="steady, coldstart, references, visualize-small: also run the regioncap package of this checkout; "
                             "ray: interleave its runs (before)")
    parser.add_argument("--replicas", type=int, default=1, help="ray: executor.num_replicas")
    parser.add_argument("--busy", type=int, default=2, help="coldstart: CPU-burning processes of the busy rounds")
    parser.add_argument("--modes", default="quiet,busy", help="coldstart: quiet, busy or both")
    parser.add_argument("--images", type=int, default=12, help="camera-like JPEGs of the anchor section")
    parser.add_argument("--parts", action="store_true",
                        help="visualize-small: also the stage and the floor with their image writes left out")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-rows", type=int, default=200, help="rows of the 1x memory run (10x: ten times)")
    parser.add_argument("--models", default="qwen25vl_3b,tiny", help="model budgets of the visualize section")
    parser.add_argument("--overlap-rows", type=int, default=60, help="rows of the overlap benchmark")
    parser.add_argument("--captions", type=int, default=20000, help="captions of the ptb (tokenizer) benchmark")
    parser.add_argument("--note", default="", help="a line on the machine's load, written under the header")
    parser.add_argument("--write", type=Path, default=None, help="write the results as Markdown here")
    args = parser.parse_args()
    results: Dict[str, Dict[str, object]] = {}
    if args.code is not None and args.what == "visualize-small":  # in this process: its code goes first
        sys.path[:0] = [str(args.code.resolve()), str(args.code.resolve() / "tests")]
    with tempfile.TemporaryDirectory(prefix="regioncap-bench-") as tmp:
        work = Path(tmp)
        if args.what in ("visualize", "all"):
            # The real 3B model's budget (up to 1280 visual tokens), then the tiny model's (64).
            for model in args.models.split(","):
                results[f"visualize/{model}"] = bench_visualize(args.rows or 60, args.repeat, work, model)
                print(json.dumps(results[f"visualize/{model}"], indent=2))
        if args.what == "visualize-small":  # not in "all": its figures go to docs/benchmarks.md by hand
            results["visualize-small"] = bench_visualize_small(args.rows or 600, args.repeat, work, args.parts)
            print(json.dumps(results["visualize-small"], indent=2))
        if args.what in ("anchor", "all"):
            results["anchor"] = bench_anchor(args.images, args.repeat, work)
            print(json.dumps(results["anchor"], indent=2))
        if args.what in ("memory", "all"):
            results["memory"] = bench_memory(args.memory_rows, work)
            print(json.dumps(results["memory"], indent=2))
        if args.what == "references":  # not in "all": minutes of whole runs at 20k rows
            results["references"] = bench_references(args.memory_rows, work, args.code)
            print(json.dumps(results["references"], indent=2))
        if args.what in ("caption", "all"):
            results["caption"] = bench_caption(args.rows or 20, args.repeat, work)
            print(json.dumps(results["caption"], indent=2))
        if args.what == "steady":  # not in "all": minutes of whole runs, and it writes no Markdown section
            results["steady"] = bench_steady(args.rows or 40, args.repeat, work, args.code)
            print(json.dumps({k: v for k, v in results["steady"].items() if k != "runs"}, indent=2))
        if args.what == "ray":  # not in "all": a Ray cluster per run, and it writes no Markdown section
            results["ray"] = bench_ray(args.rows or 1000, args.repeat, work, args.code, args.replicas)
            print(json.dumps({k: v for k, v in results["ray"].items() if k != "runs"}, indent=2))
        if args.what == "coldstart":  # not in "all": whole runs, and it has its own Markdown section
            results["coldstart"] = bench_coldstart(args.repeat, work, args.code, args.busy, args.modes.split(","))
            print(json.dumps(results["coldstart"], indent=2))
            print(coldstart_markdown(results["coldstart"]))
        if args.what in ("ptb", "all"):
            results["ptb"] = bench_ptb(args.captions, args.repeat)
            print(json.dumps(results["ptb"], indent=2))
        if args.what in ("overlap", "all"):
            results["overlap"] = bench_overlap(args.overlap_rows, args.repeat, work)
            print(json.dumps(results["overlap"], indent=2))
    if args.write and args.what == "coldstart":
        args.write.write_text(coldstart_markdown(results["coldstart"]))
        print(f"wrote {args.write}")
    elif args.write:
        args.write.write_text(to_markdown(results, environment(), args.note))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()

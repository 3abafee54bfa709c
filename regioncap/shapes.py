"""A synthetic domain of coloured shapes, with ground-truth boxes and captions.

This is the world the offline default model (``model=shapes``) was trained on:
a light, noisy gradient background with 1 to 6 filled shapes (circle, square,
triangle, star, ellipse) in six colours, none overlapping, each with a tight
box and a caption such as ``a red circle``. Because every answer is known, a
run on this domain measures whether regioncap's box handling, marks, prompts,
engines and answer parsing are right, on a laptop or in CI, with no model hub.

Pure module (Pillow and numpy only). ``python -m regioncap.shapes --out DIR
--rows N --seed S`` writes a data set in regioncap's (and DataFlow-MM's) JSONL
input format: ``image``, ``bbox`` (xywh pixels) and ``references`` (one
caption per box), which ``data.references_key`` picks up for the metrics.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from regioncap.record_types import Record

#: Colour names and their base RGB (each drawn with a small random jitter).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (235, 210, 35),
    "green": (45, 165, 60),
    "blue": (40, 85, 215),
    "purple": (135, 55, 185),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse")

#: Scene side in pixels: 224 x 224 is the tiny models' whole pixel budget (64 visual tokens).
SCENE_SIZE = 224
#: Shapes' longer side in pixels, and the free gap kept between two shapes' boxes.
MIN_SIDE, MAX_SIDE = 36, 68
GAP = 8
MAX_SHAPES = 6
#: Colour jitter per channel, in 0-255 units.
JITTER = 18


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: its kind, colour and tight box ``[x, y, w, h]`` in pixels."""

    kind: str
    colour: str
    box: Tuple[int, int, int, int]

    @property
    def caption(self) -> str:
        """The ground-truth caption, e.g. ``a red circle`` / ``an orange star``."""
        return caption(self.colour, self.kind)


def caption(colour: str, kind: str) -> str:
    """``a <colour> <shape>`` with the right article."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {kind}"


def _size(rng: random.Random, kind: str) -> Tuple[int, int]:
    side = rng.randint(MIN_SIDE, MAX_SIDE)
    if kind == "ellipse":  # clearly elongated, either way round
        short = max(MIN_SIDE // 2 + 4, int(side / rng.uniform(1.6, 2.0)))
        return (side, short) if rng.random() < 0.5 else (short, side)
    if kind == "triangle":
        return side, max(MIN_SIDE - 4, int(side * rng.uniform(0.85, 1.0)))
    return side, side


def _place(rng: random.Random, sizes: Sequence[Tuple[int, int]], scene: int) -> List[Tuple[int, int, int, int]]:
    """Non-overlapping boxes for ``sizes`` (rejection sampling); shapes that do not fit are left out."""
    boxes: List[Tuple[int, int, int, int]] = []
    for w, h in sizes:
        for _ in range(60):
            x, y = rng.randint(2, scene - w - 2), rng.randint(2, scene - h - 2)
            if all(x + w + GAP <= bx or bx + bw + GAP <= x or y + h + GAP <= by or by + bh + GAP <= y
                   for bx, by, bw, bh in boxes):
                boxes.append((x, y, w, h))
                break
    return boxes


def _background(rng: random.Random, size: int) -> Image.Image:
    import numpy as np

    nrng = np.random.default_rng(rng.getrandbits(32))
    a = np.array([rng.randint(205, 250) for _ in range(3)], dtype=np.float32)
    b = np.array([rng.randint(205, 250) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = t[None, :] if rng.random() < 0.5 else t[:, None]
    img = a + (b - a) * ramp[..., None]
    img = np.broadcast_to(img, (size, size, 3)) + nrng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype("uint8"), "RGB")


def _polygon(kind: str, x: int, y: int, w: int, h: int) -> List[Tuple[float, float]]:
    if kind == "triangle":
        return [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    # A five-pointed star filling its box: outer radius to the box, inner 0.45 of it.
    cx, cy = x + w / 2, y + h / 2
    pts = []
    for i in range(10):
        r = (w / 2 if i % 2 == 0 else w / 2 * 0.45)
        ang = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + r * math.cos(ang), cy + r * math.sin(ang) * (h / w)))
    return pts


def render_scene(rng: random.Random, n_shapes: Optional[int] = None, size: int = SCENE_SIZE
                 ) -> Tuple[Image.Image, List[Shape]]:
    """One scene: an RGB image and its shapes (each with a tight box and a caption)."""
    n = n_shapes if n_shapes is not None else rng.randint(1, MAX_SHAPES)
    kinds = [rng.choice(SHAPES) for _ in range(n)]
    colours = [rng.choice(list(COLOURS)) for _ in range(n)]
    sizes = [_size(rng, k) for k in kinds]
    boxes = _place(rng, sizes, size)
    img = _background(rng, size)
    # Drawn at 4x and reduced, so edges are smooth as in a photo, not aliased.
    k = 4
    layer = img.resize((size * k, size * k), Image.NEAREST)
    draw = ImageDraw.Draw(layer)
    shapes: List[Shape] = []
    for kind, colour, (x, y, w, h) in zip(kinds, colours, boxes):
        base = COLOURS[colour]
        fill = tuple(max(0, min(255, c + rng.randint(-JITTER, JITTER))) for c in base)
        X, Y, W, H = x * k, y * k, w * k, h * k
        if kind in ("circle", "ellipse"):
            draw.ellipse([X, Y, X + W - 1, Y + H - 1], fill=fill)
        elif kind == "square":
            draw.rectangle([X, Y, X + W - 1, Y + H - 1], fill=fill)
        else:
            draw.polygon(_polygon(kind, X, Y, W, H), fill=fill)
        shapes.append(Shape(kind, colour, (x, y, w, h)))
    return layer.resize((size, size), Image.LANCZOS), shapes


def write_dataset(out_dir: str | Path, rows: int, *, seed: int, prefix: str = "scene",
                  min_shapes: int = 1, max_shapes: int = MAX_SHAPES, image_format: str = "png") -> Path:
    """Write ``rows`` scenes as images plus ``shapes.jsonl`` into ``out_dir``; return the JSONL path.

    Each line: ``{"id", "image" (relative), "bbox" (xywh), "references"}``, the
    input format of ``data=jsonl`` (and of DataFlow-MM, with ``references`` as
    an extra field). Deterministic for a given seed and Pillow/numpy version.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ext = "png" if image_format == "png" else "jpg"
    lines = []
    for i in range(rows):
        img, shapes = render_scene(rng, rng.randint(min_shapes, max_shapes))
        name = f"images/{prefix}_{i:05d}.{ext}"
        if ext == "png":
            img.save(out / name, format="PNG", optimize=True)
        else:
            img.save(out / name, format="JPEG", quality=95)
        lines.append({"id": f"{prefix}_{i:05d}", "image": name, "bbox": [list(s.box) for s in shapes],
                      "references": [s.caption for s in shapes]})
    path = out / "shapes.jsonl"
    from regioncap.records import dumps

    path.write_text("".join(dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


def score_records(records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Exact-match, colour and shape accuracy of a run's caption records against their references.

    Every box of the input counts: boxes of an error row, and boxes the run
    dropped, count as wrong. ``by`` breaks exact match down by the number of
    shapes in the scene and by region number.
    """
    totals = {"regions": 0, "exact": 0, "colour": 0, "shape": 0, "missing": 0, "error_rows": 0}
    tally: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for raw in records:
        rec = Record.from_dict(raw)
        refs = rec.inputs().get("references") or []
        regions = rec.regions or []
        totals["error_rows"] += rec.status == "error"
        totals["regions"] += len(refs) - len(regions)
        for reg in regions:
            ref = refs[reg.source_index]
            cap = _norm(reg.caption or "")
            _, colour, kind = ref.split()
            ok = cap == _norm(ref)
            totals["regions"] += 1
            totals["exact"] += ok
            totals["colour"] += colour in cap.split()
            totals["shape"] += kind in cap.split()
            totals["missing"] += reg.caption is None
            for key in (f"scene_shapes={len(regions)}", f"region={reg.id}"):
                tally[key][0] += ok
                tally[key][1] += 1
    n = max(1, totals["regions"])
    return {
        **{k: totals[k] for k in ("regions", "missing", "error_rows")},
        **{k: totals[k] / n for k in ("exact", "colour", "shape")},
        "by": {k: {"exact": a / b, "regions": b} for k, (a, b) in sorted(tally.items())},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m regioncap.shapes --out DIR --rows N --seed S``."""
    p = argparse.ArgumentParser(prog="python -m regioncap.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write images/ and shapes.jsonl into")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="scene")
    p.add_argument("--min-shapes", type=int, default=1)
    p.add_argument("--max-shapes", type=int, default=MAX_SHAPES)
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    a = p.parse_args(argv)
    if a.rows < 0:
        p.error(f"--rows must be 0 or more, got {a.rows}")
    if not 1 <= a.min_shapes <= a.max_shapes:
        p.error(f"need 1 <= --min-shapes <= --max-shapes, got {a.min_shapes} and {a.max_shapes}")
    path = write_dataset(a.out, a.rows, seed=a.seed, prefix=a.prefix, min_shapes=a.min_shapes,
                         max_shapes=a.max_shapes, image_format=a.format)
    print(f"wrote {a.rows} scenes to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

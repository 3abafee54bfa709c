"""Bad input, nothing lost: fuzzed input rows through the real pipeline (fake engine).

Whatever a JSONL file holds (broken JSON, bytes that are not UTF-8, image
fields of every wrong type, paths to FIFOs, devices, directories, truncated or
corrupt images, odd Pillow modes, EXIF rotations, decompression-bomb headers,
junk boxes by the thousand), a run either completes with exactly one output
row per non-blank input line, or (no rows at all) raises RunError after
writing what it read. Error rows carry a known ``error.kind`` and a message
that names the input; clean rows have every region captioned; no box vanishes
(kept + dropped == given).

The table test at the end names each bad-input case and the error kind it
must give, so a regression names the case rather than a hypothesis example.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, compose
from regioncap.job import execute
from regioncap.records import read_jsonl
from regioncap.record_types import RECORD_KEYS
from regioncap.run import RunError

#: Every ``error.kind`` a visualize-stage error row may carry (data.py, images.py, run.py).
KNOWN_KINDS = {
    # the line itself (regioncap.data)
    "invalid_utf8", "invalid_json", "invalid_row", "missing_image_field", "bad_image_value",
    # the image (regioncap.images.ImageLoadError)
    "missing_file", "not_a_file", "unreadable_file", "empty_file", "file_too_large", "not_an_image",
    "corrupt_image", "image_too_large", "unsupported_mode", "bad_aspect_ratio", "unsupported_url",
    # the boxes and the drawing (regioncap.run)
    "bad_bbox", "no_valid_boxes", "draw_error",
}
#: Box drop reasons (regioncap.boxes.ISSUE_REASONS, less "clipped").
DROP_REASONS = {"not_numeric", "not_finite", "wrong_arity", "non_positive_size", "outside_image", "too_small"}

#: Limits of every fuzzed run: small enough that a header can claim "too large" cheaply.
MAX_PIXELS = 1_000_000
MAX_FILE_BYTES = 1_000_000
BASE_OVERRIDES = ("engine=fake", "progress=false", "data=jsonl", "data.path=unset.jsonl", "max_error_rate=1.0",
                  f"limits.max_image_pixels={MAX_PIXELS}", f"limits.max_file_bytes={MAX_FILE_BYTES}")
#: Seconds any one in-process run may take before the test fails as a hang.
HANG_S = 60

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- image fixtures


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` and that holds no pixel data.

    A decompression bomb as far as any size check is concerned, at 60 bytes.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _noise(size, mode="RGB") -> Image.Image:
    # Structured noise: a corrupt byte lands in real entropy-coded data, not in a flat run.
    w, h = size
    n = {"RGB": 3, "L": 1}[mode]
    return Image.frombytes(mode, size, bytes((i * 7919 + i // 7) % 251 for i in range(w * h * n)))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Every image kind the fuzz rows point at, made once per session."""
    a = tmp_path_factory.mktemp("fuzz_assets")
    _noise((96, 64)).save(a / "ok.png")
    _noise((96, 64)).save(a / "ok.jpg", quality=90)
    Image.new("CMYK", (96, 64), (10, 200, 30, 0)).save(a / "cmyk.jpg")
    Image.new("I;16", (96, 64), 40000).save(a / "i16.png")
    pal = Image.new("P", (96, 64), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(a / "p_trans.png", transparency=1)
    Image.new("LA", (96, 64), (100, 128)).save(a / "la.png")
    Image.new("RGBA", (96, 64), (10, 20, 30, 40)).save(a / "rgba.png")
    Image.new("1", (96, 64), 1).save(a / "one_bit.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(a / "tiny.png")
    for o in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        _noise((80, 40)).save(a / f"exif{o}.jpg", exif=exif.tobytes())
    (a / "bomb.png").write_bytes(png_header_only(30000, 30000))  # over Pillow's own guard too
    (a / "big_header.png").write_bytes(png_header_only(2000, 1000))  # over MAX_PIXELS only
    (a / "text.jpg").write_text("this is not an image\n")
    (a / "empty.png").write_bytes(b"")
    (a / "adir").mkdir()
    os.mkfifo(a / "fifo.png")
    with open(a / "sparse.png", "wb") as fh:  # over MAX_FILE_BYTES, no real disk used
        fh.truncate(MAX_FILE_BYTES * 5)
    data = (a / "ok.jpg").read_bytes()
    (a / "cut.jpg").write_bytes(data[: len(data) // 2])
    data = (a / "ok.png").read_bytes()
    (a / "cut.png").write_bytes(data[: len(data) // 2])
    (a / "图像 ünïcode.png").write_bytes((a / "ok.png").read_bytes())
    (a / "idat.png").write_bytes(png_with_broken_idat(_noise((96, 64))))
    return a


# --------------------------------------------------------------------------- running


_BASE_CFG: Dict[tuple, Any] = {}


def run_rows(data: Path, out: Path, overrides=()) -> Optional[Dict[str, Any]]:
    """Run the pipeline over ``data`` into the fresh dir ``out``; metrics, or None on RunError."""
    key = tuple(overrides)
    if key not in _BASE_CFG:  # composing costs more than a small run: once per override set
        _BASE_CFG[key] = compose([*BASE_OVERRIDES, *overrides])
    cfg = copy.deepcopy(_BASE_CFG[key])
    cfg.data.path = str(data)
    cfg.output_dir = str(out)
    with no_hang(HANG_S):
        try:
            return execute(cfg)
        except RunError:
            return None


@contextlib.contextmanager
def no_hang(seconds: int):
    """Fail (rather than block the test session) when the body runs over ``seconds``."""
    def alarm(signum, frame):
        raise TimeoutError(f"the run did not finish in {seconds} s: some input blocks")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def example_dir():
    """A fresh folder per hypothesis example (function-scoped tmp_path is shared by all examples)."""
    path = Path(tempfile.mkdtemp(prefix="regioncap-fuzz-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def non_blank_lines(data: bytes) -> List[int]:
    """1-based numbers of the lines that are rows (docs/formats.md: blank lines are skipped)."""
    return [n for n, line in enumerate(io.BytesIO(data), start=1) if line.strip()]


def boxes_given(bbox: Any) -> Optional[int]:
    """How many boxes a bbox value holds, per docs/formats.md; None when it is not a list of boxes."""
    if isinstance(bbox, str):
        try:
            bbox = json.loads(bbox)
        except (ValueError, RecursionError):
            return None
    if bbox is None:
        return 0
    if isinstance(bbox, dict):
        return 1
    if not isinstance(bbox, list):
        return None
    if bbox and not any(isinstance(b, (list, dict)) for b in bbox):
        return 1  # a bare box written without the outer list
    return len(bbox)


def check_run(data_file: Path, data: bytes, out: Path, metrics: Optional[Dict[str, Any]],
              rows: List[Optional[Dict[str, Any]]], max_boxes: int = 10) -> List[Dict[str, Any]]:
    """The properties every run must have; returns the caption records.

    ``rows``: per non-blank line, the row object written (None when the line was not a JSON object).
    """
    lines = non_blank_lines(data)
    if not lines:
        # Nothing to caption: a clear RunError, not an empty success.
        assert metrics is None
        assert list(read_jsonl(out / "visualize.jsonl")) == []
        return []
    assert metrics is not None, "a run with rows must complete (max_error_rate=1.0)"
    vis = list(read_jsonl(out / "visualize.jsonl"))
    caps = list(read_jsonl(out / "captions.jsonl"))
    assert len(vis) == len(caps) == len(lines) == metrics["rows"]
    assert [r["index"] for r in caps] == list(range(len(lines)))
    assert [r["line"] for r in caps] == lines
    assert [r["id"] for r in vis] == [r["id"] for r in caps]
    where = data_file.name
    for rec, row in zip(caps, rows):
        err = rec["error"]
        if err is not None:
            assert rec["status"] == "error"
            assert err["stage"] == "visualize", err  # the fake engine answers every request
            assert err["kind"] in KNOWN_KINDS, err
            msg = err["message"]
            named = [f"{where} line {rec['line']}"]
            named += [rec["image_path"]] if rec.get("image_path") else []
            named += [rec["image"]] if isinstance(rec.get("image"), str) and rec["image"].strip() else []
            assert any(n in msg for n in named), (msg, named)
        else:
            assert rec["status"] in ("ok", "no_regions"), rec["status"]
            assert rec["regions"] and rec["status"] == "ok" or not rec["regions"] and rec["status"] == "no_regions"
            for reg in rec["regions"]:
                assert reg["caption"] and not reg["missing"], reg
        for d in rec["dropped_boxes"]:
            assert d["reason"] in DROP_REASONS, d
        if isinstance(row, dict):
            # Every other input field is carried through (under "input" when regioncap uses its name).
            for k, v in row.items():
                if k not in ("image", "bbox"):
                    assert (rec["input"][k] if k in RECORD_KEYS else rec[k]) == v, k
        if err is None or err["kind"] == "no_valid_boxes":
            # The image loaded and the boxes parsed: every box is kept or dropped, none lost.
            n = boxes_given(row.get("bbox")) if isinstance(row, dict) else None
            kept = [r["source_index"] for r in rec["regions"]]
            dropped = [d["index"] for d in rec["dropped_boxes"]]
            assert sorted(kept + dropped) == list(range(len(kept) + len(dropped)))
            if n is not None:
                assert len(kept) + len(dropped) == n, (row.get("bbox"), rec["regions"], rec["dropped_boxes"])
            assert rec["valid_bboxes_num"] == len(kept)
            assert len(rec["normalized_bbox"]) == max(len(kept), max_boxes)
            clipped = {c["index"] for c in rec["clipped_boxes"]}
            assert clipped <= set(kept)
            if kept:
                assert [r["id"] for r in rec["regions"]] == list(range(1, len(kept) + 1))
                assert sum(len(s["region_ids"]) for s in rec["requests"]) == len(kept)
                assert all((out / s["image"]).is_file() for s in rec["requests"])
    return caps


# --------------------------------------------------------------------------- strategies

finite = st.floats(min_value=-200, max_value=300, allow_nan=False, allow_infinity=False)
good_box = st.tuples(st.integers(0, 60), st.integers(0, 40), st.integers(2, 40), st.integers(2, 30)).map(list)
junk_scalar = st.one_of(
    st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")), st.just(None), st.booleans(),
    st.just("a"), st.just("12"), st.just(""), st.integers(-10**6, 10**6), finite, st.just(10**400),
)
junk_box = st.one_of(
    st.lists(st.one_of(finite, junk_scalar), min_size=4, max_size=4),    # not numeric / not finite / bounds
    st.lists(finite, min_size=0, max_size=7).filter(lambda b: len(b) != 4),  # wrong arity
    st.tuples(finite, finite, st.floats(-50, 0), st.floats(-50, 0)).map(list),  # negative size
    st.tuples(st.integers(500, 10**6), st.integers(500, 10**6), st.integers(1, 9), st.integers(1, 9)).map(list),
    st.lists(st.lists(finite, max_size=2), min_size=4, max_size=4),      # nested junk
    st.fixed_dictionaries({"x": finite, "y": finite, "w": finite, "h": finite}),
    st.fixed_dictionaries({"x1": junk_scalar, "y1": finite}),
    st.just({}), st.just([]),
)
box_list = st.lists(st.one_of(good_box, good_box, junk_box), max_size=25)
bbox_value = st.one_of(
    box_list, box_list,
    box_list.map(lambda b: json.dumps(b, allow_nan=True)),               # a JSON string of the list
    good_box,                                                            # a bare box
    st.just([]), st.none(), st.just(42), st.just("[[1, 2"), st.just({"bbox": [1, 2, 30, 20]}),
    st.just("not json"), st.just([1, 2]), st.just(["a", "b"]),
)

#: Image references by name; resolved against the assets folder when the row is written.
ASSET_IMAGES = ["ok.png", "ok.jpg", "cmyk.jpg", "i16.png", "p_trans.png", "la.png", "rgba.png", "one_bit.png",
                "tiny.png", *[f"exif{o}.jpg" for o in range(2, 9)], "bomb.png", "big_header.png", "text.jpg",
                "empty.png", "adir", "fifo.png", "sparse.png", "cut.jpg", "cut.png", "missing.png",
                "图像 ünïcode.png"]
#: Image field values that are not a usable path string.
BAD_IMAGE_VALUES = [None, 0, 7, 1.5, True, [], ["ok.png"], {}, {"path": 5}, {"bytes": "abc"}, "", "   ",
                    "ok\x00.png", "/dev/null", "/dev/zero", "/dev/urandom"]


@st.composite
def corrupt_image(draw, assets: Path, folder: Path) -> str:
    """A valid JPEG/PNG with random cuts and byte flips, written into ``folder``."""
    data = bytearray((assets / draw(st.sampled_from(["ok.jpg", "ok.png", "exif6.jpg"]))).read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    name = f"corrupt{len(list(folder.glob('corrupt*')))}.img"
    (folder / name).write_bytes(bytes(data))
    return name


@st.composite
def line(draw, assets: Path, folder: Path) -> tuple:
    """One line of a JSONL file: ``(bytes, the row object or None)``."""
    kind = draw(st.sampled_from(["row"] * 8 + ["blank", "invalid_json", "not_utf8", "array", "surrogate",
                                               "deep"]))
    if kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t", b"\r", b" \x0c "])), None
    if kind == "invalid_json":
        return draw(st.sampled_from([b'{"image": "ok.png", "bbox": [[1, 2', b"{", b"nope", b"{'a': 1}",
                                     b'{"image": "ok.png",}'])), None
    if kind == "not_utf8":
        return b'{"image": "ok.png", "bbox": [[1, 1, 9, 9]], "note": "\xff\xfe"}', None
    if kind == "array":
        return draw(st.sampled_from([b"[1, 2, 3]", b"42", b'"ok.png"', b"null"])), None
    if kind == "surrogate":
        return b'{"image": "ok.png", "bbox": [[1, 1, 9, 9]], "note": "\\ud800"}', None
    if kind == "deep":
        depth = draw(st.sampled_from([150, 5000]))
        return b'{"image": "ok.png", "x": ' + b"[" * depth + b"]" * depth + b"}", None
    row: Dict[str, Any] = {}
    image = draw(st.one_of(st.sampled_from(ASSET_IMAGES).map(lambda n: str(assets / n)),
                           st.sampled_from(BAD_IMAGE_VALUES), corrupt_image(assets, folder),
                           st.just("<absent>")))
    if image != "<absent>":
        row["image"] = image
    bbox = draw(st.one_of(bbox_value, st.just("<absent>")))
    if bbox != "<absent>":
        row["bbox"] = bbox
    ident = draw(st.sampled_from(["<absent>", "a", "a", "b", None, 7, "../../etc/passwd", ""]))
    if ident != "<absent>":
        row["id"] = ident  # duplicates on purpose
    if draw(st.booleans()):
        row["status"] = "a field whose name regioncap uses"
    return json.dumps(row, allow_nan=True, ensure_ascii=draw(st.booleans())).encode("utf-8"), row


def write_file(folder: Path, lines: List[tuple], newline: bytes, trailing: bool) -> tuple:
    data = newline.join(b for b, _ in lines) + (newline if trailing and lines else b"")
    path = folder / "rows.jsonl"
    path.write_bytes(data)
    rows = [row for b, row in lines if b.strip()]
    return path, data, rows


# --------------------------------------------------------------------------- properties


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@FUZZ
@given(st.data())
def test_mixed_bad_rows_every_row_comes_out_once(assets, data):
    with example_dir() as folder:
        lines = data.draw(st.lists(line(assets, folder), max_size=12), label="lines")
        newline = data.draw(st.sampled_from([b"\n", b"\r\n"]), label="newline")
        path, raw, rows = write_file(folder, lines, newline, data.draw(st.booleans(), label="trailing"))
        out = folder / "run"
        metrics = run_rows(path, out)
        check_run(path, raw, out, metrics, rows)


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@FUZZ
@given(st.data())
def test_junk_boxes_are_each_kept_or_dropped(assets, data):
    with example_dir() as folder:
        image = data.draw(st.sampled_from(["ok.png", "ok.jpg", "exif6.jpg", "tiny.png", "rgba.png"]))
        bboxes = data.draw(st.lists(bbox_value, min_size=1, max_size=4))
        fmt = data.draw(st.sampled_from(["xywh", "xyxy", "cxcywh", "xyxy_norm", "qwen1000"]))
        max_boxes = data.draw(st.sampled_from([1, 3, 10]))
        lines = [(json.dumps({"image": str(assets / image), "bbox": b}, allow_nan=True).encode(),
                  {"image": image, "bbox": b}) for b in bboxes]
        path, raw, rows = write_file(folder, lines, b"\n", True)
        out = folder / "run"
        metrics = run_rows(path, out, (f"data.bbox_format={fmt}", f"max_boxes={max_boxes}"))
        caps = check_run(path, raw, out, metrics, rows, max_boxes)
        for rec, row in zip(caps, rows):
            n = boxes_given(row["bbox"])
            kind = (rec["error"] or {}).get("kind")
            if n is None:
                assert kind == "bad_bbox", (row["bbox"], rec["error"])
            else:
                assert kind in (None, "no_valid_boxes"), rec["error"]
                assert len(rec["regions"]) + len(rec["dropped_boxes"]) == n
                if rec["regions"]:
                    assert len(rec["requests"]) == math.ceil(len(rec["regions"]) / max_boxes)


def pillow_decodes(path: Path) -> bool:
    """True when a fresh ``Image.open(path).load()`` decodes the file without any error."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001 - any failure at all means "Pillow cannot decode it"
        return False
    return True


@pytest.mark.slow  # several seconds: the slow tier runs it (the unit tier stays under 2 min)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on a corrupt EXIF block: skipped, as it should
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupt_images_are_error_rows_or_captioned(assets, data):
    """A damaged image is an error row unless Pillow itself decodes it cleanly: never a
    blank image captioned as ``ok`` (a PNG whose IDAT data is broken once came out black)."""
    with example_dir() as folder:
        names = [data.draw(corrupt_image(assets, folder)) for _ in range(data.draw(st.integers(1, 4)))]
        lines = [(json.dumps({"image": n, "bbox": [[2, 2, 20, 20]]}).encode(), {"image": n, "bbox": [[2, 2, 20, 20]]})
                 for n in names]
        path, raw, rows = write_file(folder, lines, b"\n", True)
        out = folder / "run"
        caps = check_run(path, raw, out, run_rows(path, out), rows)
        for name, rec in zip(names, caps):
            kind = (rec["error"] or {}).get("kind")
            if pillow_decodes(folder / name):
                # Pillow decoding a file does not make it usable: a header may declare a size over the
                # limits or an aspect ratio the model refuses (each an error row naming the image).
                assert kind in {None, "no_valid_boxes", "corrupt_image", "not_an_image", "image_too_large",
                                "bad_aspect_ratio"}, rec["error"]
            else:
                assert kind in {"not_an_image", "corrupt_image", "image_too_large", "unsupported_mode"}, (
                    name, rec["status"], rec["error"])


def png_with_broken_idat(image: Image.Image) -> bytes:
    """``image`` as a PNG whose IDAT chunk holds damaged deflate data (its CRC made valid again).

    Pillow's own ``load()`` raises "broken data stream" on it.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    data[at + 4 + length // 3] ^= 0xFF
    crc = zlib.crc32(bytes(data[at:at + 4 + length])) & 0xFFFFFFFF
    data[at + 4 + length:at + 8 + length] = struct.pack(">I", crc)
    return bytes(data)


def test_png_with_broken_idat_is_a_corrupt_image_not_a_black_one(tmp_path):
    from regioncap.images import ImageLoadError, load_image

    path = tmp_path / "idat.png"
    path.write_bytes(png_with_broken_idat(_noise((96, 64))))
    assert not pillow_decodes(path)
    for src in (path, path.read_bytes()):
        with pytest.raises(ImageLoadError) as info:
            load_image(src)
        assert info.value.kind == "corrupt_image"
    assert str(path) in str(info.value) or "<in-memory>" in str(info.value)
    with pytest.raises(ImageLoadError, match=str(path)):
        load_image(path)


# --------------------------------------------------------------------------- fixed cases


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_blank_file_and_blank_lines_only_fail_clearly(tmp_path):
    for i, content in enumerate([b"", b"\n\n  \n\t\r\n"]):
        path = tmp_path / f"rows{i}.jsonl"
        path.write_bytes(content)
        cfg = compose([*BASE_OVERRIDES, f"data.path={path}"], output_dir=tmp_path / f"run{i}")
        with pytest.raises(RunError, match="no input rows"):
            execute(cfg)
        assert (tmp_path / f"run{i}" / "visualize.jsonl").read_text() == ""


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_a_byte_order_mark_at_the_start_of_the_file_is_not_part_of_the_first_row(tmp_path, assets):
    """Windows editors and spreadsheets save UTF-8 with a BOM; the first row must still be a row."""
    from regioncap.data import count_rows, iter_rows

    rows = [{"id": "a", "image": str(assets / "ok.png"), "bbox": [[2, 2, 20, 20]]},
            {"id": "b", "image": str(assets / "ok.jpg"), "bbox": [[4, 4, 10, 10]]}]
    body = b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"
    runs = {}
    for name, content in (("plain", body), ("bom", b"\xef\xbb\xbf" + body), ("bom_blank", b"\xef\xbb\xbf\n" + body)):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        metrics = run_rows(path, tmp_path / name)
        assert metrics["rows"] == 2 and metrics["error_rows"] == 0, name
        cfg = compose([*BASE_OVERRIDES, f"data.path={path}"])
        assert count_rows(cfg.data) == 2, name
        runs[name] = [(r.row_id, r.digest) for r in iter_rows(cfg.data)]
    assert runs["plain"] == runs["bom"] == runs["bom_blank"]
    # A BOM anywhere else is not a file's start: that line stays an error row naming it.
    path = tmp_path / "late.jsonl"
    path.write_bytes(body + b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    caps = check_run(path, path.read_bytes(), tmp_path / "late", run_rows(path, tmp_path / "late"), [*rows, None])
    assert [(c["error"] or {}).get("kind") for c in caps] == [None, None, "invalid_json"]


@pytest.mark.slow  # over a second: the full suite, not the unit tier
def test_all_rows_bad_still_writes_every_row(tmp_path):
    lines = [b"{", b"\xff\xfe", b"[1]", b'{"bbox": []}', b'{"image": null}']
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    metrics = run_rows(path, tmp_path / "run")
    assert metrics["rows"] == metrics["error_rows"] == 5
    strict = compose([*BASE_OVERRIDES, f"data.path={path}", "max_error_rate=0.5"], output_dir=tmp_path / "run2")
    with pytest.raises(RunError, match="5 of 5 rows failed"):
        execute(strict)
    assert len(list(read_jsonl(tmp_path / "run2" / "captions.jsonl"))) == 5


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
def test_thousands_of_boxes_are_chunked_and_all_accounted(tmp_path, assets):
    boxes: List[Any] = []
    for i in range(3000):
        if i % 10 == 7:
            boxes.append([float("nan"), 1, 2, 2])            # not_finite
        elif i % 10 == 8:
            boxes.append([5000 + i, 10, 2, 2])               # outside_image
        elif i % 10 == 9:
            boxes.append([1, 2, 3])                          # wrong_arity
        else:
            boxes.append([(i * 7) % 90, (i * 3) % 60, 2, 2])  # tiny but kept
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": str(assets / "ok.png"), "bbox": boxes}, allow_nan=True) + "\n")
    out = tmp_path / "run"
    metrics = run_rows(path, out, ("max_boxes=50",))
    (rec,) = list(read_jsonl(out / "captions.jsonl"))
    assert len(rec["regions"]) == 2100 and len(rec["dropped_boxes"]) == 900
    assert len(rec["regions"]) + len(rec["dropped_boxes"]) == 3000
    assert len(rec["requests"]) == 42 and rec["status"] == "ok"
    assert metrics["regions_captioned"] == 2100 and metrics["boxes_dropped"] == 900


def test_exif_rotation_sizes_and_boxes(tmp_path, assets):
    rows = [{"image": str(assets / f"exif{o}.jpg"), "bbox": [[0, 0, 40, 40]]} for o in range(2, 9)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_rows(path, tmp_path / "run")
    recs = list(read_jsonl(tmp_path / "run" / "captions.jsonl"))
    for o, rec in zip(range(2, 9), recs):
        # Stored 80x40; orientations 5-8 turn it on its side.
        assert rec["image_size"] == ([40, 80] if o >= 5 else [80, 40]), o
        assert rec["status"] == "ok" and rec["regions"][0]["bbox"] == [0.0, 0.0, 40.0, 40.0]


def data_uri(path: Path, prefix: str = "data:image/png;base64,") -> str:
    return prefix + base64.b64encode(path.read_bytes()).decode()


#: (case, row builder given the assets folder, expected error kind or None for a clean row).
#: A row builder returns the JSON object, or raw bytes for a line that is not one.
CASES = [
    ("ok_png", lambda a: {"image": str(a / "ok.png"), "bbox": [[2, 2, 20, 20]]}, None),
    ("ok_jpg_relative", lambda a: {"image": "ok.jpg", "bbox": [[2, 2, 20, 20]]}, None),
    ("unicode_name", lambda a: {"image": "图像 ünïcode.png", "bbox": [[2, 2, 20, 20]]}, None),
    ("cmyk_jpeg", lambda a: {"image": "cmyk.jpg", "bbox": [[2, 2, 20, 20]]}, None),
    ("gray16_png", lambda a: {"image": "i16.png", "bbox": [[2, 2, 20, 20]]}, None),
    ("palette_transparency", lambda a: {"image": "p_trans.png", "bbox": [[2, 2, 20, 20]]}, None),
    ("la_png", lambda a: {"image": "la.png", "bbox": [[2, 2, 20, 20]]}, None),
    ("rgba_png", lambda a: {"image": "rgba.png", "bbox": [[2, 2, 20, 20]]}, None),
    ("one_bit_png", lambda a: {"image": "one_bit.png", "bbox": [[2, 2, 20, 20]]}, None),
    ("one_by_one", lambda a: {"image": "tiny.png", "bbox": [[0, 0, 1, 1]]}, None),
    ("exif_rotated", lambda a: {"image": "exif6.jpg", "bbox": [[2, 2, 20, 20]]}, None),
    ("no_boxes", lambda a: {"image": "ok.png", "bbox": []}, None),
    ("bbox_field_missing", lambda a: {"image": "ok.png"}, None),
    ("duplicate_id_1", lambda a: {"image": "ok.png", "bbox": [[2, 2, 9, 9]], "id": "dup"}, None),
    ("duplicate_id_2", lambda a: {"image": "ok.png", "bbox": [[2, 2, 9, 9]], "id": "dup"}, None),
    ("missing_file", lambda a: {"image": "missing.png", "bbox": [[2, 2, 20, 20]]}, "missing_file"),
    ("directory", lambda a: {"image": "adir", "bbox": [[2, 2, 20, 20]]}, "not_a_file"),
    ("fifo_no_writer", lambda a: {"image": "fifo.png", "bbox": [[2, 2, 20, 20]]}, "not_a_file"),
    ("dev_null", lambda a: {"image": "/dev/null", "bbox": [[2, 2, 20, 20]]}, "not_a_file"),
    ("dev_zero", lambda a: {"image": "/dev/zero", "bbox": [[2, 2, 20, 20]]}, "not_a_file"),
    ("dev_urandom", lambda a: {"image": "/dev/urandom", "bbox": [[2, 2, 20, 20]]}, "not_a_file"),
    ("empty_file", lambda a: {"image": "empty.png", "bbox": [[2, 2, 20, 20]]}, "empty_file"),
    ("sparse_over_max_file_bytes", lambda a: {"image": "sparse.png", "bbox": [[2, 2, 20, 20]]}, "file_too_large"),
    ("text_not_image", lambda a: {"image": "text.jpg", "bbox": [[2, 2, 20, 20]]}, "not_an_image"),
    ("truncated_jpeg", lambda a: {"image": "cut.jpg", "bbox": [[2, 2, 20, 20]]}, "corrupt_image"),
    ("truncated_png", lambda a: {"image": "cut.png", "bbox": [[2, 2, 20, 20]]}, "corrupt_image"),
    ("broken_idat_png", lambda a: {"image": "idat.png", "bbox": [[2, 2, 20, 20]]}, "corrupt_image"),
    ("bomb_header", lambda a: {"image": "bomb.png", "bbox": [[2, 2, 20, 20]]}, "image_too_large"),
    ("over_max_image_pixels", lambda a: {"image": "big_header.png", "bbox": [[2, 2, 20, 20]]}, "image_too_large"),
    ("data_uri_png", lambda a: {"image": data_uri(a / "ok.png"), "bbox": [[2, 2, 20, 20]]}, None),
    ("data_uri_jpeg_mixed_case", lambda a: {"image": data_uri(a / "ok.jpg", "DATA:image/jpeg;BASE64,"),
                                            "bbox": [[2, 2, 20, 20]]}, None),
    ("data_uri_wrapped_mime_style", lambda a: {"image": "\n".join(textwrap.wrap(data_uri(a / "ok.png"), 76)),
                                               "bbox": [[2, 2, 20, 20]]}, None),
    ("data_uri_not_base64", lambda a: {"image": "data:image/png,abc", "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("data_uri_bad_base64", lambda a: {"image": "data:image/png;base64,@@@=", "bbox": [[2, 2, 20, 20]]},
     "bad_image_value"),
    ("data_uri_of_text", lambda a: {"image": "data:image/png;base64,aGVsbG8=", "bbox": [[2, 2, 20, 20]]},
     "not_an_image"),
    ("data_uri_over_max_file_bytes", lambda a: {"image": "data:image/png;base64," + "A" * (MAX_FILE_BYTES * 2),
                                                "bbox": [[2, 2, 20, 20]]}, "file_too_large"),
    ("file_uri", lambda a: {"image": (a / "ok.png").as_uri(), "bbox": [[2, 2, 20, 20]]}, None),
    ("file_uri_quoted_unicode", lambda a: {"image": (a / "图像 ünïcode.png").as_uri(), "bbox": [[2, 2, 20, 20]]},
     None),
    ("file_uri_other_host", lambda a: {"image": "file://elsewhere/ok.png", "bbox": [[2, 2, 20, 20]]},
     "unsupported_url"),
    ("https_url", lambda a: {"image": "https://example.invalid/ok.png", "bbox": [[2, 2, 20, 20]]},
     "unsupported_url"),
    ("s3_url", lambda a: {"image": "s3://bucket/ok.png", "bbox": [[2, 2, 20, 20]]}, "unsupported_url"),
    ("windows_drive_path_is_a_path", lambda a: {"image": "C:\\images\\ok.png", "bbox": [[2, 2, 20, 20]]},
     "missing_file"),
    ("image_field_missing", lambda a: {"bbox": [[2, 2, 20, 20]]}, "missing_image_field"),
    ("image_null", lambda a: {"image": None, "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_int", lambda a: {"image": 3, "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_list", lambda a: {"image": ["ok.png"], "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_empty_dict", lambda a: {"image": {}, "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_dict_int_path", lambda a: {"image": {"path": 5}, "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_dict_str_bytes", lambda a: {"image": {"bytes": "abc"}, "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_dict_path_ok", lambda a: {"image": {"path": "ok.png"}, "bbox": [[2, 2, 20, 20]]}, None),
    ("image_empty_string", lambda a: {"image": "", "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_nul_byte", lambda a: {"image": "ok.png\x00.txt", "bbox": [[2, 2, 20, 20]]}, "bad_image_value"),
    ("image_name_too_long", lambda a: {"image": "x" * 5000 + ".png", "bbox": [[2, 2, 20, 20]]},
     "unreadable_file"),
    ("bbox_unparsable_string", lambda a: {"image": "ok.png", "bbox": "[[1, 2"}, "bad_bbox"),
    ("bbox_int", lambda a: {"image": "ok.png", "bbox": 42}, "bad_bbox"),
    ("bbox_all_junk", lambda a: {"image": "ok.png", "bbox": [["a", 1, 2, 3], [1, 2, 3], [5, 5, -1, 4],
                                                             [9e9, 9e9, 5, 5], [0.1, 0.1, 0.2, 0.2],
                                                             [float("nan"), 1, 2, 3]]}, "no_valid_boxes"),
    ("bbox_nested_junk", lambda a: {"image": "ok.png", "bbox": [[[1], [2], [3], [4]], {"x1": "q"}]},
     "no_valid_boxes"),
    ("bbox_nested_too_deep_to_show", lambda a: {"image": "ok.png", "bbox": json.loads("[" * 90 + "]" * 90)},
     "no_valid_boxes"),
    ("invalid_json", lambda a: b'{"image": "ok.png", "bbox": [[1, 2', "invalid_json"),
    ("not_utf8", lambda a: b'{"image": "ok.png", "note": "\xff"}', "invalid_utf8"),
    ("lone_surrogate_escape", lambda a: b'{"image": "ok.png", "bbox": [], "note": "\\udc80"}', "invalid_utf8"),
    ("not_an_object", lambda a: b"[1, 2, 3]", "invalid_row"),
    ("nested_too_deep", lambda a: b'{"image": "ok.png", "x": ' + b"[" * 500 + b"]" * 500 + b"}", "invalid_row"),
    ("nested_past_recursion_limit", lambda a: b"[" * 100000 + b"]" * 100000, "invalid_json"),
]


@pytest.fixture(scope="module")
def table_run(assets, tmp_path_factory):
    """Every case of CASES as one row of one run (the assets folder holds the JSONL file)."""
    folder = tmp_path_factory.mktemp("table")
    for entry in assets.iterdir():
        (folder / entry.name).symlink_to(entry)
    lines = [row(assets) for _, row, _ in CASES]
    raw = b"\n\n".join(r if isinstance(r, bytes) else json.dumps(r, allow_nan=True).encode() for r in lines)
    path = folder / "rows.jsonl"
    path.write_bytes(raw + b"\n")
    out = folder / "run"
    metrics = run_rows(path, out)
    caps = check_run(path, raw + b"\n", out, metrics, [r if isinstance(r, dict) else None for r in lines])
    return {name: rec for (name, _, _), rec in zip(CASES, caps)}


@pytest.mark.parametrize("case,expected", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_case_gives_its_error_kind(table_run, case, expected):
    rec = table_run[case]
    assert (rec["error"] or {}).get("kind") == expected, rec["error"]
    if expected is None:
        assert rec["status"] in ("ok", "no_regions")
        assert all(r["caption"] for r in rec["regions"])


def test_nothing_blocks_fifo_devices_and_a_huge_sparse_file(tmp_path):
    """A FIFO with no writer, /dev/zero, /dev/urandom and a file over max_file_bytes
    (default limits, a sparse 300 MiB file) are refused at once, in a real CLI run."""
    os.mkfifo(tmp_path / "fifo.jpg")
    with open(tmp_path / "huge.jpg", "wb") as fh:
        fh.truncate(300 * 1024 * 1024)
    rows = [{"image": p, "bbox": [[1, 1, 5, 5]]} for p in ("fifo.jpg", "/dev/zero", "/dev/urandom", "huge.jpg")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "regioncap", "engine=fake", "progress=false", "data=jsonl",
                           f"data.path={path}", "max_error_rate=1.0", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kinds = [r["error"]["kind"] for r in read_jsonl(out / "captions.jsonl")]
    assert kinds == ["not_a_file", "not_a_file", "not_a_file", "file_too_large"]
    assert os.stat(tmp_path / "huge.jpg").st_blocks == 0  # the test itself used no disk


def test_a_box_nested_past_the_recursion_limit_is_dropped_not_a_crash():
    from regioncap.boxes import parse_boxes

    deep: Any = []
    for _ in range(sys.getrecursionlimit() + 100):
        deep = [deep]
    parsed = parse_boxes([deep, [1, 1, 5, 5]], "xywh", 64, 48)
    assert len(parsed.boxes) == 1 and [d.reason for d in parsed.dropped] == ["wrong_arity"]
    json.dumps([d.raw for d in parsed.dropped])  # what the record carries can be written


@pytest.mark.parametrize("path", ["a\x00b.png", "\ud800.png"], ids=["nul", "lone_surrogate"])
def test_load_image_refuses_a_path_no_file_system_can_hold(path):
    from regioncap.images import ImageLoadError, load_image

    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.kind == "bad_image_value" and repr(path) in info.value.message


def test_an_input_field_named_input_survives_a_collision(tmp_path, assets):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": str(assets / "ok.png"), "bbox": [[2, 2, 9, 9]], "input": "mine",
                                "status": "theirs"}) + "\n")
    run_rows(path, tmp_path / "run")
    (rec,) = read_jsonl(tmp_path / "run" / "captions.jsonl")
    assert rec["input"] == {"input": "mine", "status": "theirs"}


def test_prompt_crop_on_a_thin_box_of_a_6000x60_image(tmp_path):
    """A box one line thick across a 6000x60 image: its crop was over 200:1 and the
    uncaught aspect-ratio error stopped the run; now it is widened and captioned."""
    Image.new("RGB", (6000, 60), (90, 120, 200)).save(tmp_path / "strip.png")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "strip.png", "bbox": [[0, 10, 6000, 2], [100, 20, 4900, 1], [10, 0, 30, 60]]})
                    + "\n")
    metrics = run_rows(path, tmp_path / "run", ("prompt=crop",))
    (rec,) = read_jsonl(tmp_path / "run" / "captions.jsonl")
    assert rec["status"] == "ok" and len(rec["regions"]) == 3 and metrics["rows"] == 1
    for req in rec["requests"]:
        w, h = req["image_size"]
        assert max(w, h) <= 200 * min(w, h)

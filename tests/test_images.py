"""Tests for regioncap.images: every error kind, mode conversion, orientation, draft, sizing."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncap import images
from regioncap.families.qwen import Qwen25VL, settled_size, smart_resize
from regioncap.images import (
    ImageLoadError,
    crop_with_margin,
    encode_image,
    load_image,
    resize_to,
    save_image,
)

# --------------------------------------------------------------------------- helpers


def is_fixed_size(width: int, height: int, *, min_pixels: int, max_pixels: int) -> bool:
    """Whether Qwen2.5-VL at this budget leaves a ``width x height`` image as it is."""
    return Qwen25VL(Qwen25VL.Config(min_pixels=min_pixels, max_pixels=max_pixels)).is_fixed_size(width, height)


def jpeg_bytes(img: Image.Image, orientation: int | None = None, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: nothing big is ever stored."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(img.getpixel(xy))


def close(a, b, tol: int = 6) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def split_image(w: int, h: int) -> Image.Image:
    """Left half red, right half blue: shows which way a transpose went."""
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (w // 2, 0, w, h))
    return img


def load_kind(src, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(src, **kwargs)
    return info.value.kind


# --------------------------------------------------------------------------- error kinds


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.kind == "missing_file"
    assert str(path) in info.value.message
    assert str(path) in str(info.value)


def test_missing_file_below_a_file(tmp_path: Path) -> None:
    # ENOTDIR, not ENOENT: still a missing file to the user.
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert load_kind(tmp_path / "a.jpg" / "b.jpg") == "missing_file"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    assert load_kind(tmp_path) == "not_a_file"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    def timeout(signum, frame):
        raise AssertionError("load_image blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    try:
        assert load_kind(fifo) == "not_a_file"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_device_is_not_a_file() -> None:
    assert load_kind("/dev/null") == "not_a_file"


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert load_kind(path) == "empty_file"
    assert load_kind(b"") == "empty_file"
    assert load_kind({"bytes": b"", "path": "x.png"}) == "empty_file"


def test_file_too_large(tmp_path: Path) -> None:
    data = png_bytes(Image.new("RGB", (8, 8)))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert load_kind(path, max_file_bytes=len(data) - 1) == "file_too_large"
    assert load_kind(data, max_file_bytes=len(data) - 1) == "file_too_large"
    assert load_image(path, max_file_bytes=len(data)).image.size == (8, 8)


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("just some text\n")
    assert load_kind(path) == "not_an_image"
    assert load_kind(b"not an image at all") == "not_an_image"


def test_truncated_jpeg_is_corrupt(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = jpeg_bytes(noisy)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert load_kind(path) == "corrupt_image"
    assert load_kind(data[: len(data) // 2]) == "corrupt_image"


def test_truncated_png_is_corrupt() -> None:
    rng = np.random.default_rng(1)
    data = png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    assert load_kind(data[: len(data) - 200]) == "corrupt_image"


def test_loader_leaves_truncated_images_setting_alone() -> None:
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_too_large_by_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(Image.new("RGB", (100, 100))))
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_image_pixels=100 * 100 - 1)
    assert info.value.kind == "image_too_large"
    assert "max_image_pixels" in info.value.message
    assert load_image(path, max_image_pixels=100 * 100).original_size == (100, 100)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_too_large_from_header_before_decoding() -> None:
    # 12000 x 12000 = 144 M pixels: over our 100 M default, under Pillow's own bomb error.
    with pytest.raises(ImageLoadError) as info:
        load_image(png_header_only(12_000, 12_000))
    assert info.value.kind == "image_too_large"
    assert "12000x12000" in info.value.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_header_is_too_large_naming_the_limit() -> None:
    # 100000^2 = 10^10 pixels trips Pillow's DecompressionBombError inside Image.open (or, where an
    # earlier load raised Pillow's limit that far, the run's own check): either way the setting is named.
    with pytest.raises(ImageLoadError) as info:
        load_image(png_header_only(100_000, 100_000))
    assert info.value.kind == "image_too_large"
    assert "max_image_pixels" in info.value.message


@pytest.mark.parametrize("limit, kind", [(200_000_000, "corrupt_image"), (100_000_000, "image_too_large")])
def test_a_limit_raised_over_pillows_own_is_the_one_that_counts(limit: int, kind: str) -> None:
    # 15000 x 10000 = 150 M pixels, over Pillow's own 89 M (it warned) and, with limits.max_image_pixels
    # at 300 M, a 200 M image was refused by Pillow's bomb error at 179 M: the raised limit was never reached.
    # Under the limit, Pillow opens the header and the decode then fails on the tiny data (no warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert load_kind(png_header_only(15_000, 10_000), max_image_pixels=limit) == kind


def test_in_memory_image_over_limit() -> None:
    assert load_kind(Image.new("RGB", (10, 10)), max_image_pixels=99) == "image_too_large"


@pytest.mark.parametrize(
    "value",
    [42, None, 3.5, ["a.jpg"], {"neither": 1}, {"bytes": None, "path": None}, {"bytes": 12}],
)
def test_bad_image_value(value) -> None:
    assert load_kind(value) == "bad_image_value"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, where chmod does not stop reads: simulate the refusal.
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(Image.new("RGB", (4, 4))))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images.os, "open", refuse)
    assert load_kind(path) == "unreadable_file"


def test_unsupported_mode() -> None:
    img = Image.new("La", (4, 4))
    try:
        img.convert("RGBA")
    except ValueError:
        # A mode Pillow cannot convert is an error row of its own kind.
        assert load_kind(img) == "unsupported_mode"
    else:  # a Pillow that converts La: the image loads as RGB like any other
        assert load_image(img).image.mode == "RGB"


def test_bad_aspect_ratio() -> None:
    with pytest.raises(ImageLoadError) as info:
        smart_resize(4020, 20, min_pixels=56 * 56, max_pixels=224 * 224, source="wide.png")
    assert info.value.kind == "bad_aspect_ratio"
    assert "wide.png" in info.value.message
    assert smart_resize(4000, 20, min_pixels=56 * 56, max_pixels=224 * 224)  # exactly 200 is allowed


# --------------------------------------------------------------------------- sources


def test_sources_path_bytes_dict_pil(tmp_path: Path) -> None:
    img = split_image(40, 20)
    data = png_bytes(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for src, source in [
        (path, str(path)),
        (str(path), str(path)),
        (data, "<in-memory>"),
        (bytearray(data), "<in-memory>"),
        ({"bytes": data, "path": "orig/a.png"}, "orig/a.png"),
        ({"bytes": data, "path": None}, "<in-memory>"),
        ({"bytes": None, "path": str(path)}, str(path)),
        (img, "<in-memory>"),
    ]:
        loaded = load_image(src)
        assert loaded.source == source
        assert loaded.original_size == (40, 20)
        assert loaded.image.mode == "RGB"
        assert np.array_equal(np.asarray(loaded.image), np.asarray(img))


def test_pil_input_is_not_modified_or_aliased() -> None:
    img = Image.new("RGBA", (6, 4), (10, 20, 30, 40))
    before = img.tobytes()
    loaded = load_image(img)
    assert img.mode == "RGBA" and img.tobytes() == before
    assert loaded.image is not img
    rgb = Image.new("RGB", (6, 4), (1, 2, 3))
    assert load_image(rgb).image is not rgb


def test_lazy_truncated_pil_input_is_corrupt() -> None:
    rng = np.random.default_rng(2)
    data = jpeg_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
    assert load_kind(lazy) == "corrupt_image"


# --------------------------------------------------------------------------- modes


def test_cmyk_to_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 4), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (4, 0, 8, 4))  # cyan on the right
    loaded = load_image(cmyk).image
    assert px(loaded, (0, 0)) == (255, 255, 255)
    assert px(loaded, (6, 2)) == (0, 255, 255)
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, "JPEG", quality=100)
    assert Image.open(path).mode == "CMYK"
    from_file = load_image(path).image
    assert close(px(from_file, (0, 0)), (255, 255, 255))
    assert close(px(from_file, (7, 2)), (0, 255, 255), tol=20)


def test_16bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    grey = Image.new("I;16", (4, 1))
    grey.putpixel((0, 0), 0)
    grey.putpixel((1, 0), 1000)
    grey.putpixel((2, 0), 32768)
    grey.putpixel((3, 0), 65535)
    path = tmp_path / "deep.png"
    grey.save(path)
    assert Image.open(path).mode.startswith("I;16")
    loaded = load_image(path).image
    values = [px(loaded, (x, 0)) for x in range(4)]
    assert values == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]


def test_32bit_int_is_scaled_as_16bit() -> None:
    img = Image.new("I", (2, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 25700)
    loaded = load_image(img).image
    assert px(loaded, (0, 0)) == (255, 255, 255)
    assert px(loaded, (1, 0)) == (100, 100, 100)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    rgb = split_image(8, 4)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    loaded = load_image(pal).image
    assert close(px(loaded, (0, 0)), (255, 0, 0)) and close(px(loaded, (7, 0)), (0, 0, 255))
    # Index of the blue half transparent: composited over white.
    blue_index = pal.getpixel((7, 0))
    pal.info["transparency"] = blue_index
    path = tmp_path / "t.png"
    pal.save(path, transparency=blue_index)
    loaded = load_image(path).image
    assert close(px(loaded, (0, 0)), (255, 0, 0))
    assert px(loaded, (7, 0)) == (255, 255, 255)


def test_alpha_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black must become white
    loaded = load_image(rgba).image
    assert px(loaded, (0, 0)) == (255, 255, 255)
    assert close(px(loaded, (2, 2)), (255, 127, 127), tol=2)
    la = Image.new("LA", (2, 2), (0, 0))
    assert px(load_image(la).image, (1, 1)) == (255, 255, 255)
    pa = Image.new("RGBA", (2, 2), (0, 0, 0, 0)).convert("PA")
    assert px(load_image(pa).image, (1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "1", "YCbCr", "RGB", "F"])
def test_other_modes_give_rgb(mode: str) -> None:
    assert load_image(Image.new(mode, (3, 3))).image.mode == "RGB"


# --------------------------------------------------------------------------- orientation and draft


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_sizes(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "o.jpg"
    path.write_bytes(jpeg_bytes(split_image(40, 20), orientation))
    loaded = load_image(path)
    expected = (20, 40) if orientation in (5, 6, 7, 8) else (40, 20)
    assert loaded.original_size == expected
    assert loaded.image.size == expected


def test_exif_orientation_6_rotates_clockwise(tmp_path: Path) -> None:
    # Orientation 6: the stored image is displayed turned 90 degrees clockwise,
    # so its left (red) half ends up on top.
    path = tmp_path / "o6.jpg"
    path.write_bytes(jpeg_bytes(split_image(40, 20), 6))
    img = load_image(path).image
    assert img.size == (20, 40)
    assert close(px(img, (10, 5)), (255, 0, 0), tol=40)
    assert close(px(img, (10, 35)), (0, 0, 255), tol=40)


def test_exif_orientation_on_pil_and_bytes_input(tmp_path: Path) -> None:
    data = jpeg_bytes(split_image(40, 20), 8)
    assert load_image(data).original_size == (20, 40)
    lazy = Image.open(io.BytesIO(data))
    loaded = load_image(lazy)
    assert loaded.original_size == (20, 40) and loaded.image.size == (20, 40)
    assert lazy.size == (40, 20)  # the caller's image is untouched


def test_draft_decodes_smaller_but_keeps_original_size(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(split_image(2000, 1500)))
    full = load_image(path)
    assert full.image.size == (2000, 1500)
    small = load_image(path, draft_target=(224, 224))
    assert small.original_size == (2000, 1500)
    # libjpeg scales by 1/2, 1/4 or 1/8: the largest that stays >= the target is 1/4 here.
    assert small.image.size == (500, 375)
    assert close(px(small.image, (10, 10)), (255, 0, 0), tol=40)


def test_draft_target_is_swapped_for_rotated_jpegs(tmp_path: Path) -> None:
    # Stored 2000x1500, displayed 1500x2000; a display target of 300x400 is 400x300 stored,
    # which allows 1/4 (500x375 stored). Without the swap only 1/2 would be chosen.
    path = tmp_path / "rot.jpg"
    path.write_bytes(jpeg_bytes(split_image(2000, 1500), 6))
    loaded = load_image(path, draft_target=(300, 400))
    assert loaded.original_size == (1500, 2000)
    assert loaded.image.size == (375, 500)
    assert loaded.image.size[0] >= 300 and loaded.image.size[1] >= 400


def test_draft_target_may_be_a_function_of_the_upright_size(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    path.write_bytes(jpeg_bytes(split_image(2000, 1500), 6))
    seen = []

    def rule(w: int, h: int) -> tuple[int, int]:
        seen.append((w, h))
        return smart_resize(w, h, min_pixels=56 * 56, max_pixels=224 * 224)

    loaded = load_image(path, draft_target=rule)
    assert seen == [(1500, 2000)]  # called with the corrected full-resolution size
    target = rule(1500, 2000)
    assert loaded.original_size == (1500, 2000)
    assert loaded.image.size[0] >= target[0] and loaded.image.size[1] >= target[1]
    # Target 168x252 (252x168 stored): 1/8 would give 250x188 stored, under 252, so 1/4.
    assert target == (168, 252) and loaded.image.size == (375, 500)


def test_draft_only_when_twice_as_large_and_jpeg(tmp_path: Path) -> None:
    jpg = tmp_path / "mid.jpg"
    jpg.write_bytes(jpeg_bytes(split_image(400, 300)))
    assert load_image(jpg, draft_target=(300, 200)).image.size == (400, 300)
    png = tmp_path / "big.png"
    png.write_bytes(png_bytes(split_image(800, 600)))
    assert load_image(png, draft_target=(100, 100)).image.size == (800, 600)


# --------------------------------------------------------------------------- smart_resize


def test_target_size_known_values() -> None:
    assert smart_resize(640, 480, min_pixels=56 * 56, max_pixels=224 * 224) == (252, 168)
    assert smart_resize(224, 224, min_pixels=56 * 56, max_pixels=224 * 224) == (224, 224)
    assert smart_resize(10, 10, min_pixels=56 * 56, max_pixels=224 * 224) == (56, 56)
    assert smart_resize(1920, 1080, min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28) == (1316, 728)
    assert smart_resize(512, 512, min_pixels=56 * 56, max_pixels=56 * 56) == (56, 56)


sizes = st.integers(min_value=1, max_value=12_000)
budgets = st.tuples(st.integers(1, 2048), st.integers(1, 64)).map(
    lambda t: (t[0] * 28 * 28, t[0] * 28 * 28 * t[1])
)


def _plausible(w: int, h: int) -> bool:
    return max(w, h) / min(w, h) <= 200


@settings(max_examples=400, deadline=None)
@given(sizes, sizes, budgets)
def test_target_size_multiples_of_28_and_within_budget(w: int, h: int, budget) -> None:
    if not _plausible(w, h):
        return
    mn, mx = budget
    try:
        tw, th = smart_resize(w, h, min_pixels=mn, max_pixels=mx)
    except ImageLoadError as exc:
        # Only an image over 100:1 can round past the processor's 200:1 (a short side to 28 px).
        assert exc.kind == "bad_aspect_ratio" and max(w, h) > 100 * min(w, h)
        return
    assert max(tw, th) <= 200 * min(tw, th)
    assert tw % 28 == 0 and th % 28 == 0 and tw >= 28 and th >= 28
    # The rule itself can overshoot max_pixels (rounding a thin side up to 28) or land
    # under min_pixels (flooring both sides); for ordinary shapes and budgets it does not.
    # (Float rounding in the rule can floor an exact 56.0 to 28: allow a 4x margin.)
    if max(w, h) / min(w, h) <= 4 and mx >= 4 * mn:
        assert mn <= tw * th <= mx


@settings(max_examples=400, deadline=None)
@given(sizes, sizes, budgets)
def test_target_size_is_a_fixed_point_for_usual_budgets(w: int, h: int, budget) -> None:
    """The size the pipeline draws at is one the processor keeps, and in the budget."""
    mn, mx = budget
    if not _plausible(w, h) or max(w, h) / min(w, h) > 4 or mx < 2 * mn:
        return
    tw, th = settled_size(w, h, min_pixels=mn, max_pixels=mx)
    assert is_fixed_size(tw, th, min_pixels=mn, max_pixels=mx)
    assert mn <= tw * th <= mx


def test_the_rule_can_land_under_min_pixels_and_the_settled_size_does_not() -> None:
    # Float rounding floors 1409 / 25.16... / 28 (exactly 2) to 1: transformers gives the same.
    assert smart_resize(1409, 1409, min_pixels=1568, max_pixels=3136) == (28, 28)
    assert not is_fixed_size(28, 28, min_pixels=1568, max_pixels=3136)
    assert settled_size(1409, 1409, min_pixels=1568, max_pixels=3136) == (56, 56)
    # Where the rule alternates (min == max, not square), its first answer stays.
    assert settled_size(2090, 966, min_pixels=224 * 224, max_pixels=224 * 224) == (308, 140)


def test_target_size_not_a_fixed_point_when_min_equals_max() -> None:
    # Documented caveat: with min == max a non-square result can be resized again.
    tw, th = smart_resize(2090, 966, min_pixels=224 * 224, max_pixels=224 * 224)
    assert (tw, th) == (308, 140)
    assert not is_fixed_size(tw, th, min_pixels=224 * 224, max_pixels=224 * 224)


@pytest.fixture(scope="module")
def reference_rules():
    """The two upstream implementations (each import pulls in torch: about 5 s, once).

    transformers' rule from its PIL image processor's module, which imports no
    torchvision (transformers 4 has the rule in the default module). qwen-vl-utils
    imports torchvision at module level: without it (the CPU-only set-up) its rule is
    None and only transformers' is checked.
    """
    try:
        hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    except pytest.skip.Exception:
        hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    if importlib.util.find_spec("torchvision") is None:
        return hf.smart_resize, None
    qvu = pytest.importorskip("qwen_vl_utils")
    return hf.smart_resize, qvu.smart_resize


@pytest.mark.slow  # over a second: the slow tier (the unit tier stays under 2 min)
@settings(max_examples=600, deadline=None)
@given(sizes, sizes, budgets, st.sampled_from([(14, 2), (16, 2)]))
def test_target_size_matches_upstream(reference_rules, w, h, budget, patch_merge) -> None:
    hf_rule, qvu_rule = reference_rules
    if not _plausible(w, h):
        return
    patch, merge = patch_merge
    factor = patch * merge
    mn, mx = (v * factor * factor // (28 * 28) for v in budget)
    hh, hw = hf_rule(h, w, factor=factor, min_pixels=mn, max_pixels=mx)
    if max(hh, hw) > 200 * min(hh, hw):
        # Upstream returns a size its own processor then refuses (it applies the rule
        # again to the resized image); smart_resize refuses it at once.
        with pytest.raises(ImageLoadError, match="resizes to"):
            smart_resize(w, h, min_pixels=mn, max_pixels=mx, patch_size=patch, merge_size=merge)
        return
    ours = smart_resize(w, h, min_pixels=mn, max_pixels=mx, patch_size=patch, merge_size=merge)
    assert ours == (hw, hh)
    if qvu_rule is None:
        return
    qh, qw = qvu_rule(h, w, factor=factor, min_pixels=mn, max_pixels=mx)
    if min(w, h) > factor / 2 and qh > 0 and qw > 0:
        # qwen_vl_utils differs only where it rounds a side to 28 that transformers
        # rounds to 0 (a side of at most half a patch) or where it returns a 0 side.
        assert ours == (qw, qh)


def test_target_size_rejects_bad_budgets() -> None:
    with pytest.raises(ValueError):
        smart_resize(100, 100, min_pixels=0, max_pixels=100)
    with pytest.raises(ValueError):
        smart_resize(100, 100, min_pixels=200, max_pixels=100)
    with pytest.raises(ValueError):
        smart_resize(0, 100, min_pixels=1, max_pixels=100)


def test_module_does_not_import_heavy_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys, regioncap.images, regioncap.draw; "
        "bad = [m for m in ('torch', 'transformers', 'qwen_vl_utils', 'hydra', 'wandb', 'numpy') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- resize, crop


def test_resize_to_bicubic_and_noop() -> None:
    img = split_image(40, 20)
    assert resize_to(img, (40, 20)) is img
    out = resize_to(img, (28, 56))
    assert out.size == (28, 56)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((28, 56), Image.Resampling.BICUBIC)))


class _Box:
    def __init__(self, x1, y1, x2, y2):
        self.x1, self.y1, self.x2, self.y2 = x1, y1, x2, y2


def test_crop_with_margin_basic() -> None:
    img = Image.new("RGB", (200, 100))
    crop, rect = crop_with_margin(img, (50, 20, 150, 60), margin=0.1)
    assert rect == (40, 16, 160, 64)
    assert crop.size == (120, 48)
    assert crop_with_margin(img, _Box(50, 20, 150, 60), margin=0.1)[1] == rect


def test_crop_with_margin_clamps_and_keeps_min_side() -> None:
    img = Image.new("RGB", (200, 100))
    # Margin past the top-left corner is clamped.
    assert crop_with_margin(img, (0, 0, 100, 50), margin=0.5)[1] == (0, 0, 150, 75)
    # A 4 px box grows to 28 px, centred...
    left, top, right, bottom = crop_with_margin(img, (100, 50, 104, 54), margin=0.0)[1]
    assert (right - left, bottom - top) == (28, 28)
    assert left <= 100 and right >= 104 and top <= 50 and bottom >= 54
    # ...and slides inward at an edge instead of shrinking.
    assert crop_with_margin(img, (196, 96, 200, 100), margin=0.0)[1] == (172, 72, 200, 100)
    # An image smaller than min_side gives the whole image.
    tiny = Image.new("RGB", (20, 10))
    assert crop_with_margin(tiny, (5, 2, 7, 4), margin=0.0)[1] == (0, 0, 20, 10)


def test_crop_square() -> None:
    img = Image.new("RGB", (200, 100))
    assert crop_with_margin(img, (80, 40, 120, 60), margin=0.0, square=True)[1] == (80, 30, 120, 70)
    # At the bottom edge the square is kept by sliding up.
    assert crop_with_margin(img, (80, 80, 120, 100), margin=0.0, square=True)[1] == (80, 60, 120, 100)
    # A box wider than the image is tall: full height, box width.
    assert crop_with_margin(img, (20, 40, 180, 60), margin=0.0, square=True)[1] == (20, 0, 180, 100)
    # A tiny box still gets a min_side square.
    assert crop_with_margin(img, (10, 10, 12, 12), margin=0.15, square=True)[1] == (0, 0, 28, 28)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 300), st.integers(1, 300),
    st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1),
    st.floats(0, 1), st.booleans(),
)
def test_crop_always_inside_and_covers_box(W, H, a, b, c, d, margin, square) -> None:
    x1, x2 = sorted((a * W, c * W))
    y1, y2 = sorted((b * H, d * H))
    if x2 <= 0 or y2 <= 0 or x1 >= W or y1 >= H:
        return
    img = Image.new("RGB", (W, H))
    crop, (l, t, r, btm) = crop_with_margin(img, (x1, y1, x2, y2), margin, square=square)
    if max(W, H) > 100 * min(W, H):
        # Over 100:1 the image cannot give a crop the model takes: its short side is padded.
        assert max(crop.size) <= 100 * min(crop.size)
        return
    assert 0 <= l < r <= W and 0 <= t < btm <= H
    assert crop.size == (r - l, btm - t)
    assert r - l >= min(28, W) and btm - t >= min(28, H)
    assert l <= max(0, x1) and r >= min(W, x2) and t <= max(0, y1) and btm >= min(H, y2)
    if square and r - l < W and btm - t < H:
        assert r - l == btm - t


def test_crop_rejects_outside_and_bad_boxes() -> None:
    img = Image.new("RGB", (50, 50))
    for box in [(60, 0, 70, 10), (10, 10, 5, 20), (1, 2, 3), "abcd", (0, 0, float("nan"), 1)]:
        with pytest.raises(ValueError):
            crop_with_margin(img, box, margin=0.1)
    with pytest.raises(ValueError):
        crop_with_margin(img, (1, 1, 10, 10), margin=-0.1)


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_save_image_atomic_roundtrip(tmp_path: Path, fmt: str) -> None:
    img = split_image(64, 32)
    path = tmp_path / f"out.{fmt}"
    save_image(img, path, fmt=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    back = Image.open(path)
    assert back.format == fmt.upper() and back.size == (64, 32)
    if fmt == "png":
        assert np.array_equal(np.asarray(back), np.asarray(img))
    # Overwrite in place.
    save_image(Image.new("RGB", (8, 8)), path, fmt=fmt)
    assert Image.open(path).size == (8, 8)


def test_save_image_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_image(Image.new("RGB", (4, 4)), tmp_path / "a.png", fmt="png")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.png").st_mode & 0o777) == 0o644


def test_save_image_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "a.gif", fmt="gif")
    with pytest.raises(ValueError):  # Pillow refuses to write an empty image
        save_image(Image.new("RGB", (0, 0)), tmp_path / "b.png", fmt="png")
    assert list(tmp_path.iterdir()) == []


def test_save_image_writes_the_encoded_bytes(tmp_path: Path) -> None:
    """The file holds exactly what encode_image makes (the bytes are encoded in memory, then written)."""
    img = split_image(64, 32)
    for fmt, quality in (("jpeg", 92), ("jpeg", 75), ("png", 92)):
        path = tmp_path / f"out.{fmt}"
        save_image(img, path, fmt=fmt, quality=quality)
        assert path.read_bytes() == encode_image(img, fmt, quality)


def test_save_image_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (a full disk) leaves neither a temp file nor a torn image, and keeps an older one."""
    import errno

    path = tmp_path / "a.jpg"
    save_image(Image.new("RGB", (8, 8)), path)
    before = path.read_bytes()

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        save_image(split_image(64, 32), path)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["a.jpg"] and path.read_bytes() == before


def test_loaded_image_is_the_callers_only_when_copied(tmp_path: Path) -> None:
    """A file's decoded image is handed over as decoded; a caller's image is copied, never drawn on."""
    src = split_image(32, 16)
    path = tmp_path / "a.png"
    src.save(path)
    from_file = load_image(str(path)).image
    from_object = load_image(src).image
    assert from_object is not src and from_file.mode == from_object.mode == "RGB"
    from_object.paste((0, 0, 0), (0, 0, 32, 16))
    from_file.paste((0, 0, 0), (0, 0, 32, 16))  # usable after its file was closed
    assert np.array_equal(np.asarray(src), np.asarray(split_image(32, 16)))


def test_encode_image() -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    data = encode_image(img, "jpeg", 90)
    assert data[:3] == b"\xff\xd8\xff"
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB" and close(px(decoded, (5, 5)), (0, 0, 255))
    assert encode_image(img, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    # 4:4:4 chroma keeps a 2 px coloured line coloured.
    line = Image.new("RGB", (32, 32), (255, 255, 255))
    line.paste((255, 0, 0), (15, 0, 17, 32))
    back = Image.open(io.BytesIO(encode_image(line)))
    assert close(px(back, (15, 16)), (255, 0, 0), tol=30)


@pytest.mark.parametrize("value,kind", [
    ("images/a.png", None), ("/abs/a.png", None), ("C:\\images\\a.png", None), ("c:/images/a.png", None),
    ("a:b.png", None), ("data.png", None), ("data:image/png;base64,AAAA", "data"), ("DATA:,x", "data"),
    ("file:///abs/a.png", "file"), ("FILE://localhost/a.png", "file"), ("http://h/a.png", "remote"),
    ("https://h/a.png", "remote"), ("s3://bucket/a.png", "remote"), ("gs://b/a.png", "remote"),
])
def test_image_uri_tells_paths_from_uris(value, kind):
    from regioncap.images import image_uri

    assert image_uri(value) == kind


def test_data_uri_loads_like_its_bytes_and_is_labelled_short(tmp_path):
    import base64

    from regioncap.images import uri_label

    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    got, want = load_image(uri), load_image(raw)
    assert got.original_size == want.original_size == (40, 30)
    assert got.image.tobytes() == want.image.tobytes()
    assert uri_label(uri) == f"<data URI: image/png, {len(uri) - len('data:image/png;base64,')} characters>"
    assert load_image((tmp_path / "a.png").as_uri()).original_size == (40, 30)
    with pytest.raises(ImageLoadError, match="never the network") as err:
        load_image("https://example.invalid/a.png")
    assert err.value.kind == "unsupported_url"

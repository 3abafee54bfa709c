"""Load, size, crop and write images for the model.

Pure library code: Pillow only (no Hydra, W&B, torch or transformers), so the
config layer, the tests and CPU-only machines can use it without heavy imports.

Coordinates: a box is ``(x1, y1, x2, y2)`` in pixels of the EXIF-corrected,
full-resolution image (``LoadedImage.original_size``); ``x2``/``y2`` are the
right/bottom edges, so a box covering the whole ``W x H`` image is
``(0, 0, W, H)``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import stat
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "LoadedImage",
    "load_image",
    "save_format",
    "file_extension",
    "image_uri",
    "file_uri_path",
    "uri_label",
    "resize_to",
    "crop_with_margin",
    "crop_aspect_limit",
    "save_image",
    "encode_image",
    "box_xyxy",
    "to_rgb",
]

#: Largest aspect ratio the Qwen-VL image processor accepts (``regioncap.families.qwen.smart_resize``).
MAX_ASPECT_RATIO = 200
#: Largest aspect ratio of a crop (:func:`crop_with_margin`): half the processor's
#: limit, because the model's input size rounds each side to one token and can up to double
#: the ratio (a 41 px side becomes 28); at 100:1 the resized crop stays within 200:1.
MAX_CROP_ASPECT_RATIO = MAX_ASPECT_RATIO / 2

# EXIF orientations that rotate by 90 or 270 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112

_IN_MEMORY = "<in-memory>"

# ``data:[<media type>][;base64],<data>`` (RFC 2397) and ``scheme://...`` (two or more
# letters, so a Windows drive letter ``C:\\`` is never taken for a scheme).
_DATA_URI = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),", re.IGNORECASE)
_SCHEME = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]+)://")


def image_uri(value: str) -> str | None:
    """What kind of URI the image value ``value`` is: ``data``, ``file``, ``remote`` or None (a path)."""
    if _DATA_URI.match(value):
        return "data"
    m = _SCHEME.match(value)
    if m is None:
        return None
    return "file" if m.group("scheme").lower() == "file" else "remote"


def file_uri_path(value: str) -> str:
    """The local path of a ``file://`` URI (``file:///a/b.png`` or ``file://localhost/a/b.png``)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(value)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError("unsupported_url", f"{value[:200]!r}: a file:// URI on another host "
                                                f"({parts.netloc}); give a local path")
    return unquote(parts.path)


def uri_label(value: str) -> str:
    """A short stand-in for a data URI in the records (its payload can be megabytes)."""
    m = _DATA_URI.match(value)
    if m is None:
        return value
    return f"<data URI: {m.group('type') or 'text/plain'}, {len(value) - m.end()} characters>"


def _load_uri(value: str, kind: str, max_image_pixels: int, max_file_bytes: int,
              draft_target: Any) -> LoadedImage:
    if kind == "file":
        return _load_path(file_uri_path(value), max_image_pixels, max_file_bytes, draft_target)
    if kind == "remote":
        scheme = _SCHEME.match(value).group("scheme")
        raise ImageLoadError(
            "unsupported_url",
            f"{value[:200]!r}: a URL ({scheme}://); regioncap reads local files, image bytes and data: URIs, "
            f"never the network: download the images and give their paths")
    m = _DATA_URI.match(value)
    label = uri_label(value)
    payload = "".join(value[m.end():].split())  # MIME encoders wrap base64 every 76 characters
    if ";base64" not in m.group("params").lower():
        raise ImageLoadError("bad_image_value", f"{label}: a data URI must be base64 (data:image/png;base64,...)")
    if len(payload) > (max_file_bytes + 2) // 3 * 4 + 4:
        raise ImageLoadError(
            "file_too_large", f"{label}: over the limit of {max_file_bytes} bytes (max_file_bytes) once decoded")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError("bad_image_value", f"{label}: not valid base64 ({exc})") from None
    return _load_bytes(data, source=label, max_image_pixels=max_image_pixels, max_file_bytes=max_file_bytes,
                       draft_target=draft_target)


class ImageLoadError(Exception):
    """An image could not be used; ``kind`` says why, ``message`` names the input.

    Kinds: ``missing_file``, ``not_a_file``, ``unreadable_file``, ``empty_file``,
    ``file_too_large``, ``not_an_image``, ``corrupt_image``, ``image_too_large``,
    ``unsupported_mode``, ``bad_image_value``, ``bad_aspect_ratio``, ``unsupported_url``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple:
        # The default pickles ``self.args`` (one string) and unpickling then calls
        # __init__ with one argument: a worker's error would arrive as a crash of
        # the pool ("a worker died") instead of as this error row.
        return (type(self), (self.kind, self.message))


@dataclass
class LoadedImage:
    """A decoded RGB image and the size its box coordinates refer to."""

    #: RGB, EXIF orientation applied; smaller than ``original_size`` when JPEG draft mode was used.
    image: Image.Image
    #: ``(width, height)`` of the EXIF-corrected full-resolution image: boxes refer to this.
    original_size: tuple[int, int]
    #: The file path, or ``"<in-memory>"``.
    source: str


def box_xyxy(box: Any) -> tuple[float, float, float, float]:
    """Return ``(x1, y1, x2, y2)`` from an object with those attributes or a 4-sequence.

    Accepting both keeps this module independent of ``regioncap.boxes``.
    """
    if all(hasattr(box, name) for name in ("x1", "y1", "x2", "y2")):
        values = (box.x1, box.y1, box.x2, box.y2)
    else:
        try:
            values = tuple(box)
        except TypeError:
            raise ValueError(f"box must have x1, y1, x2, y2 or be 4 numbers, got {box!r}") from None
        if len(values) != 4:
            raise ValueError(f"box must have 4 numbers (x1, y1, x2, y2), got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"box coordinates must be numbers, got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box coordinates must be finite, got {box!r}")
    return x1, y1, x2, y2


# --------------------------------------------------------------------------- loading


def load_image(
    src: str | os.PathLike | Image.Image | bytes | dict,
    *,
    max_image_pixels: int = 100_000_000,
    max_file_bytes: int = 200 * 1024 * 1024,
    draft_target: tuple[int, int] | Callable[[int, int], tuple[int, int]] | None = None,
) -> LoadedImage:
    """Decode ``src`` into an RGB image with EXIF orientation applied.

    ``src`` is a path, encoded bytes, a PIL image, or a Hugging Face ``datasets``
    image dict ``{"bytes": ..., "path": ...}`` (bytes win when both are set). A
    string may also be a base64 ``data:`` URI or a ``file://`` URI; any other URL
    (``http://``, ``s3://``, ...) is an ``unsupported_url`` error: nothing here
    reaches the network.

    Every failure is an :class:`ImageLoadError` whose ``kind`` a caller can count
    and whose message names the input. Files are checked with ``os.stat`` before
    opening (so a FIFO or device never blocks), the pixel count is checked from the
    header before decoding, and the whole image is decoded here so a truncated file
    fails now rather than later inside the model's processor.

    ``draft_target`` (width, height in the corrected orientation): for a JPEG at
    least twice as large on both sides, libjpeg decodes at a reduced scale that is
    still at least this size; ``original_size`` stays the full-resolution size.
    It may also be a function of the corrected full-resolution ``(width, height)``
    returning that target (e.g. the model's resize rule), since a caller does not
    know the size before the header is read.
    """
    if isinstance(src, Image.Image):
        # Already decoded, but the limit still guards drawing and encoding downstream.
        _check_pixels(src.size, _IN_MEMORY, max_image_pixels)
        _load_pixels(src, _IN_MEMORY)  # a lazily opened image decodes here; fail now, not mid-draw
        return _finish(src, source=_IN_MEMORY)
    if isinstance(src, dict):
        data, path = src.get("bytes"), src.get("path")
        if data is not None:
            return _load_bytes(
                data,
                source=str(path) if path else _IN_MEMORY,
                max_image_pixels=max_image_pixels,
                max_file_bytes=max_file_bytes,
                draft_target=draft_target,
            )
        if path:
            return _load_path(path, max_image_pixels, max_file_bytes, draft_target)
        raise ImageLoadError(
            "bad_image_value", f"image dict has neither 'bytes' nor 'path' (keys: {sorted(src)})"
        )
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _load_bytes(
            bytes(src),
            source=_IN_MEMORY,
            max_image_pixels=max_image_pixels,
            max_file_bytes=max_file_bytes,
            draft_target=draft_target,
        )
    if isinstance(src, str) and (uri := image_uri(src)):
        return _load_uri(src, uri, max_image_pixels, max_file_bytes, draft_target)
    if isinstance(src, (str, os.PathLike)):
        return _load_path(src, max_image_pixels, max_file_bytes, draft_target)
    raise ImageLoadError(
        "bad_image_value",
        f"image value must be a path, bytes, a PIL image or a {{'bytes', 'path'}} dict, "
        f"got {type(src).__name__}",
    )


def _load_path(
    path: str | os.PathLike,
    max_image_pixels: int,
    max_file_bytes: int,
    draft_target: Any,
) -> LoadedImage:
    source = os.fspath(path)
    if isinstance(source, bytes):
        source = os.fsdecode(source)
    try:
        st = os.stat(source)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageLoadError("missing_file", f"{source}: no such file") from None
    except OSError as exc:
        raise ImageLoadError("unreadable_file", f"{source}: cannot stat ({exc.strerror})") from None
    except ValueError as exc:  # a NUL byte, or a string the file system cannot encode
        raise ImageLoadError("bad_image_value", f"{source!r}: not a usable file path ({exc})") from None
    _check_file_stat(st, source, max_file_bytes)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat above,
        # opening still returns at once and the fstat below refuses it.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageLoadError("missing_file", f"{source}: no such file") from None
    except OSError as exc:
        raise ImageLoadError("unreadable_file", f"{source}: cannot open ({exc.strerror})") from None
    with open(fd, "rb") as fh:
        _check_file_stat(os.fstat(fd), source, max_file_bytes)
        return _decode(fh, source, max_image_pixels, draft_target)


def _check_file_stat(st: os.stat_result, source: str, max_file_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ImageLoadError("not_a_file", f"{source}: is {what}; expected an image file")
    if st.st_size == 0:
        raise ImageLoadError("empty_file", f"{source}: file is empty")
    if st.st_size > max_file_bytes:
        raise ImageLoadError(
            "file_too_large",
            f"{source}: {st.st_size} bytes is over the limit of {max_file_bytes} (max_file_bytes)",
        )


def _load_bytes(
    data: bytes,
    *,
    source: str,
    max_image_pixels: int,
    max_file_bytes: int,
    draft_target: Any,
) -> LoadedImage:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageLoadError(
            "bad_image_value", f"{source}: image 'bytes' must be bytes, got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ImageLoadError("empty_file", f"{source}: image bytes are empty")
    if len(data) > max_file_bytes:
        raise ImageLoadError(
            "file_too_large",
            f"{source}: {len(data)} bytes is over the limit of {max_file_bytes} (max_file_bytes)",
        )
    return _decode(io.BytesIO(bytes(data)), source, max_image_pixels, draft_target)


def _allow_pixels(max_image_pixels: int) -> None:
    """Let Pillow open every image ``max_image_pixels`` allows.

    Pillow refuses an image of over twice its own ``Image.MAX_IMAGE_PIXELS``
    (about 179 million pixels) inside ``Image.open``, before :func:`_check_pixels`
    sees its size, and warns from once that: a raised ``limits.max_image_pixels``
    was never reached, and an image under the run's limit printed a
    DecompressionBombWarning. So Pillow's limit is raised to the run's, never
    lowered (None, no limit, stays): an image over the run's limit is still
    refused, by :func:`_check_pixels` after its header, or by Pillow at twice it.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_image_pixels:
        Image.MAX_IMAGE_PIXELS = max_image_pixels


def _decode(fh: Any, source: str, max_image_pixels: int, draft_target: Any) -> LoadedImage:
    _allow_pixels(max_image_pixels)
    try:
        img = Image.open(fh)
    except UnidentifiedImageError:
        raise ImageLoadError("not_an_image", f"{source}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError("image_too_large", f"{source}: over the limit of {max_image_pixels} pixels "
                             f"(max_image_pixels): {exc}") from None
    except Exception as exc:  # a header parser choking on garbage is still "not an image"
        raise ImageLoadError("not_an_image", f"{source}: cannot read image header ({exc})") from None
    loaded: LoadedImage | None = None
    try:
        _check_pixels(img.size, source, max_image_pixels)
        w, h = img.size
        if draft_target is not None and img.format == "JPEG":
            # A JPEG keeps its EXIF block in the header (APP1): reading it decodes no
            # pixels, so it is safe before load(). Draft mode must be set before load().
            orientation = _orientation(img)
            if callable(draft_target):
                # The caller's target depends on the displayed size (e.g. the model's resize rule).
                draft_target = draft_target(*((h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)))
            tw, th = int(draft_target[0]), int(draft_target[1])
            if orientation in _SWAPPING_ORIENTATIONS:
                # The target is in display orientation; the stored JPEG is rotated.
                tw, th = th, tw
            if tw > 0 and th > 0 and w >= 2 * tw and h >= 2 * th:
                img.draft("RGB", (tw, th))
        _load_pixels(img, source)
        # Only now, with the pixels decoded: for a PNG, getexif() itself decodes the
        # image, and its decoder error would be swallowed by _orientation's fallback
        # (Pillow then returns the zero-filled image from every later load()).
        orientation = _orientation(img)
        loaded = _finish(img, source=source, orientation=orientation, stored_size=(w, h), owned=True)
        return loaded
    finally:
        if loaded is None or loaded.image is not img:
            img.close()  # its pixels were copied (or never used): free them now


def _load_pixels(img: Image.Image, source: str) -> None:
    """Decode the pixel data of ``img``: the one place decoding happens, every failure an ImageLoadError.

    Nothing may touch the pixels (or call ``getexif()``, which decodes a PNG)
    before this, since Pillow decodes only once: after a failed decode a second
    ``load()`` returns silently with a blank image.
    """
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError("image_too_large", f"{source}: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure means the data is unusable
        raise ImageLoadError(
            "corrupt_image", f"{source}: image data is truncated or corrupt ({exc})"
        ) from None


def _check_pixels(size: tuple[int, int], source: str, max_image_pixels: int) -> None:
    w, h = size
    if w * h > max_image_pixels:
        raise ImageLoadError(
            "image_too_large",
            f"{source}: {w}x{h} = {w * h} pixels is over the limit of {max_image_pixels} "
            "(max_image_pixels)",
        )


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or malformed).

    Call only after :func:`_load_pixels` (or, for a JPEG, before it: its EXIF is
    in the header), since the broad ``except`` below would hide a decoder error.
    """
    # A malformed EXIF block should not make a decodable image unusable.
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _finish(
    img: Image.Image,
    *,
    source: str,
    orientation: int | None = None,
    stored_size: tuple[int, int] | None = None,
    owned: bool = False,
) -> LoadedImage:
    """Apply EXIF orientation and convert to RGB.

    ``owned``: ``img`` was decoded here and no caller holds it, so an upright RGB
    image is returned as it is rather than copied.

    The orientation is read once and drives both the transpose and
    ``original_size``, so the two cannot disagree. (``ImageOps.exif_transpose``
    would read it again and also rewrite the EXIF block, which can fail on odd
    tags; the result here is a fresh RGB image that carries no metadata anyway.)
    """
    if orientation is None:
        orientation = _orientation(img)
    w, h = stored_size if stored_size is not None else img.size
    original_size = (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    # transpose() and to_rgb() return new images: a caller's PIL image is never modified.
    upright = img.transpose(method) if method is not None else img
    if (owned or upright is not img) and upright.mode == "RGB" and "transparency" not in upright.info:
        rgb = upright  # already a new image nobody else holds: to_rgb's copy would only cost time
    else:
        rgb = to_rgb(upright, source=source)
    return LoadedImage(image=rgb, original_size=original_size, source=source)


def to_rgb(img: Image.Image, *, source: str = _IN_MEMORY) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency is composited over white (dropping alpha would reveal whatever
    colour the transparent pixels happen to store), and 16-bit greyscale is scaled
    to 8 bits rather than clipped (Pillow's own conversion clips everything above
    255 to white).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img.copy()
    try:
        if mode.startswith("I;16") or mode == "I":
            # "I" almost always holds 16-bit data (older Pillow opened 16-bit PNGs so).
            # +0.5 rounds, since Pillow truncates the scaled value.
            return img.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L").convert("RGB")
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            mode in ("P", "L", "RGB", "1") and "transparency" in img.info
        )
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(
            "unsupported_mode", f"{source}: image mode {mode!r} cannot be converted to RGB ({exc})"
        ) from None


# --------------------------------------------------------------------------- sizing


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``(width, height)`` with bicubic resampling, as the Qwen processor does.

    Returns ``image`` itself when it already has that size (no copy).
    """
    size = (int(size[0]), int(size[1]))
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"resize target must be positive, got {size[0]}x{size[1]}")
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def crop_with_margin(
    image: Image.Image,
    box: Any,
    margin: float,
    min_side: int = 28,
    *,
    square: bool = False,
    max_aspect: float = MAX_CROP_ASPECT_RATIO,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Crop around ``box`` grown by ``margin`` times its width/height on each side.

    The crop is clamped to the image and made at least ``min_side`` pixels on each
    side when the image is that large (it slides inward at an edge rather than
    shrinking). ``square=True`` makes it a square of the longer side, slid inside
    the image, as a model trained on square crops expects; only where that square
    would not fit the image does an axis take the whole image. The crop always
    covers the part of the box inside the image. Returns the crop and
    its rectangle ``(left, top, right, bottom)`` in ``image`` pixels (right and
    bottom exclusive), so a caller can map coordinates back.

    A thin box (a line of text across a 6000x60 image) would give a crop too
    elongated for the model: the short side is widened, centred on the box and
    slid inside the image, until the crop is at most ``max_aspect`` : 1 (by
    default half the processor's 200:1, so the crop still fits after
    the model's input size rounds it). Where the image itself is too elongated for
    that, the crop takes the image's whole short side and is padded with black
    on both sides of it: the rectangle then reaches outside the image (negative
    ``left``/``top``, or ``right``/``bottom`` past the size), which maps
    coordinates back all the same.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x1, y1, x2, y2 = box_xyxy(box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {box!r} has x2 < x1 or y2 < y1")
    W, H = image.size
    if x2 <= 0 or y2 <= 0 or x1 >= W or y1 >= H:
        raise ValueError(f"box {box!r} lies outside the {W}x{H} image")
    bw, bh = x2 - x1, y2 - y1
    min_side = max(1, int(min_side))
    # Integer bounds of the box grown by the margin (may reach past the image).
    lo_x, hi_x = math.floor(x1 - margin * bw), math.ceil(x2 + margin * bw)
    lo_y, hi_y = math.floor(y1 - margin * bh), math.ceil(y2 + margin * bh)
    if square:
        side = max(hi_x - lo_x, hi_y - lo_y, min_side)
        # A square wider than the image cannot be had: that axis takes the whole image.
        left, right = _grow(lo_x, hi_x, min(side, W), W)
        top, bottom = _grow(lo_y, hi_y, min(side, H), H)
    else:
        left, right = max(0, lo_x), min(W, hi_x)
        top, bottom = max(0, lo_y), min(H, hi_y)
        if right - left < min(min_side, W):
            left, right = _grow(left, right, min(min_side, W), W)
        if bottom - top < min(min_side, H):
            top, bottom = _grow(top, bottom, min(min_side, H), H)
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    # Widen the short side of an over-long crop (integer ceil: float error must not leave it 1 px short).
    if right - left > max_aspect * (bottom - top):
        top, bottom = _widen(top, bottom, _ceil_div(right - left, max_aspect), H)
    elif bottom - top > max_aspect * (right - left):
        left, right = _widen(left, right, _ceil_div(bottom - top, max_aspect), W)
    rect = (left, top, right, bottom)
    return image.crop(rect), rect  # Pillow fills the part outside the image with black


def _widen(lo: int, hi: int, length: int, size: int) -> tuple[int, int]:
    """[lo, hi] grown to ``length``: slid inside [0, size] when it fits, else the whole
    of [0, size] centred in it (the rest is padding outside the image)."""
    if length <= size:
        return _grow(lo, hi, length, size)
    start = -((length - size) // 2)
    return start, start + length


def crop_aspect_limit(max_pixels: int, patch_size: int = 14, merge_size: int = 2) -> float:
    """The ``max_aspect`` of :func:`crop_with_margin` that keeps a crop's input size
    (``regioncap.families.qwen.smart_resize``) within ``max_pixels``: :data:`MAX_CROP_ASPECT_RATIO`,
    or less on a small budget.

    The input size never makes a side shorter than one token, so a
    crop of ``a`` : 1 costs at least about ``a`` tokens; on a budget of ``n``
    tokens the crop is kept to ``n / 2`` : 1 (at least square).
    """
    tokens = max_pixels / float(patch_size * merge_size) ** 2
    return max(1.0, min(MAX_CROP_ASPECT_RATIO, tokens / 2))


def _ceil_div(length: int, ratio: float) -> int:
    """Smallest whole ``n`` with ``length <= ratio * n``."""
    n = max(1, math.ceil(length / ratio))
    while length > ratio * n:
        n += 1
    while n > 1 and length <= ratio * (n - 1):
        n -= 1
    return n





def _grow(lo: int, hi: int, length: int, size: int) -> tuple[int, int]:
    """Interval of ``length`` centred on [lo, hi], slid (not cut) to fit inside [0, size].

    Sliding keeps [lo, hi] covered wherever it lies in the image and length >= hi - lo.
    """
    start = lo - (length - (hi - lo)) // 2
    start = min(max(start, 0), size - length)
    return start, start + length


# --------------------------------------------------------------------------- writing


def save_format(fmt: str, quality: int) -> tuple[str, dict[str, Any]]:
    """Pillow's format name and save options for ``draw.image_format`` ``fmt`` (``jpeg``, ``jpg`` or
    ``png``, any case); ValueError for another format or a JPEG quality outside 1..100."""
    key = fmt.lower()
    if key in ("jpeg", "jpg"):
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be 1..100, got {quality}")
        # 4:4:4 chroma: the default 4:2:0 halves colour resolution and smears the
        # 2 px coloured box outlines the model is meant to see.
        return "JPEG", {"quality": int(quality), "subsampling": 0}
    if key == "png":
        return "PNG", {}
    raise ValueError(f"image format must be 'jpeg' or 'png', got {fmt!r}")


def file_extension(fmt: str) -> str:
    """The file name extension of images written in ``draw.image_format`` ``fmt`` (``PNG`` too is ``png``)."""
    return "png" if save_format(fmt, 92)[0] == "PNG" else "jpg"


def _prepare(image: Image.Image, pil_format: str) -> Image.Image:
    if pil_format == "JPEG" and image.mode not in ("RGB", "L"):
        return to_rgb(image)
    return image


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 92) -> bytes:
    """Encode ``image`` as JPEG or PNG bytes (e.g. for a base64 data URL)."""
    pil_format, kwargs = save_format(fmt, quality)
    buf = io.BytesIO()
    _prepare(image, pil_format).save(buf, format=pil_format, **kwargs)
    return buf.getvalue()


def save_image(
    image: Image.Image, path: str | os.PathLike, *, fmt: str = "jpeg", quality: int = 92
) -> None:
    """Write ``image`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    A reader (or a resumed run) therefore never sees a half-written image.
    """
    # Encoded in memory first, then one write: the temporary file exists only for that write
    # (Pillow writing to a file makes a syscall per encoder chunk; the bytes are the same).
    encoded = encode_image(image, fmt, quality)
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 honours the umask, unlike tempfile's fixed 0o600, so the
    # final file gets the same permissions as any other output.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            data = memoryview(encoded)
            while data:  # os.write may write less than asked (a signal, a full pipe-like target)
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

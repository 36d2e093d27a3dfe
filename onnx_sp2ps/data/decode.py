"""Image files -> Pillow images in the model's colour mode, behind the guards a file
made to hang or exhaust the audit meets: only regular files are opened, only the formats
of :data:`IMAGE_SUFFIXES` are decoded (a ``.png`` that is really EPS or PSD never reaches
those plugins), an image whose header claims more than :data:`MAX_IMAGE_PIXELS` pixels,
or whose preprocessing would make that many, is refused before decoding (Pillow's own
bomb warning is made an error), only the first frame of a multi-frame file is read, and
the colour mode is converted (EXIF orientation, alpha dropped, 16-bit and float greys
scaled to 8 bits). With fast decoding a JPEG may be decoded at 1/2, 1/4 or 1/8 scale
(Pillow's draft mode), after the same guards. A file that cannot be used raises
:class:`_DecodeFailure`, whose message is the one-line reason; nothing is printed.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from onnx_sp2ps.files import NotRegularFile, open_regular, show

__all__ = ["DRAFTED", "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "MPO")
#: Images with more pixels than this are refused (decompression-bomb guard); the value
#: is Pillow's default ``Image.MAX_IMAGE_PIXELS``. Pillow's own global is left alone.
#: The limit also applies to what preprocessing would make of an image: the resized image
#: before the centre crop, and the model's input size; both are worked out from the
#: image's header, before decoding.
MAX_IMAGE_PIXELS = 89_478_485

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_PLAIN_MODES = ("1", "L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LAB")
#: Formats decoded at reduced scale by fast decoding (libjpeg's DCT scaling).
_DRAFT_FORMATS = ("JPEG", "MPO")
#: EXIF orientations that swap width and height (transpose, rotations by 90 degrees).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
#: Key of ``Image.info`` recording a reduced-scale decode (``preprocess.DRAFTED``).
DRAFTED = "onnx_sp2ps.drafted"
# Image.open runs Pillow's decompression-bomb check, which may warn; the warning is
# turned into an error under this lock so that it never reaches stderr.
_OPEN_LOCK = threading.Lock()


class _DecodeFailure(Exception):
    """An image file cannot be used; the message is the reason."""


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greys to 8-bit 'L'.

    'I;16*' and 'I' are read as 16-bit (0..65535 -> 0..255, values outside clipped);
    'F' is read as 0..1 when its maximum is at most 1, as 0..255 when at most 255,
    else as 16-bit. NaN becomes 0.
    """
    with np.errstate(invalid="ignore"):  # signalling NaNs in 'F' images; made 0 below
        values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.size else 0.0
        if peak <= 1.0:
            values = values * 255.0
        elif peak > 255.0:
            values = values / 257.0
    else:
        values = values / 257.0
    return Image.fromarray(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))


def _to_model_mode(image: Image.Image, channels: int) -> Image.Image:
    """Apply the EXIF orientation and convert to 'RGB' (3 channels) or 'L' (1 channel).

    Alpha is dropped (not composited); palette images go through RGBA; CMYK, YCbCr,
    HSV and LAB through RGB; deep greys are scaled to 0..255 (see :func:`_high_depth_to_l`).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_l(image)
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode not in _PLAIN_MODES:
        raise _DecodeFailure(f"unsupported image mode {image.mode!r}")
    if channels == 3:
        return image if image.mode == "RGB" else image.convert("RGB")
    if image.mode in ("L", "1", "LA"):
        return image.convert("L")
    return image.convert("RGB").convert("L")


def _bomb_reason(pillow: str) -> str:
    """The reason for an image refused by Pillow's own decompression-bomb check, which runs
    first, inside ``Image.open``: it warns (made an error here) over ``Image.MAX_IMAGE_PIXELS``
    and raises over twice that, and its message quotes the limit it used. Over
    :data:`MAX_IMAGE_PIXELS`, the reason quotes this limit, the one enforced (the same as
    Pillow's by default), so that it never shows Pillow's doubled one."""
    found = re.search(r"\(([0-9]+) pixels\)", pillow)
    if found and int(found.group(1)) > MAX_IMAGE_PIXELS:
        return (
            f"refused before decoding (decompression-bomb guard): image is "
            f"{int(found.group(1))} pixels, over the limit of {MAX_IMAGE_PIXELS}"
        )
    return "refused before decoding (decompression-bomb guard): " + show(pillow.rstrip("."))


def _draft(
    image: Image.Image, request: Callable[[tuple[int, int]], tuple[int, int] | None]
) -> tuple[tuple[int, int], tuple[float, float, float, float]] | None:
    """Set up a JPEG to decode at reduced scale, before it is loaded: ``request`` gets the
    image's (W, H) as it is once its EXIF orientation is applied and returns the size to
    pass to ``Image.draft``, or None. Returns that full (W, H) and the box of the decoded
    (and oriented) image that the full image covers, or None when the image is decoded at
    full size: other formats, progressive or multi-tile files Pillow cannot draft, and
    re-oriented images whose reduced size is not exact (libjpeg then adds a partial
    pixel on the right or bottom edge, which the orientation may move)."""
    if image.format not in _DRAFT_FORMATS or image.mode not in ("RGB", "L", "CMYK"):
        return None
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    swapped = orientation in _SWAPPING_ORIENTATIONS
    oriented = (height, width) if swapped else (width, height)
    wanted = request(oriented)
    if wanted is None:
        return None
    if swapped:
        wanted = (wanted[1], wanted[0])
    scale = min(width // wanted[0], height // wanted[1])
    if orientation not in (None, 1) and (width % scale or height % scale):
        return None
    drafted = image.draft(image.mode, wanted)
    if drafted is None or image.size == (width, height):
        return None
    _, (_, _, box_w, box_h) = drafted
    box = (0.0, 0.0, box_h, box_w) if swapped else (0.0, 0.0, box_w, box_h)
    return oriented, box


def _open_image(
    path: Path,
    channels: int,
    check_size: Callable[[tuple[int, int]], object],
    draft: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None,
) -> Image.Image:
    """Open, size-check, decode and convert one file (see :func:`_to_model_mode`).

    ``check_size`` is called with the image's (W, H), read from its header, before
    decoding; it raises :class:`_DecodeFailure` to refuse an image whose preprocessing
    would make one too large (the caller passes the resize plan of
    :mod:`onnx_sp2ps.data.preprocess`).

    ``draft`` (fast decoding), called after ``check_size``, lets a JPEG be decoded at
    reduced scale (see :func:`_draft`); the returned image then records its full size
    and the box its pixels cover under ``info[DRAFTED]``, for the resize.

    Any failure is a :class:`_DecodeFailure` with a one-line reason: a file that is not a
    regular file is refused before it is opened; an image is refused before decoding when
    it, or what preprocessing would make of it, has more than :data:`MAX_IMAGE_PIXELS`
    pixels (only the first frame of a multi-frame file is read); whatever Pillow raises on
    a corrupt or truncated file is caught.
    """
    try:
        with open_regular(path) as handle:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                # Only the formats of IMAGE_SUFFIXES: a file named .png that is really
                # EPS or PSD never reaches those plugins (or Ghostscript).
                opened = Image.open(handle, formats=_FORMATS)
            with opened as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _DecodeFailure(
                        f"refused before decoding (decompression-bomb guard): image is "
                        f"{width}x{height} = {width * height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS}"
                    )
                check_size(image.size)
                drafted = None if draft is None else _draft(image, draft)
                image.load()
                converted = _to_model_mode(image, channels)
                if drafted is not None:
                    converted.info[DRAFTED] = drafted
                return converted
    except _DecodeFailure:
        raise
    except MemoryError:
        raise
    except NotRegularFile as exc:
        raise _DecodeFailure(f"refused before reading: it is {exc}, not a regular file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _DecodeFailure(_bomb_reason(str(exc))) from None
    except UnidentifiedImageError:
        raise _DecodeFailure(
            "cannot decode: UnidentifiedImageError: not an image file that Pillow recognises"
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise _DecodeFailure(f"cannot decode: {type(exc).__name__}: {show(reason)}") from None
    except Exception as exc:  # Pillow raises many types on corrupt files
        raise _DecodeFailure(f"cannot decode: {type(exc).__name__}: {show(str(exc))}") from None

"""Images and arrays -> float32 batches in a model's layout, with labels.

Two sources are accepted:

* a **folder** of images (searched recursively), decoded and preprocessed here:
  EXIF orientation, colour mode, resize (or resize + centre crop), scale, mean/std,
  optional BGR order, channels-first or channels-last;
* a **preprocessed array file** (``.npy`` or ``.npz``) whose values are used as given.

Labels come from the first-level sub-folder of each image (integer folder names, or
folder names looked up in a list of class names), or from the ``labels`` array of an
``.npz`` file.

The module never prints; problems raise :class:`~onnx_sp2ps.errors.DataError`
(unusable images or arrays), :class:`~onnx_sp2ps.errors.UsageError` (contradictory
settings) or :class:`~onnx_sp2ps.errors.MismatchError` (a size the model cannot take).
"""

from __future__ import annotations

import functools
import math
import mmap
import operator
import os
import re
import stat
import threading
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from onnx_sp2ps.errors import DataError, MismatchError, UsageError
from onnx_sp2ps.files import (
    NotRegularFile,
    file_kind,
    memory_budget,
    open_regular,
    show,
    special_kind,
)

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "IMAGE_SUFFIXES",
    "ARRAY_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MAX_CLASS_NAMES_BYTES",
    "InputSpec",
    "Preprocess",
    "ResolvedPreprocess",
    "Batch",
    "ImageSet",
    "parse_size",
    "preprocess_image",
    "display_image",
    "open_images",
]

LAYOUTS = ("NCHW", "NHWC")
PRESETS: dict[str, dict[str, Any]] = {
    "unit": dict(scale=1 / 255, mean=(0.0,), std=(1.0,)),
    "imagenet": dict(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "raw": dict(scale=1.0, mean=(0.0,), std=(1.0,)),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "MPO")
#: Images with more pixels than this are refused (decompression-bomb guard); the value
#: is Pillow's default ``Image.MAX_IMAGE_PIXELS``. Pillow's own global is left alone.
#: The limit also applies to what preprocessing would make of an image: the resized image
#: before the centre crop, and the model's input size; both are worked out from the
#: image's header, before decoding.
MAX_IMAGE_PIXELS = 89_478_485
#: Class-names files larger than this (bytes) are refused, unread.
MAX_CLASS_NAMES_BYTES = 16 * 1024 * 1024
#: Preset name recorded for array files, whose values are used as given.
ARRAY_PRESET = "array"
#: Ratio of crop size to resized shorter side in centre-crop mode (224 -> 256).
CROP_RATIO = 0.875

_NPZ_INPUT_KEYS = ("images", "inputs", "x")
_NPZ_LABEL_KEYS = ("labels", "y")
_DECODE_WORKERS = 2
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_PLAIN_MODES = ("1", "L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LAB")
_INTEGER_NAME = re.compile(r"[0-9]+")
# Image.open runs Pillow's decompression-bomb check, which may warn; the warning is
# turned into an error under this lock so that it never reaches stderr.
_OPEN_LOCK = threading.Lock()


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """What the model's image input takes, as read from the ONNX graph.

    Parameters
    ----------
    layout : str
        ``"NCHW"`` or ``"NHWC"``.
    channels, height, width : int or None
        Static sizes, or None where the graph leaves them symbolic.
    batch : int or None, default None
        Fixed batch size of the model, or None if dynamic. Recorded only:
        :meth:`ImageSet.iter_batches` yields the batch size the caller asks for, and the
        caller splits or pads batches for a model with a fixed batch.
    """

    layout: str
    channels: int | None
    height: int | None
    width: int | None
    batch: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise UsageError(
                f"input layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}"
            )
        for name in ("channels", "height", "width", "batch"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise UsageError(f"input {name} must be a positive integer or None; got {value!r}")

    @property
    def static_size(self) -> tuple[int, int] | None:
        """(H, W) when both are static, else None."""
        if self.height is None or self.width is None:
            return None
        return (self.height, self.width)


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How images are turned into model inputs, as asked by the user.

    Every option left at None takes its value from the preset or from the model;
    :meth:`resolved` fills them in and validates the whole.

    Parameters
    ----------
    preset : {"unit", "imagenet", "raw"}, default "unit"
        Scale, mean and std to start from (see :data:`PRESETS`).
    size : (int, int) or None
        Input size (H, W); None takes the model's static size.
    center_crop : bool, default False
        Resize the shorter side to ``round(max(H, W) / 0.875)`` keeping the aspect ratio,
        then crop the central H x W (the usual ImageNet evaluation transform).
        Otherwise the image is resized to H x W directly.
    scale : float or None
        Pixel values (0..255) are multiplied by it before normalisation.
    mean, std : tuple of float or None
        ``x = (pixel * scale - mean) / std`` per channel; one value or one per channel,
        in RGB order (as in the presets) even with ``bgr``.
    bgr : bool, default False
        Feed 3-channel models in BGR order instead of RGB: the channels are reversed
        after normalisation.
    layout : {"NCHW", "NHWC"} or None
        Override of the layout read from the model.
    """

    preset: str = "unit"
    size: tuple[int, int] | None = None
    center_crop: bool = False
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False
    layout: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UsageError(
                f"unknown preprocessing preset {self.preset!r}: use one of {', '.join(PRESETS)}"
            )
        if self.size is not None:
            object.__setattr__(self, "size", _check_size(self.size))
        if self.layout is not None and self.layout not in LAYOUTS:
            raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.scale is not None:
            scale = _check_float("scale", self.scale)
            if scale <= 0:
                raise UsageError(f"scale must be positive; got {self.scale!r}")
            object.__setattr__(self, "scale", scale)
        if self.mean is not None:
            object.__setattr__(self, "mean", _check_values("mean", self.mean))
        if self.std is not None:
            std = _check_values("std", self.std)
            if any(v == 0 for v in std):
                raise UsageError(f"std must be nonzero; got {', '.join(f'{v:g}' for v in std)}")
            object.__setattr__(self, "std", std)

    def resolved(self, spec: InputSpec) -> ResolvedPreprocess:
        """Fill every value from the preset and the model, and validate them together.

        Parameters
        ----------
        spec : InputSpec
            The model's image input.

        Returns
        -------
        ResolvedPreprocess

        Raises
        ------
        UsageError
            The model's size is dynamic and no size was given; mean or std have a wrong
            number of values; BGR asked for a 1-channel model.
        MismatchError
            A size was given that differs from the model's static size.
        DataError
            The model takes a channel count other than 1 or 3, which images cannot feed.
        """
        layout = self.layout or spec.layout
        size = _resolve_size(self.size, spec)
        channels = 3 if spec.channels is None else spec.channels
        if channels not in (1, 3):
            raise DataError(
                f"the model takes {channels}-channel inputs; image folders can feed 1-channel "
                "(grey) or 3-channel (RGB) models only: save the inputs as a .npy array in the "
                "model's layout and pass that instead"
            )
        if self.bgr and channels != 3:
            raise UsageError(
                "BGR order needs a 3-channel model; this model takes 1 channel: drop --bgr"
            )
        scale, mean, std = _values(self, channels)
        return ResolvedPreprocess(
            preset=self.preset,
            size=size,
            center_crop=self.center_crop,
            scale=scale,
            mean=mean,
            std=std,
            bgr=self.bgr,
            layout=layout,
            channels=channels,
        )


@dataclass(frozen=True, kw_only=True)
class ResolvedPreprocess:
    """Preprocessing with every value filled in; what was actually applied.

    Parameters
    ----------
    preset : str
        Name of the preset the values started from, or ``"array"`` for array files,
        whose values are used as given (then ``scale``, ``mean``, ``std`` and ``bgr``
        only say how the array was made, to invert it for display).
    size : (int, int)
        Input size (H, W).
    center_crop : bool
        Resize the shorter side to :attr:`resize_shorter`, then crop the centre.
    scale : float
    mean, std : tuple of float
        One value per channel.
    bgr : bool
    layout : {"NCHW", "NHWC"}
    channels : int
    """

    preset: str
    size: tuple[int, int]
    center_crop: bool
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr: bool
    layout: str
    channels: int

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UsageError(f"mean and std must have one value per channel ({self.channels})")

    @property
    def applied(self) -> bool:
        """False for array files, whose values are used as given."""
        return self.preset != ARRAY_PRESET

    @property
    def resize_shorter(self) -> int | None:
        """Shorter side before the centre crop, or None without centre crop."""
        if not self.center_crop:
            return None
        return int(round(max(self.size) / CROP_RATIO))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description, for the report.

        Returns
        -------
        dict
            The fields, plus ``applied`` and ``resize_shorter``.
        """
        return {
            "preset": self.preset,
            "applied": self.applied,
            "size": [int(self.size[0]), int(self.size[1])],
            "center_crop": bool(self.center_crop),
            "resize_shorter": self.resize_shorter,
            "scale": float(self.scale),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "bgr": bool(self.bgr),
            "layout": self.layout,
            "channels": int(self.channels),
        }

    def describe(self) -> str:
        """One line, e.g. ``"unit: 64x64 RGB NCHW, x*0.00392157, mean 0 std 1"``.

        Returns
        -------
        str
        """
        height, width = self.size
        if not self.applied:
            return (
                f"{self.preset}: {height}x{width} {self.channels}-channel {self.layout}, "
                "values as given (no preprocessing)"
            )
        colour = {1: "grey", 3: "BGR" if self.bgr else "RGB"}.get(
            self.channels, f"{self.channels}-channel"
        )
        crop = f", resize {self.resize_shorter} + centre crop" if self.center_crop else ""
        return (
            f"{self.preset}: {height}x{width} {colour} {self.layout}{crop}, x*{self.scale:.6g}, "
            f"mean {_format_values(self.mean)} std {_format_values(self.std)}"
        )


# --------------------------------------------------------------------------- helpers


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_size(size: object) -> tuple[int, int]:
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise UsageError(f"size must be (height, width); got {size!r}")
    if not all(_is_int(v) and v > 0 for v in size):
        raise UsageError(f"size must be two positive integers (height, width); got {size!r}")
    return (int(size[0]), int(size[1]))


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{name} must be a number; got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise UsageError(f"{name} must be finite; got {value!r}")
    return result


def _check_values(name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
        raise UsageError(f"{name} must be one number or one per channel; got {values!r}")
    return tuple(_check_float(name, v) for v in values)


def _per_channel(name: str, values: Sequence[float], channels: int) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(float(values[0]) for _ in range(channels))
    if len(values) != channels:
        raise UsageError(
            f"{name} has {len(values)} values but the model takes {channels} channel(s): "
            f"give 1 value or {channels}"
        )
    return tuple(float(v) for v in values)


def _values(pre: Preprocess, channels: int) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    """Scale, mean and std (one per channel) from the preset and the overrides."""
    preset = PRESETS[pre.preset]
    scale = float(preset["scale"] if pre.scale is None else pre.scale)
    mean = _per_channel("mean", preset["mean"] if pre.mean is None else pre.mean, channels)
    std = _per_channel("std", preset["std"] if pre.std is None else pre.std, channels)
    return scale, mean, std


def _format_values(values: Sequence[float]) -> str:
    if all(v == values[0] for v in values):
        return f"{values[0]:g}"
    return ",".join(f"{v:g}" for v in values)


def _format_size(size: tuple[int | None, int | None]) -> str:
    return "x".join("?" if v is None else str(v) for v in size)


def _resolve_size(size: tuple[int, int] | None, spec: InputSpec) -> tuple[int, int]:
    model = (spec.height, spec.width)
    if size is None:
        if spec.static_size is None:
            raise UsageError(
                f"the model's input size is dynamic ({_format_size(model)}): pass --size HxW"
            )
        return spec.static_size
    if any(m is not None and m != s for m, s in zip(model, size)):
        raise MismatchError(
            f"the model takes {_format_size(model)} inputs but the size asked is "
            f"{size[0]}x{size[1]}: drop --size or pass {_format_size(model)}"
        )
    return size


def parse_size(text: str) -> tuple[int, int]:
    """Parse an input size given on the command line.

    Parameters
    ----------
    text : str
        ``"HxW"`` (e.g. ``"224x160"``) or a single number for a square size.

    Returns
    -------
    (int, int)
        (H, W).

    Raises
    ------
    UsageError
        The text is not one or two positive integers.

    Examples
    --------
    >>> parse_size("224x160")
    (224, 160)
    >>> parse_size("64")
    (64, 64)
    """
    parts = re.split(r"\s*[xX×]\s*", str(text).strip())
    if len(parts) in (1, 2) and all(re.fullmatch(r"[0-9]+", p) for p in parts):
        values = [int(p) for p in parts]
        if all(v > 0 for v in values):
            return (values[0], values[-1])
    raise UsageError(f"size must be HxW or one number, e.g. 224x224 or 224; got {text!r}")


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- images


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


def _resize_plan(
    size: tuple[int, int], pre: ResolvedPreprocess
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """(W, H) an image of ``size`` (W, H) is resized to, and the crop box after, or None.

    Raises :class:`_DecodeFailure` (decompression-bomb guard) when the resized or the final
    image would have more than :data:`MAX_IMAGE_PIXELS` pixels: with centre crop, a very
    elongated image (1 x 1,000,000) would be resized to (73 x 73,000,000) first.
    """
    height, width = pre.size
    old_w, old_h = size
    if old_w < 1 or old_h < 1:
        raise _DecodeFailure(f"the image is {old_w}x{old_h}: it has no pixels")
    if not pre.center_crop:
        resized, box = (width, height), None
    else:
        shorter = pre.resize_shorter
        assert shorter is not None
        # Same arithmetic as torchvision's Resize(int) and CenterCrop.
        if old_w <= old_h:
            new_w, new_h = shorter, int(shorter * old_h / old_w)
        else:
            new_w, new_h = int(shorter * old_w / old_h), shorter
        top = int(round((new_h - height) / 2.0))
        left = int(round((new_w - width) / 2.0))
        resized, box = (new_w, new_h), (left, top, left + width, top + height)
    for what, (w, h) in (("resized", resized), ("prepared", (width, height))):
        if w * h > MAX_IMAGE_PIXELS:
            raise _DecodeFailure(
                f"refused before resizing (decompression-bomb guard): the {old_w}x{old_h} "
                f"image would be {what} to {w}x{h} = {w * h} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS}"
            )
    return resized, box


def _resize(image: Image.Image, pre: ResolvedPreprocess) -> Image.Image:
    """Resize to pre.size, or resize the shorter side and crop the centre.

    Raises :class:`_DecodeFailure` when that would make too large an image
    (see :func:`_resize_plan`).
    """
    resized, box = _resize_plan(image.size, pre)
    image = image.resize(resized, Image.Resampling.BILINEAR, reducing_gap=None)
    return image if box is None else image.crop(box)


def _normalise(pixels: np.ndarray, pre: ResolvedPreprocess) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> float32 model input of one image."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if abs(pre.scale * 255.0 - 1.0) < 1e-12:
        x = pixels.astype(np.float32) / np.float32(255.0)  # equals torch's x.float() / 255.0
    else:
        x = pixels.astype(np.float32) * np.float32(pre.scale)
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if np.any(mean != 0):
        x = x - mean
    if np.any(std != 1):
        x = x / std
    if pre.bgr:
        x = x[:, :, ::-1]
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_image(image: Image.Image, pre: ResolvedPreprocess) -> np.ndarray:
    """Turn one image into one model input.

    Steps: EXIF orientation; colour mode ('RGB' for 3-channel models, 'L' for 1-channel;
    alpha dropped; 16-bit and float greys scaled to 0..255); resize to ``pre.size`` with
    bilinear filtering (or shorter side to ``pre.resize_shorter`` then centre crop);
    then, per channel,

    .. math:: x = (p \\cdot \\mathrm{scale} - \\mathrm{mean}) / \\mathrm{std}

    in float32 (with scale 1/255 computed as ``p / 255``, which equals PyTorch's
    ``x.float() / 255.0`` bit for bit); BGR order if asked; channels first for NCHW.

    Parameters
    ----------
    image : PIL.Image.Image
    pre : ResolvedPreprocess

    Returns
    -------
    numpy.ndarray
        (C, H, W) for NCHW or (H, W, C) for NHWC, float32, C-contiguous.

    Raises
    ------
    DataError
        The image's colour mode is not supported, or resizing it would make an image of
        more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    return _normalise(_model_pixels(image, pre), pre)


def display_image(image: Image.Image, pre: ResolvedPreprocess) -> np.ndarray:
    """The image as the model sees it, for overlays: same orientation, resize and crop.

    Parameters
    ----------
    image : PIL.Image.Image
    pre : ResolvedPreprocess

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB; grey (for 1-channel models) replicated to 3 channels.

    Raises
    ------
    DataError
        The image's colour mode is not supported, or resizing it would make an image of
        more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    return _as_rgb(_model_pixels(image, pre))


def _model_pixels(image: Image.Image, pre: ResolvedPreprocess) -> np.ndarray:
    """uint8 pixels in the model's colour mode, resized/cropped to the model's size."""
    try:
        _resize_plan(image.size, pre)  # before converting a too large image
        return np.asarray(_resize(_to_model_mode(image, pre.channels), pre))
    except _DecodeFailure as exc:
        raise DataError(f"cannot use the image: {exc}") from None


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3) uint8, C-contiguous."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] not in (1, 3):  # other channel counts (arrays only): their mean
        pixels = np.rint(pixels.mean(axis=2, keepdims=True))
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


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


def _open_image(path: Path, pre: ResolvedPreprocess) -> Image.Image:
    """Open, size-check, decode and convert one file (see :func:`_to_model_mode`).

    Any failure is a :class:`_DecodeFailure` with a one-line reason: a file that is not a
    regular file is refused before it is opened; an image is refused before decoding when
    it, or what :func:`_resize` would make of it, has more than :data:`MAX_IMAGE_PIXELS`
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
                _resize_plan(image.size, pre)
                image.load()
                return _to_model_mode(image, pre.channels)
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


# --------------------------------------------------------------------------- image set


def _release_rows(array: np.ndarray | None, stop: int) -> None:
    """Let the kernel drop the resident pages of rows ``[0, stop)`` of a memory-mapped
    ``.npy`` (read-only), so that streaming a large file keeps the resident set flat
    instead of growing by the file's size; a later read of those rows maps them again."""
    mapped = getattr(array, "_mmap", None)
    if (
        mapped is None
        or stop <= 0
        or not array.flags.c_contiguous
        or not hasattr(mapped, "madvise")
        or not hasattr(mmap, "MADV_DONTNEED")
    ):
        return
    offset = int(getattr(array, "offset", 0))
    begin = offset - offset % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping starts
    end = offset - begin + stop * array.strides[0]
    end -= end % mmap.PAGESIZE
    if end > 0:
        mapped.madvise(mmap.MADV_DONTNEED, 0, end)


class _RowNames(Sequence[str]):
    """``"file.npy[i]"`` for each row of an array file, made when asked for: an array may
    hold millions of rows, and its header is not trusted to build one string per row."""

    def __init__(self, name: str, n: int) -> None:
        self._name = name
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):  # int or slice, as a list's
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        position = operator.index(index)
        if position < 0:
            position += self._n
        if not 0 <= position < self._n:
            raise IndexError(f"image index {index} out of range for {self._n} images")
        return f"{self._name}[{position}]"

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        prefix = f"{self._name}["
        if isinstance(value, str) and value.startswith(prefix) and value.endswith("]"):
            digits = value[len(prefix) : -1]
            if _INTEGER_NAME.fullmatch(digits) and str(int(digits)) == digits:
                position = int(digits)
                end = self._n if stop is None else stop
                if position < self._n and start <= position < end:
                    return position
        raise ValueError(f"{value!r} is not in the list")

    def __contains__(self, value: object) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (_RowNames, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{self._n} rows of {self._name}>"


@dataclass(frozen=True)
class Batch:
    """A run of consecutive images of an :class:`ImageSet`, minus any that were skipped.

    Attributes
    ----------
    indices : numpy.ndarray
        (B,) int64 positions in the ImageSet of the images in this batch.
    inputs : numpy.ndarray
        (B, C, H, W) or (B, H, W, C) float32, C-contiguous.
    """

    indices: np.ndarray
    inputs: np.ndarray


class ImageSet:
    """Images to feed a model: where they are, their labels and how they are prepared.

    Made by :func:`open_images`.

    Attributes
    ----------
    source : str
        The folder or array file as given, shown on one printable line like
        :attr:`paths` (printable paths are unchanged).
    kind : {"folder", "array"}
    paths : sequence of str
        Display names: path relative to the folder (posix), or ``"file.npy[i]"`` (a
        sequence that makes each name when asked). Names are shown on one printable line:
        control characters, backslashes and bytes that are not UTF-8 are escaped
        (``"a\\n.png"``, ``"\\xff.png"``); the files are read under their real names.
    labels : numpy.ndarray or None
        (N,) int64, -1 where unknown; None when no image has a label.
    class_names : list of str or None
    label_source : str
        Where the labels came from, or why there are none (for diagnostics).
    preprocess : ResolvedPreprocess
    spec : InputSpec
        The model's input, as given to :func:`open_images`.
    strict : bool
        Raise on the first image that cannot be decoded instead of skipping it.
    """

    def __init__(
        self,
        *,
        source: str,
        kind: Literal["folder", "array"],
        paths: Sequence[str],
        labels: np.ndarray | None,
        class_names: list[str] | None,
        label_source: str,
        preprocess: ResolvedPreprocess,
        spec: InputSpec,
        strict: bool = False,
        files: list[Path] | None = None,
        array: np.ndarray | None = None,
        unlisted: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.source = source
        self.kind = kind
        self.paths = paths
        self.labels = labels
        self.class_names = class_names
        self.label_source = label_source
        self.preprocess = preprocess
        self.spec = spec
        self.strict = strict
        self._files = files
        self._array = array
        self._failures: dict[int, str] = {}
        self._unlisted = list(unlisted)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageSet({self.source!r}, kind={self.kind!r}, n={len(self)}, "
            f"{self.preprocess.describe()!r})"
        )

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the images that could not be decoded, in order; then the
        sub-folders that could not be listed (path ending in ``/``), whose images were
        never seen.

        Images are added as batches are read: complete only after a full pass of
        :meth:`iter_batches`.
        """
        return [
            (self.paths[i], reason) for i, reason in sorted(self._failures.items())
        ] + self._unlisted

    def iter_batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield the images as float32 batches, in order.

        Folder images are decoded by a pool of 2 threads; the next batch is decoded while
        the caller works on the current one. Each batch covers the next ``batch_size``
        positions; images that cannot be decoded are left out (and listed in
        :attr:`skipped`), so a batch may be smaller, and a batch with no usable image is
        not yielded. The batch size is not adjusted to :attr:`InputSpec.batch`: a caller
        feeding a model with a fixed batch splits or pads.

        Parameters
        ----------
        batch_size : int
            Images per batch, at least 1.

        Yields
        ------
        Batch

        Raises
        ------
        UsageError
            batch_size is not a positive integer.
        DataError
            With ``strict``, the first image that cannot be decoded (named).
        """
        if not _is_int(batch_size) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer; got {batch_size!r}")
        if self.kind == "array":
            return self._iter_array(int(batch_size))
        return self._iter_folder(int(batch_size))

    def _iter_array(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            _release_rows(self._array, start)  # the caller is done with earlier batches
            yield Batch(
                indices=np.arange(start, stop, dtype=np.int64),
                inputs=self._array_inputs(slice(start, stop)),
            )

    def _array_inputs(self, index: slice) -> np.ndarray:
        assert self._array is not None
        inputs = np.asarray(self._array[index])
        if inputs.ndim == 3:  # (N, H, W) grey
            inputs = inputs[:, None] if self.preprocess.layout == "NCHW" else inputs[..., None]
        return np.ascontiguousarray(inputs, dtype=np.float32)

    def _load(self, index: int) -> tuple[np.ndarray | None, str | None]:
        assert self._files is not None
        try:
            image = _open_image(self._files[index], self.preprocess)
            image = _resize(image, self.preprocess)
        except _DecodeFailure as exc:
            return None, str(exc)
        return _normalise(np.asarray(image), self.preprocess), None

    def _iter_folder(self, batch_size: int) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=_DECODE_WORKERS, thread_name_prefix="sp2ps-decode")
        starts = iter(range(0, len(self), batch_size))
        pending: list[Future] = []

        def submit(start: int | None) -> list[Future]:
            if start is None:
                return []
            stop = min(start + batch_size, len(self))
            return [pool.submit(self._load, i) for i in range(start, stop)]

        try:
            first = next(starts, None)
            offset = first
            pending = submit(first)
            while pending:
                results = [future.result() for future in pending]
                assert offset is not None
                following = next(starts, None)
                pending = submit(following)  # decodes while the caller works on this batch
                batch = self._collect(offset, results)
                offset = following
                if batch is not None:
                    yield batch
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _collect(
        self, start: int, results: list[tuple[np.ndarray | None, str | None]]
    ) -> Batch | None:
        indices: list[int] = []
        inputs: list[np.ndarray] = []
        for index, (values, reason) in enumerate(results, start):
            if values is None:
                if self.strict:
                    raise DataError(
                        f"cannot use image {self.paths[index]} in {self.source}: "
                        f"{reason}; "
                        "fix or remove the file, or drop --strict to skip unreadable images"
                    )
                self._failures[index] = str(reason)
                continue
            self._failures.pop(index, None)
            indices.append(index)
            inputs.append(values)
        if not indices:
            return None
        return Batch(indices=np.asarray(indices, dtype=np.int64), inputs=np.stack(inputs))

    def display_image(self, index: int) -> np.ndarray:
        """One image as the model sees it, for overlays.

        For folders the file is decoded again and resized/cropped as for the model.
        For arrays the recorded scale, mean and std are inverted, values clipped to
        0..255 (NaN -> 0), BGR swapped back and grey replicated.

        Parameters
        ----------
        index : int
            Position in the set (negative counts from the end).

        Returns
        -------
        numpy.ndarray
            (H, W, 3) uint8 RGB.

        Raises
        ------
        IndexError
            index is out of range.
        DataError
            The image file cannot be decoded.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        index = int(index) % len(self)
        pre = self.preprocess
        if self.kind == "folder":
            assert self._files is not None
            try:
                image = _resize(_open_image(self._files[index], pre), pre)
            except _DecodeFailure as exc:
                raise DataError(
                    f"cannot use image {self.paths[index]} in {self.source}: {exc}"
                ) from None
            return _as_rgb(np.asarray(image))
        x = self._array_inputs(slice(index, index + 1))[0].astype(np.float64)
        if pre.layout == "NCHW":
            x = x.transpose(1, 2, 0)
        if pre.bgr and x.shape[2] == 3:
            x = x[:, :, ::-1]  # back to RGB, the order of mean and std
        x = x * np.asarray(pre.std) + np.asarray(pre.mean)
        x = np.nan_to_num(x / pre.scale, nan=0.0, posinf=255.0, neginf=0.0)
        return _as_rgb(np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8))


# --------------------------------------------------------------------------- opening


def open_images(
    path: str | os.PathLike[str],
    *,
    spec: InputSpec,
    preprocess: Preprocess = Preprocess(),
    class_names: str | os.PathLike[str] | list[str] | None = None,
    strict: bool = False,
    max_memory: int | None = None,
) -> ImageSet:
    """Open a folder of images or a preprocessed array file for a model.

    ``max_memory``: the memory budget in bytes that the arrays of an ``.npz`` (inputs and
    labels together, uncompressed) must fit, checked from the archive's directory and
    the arrays' headers before anything is inflated (None: the default of
    :func:`onnx_sp2ps.files.memory_budget`). ``.npy`` files are memory-mapped, read as
    needed, and have no budget.

    Nothing is decoded yet (array files are memory-mapped): decoding happens in
    :meth:`ImageSet.iter_batches`.

    Only folders and regular files are read: the path, every image file found in the
    folder and the class names file are examined before they are opened, and a FIFO,
    socket or device (or a symlink to one) is refused, since reading it could block
    forever. Sub-folders that cannot be listed are recorded in :attr:`ImageSet.skipped`
    (refused with ``strict``). Nothing is read whose size is not known and bounded first:
    see :data:`MAX_IMAGE_PIXELS`, :data:`MAX_CLASS_NAMES_BYTES` and ``max_memory``.

    Parameters
    ----------
    path : str or path-like
        A folder, searched recursively for :data:`IMAGE_SUFFIXES` (any case; hidden files
        and folders ignored; sorted by relative posix path), or a ``.npy`` / ``.npz``
        file of float inputs in the model's layout.
    spec : InputSpec
        The model's image input.
    preprocess : Preprocess, optional
        How to prepare images. For array files nothing is applied; scale, mean, std and
        bgr then say how the array was made (used to display it), and ``size`` and
        ``center_crop`` must not ask for a change.
    class_names : path, list of str or None
        Class names, a file with one per line (blank lines ignored) or a list. Sub-folder
        names are looked up in them (an integer folder name is also taken as an index).
        Without them, labels come from sub-folders only when all are named by integers.
    strict : bool, default False
        Raise on the first image that cannot be decoded instead of skipping it.

    Returns
    -------
    ImageSet

    Raises
    ------
    DataError
        The path is missing, holds no images, is not a folder nor an array file; it, an
        image file in the folder or the class names file is a FIFO, socket or device; the
        class names file is over :data:`MAX_CLASS_NAMES_BYTES`; a sub-folder name is not a
        known class; with ``strict``, a sub-folder cannot be listed; the input size is over
        :data:`MAX_IMAGE_PIXELS`; an array is unusable, its header claims more data than
        the file holds, or an ``.npz`` would take more memory than its budget.
    UsageError
        Contradictory settings (see :meth:`Preprocess.resolved`).
    MismatchError
        The size asked or the array's shape does not fit the model.
    """
    root = Path(path)
    names = _read_class_names(class_names)
    try:
        mode = os.stat(root).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(
            f"image path {show(root)} does not exist: pass a folder of images "
            f"({', '.join(IMAGE_SUFFIXES)}) or a .npy/.npz array file"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot examine the image path {show(root)} ({_reason(exc)}): check its "
            "permissions, or pass another folder or array file"
        ) from None
    if stat.S_ISDIR(mode):
        opener = _open_folder
    elif not stat.S_ISREG(mode):
        raise DataError(
            f"image path {show(root)} is {file_kind(mode)}, not a folder nor a regular "
            "file; it is not read: pass a folder of images or a .npy/.npz array file"
        )
    elif root.suffix.lower() in ARRAY_SUFFIXES:
        opener = functools.partial(_open_array, max_memory=max_memory)
    else:
        raise DataError(
            f"{show(root)} is neither a folder of images nor a .npy/.npz array file: "
            "put the images in a folder and pass the folder"
        )
    return opener(root, spec=spec, preprocess=preprocess, class_names=names, strict=strict)


def _reason(exc: BaseException) -> str:
    """An OSError's reason without its file name (``strerror``), else the message; one line."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return show(text)


def _read_class_names(class_names: str | os.PathLike[str] | list[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, os.PathLike)):
        source = Path(class_names)
        shown = show(source)
        try:
            with open_regular(source) as handle:
                too_large = os.fstat(handle.fileno()).st_size > MAX_CLASS_NAMES_BYTES
                raw = b"" if too_large else handle.read(MAX_CLASS_NAMES_BYTES + 1)
            if too_large or len(raw) > MAX_CLASS_NAMES_BYTES:
                raise DataError(
                    f"the class names file {shown} is over {MAX_CLASS_NAMES_BYTES} bytes "
                    "(16 MiB) and was not read: write one class name per line"
                )
            text = raw.decode("utf-8-sig")
        except NotRegularFile as exc:
            raise DataError(
                f"the class names file {shown} is {exc}, not a regular file, and was not "
                "read: pass a text file with one class name per line"
            ) from None
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read the class names file {shown} ({_reason(exc)}): pass a UTF-8 "
                "text file with one class name per line"
            ) from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise DataError(f"the class names file {shown} is empty: write one class name per line")
        return names
    names = [str(name).strip() for name in class_names]
    if not names:
        raise DataError("the list of class names is empty")
    return names


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Relative posix paths of the images under root, sorted; some other suffixes (shown);
    and (shown relative path + "/", why) of the sub-folders that could not be listed.

    Every image file is examined (os.stat, following symlinks) but not opened: one that is
    a FIFO, socket or device, or a symlink to one, raises DataError, since opening or
    reading it could block forever. Files with other suffixes are never examined.
    """
    found: list[str] = []
    others: set[str] = set()
    seen: set[str] = set()
    unlisted: list[tuple[str, str]] = []

    def unreadable(error: OSError) -> None:
        where = Path(error.filename) if error.filename else root
        if where == root:
            raise DataError(
                f"cannot list the image folder {show(root)} ({_reason(error)}): check its "
                "permissions, or pass another folder"
            )
        unlisted.append((show(where.relative_to(root).as_posix()) + "/", _reason(error)))

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = PurePosixPath(Path(folder).relative_to(root).as_posix())
        for name in files:
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES:
                kind = special_kind(Path(folder) / name)
                if kind is not None:
                    raise DataError(
                        f"{show((relative / name).as_posix())} in {show(root)} is {kind}, "
                        "not an image file, and was not read: remove it from the folder"
                    )
                found.append((relative / name).as_posix())
            elif len(others) < 5:
                others.add(show(suffix or name))
    return sorted(found), sorted(others), sorted(unlisted)


def _folder_labels(
    paths: list[str], class_names: list[str] | None
) -> tuple[np.ndarray | None, str]:
    folders = [p.split("/")[0] if "/" in p else None for p in paths]
    used = sorted({f for f in folders if f is not None})
    if not used:
        return None, "none: the images are not in sub-folders"
    if class_names is None:
        if not all(_INTEGER_NAME.fullmatch(f) for f in used):
            return None, (
                "none: sub-folder names are not class indices; pass class names to use "
                "them as labels"
            )
        mapping = {f: int(f) for f in used}
        source = "integer sub-folder names"
    else:
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(class_names):
            positions.setdefault(name, []).append(i)
        mapping = {}
        unknown: list[str] = []
        for f in used:
            if f in positions:
                if len(positions[f]) > 1:
                    raise DataError(
                        f"sub-folder '{show(f)}' is ambiguous: the class names list it at "
                        "positions "
                        f"{', '.join(map(str, positions[f]))}; rename the folder to its index"
                    )
                mapping[f] = positions[f][0]
            elif _INTEGER_NAME.fullmatch(f) and int(f) < len(class_names):
                mapping[f] = int(f)
            else:
                unknown.append(f)
        if unknown:
            shown = ", ".join(f"'{show(u)}'" for u in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise DataError(
                f"{len(unknown)} sub-folder name(s) are not among the {len(class_names)} class "
                f"names nor a class index: {shown}{more}; rename the folders or fix the class names"
            )
        source = "sub-folder names looked up in the class names"
    labels = np.asarray([-1 if f is None else mapping[f] for f in folders], dtype=np.int64)
    return labels, source


def _open_folder(
    root: Path,
    *,
    spec: InputSpec,
    preprocess: Preprocess,
    class_names: list[str] | None,
    strict: bool,
) -> ImageSet:
    pre = preprocess.resolved(spec)
    height, width = pre.size
    if height * width > MAX_IMAGE_PIXELS:
        raise DataError(
            f"images cannot be prepared at {height}x{width}: that is {height * width} pixels, "
            f"over the limit of {MAX_IMAGE_PIXELS} (decompression-bomb guard): use a smaller "
            "input size"
        )
    files, others, unreadable = _scan_folder(root)
    if unreadable and strict:
        folder, why = unreadable[0]
        raise DataError(
            f"cannot list the sub-folder {folder} of {show(root)} ({why}): fix its "
            "permissions, or drop --strict to skip what cannot be read"
        )
    unlisted = [
        (folder, f"cannot list the sub-folder ({why}); the images in it were not read")
        for folder, why in unreadable
    ]
    if not files:
        hint = f" (found only {', '.join(others)} files)" if others else ""
        if unreadable:
            hint += (
                f" ({len(unreadable)} sub-folder(s) could not be listed, e.g. "
                f"{unreadable[0][0]}: {unreadable[0][1]})"
            )
        raise DataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {show(root)} or its "
            f"sub-folders{hint}: pass a folder that holds images, or a .npy/.npz array file"
        )
    paths = [show(p) for p in files]
    labels, source = _folder_labels(files, class_names)
    return ImageSet(
        source=show(root),
        kind="folder",
        paths=paths,
        labels=labels,
        class_names=class_names,
        label_source=source,
        preprocess=pre,
        spec=spec,
        strict=strict,
        files=[root / p for p in files],
        unlisted=unlisted,
    )


_OBJECTS_REFUSED = "arrays with Python objects are refused; save plain float arrays"


def _npy_header(handle: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, bytes of data the header claims) of the ``.npy`` data
    at the handle's position; the handle is left just after the header. Nothing else is
    read: the claim is checked against the file's size before any data is."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    if version not in readers:
        raise DataError(
            f"{where} is a .npy of format version {version[0]}.{version[1]}, which is not "
            "read here: save it with np.save as plain float arrays"
        )
    shape, fortran, dtype = readers[version](handle)
    if dtype.hasobject:
        raise DataError(f"{where}: {_OBJECTS_REFUSED}")
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: the header's shape {shape} is not valid: save the array again")
    return tuple(int(d) for d in shape), bool(fortran), dtype, math.prod(shape) * dtype.itemsize


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` whose data is all there (its header is not trusted)."""
    with open_regular(path) as handle:
        shape, fortran, dtype, claimed = _npy_header(handle, show(path))
        offset = handle.tell()
        held = os.fstat(handle.fileno()).st_size - offset
        if held < claimed:
            raise DataError(
                f"{show(path)} is cut short: its header says {shape} {dtype} values "
                f"({claimed} bytes) but it holds {held} bytes of data: save the array again"
            )
        if claimed == 0:
            return np.empty(shape, dtype=dtype)
        return np.memmap(
            handle, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )


def _npz_members(
    path: Path, archive: zipfile.ZipFile, keys: list[str | None], budget: int
) -> list[np.ndarray | None]:
    """Read the ``.npz`` members named by keys (None: none), after checking, from the
    archive's directory and each member's ``.npy`` header, that their data is what the
    header says and that together they fit ``budget`` bytes."""
    infos = {}
    claimed = 0
    for key in keys:
        if key is None:
            continue
        info = archive.getinfo(key + ".npy")
        where = f"array {key!r} of {show(path)}"
        with archive.open(info) as member:
            shape, _, dtype, size = _npy_header(member, where)
            held = info.file_size - member.tell()
        if held != size:
            raise DataError(
                f"{where} is corrupt: its header says {shape} {dtype} values ({size} bytes) "
                f"but the archive holds {held} bytes for them: save the file again (np.savez)"
            )
        claimed += size
        infos[key] = info
    if claimed > budget:
        raise DataError(
            f"{show(path)} would take {claimed} bytes of memory once inflated, over the "
            f"memory budget of {budget} bytes (--max-memory): save the inputs as a .npy "
            "file, which is read from disk as needed, or pass fewer images"
        )
    arrays: list[np.ndarray | None] = []
    for key in keys:
        if key is None:
            arrays.append(None)
            continue
        with archive.open(infos[key]) as member:
            arrays.append(np.lib.format.read_array(member, allow_pickle=False))
    return arrays


def _load_arrays(
    path: Path, max_memory: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(inputs, labels or None, description of where they came from)."""
    shown = show(path)
    try:
        if path.suffix.lower() == ".npy":
            return _load_npy(path), None, "none: a .npy file holds no labels"
        with open_regular(path) as handle, zipfile.ZipFile(handle) as archive:
            names = archive.namelist()
            keys = [n[:-4] for n in names if n.endswith(".npy")]
            if len(keys) != len(names):
                others = [n for n in names if not n.endswith(".npy")]
                raise DataError(
                    f"{shown} holds members that are not .npy arrays "
                    f"({', '.join(repr(show(n)) for n in others[:5])}): save it with "
                    "np.savez or np.savez_compressed"
                )
            input_key = next((k for k in _NPZ_INPUT_KEYS if k in keys), None)
            label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys), None)
            if input_key is None:
                rest = [k for k in keys if k != label_key]
                if len(rest) != 1:
                    listed = ", ".join(show(k) for k in keys[:20]) or "(none)"
                    raise DataError(
                        f"{shown} holds arrays {listed}: name the inputs "
                        f"'images' (or {' or '.join(repr(k) for k in _NPZ_INPUT_KEYS[1:])}) "
                        "and the labels 'labels'"
                    )
                input_key = rest[0]
            budget = memory_budget(max_memory)
            inputs, labels = _npz_members(path, archive, [input_key, label_key], budget)
            assert inputs is not None
            source = (
                f"no labels in {show(path.name)}" if label_key is None else (f"array {label_key!r}")
            )
            return inputs, labels, source
    except NotRegularFile as exc:
        raise DataError(
            f"{shown} is {exc}, not a regular file, and was not read: pass a .npy/.npz file"
        ) from None
    except ValueError as exc:
        if "object" in str(exc).lower() or "pickle" in str(exc).lower():
            raise DataError(f"{shown}: {_OBJECTS_REFUSED}") from None
        raise DataError(f"cannot read {shown}: {show(str(exc))}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {shown}: {_reason(exc)}") from None
    except MemoryError:
        raise DataError(
            f"{shown} does not fit in memory: save the inputs as a .npy file, which is read "
            "from disk as needed, or pass fewer images"
        ) from None
    except Exception as exc:  # zipfile.BadZipFile and friends on corrupt files
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {shown}: {type(exc).__name__}: {show(str(exc))}") from None


def _check_array_shape(
    path: Path, inputs: np.ndarray, spec: InputSpec, layout: str
) -> tuple[int, int, int]:
    """Validate an input array against the model; return its (C, H, W)."""
    if inputs.dtype.hasobject:
        raise DataError(f"{show(path)}: {_OBJECTS_REFUSED}")
    if not np.issubdtype(inputs.dtype, np.floating):
        raise DataError(
            f"{show(path)} holds {inputs.dtype} values; arrays are used as given, so they must be "
            "preprocessed floats (float16/32/64): save float32 inputs, or pass a folder of images"
        )
    grey_ok = spec.channels in (None, 1)
    if inputs.ndim == 3 and grey_ok:
        n, height, width = inputs.shape
        channels = 1
    elif inputs.ndim == 4:
        if layout == "NCHW":
            n, channels, height, width = inputs.shape
        else:
            n, height, width, channels = inputs.shape
    else:
        expected = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
        extra = " or (N, H, W) for a 1-channel model" if grey_ok else ""
        raise DataError(
            f"{show(path)} holds a {inputs.ndim}-D array of shape {tuple(inputs.shape)}; "
            f"inputs must be {expected}{extra}, in the model's {layout} layout"
        )
    if n == 0:
        raise DataError(
            f"{show(path)} holds no inputs (shape {tuple(inputs.shape)}): save at least one"
        )
    if min(channels, height, width) < 1:
        raise DataError(f"{show(path)} holds inputs of empty shape {tuple(inputs.shape)}")
    model = (spec.channels, spec.height, spec.width)
    if any(m is not None and m != g for m, g in zip(model, (channels, height, width))):
        want = "x".join("?" if v is None else str(v) for v in model)
        got = f"{channels}x{height}x{width}"
        hint = ""
        if inputs.ndim == 4:  # would the other layout fit?
            _, a, b, c = inputs.shape
            other, name, axes = (
                ((c, a, b), "NHWC", "(0, 3, 1, 2)")
                if layout == "NCHW"
                else ((a, b, c), "NCHW", "(0, 2, 3, 1)")
            )
            if all(m is None or m == g for m, g in zip(model, other)):
                hint = f"; the array looks {name}: use np.transpose(x, {axes})"
        if not hint:
            hint = (
                f": save inputs of {want} (arrays are used as given, never resized), "
                "or pass a folder of images"
            )
        raise MismatchError(
            f"{show(path)} holds inputs of CxHxW {got} (shape {tuple(inputs.shape)}, read as "
            f"{layout}) but the model takes {want}{hint}"
        )
    return int(channels), int(height), int(width)


def _check_array_labels(
    path: Path, labels: np.ndarray, n: int, class_names: list[str] | None
) -> np.ndarray | None:
    labels = np.asarray(labels)
    if labels.dtype.hasobject or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{show(path)}: labels must be integers; got {labels.dtype}: save them as int64"
        )
    if labels.shape != (n,):
        raise DataError(
            f"{show(path)}: labels have shape {labels.shape} but there are {n} inputs: "
            "save (N,) labels"
        )
    labels = labels.astype(np.int64)
    if np.any(labels < -1):
        raise DataError(
            f"{show(path)}: labels must be class indices, or -1 where unknown; "
            f"found {int(labels.min())}"
        )
    if class_names is not None and labels.size and int(labels.max()) >= len(class_names):
        raise DataError(
            f"{show(path)}: label {int(labels.max())} is out of range for the "
            f"{len(class_names)} class names"
        )
    if np.all(labels == -1):
        return None
    return labels


def _open_array(
    path: Path,
    *,
    spec: InputSpec,
    preprocess: Preprocess,
    class_names: list[str] | None,
    strict: bool,
    max_memory: int | None = None,
) -> ImageSet:
    layout = preprocess.layout or spec.layout
    inputs, raw_labels, label_source = _load_arrays(path, max_memory)
    channels, height, width = _check_array_shape(path, inputs, spec, layout)
    if preprocess.center_crop:
        raise UsageError(
            "arrays are used as given, so centre crop cannot apply: drop --center-crop"
        )
    if preprocess.size is not None and preprocess.size != (height, width):
        raise UsageError(
            f"arrays are used as given: {show(path.name)} holds {height}x{width} inputs but the "
            f"size asked is {preprocess.size[0]}x{preprocess.size[1]}: drop --size"
        )
    if preprocess.bgr and channels != 3:
        raise UsageError(
            f"BGR order needs 3 channels; {show(path.name)} holds {channels}: drop --bgr"
        )
    scale, mean, std = _values(preprocess, channels)
    n = int(inputs.shape[0])
    labels = None if raw_labels is None else _check_array_labels(path, raw_labels, n, class_names)
    if raw_labels is not None and labels is None:
        label_source = f"none: every label in {label_source} is -1"
    pre = ResolvedPreprocess(
        preset=ARRAY_PRESET,
        size=(height, width),
        center_crop=False,
        scale=scale,
        mean=mean,
        std=std,
        bgr=preprocess.bgr,
        layout=layout,
        channels=channels,
    )
    return ImageSet(
        source=show(path),
        kind="array",
        paths=_RowNames(show(path.name), n),
        labels=labels,
        class_names=class_names,
        label_source=label_source,
        preprocess=pre,
        spec=spec,
        strict=strict,
        array=inputs,
    )

"""Preprocessing settings and maths: what the user asks (:class:`Preprocess`), what the
model takes (:class:`InputSpec`), the two resolved together (:class:`ResolvedPreprocess`),
and the one path from an image to a model input and to the RGB image shown in overlays:
colour mode (see :mod:`onnx_sp2ps.data.decode`), resize (or resize + centre crop), scale,
mean/std, optional BGR order, channels-first or channels-last. Problems raise
:class:`~onnx_sp2ps.errors.UsageError` (contradictory settings),
:class:`~onnx_sp2ps.errors.MismatchError` (a size the model cannot take) or
:class:`~onnx_sp2ps.errors.DataError` (an image that cannot be used); nothing is printed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from onnx_sp2ps.data.decode import DRAFTED, MAX_IMAGE_PIXELS, _DecodeFailure, _to_model_mode
from onnx_sp2ps.errors import DataError, MismatchError, UsageError

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "InputSpec",
    "Preprocess",
    "ResolvedPreprocess",
    "draft_scale",
    "parse_size",
    "model_input",
    "display_rgb",
    "preprocess_image",
    "display_image",
]

LAYOUTS = ("NCHW", "NHWC")
PRESETS: dict[str, dict[str, Any]] = {
    "unit": dict(scale=1 / 255, mean=(0.0,), std=(1.0,)),
    "imagenet": dict(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "raw": dict(scale=1.0, mean=(0.0,), std=(1.0,)),
}
#: Preset name recorded for array files, whose values are used as given.
ARRAY_PRESET = "array"
#: Ratio of crop size to resized shorter side in centre-crop mode (224 -> 256).
CROP_RATIO = 0.875
#: Fast decoding (``fast_decode``) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale
#: only when the decoded image stays at least this many times the size the resize makes,
#: in both directions, so that the bilinear resize still antialiases.
DRAFT_MARGIN = 2
#: JPEG DCT scales libjpeg can decode at, largest first.
DRAFT_SCALES = (8, 4, 2)


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
    fast_decode : bool, default False
        Let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) when the
        decoded image stays at least :data:`DRAFT_MARGIN` times the size the resize
        makes; the bilinear resize then starts from that image. Faster (about 1.7x per
        full-HD JPEG), not bit-identical: README "Images and preprocessing" gives the
        measured differences. Other formats, and JPEGs too small to reduce, are decoded
        as without it.
    """

    preset: str = "unit"
    size: tuple[int, int] | None = None
    center_crop: bool = False
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False
    layout: str | None = None
    fast_decode: bool = False

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
            fast_decode=bool(self.fast_decode),
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
    fast_decode : bool, default False
        JPEGs may be decoded at reduced scale (see :class:`Preprocess`); False for arrays.
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
    fast_decode: bool = False

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
            The fields, plus ``applied`` and ``resize_shorter``; ``fast_decode`` says
            which decoding path made the inputs.
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
            "fast_decode": bool(self.fast_decode),
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
        fast = ", fast JPEG decoding" if self.fast_decode else ""
        return (
            f"{self.preset}: {height}x{width} {colour} {self.layout}{crop}, x*{self.scale:.6g}, "
            f"mean {_format_values(self.mean)} std {_format_values(self.std)}{fast}"
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


# --------------------------------------------------------------------------- images


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


def draft_scale(size: tuple[int, int], resized: tuple[int, int]) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) fast decoding uses for an image of ``size``
    (W, H) that preprocessing resizes to ``resized`` (W, H): the largest of
    :data:`DRAFT_SCALES` whose decoded image, ``ceil(W / s) x ceil(H / s)``, is at least
    :data:`DRAFT_MARGIN` times ``resized`` in both directions; 1 (full size) when none is.

    Examples
    --------
    >>> draft_scale((1920, 1080), (455, 256))  # --center-crop at 224: 960x540
    2
    >>> draft_scale((1920, 1080), (64, 64))  # 240x135
    8
    >>> draft_scale((640, 480), (455, 341))
    1
    """
    width, height = size
    new_w, new_h = resized
    for scale in DRAFT_SCALES:
        if -(-width // scale) >= DRAFT_MARGIN * new_w and -(-height // scale) >= (
            DRAFT_MARGIN * new_h
        ):
            return scale
    return 1


def _draft_request(size: tuple[int, int], pre: ResolvedPreprocess) -> tuple[int, int] | None:
    """The size to pass to Pillow's ``Image.draft`` for an image of ``size`` (W, H), as
    it will be once its EXIF orientation is applied, so that libjpeg decodes at
    :func:`draft_scale`; None when the image is decoded at full size. (Pillow picks the
    largest scale s with ``W // s >= w`` and ``H // s >= h``; asking ``(W // s, H // s)``
    gives exactly s.)"""
    resized, _ = _resize_plan(size, pre)
    scale = draft_scale(size, resized)
    if scale == 1:
        return None
    return (size[0] // scale, size[1] // scale)


def _resize(image: Image.Image, pre: ResolvedPreprocess) -> Image.Image:
    """Resize to pre.size, or resize the shorter side and crop the centre.

    An image decoded at reduced scale (fast decoding) is resized as its full size says:
    same plan and crop box, its decoded pixels mapped onto the full image's extent.

    Raises :class:`_DecodeFailure` when that would make too large an image
    (see :func:`_resize_plan`).
    """
    drafted = image.info.get(DRAFTED)
    if drafted is None:
        resized, box = _resize_plan(image.size, pre)
        image = image.resize(resized, Image.Resampling.BILINEAR, reducing_gap=None)
    else:
        full, source_box = drafted
        resized, box = _resize_plan(full, pre)
        image = image.resize(resized, Image.Resampling.BILINEAR, box=source_box, reducing_gap=None)
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


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3) uint8, C-contiguous."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] not in (1, 3):  # other channel counts (arrays only): their mean
        pixels = np.rint(pixels.mean(axis=2, keepdims=True))
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def model_input(image: Image.Image, pre: ResolvedPreprocess) -> np.ndarray:
    """An image already in the model's colour mode -> one model input: resize (or resize
    and crop the centre), then normalise. The one path of both :func:`preprocess_image`
    and :meth:`onnx_sp2ps.data.sources.ImageSet.iter_batches`.

    Raises :class:`~onnx_sp2ps.data.decode._DecodeFailure` when resizing would make too
    large an image (see :func:`_resize_plan`).
    """
    return _normalise(np.asarray(_resize(image, pre)), pre)


def display_rgb(image: Image.Image, pre: ResolvedPreprocess) -> np.ndarray:
    """An image already in the model's colour mode -> the (H, W, 3) uint8 RGB image shown
    in overlays: resized and cropped as :func:`model_input` does. The one path of both
    :func:`display_image` and :meth:`onnx_sp2ps.data.sources.ImageSet.display_image`.

    Raises :class:`~onnx_sp2ps.data.decode._DecodeFailure` as :func:`model_input` does.
    """
    return _as_rgb(np.asarray(_resize(image, pre)))


def _from_image(
    image: Image.Image,
    pre: ResolvedPreprocess,
    finish: Callable[[Image.Image, ResolvedPreprocess], np.ndarray],
) -> np.ndarray:
    """``finish`` applied to the image in the model's colour mode; a refused image is a
    :class:`~onnx_sp2ps.errors.DataError`."""
    try:
        _resize_plan(image.size, pre)  # before converting a too large image
        return finish(_to_model_mode(image, pre.channels), pre)
    except _DecodeFailure as exc:
        raise DataError(f"cannot use the image: {exc}") from None


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
    return _from_image(image, pre, model_input)


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
    return _from_image(image, pre, display_rgb)

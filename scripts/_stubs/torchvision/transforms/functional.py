"""Stand-in for ``torchvision.transforms.functional``: ``resize`` (bilinear) and
``InterpolationMode``; other names are placeholders."""

import enum

import torch


def resize(img, size, *args, **kwargs):
    if isinstance(size, int):
        size = [size, size]
    x = img if img.dim() == 4 else img.unsqueeze(0)
    out = torch.nn.functional.interpolate(
        x.float(), size=list(size), mode="bilinear", align_corners=False
    )
    return out if img.dim() == 4 else out.squeeze(0)


class InterpolationMode(enum.Enum):
    """The names timm reads at import time (scripts/make_zoo.py imports timm)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def placeholder(*args, **kwargs):
        raise NotImplementedError(f"torchvision stand-in: transforms.functional.{name}")

    return placeholder

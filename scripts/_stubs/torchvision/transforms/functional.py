"""Stand-in for ``torchvision.transforms.functional``: ``resize`` (bilinear) for
pytorch-grad-cam, and the ``InterpolationMode`` enum that timm imports at import time."""

from enum import Enum

import torch


class InterpolationMode(Enum):
    """Same members and values as torchvision's."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def resize(img, size, *args, **kwargs):
    if isinstance(size, int):
        size = [size, size]
    x = img if img.dim() == 4 else img.unsqueeze(0)
    out = torch.nn.functional.interpolate(
        x.float(), size=list(size), mode="bilinear", align_corners=False
    )
    return out if img.dim() == 4 else out.squeeze(0)

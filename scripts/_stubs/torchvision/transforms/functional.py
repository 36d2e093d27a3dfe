"""Stand-in for ``torchvision.transforms.functional``: ``resize`` only (bilinear)."""

import torch


def resize(img, size, *args, **kwargs):
    if isinstance(size, int):
        size = [size, size]
    x = img if img.dim() == 4 else img.unsqueeze(0)
    out = torch.nn.functional.interpolate(
        x.float(), size=list(size), mode="bilinear", align_corners=False
    )
    return out if img.dim() == 4 else out.squeeze(0)

"""Stand-in for ``torchvision.transforms``: the three names pytorch-grad-cam imports."""

import numpy as np
import torch

from . import functional  # noqa: F401


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    """HWC uint8 (or float) array -> CHW float tensor, uint8 scaled to [0, 1]."""

    def __call__(self, pic):
        a = np.asarray(pic)
        if a.ndim == 2:
            a = a[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        return t.float().div(255.0) if a.dtype == np.uint8 else t.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    def __call__(self, t):
        return (t - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)


def __getattr__(name):
    """timm (dev scripts: scripts/make_zoo.py) subclasses and names more transforms at
    import time; none is used: a placeholder class that refuses to be built."""
    if name.startswith("__"):
        raise AttributeError(name)

    class Placeholder:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(f"torchvision stand-in: transforms.{name}")

    Placeholder.__name__ = name
    return Placeholder

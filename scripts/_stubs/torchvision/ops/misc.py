"""Stand-in for ``torchvision.ops.misc``: timm lists ``FrozenBatchNorm2d`` among its norm
layers at import time; no model built by the dev scripts uses it."""

import torch


class FrozenBatchNorm2d(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision stand-in: FrozenBatchNorm2d is not available")

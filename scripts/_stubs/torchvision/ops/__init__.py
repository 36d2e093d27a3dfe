"""Stand-in for ``torchvision.ops``: only ``misc.FrozenBatchNorm2d``, which timm imports
at import time (``timm.layers.create_norm``, ``norm_act``, ``timm.utils.model``)."""

from . import misc  # noqa: F401

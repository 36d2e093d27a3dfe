"""Stand-in for ``torchvision.ops``: what timm imports (``ops.misc.FrozenBatchNorm2d``)."""

from . import misc  # noqa: F401

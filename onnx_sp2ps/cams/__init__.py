"""Class activation map methods, one module each on :class:`BaseCAM`."""

from __future__ import annotations

from onnx_sp2ps.cams.base import BaseCAM, normalise_maps, upsample_bilinear
from onnx_sp2ps.cams.eigencam import EigenCAM
from onnx_sp2ps.cams.gradcam import GradCAM
from onnx_sp2ps.errors import UsageError

#: Method name (as on the command line) -> class.
METHODS: dict[str, type[BaseCAM]] = {
    GradCAM.name: GradCAM,
    EigenCAM.name: EigenCAM,
}

__all__ = ["METHODS", "BaseCAM", "GradCAM", "EigenCAM", "get_method",
           "normalise_maps", "upsample_bilinear"]


def get_method(name: str) -> type[BaseCAM]:
    """The CAM class for ``name``; UsageError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(
            f"unknown CAM method {name!r}: choose one of {', '.join(METHODS)}") from None

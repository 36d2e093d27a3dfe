"""Class activation map methods, one module each on :class:`BaseCAM`."""

from __future__ import annotations

from onnx_sp2ps.cams.ablationcam import AblationCAM
from onnx_sp2ps.cams.base import BaseCAM, normalise_maps, upsample_bilinear
from onnx_sp2ps.cams.cam import ClassicCAM
from onnx_sp2ps.cams.eigencam import EigenCAM
from onnx_sp2ps.cams.gradcam import GradCAM
from onnx_sp2ps.cams.gradcam_plusplus import GradCAMPlusPlus
from onnx_sp2ps.cams.hirescam import HiResCAM
from onnx_sp2ps.cams.layercam import LayerCAM
from onnx_sp2ps.cams.reciprocam import ReciproCAM
from onnx_sp2ps.cams.scorecam import ScoreCAM
from onnx_sp2ps.cams.xgradcam import XGradCAM
from onnx_sp2ps.errors import UsageError

#: Method name (as on the command line) -> class.
METHODS: dict[str, type[BaseCAM]] = {
    cls.name: cls
    for cls in (
        GradCAM,
        GradCAMPlusPlus,
        XGradCAM,
        HiResCAM,
        LayerCAM,
        AblationCAM,
        ReciproCAM,
        ScoreCAM,
        EigenCAM,
        ClassicCAM,
    )
}

__all__ = [
    "METHODS",
    "BaseCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "HiResCAM",
    "LayerCAM",
    "AblationCAM",
    "ReciproCAM",
    "ScoreCAM",
    "EigenCAM",
    "ClassicCAM",
    "get_method",
    "make_cam",
    "normalise_maps",
    "upsample_bilinear",
]


def get_method(name: str) -> type[BaseCAM]:
    """The CAM class for ``name``; UsageError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(
            f"unknown CAM method {name!r}: choose one of {', '.join(METHODS)}"
        ) from None


def make_cam(name: str, runner, *, scorecam_channels: int | None = None) -> BaseCAM:
    """An instance of method ``name`` on ``runner``, with its options."""
    cls = get_method(name)
    if cls is ScoreCAM:
        return ScoreCAM(runner, channels=scorecam_channels)
    if scorecam_channels is not None:
        raise UsageError("--scorecam-channels applies to --method scorecam only")
    return cls(runner)

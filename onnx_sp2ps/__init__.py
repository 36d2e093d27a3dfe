"""onnx-sp2ps: compare class activation maps of an ONNX model and its compressed copy.

Python API::

    from onnx_sp2ps import audit, compute_cams

    result = audit("model.onnx", ["model_pruned.onnx"], "val_images/")
    print(result.candidates[0].summary.mean)      # Sp2PS
    report = result.to_dict()                     # what report.json holds
"""

from typing import Any

from onnx_sp2ps._version import __version__

# The public API is imported on first use (PEP 562), so that ``import onnx_sp2ps.cli``
# is quick: the command line installs its signal handlers before numpy, onnx and
# onnxruntime load, and a signal during those imports still ends the run with one line.
_EXPORTS = {
    "Preprocess": "onnx_sp2ps.data",
    "AuditResult": "onnx_sp2ps.pipeline",
    "AuditSettings": "onnx_sp2ps.pipeline",
    "CandidateResult": "onnx_sp2ps.pipeline",
    "ImageRecord": "onnx_sp2ps.pipeline",
    "ModelMaps": "onnx_sp2ps.pipeline",
    "ModelOptions": "onnx_sp2ps.pipeline",
    "audit": "onnx_sp2ps.pipeline",
    "compute_cams": "onnx_sp2ps.pipeline",
    "GateCriteria": "onnx_sp2ps.gate",
    "IntervalSettings": "onnx_sp2ps.intervals",
}

__all__ = [
    "__version__",
    "audit",
    "compute_cams",
    "AuditResult",
    "AuditSettings",
    "CandidateResult",
    "ImageRecord",
    "ModelMaps",
    "ModelOptions",
    "Preprocess",
    "GateCriteria",
    "IntervalSettings",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnx_sp2ps' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

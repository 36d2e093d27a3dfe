"""onnx-sp2ps: compare class activation maps of an ONNX model and its compressed copy.

Python API::

    from onnx_sp2ps import audit, compute_cams

    result = audit("model.onnx", ["model_pruned.onnx"], "val_images/")
    print(result.candidates[0].summary.mean)      # Sp2PS
    report = result.to_dict()                     # what report.json holds
"""

__version__ = "0.1.0"

from onnx_sp2ps.data import Preprocess  # noqa: E402
from onnx_sp2ps.pipeline import (  # noqa: E402
    AuditResult,
    AuditSettings,
    CandidateResult,
    ImageRecord,
    ModelMaps,
    ModelOptions,
    audit,
    compute_cams,
)
from onnx_sp2ps.report import GateCriteria  # noqa: E402

__all__ = ["__version__", "audit", "compute_cams", "AuditResult", "AuditSettings",
           "CandidateResult", "ImageRecord", "ModelMaps", "ModelOptions", "Preprocess",
           "GateCriteria"]

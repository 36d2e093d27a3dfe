"""The ONNX model, read and edited in memory: loading and checking (:mod:`.load`), the
graph index (:mod:`.index`), shape inference (:mod:`.shapes`), detection of the input,
feature map and logits (:mod:`.detect`; token grids of transformers: :mod:`.tokens`),
compressed forms (:mod:`.compressed`) and the
edits that make a model ready to run (:mod:`.edit`).  The user's file is only ever read,
and nothing here imports onnxruntime (running models is :mod:`onnx_sp2ps.runtime`'s job).
"""

from onnx_sp2ps.model.compressed import qdq_form
from onnx_sp2ps.model.detect import (
    FINAL_ACTIVATIONS,
    ModelSpec,
    analyse_model,
    linear_classifier_weights,
)
from onnx_sp2ps.model.edit import (
    PreparedModel,
    extract_head,
    float32_head,
    fuse_gradient,
    prepare_model,
)
from onnx_sp2ps.model.index import TensorInfo, constant_value
from onnx_sp2ps.model.load import (
    check_model,
    check_tensor_sizes,
    count_parameters,
    is_too_large,
    load_model,
    model_digest,
    split_large_weights,
)
from onnx_sp2ps.model.tokens import TokenGrid

__all__ = [
    "TensorInfo",
    "ModelSpec",
    "TokenGrid",
    "PreparedModel",
    "load_model",
    "model_digest",
    "check_tensor_sizes",
    "analyse_model",
    "linear_classifier_weights",
    "prepare_model",
    "extract_head",
    "constant_value",
    "check_model",
    "split_large_weights",
    "FINAL_ACTIVATIONS",
    "count_parameters",
    "float32_head",
    "fuse_gradient",
    "is_too_large",
    "qdq_form",
]

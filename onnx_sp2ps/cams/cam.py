"""Classic CAM (Zhou et al., CVPR 2016, doi:10.1109/CVPR.2016.319)."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_sp2ps.cams.base import BaseCAM
from onnx_sp2ps.errors import ModelError
from onnx_sp2ps.model import constant_value

__all__ = ["ClassicCAM", "linear_classifier_weights"]

_POOLS = ("GlobalAveragePool", "ReduceMean", "AveragePool")
_SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")


def linear_classifier_weights(head: onnx.ModelProto) -> np.ndarray:
    """The weights ``(K, C)`` of the linear layer after global average pooling.

    Raises
    ------
    ModelError
        When the head is not global average pooling, shape ops, then one Gemm or MatMul
        (+ Add): classic CAM is defined for that form only.
    """
    ops = [n for n in head.graph.node if n.op_type != "Constant"]
    kinds = [n.op_type for n in ops]
    wrong = ModelError(
        "classic CAM needs a head of global average pooling and one linear "
        f"layer; this head is {' -> '.join(kinds)}: use --method gradcam"
    )
    if not kinds or kinds[0] not in _POOLS:
        raise wrong
    rest = [n for n in ops[1:] if n.op_type not in _SHAPE_OPS]
    if not rest or rest[0].op_type not in ("Gemm", "MatMul"):
        raise wrong
    if len(rest) > 2 or (len(rest) == 2 and rest[1].op_type != "Add"):
        raise wrong
    lin = rest[0]
    w = constant_value(head.graph, lin.input[1])
    if w is None or w.ndim != 2:
        raise wrong
    if lin.op_type == "Gemm":
        trans_b = next((a.i for a in lin.attribute if a.name == "transB"), 0)
        alpha = next((a.f for a in lin.attribute if a.name == "alpha"), 1.0)
        return (w if trans_b else w.T).astype(np.float64) * alpha
    return w.T.astype(np.float64)


class ClassicCAM(BaseCAM):
    r"""CAM: channels weighted by the target's row of the linear layer that follows
    global average pooling, :math:`R = \sum_k W_{ck} A_k`.  For such heads it is
    Grad-CAM times :math:`hw`; other heads are refused."""

    name = "cam"

    def __init__(self, runner):
        super().__init__(runner)
        self.weights = linear_classifier_weights(runner.prepared.head_model)

    def get_cam_weights(self, activations, targets, inputs=None):
        if self.weights.shape[1] != activations.shape[1]:
            raise ModelError("the linear layer's inputs do not match the feature map's channels")
        return self.weights[np.asarray(targets, dtype=np.int64)]

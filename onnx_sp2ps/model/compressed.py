"""Compressed models as the rest of the code can read them: sparse initializers made
dense, int8/uint8 feature maps and logits of QOperator models given float views
(DequantizeLinear), and QOperator heads written in their QDQ form
(DequantizeLinear -> float op -> QuantizeLinear), the form the gradient rules know.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_sp2ps.errors import DetectionError
from onnx_sp2ps.model.detect import ModelSpec
from onnx_sp2ps.model.index import GraphIndex, TensorInfo, _attr, _dense

__all__ = ["FLOAT_VIEW", "UnsupportedQuantizedOp", "qdq_form"]


class UnsupportedQuantizedOp(Exception):
    """A QOperator op in a form :func:`qdq_form` cannot rewrite (the gradient code
    reports it as an unsupported head)."""


#: Where a quantized op's output scale and zero point are: (scale input, zero-point input).
_OUTPUT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearSoftmax": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
}
#: Ops that keep the quantization of their (first) int8 input.
_QPARAMS_KEPT = (
    "MaxPool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Dropout",
)
#: Suffixes of the tensors added for the float view of an int8 feature map or logits.
FLOAT_VIEW = "/sp2ps_float"
_REQUANTIZED = "/sp2ps_requantized"


_QUANTIZED_DTYPES = {"int8", "uint8"}


def _densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy with its sparse initializers turned into dense ones (as
    onnxruntime does when it loads them), so that shape inference, weight lookups, the
    head and its backward graph see ordinary weights."""
    if not model.graph.sparse_initializer:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    g.initializer.extend(
        numpy_helper.from_array(_dense(t), t.values.name) for t in g.sparse_initializer
    )
    del g.sparse_initializer[:]
    return out


def _is_quantized(g: GraphIndex, info: TensorInfo) -> bool:
    """True for an int8/uint8 tensor, or one of unknown type made by a quantized op."""
    if info.dtype in _QUANTIZED_DTYPES:
        return True
    node = g.producer.get(info.name)
    return info.dtype == "undefined" and node is not None and node.op_type in _OUTPUT_QPARAMS


def _quant_params(g: GraphIndex, name: str) -> tuple[str, str] | None:
    """(scale, zero point) tensor names of the int8/uint8 tensor ``name``, read from the
    op that makes it (QLinear*, QuantizeLinear, or MaxPool/Flatten/... of such a tensor)
    or from a DequantizeLinear / QLinear* op that reads it; None when not found."""
    current = name
    for _ in range(16):
        node = g.producer.get(current)
        if node is None:
            break
        where = _OUTPUT_QPARAMS.get(node.op_type)
        if where is not None and len(node.input) > where[1] and node.input[where[1]]:
            return node.input[where[0]], node.input[where[1]]
        if node.op_type not in _QPARAMS_KEPT:
            break
        current = node.input[0]
    for node in g.consumers.get(name, []):
        if (
            (
                node.op_type == "DequantizeLinear"
                or node.op_type.startswith("QLinear")
                or node.op_type == "QGemm"
            )
            and node.input[0] == name
            and len(node.input) > 2
        ):
            return node.input[1], node.input[2]
    return None


def _float_views(
    model: onnx.ModelProto, g: GraphIndex, spec: ModelSpec
) -> tuple[onnx.ModelProto, ModelSpec]:
    """For a QOperator model whose feature map or logits are int8/uint8: a copy with
    ``DequantizeLinear`` nodes giving their float values (``<name>/sp2ps_float``), and
    the spec naming those.  The int8 feature map is quantized back from its float view
    (``QuantizeLinear``, exact: the values are on the grid) for the nodes after it, so
    that the head starts from the float map.

    Raises
    ------
    DetectionError
        When the scale and zero point of such a tensor cannot be found.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    infos = {}
    for info in (spec.feature_map, spec.logits):
        if not _is_quantized(g, info) or info.name in infos:
            continue
        params = _quant_params(g, info.name)
        if params is None:
            raise DetectionError(
                f"{info.name!r} is quantized but its scale and zero point were not "
                "found; name a float tensor with --feature-layer / --logits"
            )
        view = info.name + FLOAT_VIEW
        nodes.append(helper.make_node("DequantizeLinear", [info.name, *params], [view]))
        infos[info.name] = TensorInfo(view, "float32", info.shape)
        if info.shape is not None:  # (shape inference stops at com.microsoft ops)
            out.graph.value_info.append(
                helper.make_tensor_value_info(view, onnx.TensorProto.FLOAT, list(info.shape))
            )
        if info is spec.feature_map:
            requantized = info.name + _REQUANTIZED
            for node in out.graph.node:
                for i, name in enumerate(node.input):
                    if name == info.name:
                        node.input[i] = requantized
            nodes.append(helper.make_node("QuantizeLinear", [view, *params], [requantized]))
    # Insert right after the producers (graph order stays topological).
    order = list(out.graph.node)
    for node in nodes:
        source = node.input[0]
        at = next((i + 1 for i, n in enumerate(order) if source in n.output), 0)
        order.insert(at, node)
    del out.graph.node[:]
    out.graph.node.extend(order)
    feature = infos.get(spec.feature_map.name, spec.feature_map)
    logits = infos.get(spec.logits.name, spec.logits)
    return out, dataclasses.replace(spec, feature_map=feature, logits=logits)


class _Add(Protocol):
    """How a QOperator rule adds a node: ``add(op_type, inputs, output=None, **attrs)``
    returns the name of the node's one output (made up when not given)."""

    def __call__(
        self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any
    ) -> str: ...


#: A QOperator rule: writes the node's QDQ form through ``add``.
_Rule = Callable[[onnx.NodeProto, _Add], None]


def qdq_form(head: onnx.ModelProto) -> onnx.ModelProto:
    """``head`` with its QOperator ops (QLinearConv, QLinearMatMul, QGemm,
    QLinearGlobalAveragePool, QLinearAdd, QLinearMul) written as DequantizeLinear -> float
    op -> QuantizeLinear, the form the backward rules know (same values: the QDQ form is
    what onnxruntime fuses back into those ops).  Other ops are kept."""
    if not any(n.op_type in _QOPERATOR for n in head.graph.node):
        return head
    out = copy.deepcopy(head)
    nodes: list[onnx.NodeProto] = []
    counter = iter(range(1 << 30))

    def add(op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        name = output or f"sp2ps_qdq/{op_type}_{next(counter)}"
        nodes.append(helper.make_node(op_type, inputs, [name], **attrs))
        return name

    for node in out.graph.node:
        rule = _QOPERATOR.get(node.op_type)
        if rule is None:
            nodes.append(node)
        else:
            rule(node, add)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in out.opset_import):
        raise UnsupportedQuantizedOp("QOperator head with opset < 13")
    return out


def _dq(add: _Add, x: str, scale: str, zp: str, **attrs: Any) -> str:
    return add("DequantizeLinear", [x, scale, zp] if zp else [x, scale], **attrs)


def _requantize(add: _Add, node: onnx.NodeProto, y: str, at: int) -> None:
    """Quantize the float ``y`` to the node's output (scale, zero point at ``at``)."""
    ins = node.input
    if len(ins) > at and ins[at]:
        zp = [ins[at + 1]] if len(ins) > at + 1 and ins[at + 1] else []
        add("QuantizeLinear", [y, ins[at], *zp], node.output[0])
    else:
        add("Identity", [y], node.output[0])


def _float_bias(add: _Add, bias: str, *scales: str, alpha: float = 1.0) -> str:
    scale = add("Mul", list(scales[:2])) if len(scales) == 2 else scales[0]
    if alpha != 1.0:
        scale = add(
            "Mul",
            [
                scale,
                add("Constant", [], value=numpy_helper.from_array(np.asarray(alpha, np.float32))),
            ],
        )
    return add("Mul", [add("Cast", [bias], to=onnx.TensorProto.FLOAT), scale])


def _q_conv(node: onnx.NodeProto, add: _Add) -> None:
    i = node.input
    x, w = _dq(add, i[0], i[1], i[2]), _dq(add, i[3], i[4], i[5], axis=0)
    ins = [x, w] + ([_float_bias(add, i[8], i[1], i[4])] if len(i) > 8 and i[8] else [])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    _requantize(add, node, add("Conv", ins, **attrs), 6)


def _q_matmul(node: onnx.NodeProto, add: _Add) -> None:
    i = node.input
    _requantize(
        add, node, add("MatMul", [_dq(add, i[0], i[1], i[2]), _dq(add, i[3], i[4], i[5])]), 6
    )


def _q_gemm(node: onnx.NodeProto, add: _Add) -> None:
    i = node.input
    alpha = float(_attr(node, "alpha", 1.0))
    ins = [_dq(add, i[0], i[1], i[2]), _dq(add, i[3], i[4], i[5])]
    if len(i) > 6 and i[6]:
        ins.append(_float_bias(add, i[6], i[1], i[4], alpha=alpha))
    y = add(
        "Gemm",
        ins,
        alpha=alpha,
        transA=int(_attr(node, "transA", 0)),
        transB=int(_attr(node, "transB", 0)),
    )
    _requantize(add, node, y, 7)


def _q_global_average_pool(node: onnx.NodeProto, add: _Add) -> None:
    if int(_attr(node, "channels_last", 0)):
        raise UnsupportedQuantizedOp("QLinearGlobalAveragePool with channels_last")
    i = node.input
    _requantize(add, node, add("GlobalAveragePool", [_dq(add, i[0], i[1], i[2])]), 3)


def _q_binary(op_type: str) -> _Rule:
    def rule(node: onnx.NodeProto, add: _Add) -> None:
        i = node.input
        _requantize(
            add, node, add(op_type, [_dq(add, i[0], i[1], i[2]), _dq(add, i[3], i[4], i[5])]), 6
        )

    return rule


_QOPERATOR: dict[str, _Rule] = {
    "QLinearConv": _q_conv,
    "QLinearMatMul": _q_matmul,
    "QGemm": _q_gemm,
    "QLinearGlobalAveragePool": _q_global_average_pool,
    "QLinearAdd": _q_binary("Add"),
    "QLinearMul": _q_binary("Mul"),
}

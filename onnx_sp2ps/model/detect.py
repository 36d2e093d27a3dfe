"""Detection: the image input and its layout, the logits behind the graph output and
the feature map that feeds the head, found on the graph index and described as a
:class:`ModelSpec`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from onnx_sp2ps.errors import DetectionError, ModelError
from onnx_sp2ps.model.index import (
    Dim,
    GraphIndex,
    TensorInfo,
    _attr,
    _node_order,
    _numel,
    _only_input,
    _outer_names,
    _shape_of,
    constant_value,
)
from onnx_sp2ps.model.shapes import _SHAPE_OPS, _infer, _with_static_input
from onnx_sp2ps.model.tokens import (
    TokenGrid,
    _attention_shaped,
    _block_output,
    _is_token_tensor,
    _layer_norm_input,
    _token_dims,
    _token_feature,
    _token_grid,
)

__all__ = ["ModelSpec", "analyse_model", "FINAL_ACTIVATIONS", "PASS_THROUGH_OPS"]

# The rules:
#
# * image input: the single graph input that is not an initializer (or the one named);
# * logits: walking back from the graph output through Identity / Reshape / Flatten /
#   Squeeze / Unsqueeze / Cast (fp16 models with fp32 outputs) / QuantizeLinear /
#   DequantizeLinear (int8 QDQ models), the input of a final Softmax / LogSoftmax /
#   Sigmoid (or QLinearSoftmax / QLinearSigmoid) when there is one, else the graph
#   output itself; int8 feature maps and logits of QOperator models are read through
#   DequantizeLinear nodes added to the in-memory copy
#   (:func:`onnx_sp2ps.model.compressed._float_views`);
# * feature map: walking back from the logits along the data path (never into
#   weights), the first tensor met whose spatial extent is greater than 1, i.e. the last
#   one on the way forward: the input of the GlobalAveragePool / ReduceMean /
#   AveragePool / Flatten / Reshape that starts the head.  When that tensor is the
#   output of a 1x1 Conv classifier (as many output channels as classes, SqueezeNet
#   style), the feature map is that Conv's input instead, so that the map explains the
#   trunk and not the class scores.
#
# * token models: when the walk back from the logits meets tokens (N, T, D) first (a
#   rank-3 tensor that is not a flattened spatial map), the model is a transformer and its
#   feature map is a token grid (:func:`_token_feature`): for heads that read the class
#   token, the input of the last block's attention (its norm1 output); for heads that pool
#   the tokens, the last block's output.  The first P of the T tokens are prefix tokens
#   (class, distillation, registers), the other T - P the h x w patch grid, row-major.
#   Attention-shaped tensors (N, heads, T, d) are never feature maps.
#
# Layouts of 4-D tensors are propagated forward from the input: ONNX Conv and pooling
# produce NCHW; Transposes with the NHWC<->NCHW permutations switch; other ops keep the
# layout of their data input.  This is how tf2onnx graphs (NHWC, Transposes around every
# Conv, ReduceMean over axes [1, 2]) are read correctly.

#: Ops read through when looking for the logits behind the graph output.
PASS_THROUGH_OPS = (
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Dropout",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
)
#: Ops whose input is taken as the logits when a model ends in one.
FINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")
#: Quantized (QOperator, com.microsoft) final activations and the float op each stands for.
_QUANTIZED_ACTIVATIONS = {"QLinearSoftmax": "Softmax", "QLinearSigmoid": "Sigmoid"}
#: Element-wise ops skipped when looking behind the feature map for a 1x1 Conv classifier.
_ELEMENTWISE_OPS = (
    "Relu",
    "LeakyRelu",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Sigmoid",
    "Identity",
    "Dropout",
    "BatchNormalization",
    "Transpose",
)
#: Ops whose output is NCHW whatever the layout of their input (ONNX semantics).
_NCHW_PRODUCERS = (
    "Conv",
    "ConvTranspose",
    "ConvInteger",
    "QLinearConv",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "QLinearGlobalAveragePool",
    "InstanceNormalization",
    "LRN",
)
_TO_NCHW = [0, 3, 1, 2]
_TO_NHWC = [0, 2, 3, 1]


@dataclass(frozen=True)
class ModelSpec:
    """What was found in a model: input, layouts, feature map, logits and head."""

    input: TensorInfo
    layout: str
    feature_map: TensorInfo
    feature_layout: str
    logits: TensorInfo
    activation: str | None
    num_classes: int | None
    head_ops: tuple[str, ...]
    opset: int
    ir_version: int
    producer: str
    detected: dict[str, bool] = field(default_factory=dict)
    #: Bytes per input image of the largest tensor shape inference found at the size
    #: detection probed (None when none has a static shape): for memory estimates
    #: (:func:`onnx_sp2ps.pipeline.check_batch_memory`); not reported.
    largest_activation: int | None = None
    #: The token grid when the feature map is tokens (N, T, D) (``feature_layout`` "NTD").
    tokens: TokenGrid | None = None
    #: Activations the head reads besides the feature map (the residual stream around a
    #: transformer block): captured in the same run and fed to the head as constants.
    side_inputs: tuple[str, ...] = ()

    @property
    def feature_size(self) -> tuple[int | None, int | None]:
        """(h, w) of the feature map (the token grid's for token models), None where
        symbolic."""
        if self.tokens is not None:
            return self.tokens.grid
        h, w = _spatial(self.feature_map.shape, self.feature_layout)
        return (h if h and h > 0 else None, w if w and w > 0 else None)

    @property
    def input_size(self) -> tuple[int | None, int | None]:
        """(H, W) of the image input, None where symbolic."""
        return _spatial(self.input.shape, self.layout)

    @property
    def input_channels(self) -> int | None:
        shape = self.input.shape
        if shape is None or len(shape) != 4:
            return None
        dim = shape[1] if self.layout == "NCHW" else shape[3]
        return dim if isinstance(dim, int) else None

    @property
    def fixed_batch(self) -> int | None:
        shape = self.input.shape
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return shape[0]
        return None

    def to_dict(self) -> dict[str, Any]:
        feature: dict[str, Any] = {**self.feature_map.to_dict(), "layout": self.feature_layout}
        head: dict[str, Any] = {"ops": list(self.head_ops)}
        if self.tokens is not None:
            feature["tokens"] = self.tokens.to_dict()
        if self.side_inputs:
            head["side_inputs"] = list(self.side_inputs)
        return {
            "input": {**self.input.to_dict(), "layout": self.layout},
            "feature_map": feature,
            "logits": {
                **self.logits.to_dict(),
                "activation": self.activation,
                "num_classes": self.num_classes,
            },
            "head": head,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "detected": dict(self.detected),
        }


def _spatial(shape: tuple[Dim, ...] | None, layout: str) -> tuple[int | None, int | None]:
    if shape is None or len(shape) != 4:
        return (None, None)
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    return (h if isinstance(h, int) else None, w if isinstance(w, int) else None)


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _find_input(g: GraphIndex, input_name: str | None) -> str:
    if input_name is not None:
        if input_name not in g.inputs:
            raise DetectionError(
                f"input {input_name!r} not found; the model's inputs are: " + ", ".join(g.inputs)
            )
        return input_name
    if not g.inputs:
        raise DetectionError("the model has no input that is not a weight")
    if len(g.inputs) > 1:
        raise DetectionError(
            "the model has several inputs ("
            + ", ".join(g.inputs)
            + "): name the image input with --input-name"
        )
    return g.inputs[0]


def _input_layout(g: GraphIndex, name: str, shape: tuple[Dim, ...] | None) -> str:
    if shape is None or len(shape) != 4:
        rank = "unknown" if shape is None else len(shape)
        raise DetectionError(
            f"input {name!r} has rank {rank}; an image input (N,C,H,W) or (N,H,W,C) "
            "is needed (use --input-name to choose another input)"
        )
    first = [n.op_type for n in g.consumers.get(name, [])]
    for node in g.consumers.get(name, []):
        if node.op_type == "Transpose" and list(_attr(node, "perm", [])) == _TO_NCHW:
            return "NHWC"
    if any(op in ("Conv", "ConvInteger", "MaxPool", "AveragePool") for op in first):
        return "NCHW"

    def chan(d: Dim) -> bool:
        return isinstance(d, int) and d in (1, 3, 4)

    if chan(shape[3]) and not chan(shape[1]):
        return "NHWC"
    return "NCHW"


def _propagate_layouts(g: GraphIndex, input_name: str, layout: str) -> dict[str, str]:
    """Layout ('NCHW'/'NHWC') of every 4-D activation reachable from the input."""
    layouts = {input_name: layout}
    for node in g.model.graph.node:  # graph nodes are topologically sorted
        data = [i for i in node.input if i in layouts]
        if not data:
            continue
        src = layouts[data[0]]
        if node.op_type in _NCHW_PRODUCERS:
            out = "NCHW"
        elif node.op_type == "Transpose":
            perm = list(_attr(node, "perm", []))
            if perm == _TO_NCHW:
                out = "NCHW"
            elif perm == _TO_NHWC:
                out = "NHWC"
            else:
                out = src
        else:
            out = src
        for o in node.output:
            if o:
                layouts[o] = out
    return layouts


def _find_logits(g: GraphIndex, logits_name: str | None) -> tuple[str, str | None]:
    if logits_name is not None:
        if logits_name not in g.tensor_names():
            raise DetectionError(
                f"logits tensor {logits_name!r} not found in the model; graph outputs: "
                + ", ".join(g.outputs)
            )
        consumers = g.consumers.get(logits_name, [])
        act = next((c.op_type for c in consumers if c.op_type in FINAL_ACTIVATIONS), None)
        act = act or next(
            (
                _QUANTIZED_ACTIVATIONS[c.op_type]
                for c in consumers
                if c.op_type in _QUANTIZED_ACTIVATIONS
            ),
            None,
        )
        return logits_name, act
    if not g.outputs:
        raise DetectionError("the model has no outputs")
    out = g.outputs[0]
    if len(g.outputs) > 1:
        # Prefer the first output whose chain ends in a classifier activation.
        for cand in g.outputs:
            name, act = _walk_to_logits(g, cand)
            if act is not None:
                return name, act
        out = _classifier_outputs(g)[0]
    return _walk_to_logits(g, out)


def _classifier_outputs(g: GraphIndex) -> list[str]:
    """Outputs that can be logits, best first: one vector per image (not a feature map)
    and computed from no other output (models that also return their features or
    embeddings, before or after the logits); else all outputs in graph order."""

    def vector(name: str) -> bool:
        shape = g.info(name).shape
        return shape is None or len([d for d in shape[1:] if d != 1]) <= 1

    upstream: set[str] = set()
    for o in g.outputs:
        upstream |= g.ancestors(o) - {o}
    vectors = [o for o in g.outputs if vector(o)]
    return [o for o in vectors if o not in upstream] or vectors or list(g.outputs)


def _walk_to_logits(g: GraphIndex, name: str) -> tuple[str, str | None]:
    current = name
    seen = set()
    while current not in seen:
        seen.add(current)
        node = g.producer.get(current)
        if node is None:
            break
        if node.op_type in FINAL_ACTIVATIONS:
            return node.input[0], node.op_type
        if node.op_type in _QUANTIZED_ACTIVATIONS:
            return node.input[0], _QUANTIZED_ACTIVATIONS[node.op_type]
        if node.op_type in PASS_THROUGH_OPS:
            current = node.input[0]
            continue
        break
    return name, None


def _is_spatial(shape: tuple[Dim, ...] | None, layout: str) -> bool:
    if shape is None or len(shape) != 4:
        return False
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    hv = h if isinstance(h, int) else 2  # unknown spatial dims count as > 1
    wv = w if isinstance(w, int) else 2
    return hv * wv > 1


def _find_feature_map(
    g: GraphIndex, probe: GraphIndex, logits: str, layouts: dict[str, str], num_classes: int | None
) -> tuple[str, bool]:
    """The feature map, and whether it is tokens (N, T, D) rather than a spatial map."""
    found: list[str] = []
    tokens: list[str] = []
    queue = deque([logits])
    visited = set()
    while queue:
        name = queue.popleft()
        if name in visited:
            continue
        visited.add(name)
        node = g.producer.get(name)
        if node is None:  # a graph input (the image itself) is never the feature map
            continue
        layout = layouts.get(name)
        if name != logits:
            shape = probe.info(name).shape
            if (
                layout is not None
                and _is_spatial(shape, layout)
                and not _attention_shaped(g, probe, name)
            ):
                found.append(name)
                continue
            if _is_token_tensor(g, probe, name):
                tokens.append(name)
                continue
        queue.extend(g.data_inputs(node))
    if tokens and not found:
        # Several token tensors (an attention pool's keys and values) made from the same
        # block output by per-token ops: that output.
        blocks = {_block_output(g, probe, t) for t in tokens}
        if len(set(tokens)) == 1 or len(blocks) == 1:
            return (tokens[0] if len(set(tokens)) == 1 else blocks.pop()), True
    found += tokens
    if not found:
        custom = _custom_op(g, visited)
        if custom is not None:
            raise DetectionError(
                f"no feature map found: op {custom.op_type} of domain {custom.domain!r} before "
                "the logits is unknown to shape inference, so no tensor's size is known: "
                "export the model with standard ONNX ops (or name the feature map with "
                "--feature-layer)"
            )
        raise DetectionError(
            "no feature map found: no convolutional feature map or token grid before the "
            f"logits {logits!r} (no tensor with spatial extent > 1 is computed between the "
            "input and the logits); name one with --feature-layer"
        )
    if len(set(found)) > 1:
        # One the others are all computed from (LeViT's downsampling attention reads the
        # last map and a projection of it): the map everything after depends on.
        first = [c for c in set(found) if all(c in g.ancestors(o) for o in set(found))]
        if len(first) == 1:
            found = first
    if len(set(found)) > 1:
        raise DetectionError(
            "several tensors feed the head ("
            + ", ".join(sorted(set(found)))
            + "): choose one with --feature-layer"
        )
    feature = _behind_pooling(g, probe, found[0], layouts)
    feature = _behind_final_norm(g, probe, feature)
    return _behind_classifier_conv(g, feature, num_classes), False


def _behind_final_norm(g: GraphIndex, probe: GraphIndex, feature: str) -> str:
    """The last stage's output when ``feature`` is a LayerNorm of it over the channels,
    same shape: Swin's final norm of its NHWC map, or ConvNeXt's ``norm_pre`` written as
    Transpose -> LayerNorm -> Transpose back, before the pooling.  The map of the last
    block, as for the tokens of a pooled transformer (README, "Detection")."""

    def transposed(name: str) -> tuple[str, list[int]] | None:
        node = g.producer.get(name)
        if node is None or node.op_type != "Transpose":
            return None
        return node.input[0], [int(p) for p in _attr(node, "perm", [])]

    inner, outer = feature, transposed(feature)
    if outer is not None:
        inner = outer[0]
    before = _layer_norm_input(g, inner)
    if before is None or before not in g.producer:
        return feature
    if outer is not None:  # the Transpose into the norm must be undone by the one after
        into = transposed(before)
        if into is None or [into[1][i] for i in outer[1]] != list(range(len(outer[1]))):
            return feature
        before = into[0]
    if probe.info(before).shape != probe.info(feature).shape:
        return feature
    return before


#: Pooling that keeps a spatial extent: the map is taken before it, at the higher
#: resolution, and the pooling becomes part of the head (README, "Detection").
_LOCAL_POOLS = ("MaxPool", "AveragePool")


def _behind_pooling(g: GraphIndex, probe: GraphIndex, feature: str, layouts: dict[str, str]) -> str:
    """Step behind local pooling between the last convolution's output and the head
    (PP-OCR's classifiers: HardSwish -> MaxPool 2x2 -> GlobalAveragePool; VGG's last
    MaxPool before its classifier)."""
    current = feature
    for _ in range(4):
        before = _only_input(g, current, _LOCAL_POOLS)
        if before is None or before not in g.producer:
            return current
        layout = layouts.get(before)
        if layout is None or not _is_spatial(probe.info(before).shape, layout):
            return current
        current = before
    return current


#: Domains whose ops ONNX shape inference and onnxruntime know.
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def _custom_op(g: GraphIndex, tensors: set[str]) -> onnx.NodeProto | None:
    """The first node making one of ``tensors`` whose op is of a domain neither standard
    nor defined by the model's own functions."""
    local = {f.domain for f in g.model.functions}
    for name in sorted(tensors):
        node = g.producer.get(name)
        if node is not None and node.domain not in _STANDARD_DOMAINS and node.domain not in local:
            return node
    return None


def _behind_classifier_conv(g: GraphIndex, feature: str, num_classes: int | None) -> str:
    """Step behind a 1x1 Conv classifier (out channels == classes) ending the trunk."""
    if not num_classes:
        return feature
    current = feature
    for _ in range(8):
        node = g.producer.get(current)
        if node is None:
            return feature
        if node.op_type in _ELEMENTWISE_OPS:
            before = _only_input(g, current, _ELEMENTWISE_OPS)
            if before is None:
                return feature
            current = before
            continue
        if node.op_type == "Conv" and len(node.input) >= 2:
            weight = constant_value(g.model.graph, node.input[1], g.producer)
            group = _attr(node, "group", 1)
            if (
                weight is not None
                and weight.ndim == 4
                and weight.shape[2:] == (1, 1)
                and weight.shape[0] == num_classes
                and group == 1
            ):
                trunk: str = node.input[0]
                return trunk
        return feature
    return feature


def _head_nodes(
    g: GraphIndex, feature: str, logits: str, image_input: str | None = None
) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes computing ``logits`` from ``feature``, in graph order, and the side inputs:
    activations the head reads that do not come from the feature map (the residual stream
    around a transformer block, a skip connection around the map).  Side inputs are held
    constant, as autograd holds them for a target layer: the model's run captures them
    and the head takes them as inputs.  Graph inputs other than ``image_input`` are allowed
    (the caller decides); the image input itself is refused."""
    needed: set[int] = set()
    side: list[str] = []
    index = {id(n): i for i, n in enumerate(g.model.graph.node)}
    stack = [logits]
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen or name == feature or name == "":
            continue
        seen.add(name)
        if name in g.initializers:
            continue
        node = g.producer.get(name)
        if node is None and name in g.inputs and name != image_input:
            continue
        if node is None:
            raise DetectionError(
                f"the head from {feature!r} to {logits!r} also reads the model input "
                f"{name!r}; choose a feature map that everything after it depends on "
                "(--feature-layer)"
            )
        outside = not g.is_constant(name) and feature not in g.ancestors(name, feature)
        batch = outside and _batch_size_only(g, name)
        if outside and not batch and not _shape_only(g, name):
            side.append(name)
            continue
        needed.add(index[id(node)])
        if outside and node.op_type in ("Shape", "Size"):
            if not batch:
                # A size other than the batch's (a token count): the head reads it off
                # the activation, a side input that holds one row per image.
                stack.append(node.input[0])
            continue  # the batch size: read from the feature map in the head (_extract_head)
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:  # names used inside subgraphs (If/Loop)
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_outer_names(attr.g))
    order = _node_order(g)
    side.sort(key=lambda t: order.get(t, -1))
    return [g.model.graph.node[i] for i in sorted(needed)], side


def _shape_only(g: GraphIndex, name: str, depth: int = 0) -> bool:
    """True when ``name`` is computed from constants and the Shape or Size of activations
    (not of a graph input) only, through shape arithmetic
    (:data:`onnx_sp2ps.model.shapes._SHAPE_OPS`)."""
    if g.is_constant(name):
        return True
    node = g.producer.get(name)
    if node is None or depth > 32:
        return False
    if node.op_type in ("Shape", "Size"):
        return node.input[0] in g.producer
    if node.op_type not in _SHAPE_OPS:
        return False
    return all(_shape_only(g, i, depth + 1) for i in node.input if i)


def _batch_size_only(g: GraphIndex, name: str) -> bool:
    """True when ``name`` is computed from constants and the batch size of activations
    only (``Shape(x, start=0, end=1)`` or ``Gather(Shape(x), 0)``), as the dynamo exporter's
    heads read it from the image input: the feature map has the same batch size."""
    node = g.producer.get(name)
    if g.is_constant(name):
        return True
    if node is None:
        return False
    if node.op_type == "Shape":
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        if start == 0 and end == 1:
            return True
        users = g.consumers.get(name, [])
        return bool(users) and all(
            u.op_type == "Gather"
            and u.input[0] == name
            and _attr(u, "axis", 0) == 0
            and (lambda v: v is not None and v.size == 1 and int(v.reshape(-1)[0]) == 0)(
                constant_value(g.model.graph, u.input[1], g.producer)
            )
            for u in users
        )
    if node.op_type == "Gather" and _attr(node, "axis", 0) == 0:
        # Gather(Shape(x), 0): the batch size, whatever else reads that Shape.
        index = constant_value(g.model.graph, node.input[1], g.producer)
        shape = g.producer.get(node.input[0])
        if (
            shape is not None
            and shape.op_type == "Shape"
            and _attr(shape, "start", 0) == 0
            and index is not None
            and index.size == 1
            and int(index.reshape(-1)[0]) == 0
        ):
            return True
    return all(_batch_size_only(g, i) for i in node.input if i)


def analyse_model(
    model: onnx.ModelProto,
    *,
    input_name: str | None = None,
    feature_layer: str | None = None,
    logits: str | None = None,
    size: tuple[int, int] | None = None,
    prefix_tokens: int | None = None,
    token_grid: tuple[int, int] | None = None,
) -> ModelSpec:
    """Find the image input, its layout, the feature map and the logits of ``model``.

    Parameters
    ----------
    model
        The classifier; it is not modified.
    input_name, feature_layer, logits
        Tensor names overriding detection.
    size
        (H, W) used to infer intermediate shapes when the input size is symbolic.
    prefix_tokens, token_grid
        For token models: the number of prefix tokens and the (h, w) patch grid,
        overriding detection.

    Raises
    ------
    DetectionError
        When something cannot be determined; the message lists the choices.
    """
    return _analyse(
        model,
        GraphIndex(_infer(model)),
        input_name=input_name,
        feature_layer=feature_layer,
        logits=logits,
        size=size,
        prefix_tokens=prefix_tokens,
        token_grid=token_grid,
    )


def _analyse(
    model: onnx.ModelProto,
    g: GraphIndex,
    *,
    input_name: str | None,
    feature_layer: str | None,
    logits: str | None,
    size: tuple[int, int] | None,
    prefix_tokens: int | None = None,
    token_grid: tuple[int, int] | None = None,
) -> ModelSpec:
    """:func:`analyse_model` on the index ``g`` of the shape-inferred ``model``."""
    name = _find_input(g, input_name)
    in_info = g.info(name)
    layout = _input_layout(g, name, in_info.shape)
    probe = GraphIndex(
        _with_static_input(model, name, layout, size),
        real_size=None not in _spatial(in_info.shape, layout),
    )
    layouts = _propagate_layouts(g, name, layout)

    logits_name, activation = _find_logits(g, logits)
    logits_info = _best_info(g, probe, logits_name)
    if logits_info.shape is None:  # e.g. made by a com.microsoft op shape inference skips
        logits_info = _shape_from_output(g, logits_info)
    num_classes = _num_classes(logits_info.shape)
    if (
        logits_name in layouts
        and _is_spatial(probe.info(logits_name).shape, layouts[logits_name])
        and logits is None
    ):
        raise DetectionError(
            f"the output {logits_name!r} has spatial extent (shape "
            f"{list(probe.info(logits_name).shape or ())}): this is not an image classifier; "
            "name the logits with --logits"
        )

    tokens: TokenGrid | None = None
    if feature_layer is not None:
        if feature_layer not in g.tensor_names():
            spatial = _spatial_candidates(g, probe, layouts, logits_name)
            raise DetectionError(
                f"feature map {feature_layer!r} not found; spatial maps and token tensors "
                "on the way to the logits, last first: " + ", ".join(spatial[:12])
            )
        feature = feature_layer
        if _token_dims(probe, feature) is not None or token_grid or prefix_tokens is not None:
            tokens = _token_grid(g, probe, feature, "--feature-layer", prefix_tokens, token_grid)
    else:
        feature, is_tokens = _find_feature_map(g, probe, logits_name, layouts, num_classes)
        if is_tokens:
            feature, rule = _token_feature(g, probe, feature, logits_name)
            tokens = _token_grid(g, probe, feature, rule, prefix_tokens, token_grid)
        elif token_grid or prefix_tokens is not None:
            raise DetectionError(
                f"--token-grid/--prefix-tokens given, but the feature map {feature!r} is a "
                "spatial map, not tokens: drop them, or name a token tensor with "
                "--feature-layer"
            )
    if feature not in layouts:
        raise DetectionError(f"feature map {feature!r} does not depend on the input {name!r}")
    if logits_name not in g.descendants(feature):
        raise DetectionError(
            f"the logits {logits_name!r} do not depend on the feature map {feature!r}"
        )
    f_info = _best_info(g, probe, feature)
    f_layout = "NTD" if tokens is not None else layouts[feature]
    if tokens is None and f_info.shape is not None and len(f_info.shape) != 4:
        raise DetectionError(
            f"feature map {feature!r} has shape {list(f_info.shape)}; a 4-D "
            "(N,C,H,W) or (N,H,W,C) tensor or tokens (N,T,D) are needed"
        )
    head, side = _head_nodes(g, feature, logits_name, name)
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x)
    return ModelSpec(
        input=in_info,
        layout=layout,
        feature_map=f_info,
        feature_layout=f_layout,
        logits=logits_info,
        activation=activation,
        num_classes=num_classes,
        head_ops=tuple(n.op_type for n in head if n.op_type != "Constant"),
        opset=_opset(model),
        ir_version=int(model.ir_version),
        producer=producer,
        detected={
            "input": input_name is None,
            "feature_map": feature_layer is None,
            "logits": logits is None,
        },
        largest_activation=_largest_activation(probe),
        tokens=tokens,
        side_inputs=tuple(side),
    )


def _largest_activation(probe: GraphIndex) -> int | None:
    """Bytes per batch row of the largest tensor with a static shape in the probe's
    inference (computed tensors only: weights are counted by :func:`check_tensor_sizes`)."""
    largest = None
    for name, vi in probe.infos.items():
        if name in probe.initializers:
            continue
        shape = _shape_of(vi.type)
        dims = [d for d in shape or () if isinstance(d, int) and d >= 0]
        if not shape or len(dims) != len(shape):
            continue
        try:
            item = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).itemsize
        except Exception:
            item = 4
        nbytes = _numel(dims[1:]) * item
        largest = nbytes if largest is None else max(largest, nbytes)
    return largest


def _shape_from_output(g: GraphIndex, info: TensorInfo) -> TensorInfo:
    """``info`` with the shape of the graph output it leads to through ops that keep
    shapes (a final activation, Quantize/DequantizeLinear, Identity, Cast)."""
    keep = (
        FINAL_ACTIVATIONS
        + tuple(_QUANTIZED_ACTIVATIONS)
        + ("QuantizeLinear", "DequantizeLinear", "Identity", "Cast")
    )
    current = info.name
    for _ in range(8):
        if current in g.outputs:
            out = g.info(current)
            return TensorInfo(info.name, info.dtype, out.shape)
        nxt = [n for n in g.consumers.get(current, []) if n.op_type in keep]
        if len(nxt) != 1:
            break
        current = nxt[0].output[0]
    return info


def _num_classes(shape: tuple[Dim, ...] | None) -> int | None:
    if not shape:
        return None
    rest = [d for d in shape[1:] if isinstance(d, int)]
    if len(rest) == len(shape) - 1:
        return int(np.prod(rest)) if rest else 1
    return None


def _best_info(g: GraphIndex, probe: GraphIndex, name: str) -> TensorInfo:
    """Declared info, with dims the symbolic-input inference left unknown filled from the
    probe inference where they do not depend on the input size (channels, classes)."""
    info = g.info(name)
    pinfo = probe.info(name)
    if info.shape is None and pinfo.shape is not None:
        # Keep only what does not depend on the probe: batch and spatial become None.
        info = TensorInfo(name, pinfo.dtype, tuple([None] + list(pinfo.shape[1:])))
    elif (
        info.shape is not None
        and pinfo.shape is not None
        and probe.real_size
        and len(info.shape) == len(pinfo.shape)
        and None in info.shape[1:]
    ):
        # The model's own input size (not a probe size): the probe's dims are the real ones.
        info = TensorInfo(
            name,
            info.dtype,
            info.shape[:1]
            + tuple(p if d is None else d for d, p in zip(info.shape[1:], pinfo.shape[1:])),
        )
    if info.dtype == "undefined" and pinfo.dtype != "undefined":
        info = TensorInfo(name, pinfo.dtype, info.shape)
    return info


def _spatial_candidates(
    g: GraphIndex, probe: GraphIndex, layouts: dict[str, str], logits: str
) -> list[str]:
    ancestors = g.ancestors(logits)
    names = []
    for node in reversed(g.model.graph.node):
        for o in node.output:
            if o not in ancestors:
                continue
            spatial = o in layouts and _is_spatial(probe.info(o).shape, layouts[o])
            if (spatial and not _attention_shaped(g, probe, o)) or _is_token_tensor(g, probe, o):
                names.append(o)
    return names


# --------------------------------------------------------------------------- classic CAM

_CAM_POOLS = ("GlobalAveragePool", "ReduceMean", "AveragePool")
_CAM_SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")


def linear_classifier_weights(head: onnx.ModelProto) -> NDArray[np.float64]:
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
    if not kinds or kinds[0] not in _CAM_POOLS:
        raise wrong
    rest = [n for n in ops[1:] if n.op_type not in _CAM_SHAPE_OPS]
    if not rest or rest[0].op_type not in ("Gemm", "MatMul"):
        raise wrong
    if len(rest) > 2 or (len(rest) == 2 and rest[1].op_type != "Add"):
        raise wrong
    lin = rest[0]
    w = constant_value(head.graph, lin.input[1])
    if w is None or w.ndim != 2:
        raise wrong
    if lin.op_type == "Gemm":
        trans_b = _attr(lin, "transB", 0)
        alpha = float(_attr(lin, "alpha", 1.0))
        weights: NDArray[np.float64] = (w if trans_b else w.T).astype(np.float64) * alpha
        return weights
    transposed: NDArray[np.float64] = w.T.astype(np.float64)
    return transposed

"""Shape inference for detection: ONNX shape inference that never raises, a probe copy
of the model with a concrete input size, and the folding of the shape arithmetic that
ONNX shape inference does not propagate, so that the feature map's and the logits'
shapes are known.  The model that runs is never changed here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from onnx_sp2ps.model.index import Dim, GraphIndex, _attr, _numel, _shape_of, constant_value
from onnx_sp2ps.model.load import _weightless

__all__ = ["PROBE_SIZE", "broadcast_dims"]

#: Size used for symbolic height and width while shapes are inferred for detection.
PROBE_SIZE = 224


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never raises: on failure the model is returned as it is.
    Inferred on a copy without the large weights' data (:func:`_weightless`), which is
    also how models over the 2 GB limit are inferred.  ONNX shape inference stops at the
    com.microsoft ops onnxruntime's tools write — the QOperator ops of quantize_static
    (QLinearAdd, QLinearSoftmax, ...) and the fused ops of its transformer optimizer
    (SkipLayerNormalization, BiasGelu, Attention, ...); their shapes are filled in
    (:func:`_contrib_op_shape`) and inference runs again, so the shapes after them are
    known too."""
    try:
        light = _weightless(model)
        inferred = shape_inference.infer_shapes(
            light, check_type=False, strict_mode=False, data_prop=True
        )
        for _ in range(16):
            filled = _fill_contrib_ops(inferred)
            if not filled:
                break
            names = {vi.name for vi in filled}
            kept = [vi for vi in light.graph.value_info if vi.name not in names]
            del light.graph.value_info[:]
            light.graph.value_info.extend(kept + filled)
            inferred = shape_inference.infer_shapes(
                light, check_type=False, strict_mode=False, data_prop=True
            )
    except Exception:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def _shape(vi: onnx.ValueInfoProto | None) -> list[Dim] | None:
    """The dims of ``vi`` (None where unknown), or None without a shape."""
    dims = None if vi is None else _shape_of(vi.type)
    return None if dims is None else list(dims)


def broadcast_dims(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    """numpy broadcasting of two shapes (None: a size known only at run time)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(y if x == 1 or (x is None and y != 1) else x for x, y in zip(a, b))


#: com.microsoft ops whose outputs (those listed) have the shape and type of input 0.
_SAME_AS_INPUT = {
    "SkipLayerNormalization": (0, 3),
    "SkipSimplifiedLayerNormalization": (0, 3),
    "SimplifiedLayerNormalization": (0,),
    "LayerNormalization": (0,),
    "BiasGelu": (0,),
    "FastGelu": (0,),
    "Gelu": (0,),
    "QuickGelu": (0,),
    "BiasAdd": (0,),
    "QLinearSoftmax": (0,),
    "QLinearSigmoid": (0,),
    "QLinearLeakyRelu": (0,),
}


def _contrib_op_shape(
    node: onnx.NodeProto, shape: dict[str, list[Dim] | None]
) -> list[tuple[int, list[Dim], str]]:
    """(output index, shape, input whose element type it has) of the outputs of a
    com.microsoft op whose input shapes are known; empty for other ops or unknown
    inputs.  Quantized outputs take the type of their zero point."""
    ins = list(node.input)
    op = node.op_type
    x = shape.get(ins[0]) if ins else None
    if op in _SAME_AS_INPUT:
        if x is None:
            return []
        # The quantized activations' outputs are typed by their output zero point.
        source = ins[4] if op.startswith("QLinear") and len(ins) >= 5 else ins[0]
        made = [i for i in range(len(node.output)) if node.output[i]]
        found = [(i, list(x), source) for i in _SAME_AS_INPUT[op] if i in made]
        if op.startswith("Skip") and x:  # the statistics, one per row: last dim 1
            row: list[Dim] = list(x[:-1]) + [1]
            found += [(i, row, ins[0]) for i in (1, 2) if i in made]
        return found
    if op in ("QLinearAdd", "QLinearMul") and len(ins) >= 8:
        b = shape.get(ins[3])
        return [] if x is None or b is None else [(0, list(broadcast_dims(x, b)), ins[7])]
    if op == "QLinearGlobalAveragePool" and len(ins) >= 5:
        if x is None or len(x) < 3:
            return []
        one: list[Dim] = [1]
        if _attr(node, "channels_last", 0):
            return [(0, [x[0]] + one * (len(x) - 2) + [x[-1]], ins[4])]
        return [(0, list(x[:2]) + one * (len(x) - 2), ins[4])]
    if op == "QLinearConcat" and len(ins) >= 5:
        parts = [shape.get(ins[i]) for i in range(2, len(ins), 3)]
        known = [p for p in parts if p is not None]
        if len(known) != len(parts) or not known:
            return []
        axis = int(_attr(node, "axis", 0)) % len(known[0])
        out = list(known[0])
        sizes = [d for d in (p[axis] for p in known) if isinstance(d, int)]
        out[axis] = sum(sizes) if len(sizes) == len(known) else None
        return [(0, out, ins[1])]
    if op == "Attention" and len(ins) >= 2:
        w = shape.get(ins[1])
        hidden = list(_attr(node, "qkv_hidden_sizes", []))
        v = (
            int(hidden[2])
            if len(hidden) == 3
            else (w[1] // 3 if w and isinstance(w[1], int) else None)
        )
        if x is None or len(x) != 3 or v is None:
            return []
        return [(0, [x[0], x[1], v], ins[0])]
    if op == "MultiHeadAttention" and x is not None and len(x) == 3:
        value = shape.get(ins[2]) if len(ins) > 2 and ins[2] else None
        width = value[-1] if value is not None and len(value) == 3 else x[-1]
        return [(0, [x[0], x[1], width], ins[0])]
    return []


def _fill_contrib_ops(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Value infos for the outputs of com.microsoft ops that shape inference left
    without a shape, where :func:`_contrib_op_shape` knows them."""
    g = model.graph
    infos = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    shape: dict[str, list[Dim] | None] = {n: _shape(vi) for n, vi in infos.items()}
    elem: dict[str, int] = {n: vi.type.tensor_type.elem_type for n, vi in infos.items()}
    for t in g.initializer:
        shape[t.name] = [int(d) for d in t.dims]
        elem[t.name] = t.data_type
    filled = []
    for node in g.node:
        if node.domain != "com.microsoft":
            continue
        for index, dims, source in _contrib_op_shape(node, shape):
            out = node.output[index]
            known = _shape(infos.get(out))
            if known is not None and (known == dims or all(isinstance(d, int) for d in known)):
                continue
            kind = inits[source].data_type if source in inits else elem.get(source, 0)
            vi = helper.make_tensor_value_info(out, kind or onnx.TensorProto.FLOAT, dims)
            filled.append(vi)
            shape[out] = dims
            elem[out] = kind
    return filled


def _with_static_input(
    model: onnx.ModelProto, input_name: str, layout: str, size: tuple[int, int] | None
) -> onnx.ModelProto:
    """A copy whose image input has concrete dims (batch 1, probe H/W) for inference;
    without the data of its large weights (:func:`_weightless`), which shapes never need."""
    probe = _weightless(model)
    del probe.graph.value_info[:]
    h, w = size if size else (PROBE_SIZE, PROBE_SIZE)
    for inp in probe.graph.input:
        if inp.name != input_name:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != 4:
            break
        spatial = (2, 3) if layout == "NCHW" else (1, 2)
        chan = 1 if layout == "NCHW" else 3
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            value = 1 if i == 0 else 3 if i == chan else (h if i == spatial[0] else w)
            d.Clear()
            d.dim_value = value
    return _fold_shapes(_infer(probe))  # (_infer returns a copy, edited in place there)


#: Ops of shape arithmetic (x.view(n, g, c // g, h, w) and the like) that the probe
#: evaluates where ONNX shape inference stops (it does not propagate Div, for one).
_SHAPE_OPS = (
    "Shape",
    "Size",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Slice",
    "Floor",
    "Ceil",
    "Identity",
    "Reshape",
    "Equal",
    "Where",
    "Max",
    "Min",
    "Neg",
    "Abs",
    "Range",
    "Expand",
    "ConstantOfShape",
)
#: Largest tensor (elements) taken for a shape value.
_SHAPE_VALUE_SIZE = 64


def _fold_shapes(probe: onnx.ModelProto, rounds: int = 64) -> onnx.ModelProto:
    """The shape-inferred ``probe`` (static input) with its shape arithmetic evaluated
    into Constant nodes and shapes inferred again, until nothing more folds: shapes that
    ``x.view(...)`` of computed sizes hide from ONNX shape inference (ShuffleNet's channel
    shuffle) become known.  Only for detection; the model that runs is never changed."""
    opset = [o for o in probe.opset_import if o.domain in ("", "ai.onnx")]
    for _ in range(rounds):
        g = GraphIndex(probe)
        values: dict[str, np.ndarray | None] = {}

        def value(name: str) -> np.ndarray | None:
            if name not in values:
                v = None
                if name in g.initializers or (
                    name in g.producer and g.producer[name].op_type == "Constant"
                ):
                    try:  # (the probe's large weights have no data: never shape values)
                        v = constant_value(probe.graph, name, g.producer)
                    except Exception:
                        v = None
                values[name] = v if v is not None and v.size <= _SHAPE_VALUE_SIZE else None
            return values[name]

        folded: dict[int, list[np.ndarray]] = {}
        for i, node in enumerate(probe.graph.node):
            if (
                node.op_type not in _SHAPE_OPS
                or node.domain not in ("", "ai.onnx")
                or len(node.output) != 1
            ):
                continue
            if node.op_type == "Shape":
                shape = g.info(node.input[0]).shape
                if shape is None or not all(isinstance(d, int) for d in shape):
                    continue
                start, end = _attr(node, "start", 0), _attr(node, "end", None)
                outs: list[np.ndarray] = [np.asarray(shape, np.int64)[start:end]]
            else:
                ins = [value(n) if n else None for n in node.input]
                if any(n and v is None for n, v in zip(node.input, ins)):
                    continue
                evaluated = _evaluate(node, ins, opset)
                if evaluated is None:
                    continue
                outs = evaluated
            folded[i] = outs
            for o, v in zip(node.output, outs):
                values[o] = v
        if not any(probe.graph.node[i].op_type in ("Shape", "Size") for i in folded):
            return probe  # (constants alone: shape inference already propagates those)
        for i, (v,) in folded.items():
            node = probe.graph.node[i]
            node.CopyFrom(
                helper.make_node(
                    "Constant",
                    [],
                    [node.output[0]],
                    value=numpy_helper.from_array(v, node.output[0]),
                )
            )
        del probe.graph.value_info[:]
        probe = _infer(probe)
    return probe


def _evaluate(
    node: onnx.NodeProto, ins: list[np.ndarray | None], opset: list[onnx.OperatorSetIdProto]
) -> list[np.ndarray] | None:
    """The outputs of the shape op ``node`` on the values ``ins`` of its inputs (the
    reference evaluator), or None when they could be large (:func:`_folds_too_large`), the
    evaluation fails or an output is over ``_SHAPE_VALUE_SIZE`` elements."""
    from onnx.reference import ReferenceEvaluator

    if _folds_too_large(node.op_type, ins):
        return None
    try:
        one = helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [
                    helper.make_tensor_value_info(
                        n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape
                    )
                    for n, v in zip(node.input, ins)
                    if n and v is not None
                ],
                [
                    helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                    for o in node.output
                ],
            ),
            opset_imports=opset,
        )
        results = ReferenceEvaluator(one).run(None, {n: v for n, v in zip(node.input, ins) if n})
    except Exception:
        return None
    outs = [np.asarray(o) for o in results]
    if any(o.size > _SHAPE_VALUE_SIZE for o in outs):
        return None
    return outs


def _folds_too_large(op_type: str, ins: list[np.ndarray | None]) -> bool:
    """True when a shape op's output would be over ``_SHAPE_VALUE_SIZE`` elements, told
    from its (small) inputs before it is evaluated: ConstantOfShape, Expand and Range
    make outputs of any size from a few numbers (a hostile model's [100000, 100000])."""

    def arg(i: int) -> np.ndarray:
        v = ins[i]
        if v is None:
            raise ValueError(f"input {i} has no value")  # (caught below: not folded)
        return v

    try:
        if op_type == "ConstantOfShape":
            size = _numel(max(int(d), 0) for d in arg(0).reshape(-1))
        elif op_type == "Expand":
            size = _numel(max(int(d), 0) for d in arg(1).reshape(-1)) * max(arg(0).size, 1)
        elif op_type == "Range":
            start, limit, delta = (float(arg(i).reshape(-1)[0]) for i in range(3))
            size = 0 if delta == 0 else max(int(np.ceil((limit - start) / delta)), 0)
        else:
            return False
    except Exception:
        return True  # (not understood: not folded)
    return size > _SHAPE_VALUE_SIZE

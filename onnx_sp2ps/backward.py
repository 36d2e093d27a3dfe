"""Exact gradients of a classifier head, built as an ONNX graph (no autograd at run time).

:func:`build_head_gradient` takes the head model that :func:`onnx_sp2ps.model.extract_head`
cuts out (feature map -> logits) and returns a model with inputs

* the feature map ``A`` (same name, type and layout as in the head), and
* ``target`` (N,) int64: the class to explain per image, or -1 for the image's top-1,
* the head's other inputs, if any (activations it reads besides the feature map, held
  constant: the gradient is taken with respect to ``A`` alone),

and outputs ``logits`` and ``gradient`` = dy_target / dA, the shape of ``A``.  One run
gives the exact per-position gradients that Grad-CAM's relatives need.

The backward pass is written op by op (reverse-mode differentiation): one
``_Builder._bw_<op>`` rule per op that classifier heads use, and :data:`GRADIENT_OPS`
is the list those rules make.  Some rules take only some forms of their op (pools that
reduce to 1x1 or tile without overlap, Conv without auto_pad SAME, Pow of a constant
exponent, Gather of repeated or computed indices from opset 16 (a scalar index or
constant distinct ones from opset 11), Slice with constant axes); the ops of a
vision-transformer block (MatMul of two computed tensors with batch broadcasting,
Split, Slice, Concat, Expand, Tile, Where, Softmax of every opset, LayerNormalization
or its decomposition, Gelu) have rules for the forms the exporters write.  Rules that
need a tensor's rank refuse it when shape inference could not find it (before opset
13, onnx does not follow a shape through Shape -> Slice -> Concat -> Reshape).
Shapes, sizes, comparisons and indices have no gradient (:data:`_NO_GRADIENT`): the
ops that read them take them as constants.  QuantizeLinear/DequantizeLinear are
straight-through, and QOperator ops are differentiated in their QDQ form
(:func:`onnx_sp2ps.model.qdq_form`).  Weights may be initializers or Constant nodes (or
computed from them).

The com.microsoft ops that onnxruntime's transformer optimizer fuses vision
transformers into (``optimize_model(..., model_type='vit')``) have rules too, the
``_Builder._bw_ms_<op>`` methods (:data:`CONTRIB_GRADIENT_OPS`): SkipLayerNormalization,
SkipSimplifiedLayerNormalization, BiasGelu, FastGelu, Gelu, QuickGelu and BiasAdd.  Their
forward nodes stay as they are (the gradient model imports com.microsoft like the head);
the backward nodes are standard ONNX.  onnx's shape inference does not know these ops:
their outputs' shapes are filled in from their inputs'
(:func:`onnx_sp2ps.model.shapes._infer`).  Other
com.microsoft ops (Attention, MultiHeadAttention, ...) and other domains are refused, and
so is SimplifiedLayerNormalization: onnxruntime registers it in the standard domain, whose
ops onnx's checker knows (it refuses the model).

For any other op or form, :class:`UnsupportedHead` says which, and the caller falls back
to finite differences.
No onnxruntime here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_sp2ps.model.compressed import UnsupportedQuantizedOp, qdq_form
from onnx_sp2ps.model.index import _attr, constant_value
from onnx_sp2ps.model.load import check_model
from onnx_sp2ps.model.shapes import _infer, broadcast_dims

__all__ = [
    "UnsupportedHead",
    "HeadGradient",
    "build_head_gradient",
    "GRADIENT_OPS",
    "CONTRIB_GRADIENT_OPS",
]

TARGET = "sp2ps_target"
LOGITS_OUT = "sp2ps_logits"
GRADIENT_OUT = "sp2ps_gradient"
TARGET_USED = "sp2ps_target_used"
MIN_OPSET = 11

#: Note given with exact gradients of quantized heads.
STRAIGHT_THROUGH = (
    "straight-through: QuantizeLinear/DequantizeLinear taken as identity "
    "inside the quantization range (rounding has no gradient)"
)


#: Ops whose outputs have no gradient: sizes and shapes, comparisons, masks and indices
#: (piecewise constant).  Their outputs are not "active", so the ops that read them (the
#: starts of a Slice, the condition of a Where, a Reshape's target) take them as constants.
_NO_GRADIENT = frozenset(
    {
        "Shape",
        "Size",
        "ConstantOfShape",
        "Range",
        "EyeLike",
        "Equal",
        "Greater",
        "GreaterOrEqual",
        "Less",
        "LessOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "IsNaN",
        "IsInf",
        "Sign",
        "ArgMax",
        "ArgMin",
        "NonZero",
    }
)

#: Ops with several outputs whose rule also runs when its first output has no gradient
#: (the rule reads the gradients of every output itself).
_MULTI_OUTPUT = frozenset({"Split", "LayerNormalization"})

#: The domains of the standard ops, and onnxruntime's contrib-op domain.
_STANDARD_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"

#: com.microsoft ops with several outputs (as :data:`_MULTI_OUTPUT`): the sum
#: input + skip (+ bias) they also output is the residual stream of the next block.
_CONTRIB_MULTI_OUTPUT = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})

#: The prefix of the rules of com.microsoft ops (``_bw_ms_<op>``).
_CONTRIB_PREFIX = "_bw_ms_"


class UnsupportedHead(Exception):
    """The head contains an op (or an op form) with no backward rule here."""


@dataclass(frozen=True)
class HeadGradient:
    """The gradient model and the names of its inputs and outputs."""

    model: onnx.ModelProto
    feature: str
    target: str = TARGET
    logits: str = LOGITS_OUT
    gradient: str = GRADIENT_OUT
    target_used: str = TARGET_USED
    note: str | None = None
    #: Inputs besides the feature map, held constant (the head's side inputs).
    side_inputs: tuple[str, ...] = ()


class _Builder:
    def __init__(self, head: onnx.ModelProto):
        self.head = head
        self.opset = next(
            (o.version for o in head.opset_import if o.domain in _STANDARD_DOMAINS), 0
        )
        if self.opset < MIN_OPSET:
            raise UnsupportedHead(f"opset {self.opset} < {MIN_OPSET}")
        custom = sorted({n.domain for n in head.graph.node} - set(_STANDARD_DOMAINS) - {MS_DOMAIN})
        if custom:
            raise UnsupportedHead(f"ops from a custom domain ({', '.join(custom)})")
        inferred = _infer(head)  # (through the com.microsoft ops too)
        self.shapes: dict[str, tuple | None] = {}
        for vi in (
            list(inferred.graph.value_info)
            + list(inferred.graph.input)
            + list(inferred.graph.output)
        ):
            dims = None
            if vi.type.tensor_type.HasField("shape"):
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else None
                    for d in vi.type.tensor_type.shape.dim
                )
            self.shapes[vi.name] = dims
        g = head.graph
        self.feature = g.input[0].name
        self.logits = g.output[0].name
        self.initializers = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.grads: dict[str, list[str]] = {}
        self.count = 0
        self.active = self._active_tensors()
        self._shape_cache: dict[str, str] = {}

    # -- plumbing ------------------------------------------------------------------

    def name(self, hint: str) -> str:
        self.count += 1
        return f"sp2ps_bw/{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def shape(self, tensor: str) -> str:
        if tensor not in self._shape_cache:
            self._shape_cache[tensor] = self.op("Shape", [tensor], "shape")
        return self._shape_cache[tensor]

    def static_shape(self, tensor: str) -> tuple | None:
        shape = self.shapes.get(tensor)
        if shape is None and tensor in self.initializers:
            shape = tuple(self.initializers[tensor].dims)
        if shape is None:
            value = self.constant_value(tensor)
            shape = None if value is None else tuple(value.shape)
        return shape

    def is_constant(self, tensor: str) -> bool:
        return tensor not in self.active

    def constant_value(self, tensor: str) -> np.ndarray | None:
        return constant_value(self.head.graph, tensor, self.producer)

    def _active_tensors(self) -> set[str]:
        """Tensors that depend on the feature map (the ones with gradients); shapes and
        sizes read from it have none."""
        active = {self.feature}
        for node in self.head.graph.node:
            if node.op_type in _NO_GRADIENT:
                continue
            if any(i in active for i in node.input):
                active.update(o for o in node.output if o)
        return active

    def with_shape(self, tensor: str, shape: tuple | None) -> str:
        """Record the static shape of a tensor of the backward graph (for :meth:`unbroadcast`)."""
        self.shapes[tensor] = shape
        return tensor

    def unsqueeze(self, tensor: str, axes: list[int], hint: str = "unsq") -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [tensor, self.const(axes, "axes", np.int64)], hint)
        return self.op("Unsqueeze", [tensor], hint, axes=axes)

    def zeros_like(self, tensor: str) -> str:
        """float32 zeros of ``tensor``'s shape (known at run time)."""
        return self.op("ConstantOfShape", [self.shape(tensor)], "zeros")

    def add_grad(self, tensor: str, grad: str) -> None:
        if tensor and tensor in self.active:
            self.grads.setdefault(tensor, []).append(grad)

    def grad(self, tensor: str) -> str | None:
        parts = self.grads.get(tensor)
        if not parts:
            return None
        if len(parts) > 1:
            total = self.op("Sum", parts, "sum")
            self.grads[tensor] = [total]
        return self.grads[tensor][0]

    def reduce_sum(self, tensor: str, axes: list[int], keepdims: int) -> str:
        if self.opset >= 13:
            return self.op(
                "ReduceSum", [tensor, self.const(axes, "axes", np.int64)], "rsum", keepdims=keepdims
            )
        return self.op("ReduceSum", [tensor], "rsum", axes=axes, keepdims=keepdims)

    def unbroadcast(self, grad: str, x: str, y: str) -> str:
        """Sum ``grad`` (shape of y) down to the shape of x (numpy broadcasting)."""
        xs, ys = self.static_shape(x), self.static_shape(y)
        if xs is not None and ys is not None and xs == ys and None not in xs:
            return grad
        if xs is None or ys is None:
            # (a rank unknown before running: a Reshape to a computed target, as
            # paddle2onnx writes Shape -> Slice -> Concat -> Reshape)
            return self._unbroadcast_dynamic(grad, x, y, None)
        if len(xs) > len(ys):
            raise UnsupportedHead(f"broadcast of {x!r} into a tensor of lower rank")
        lead = len(ys) - len(xs)
        # Summed: y's leading dims and x's dims of 1 (a no-op where y's is 1 too, so y's
        # sizes need not be known); a symbolic dim of x is found out at run time, but for
        # a symbolic batch (x's first dim, same rank), taken as y's.
        if any(d is None and not (i == 0 and lead == 0) for i, d in enumerate(xs)):
            return self._unbroadcast_dynamic(grad, x, y, lead)
        axes = list(range(lead))
        for i, d in enumerate(xs):
            if d == 1 and ys[lead + i] != 1:
                axes.append(lead + i)
        out = grad
        if axes:
            out = self.reduce_sum(out, axes, keepdims=1)
        if lead or axes:
            out = self.op("Reshape", [out, self.shape(x)], "unb")
        return out

    def _unbroadcast_dynamic(self, grad: str, x: str, y: str, lead: int | None) -> str:
        """:meth:`unbroadcast` for symbolic dims (a batch N, or an input of any size): the
        axes to sum are found at run time (where x's dim is 1 and y's is not); with
        ``lead`` None the ranks too (x's shape is padded with ones to y's rank)."""
        if self.opset < 13:
            raise UnsupportedHead(f"broadcast of {x!r} with symbolic shapes (opset < 13)")
        x_shape = self.shape(x)
        if lead is None:
            missing = self.op(
                "Sub",
                [
                    self.op("Shape", [self.shape(y)], "rank_y"),
                    self.op("Shape", [x_shape], "rank_x"),
                ],
                "lead",
            )
            ones = self.op(
                "ConstantOfShape",
                [missing],
                "lead_ones",
                value=numpy_helper.from_array(np.array([1], np.int64)),
            )
            x_shape = self.op("Concat", [ones, x_shape], "xpad", axis=0)
        elif lead:
            x_shape = self.op(
                "Concat", [self.const([1] * lead, "ones", np.int64), x_shape], "xpad", axis=0
            )
        one = self.const(1, "one", np.int64)
        summed = self.op(
            "And",
            [
                self.op("Equal", [x_shape, one]),
                self.op("Not", [self.op("Equal", [self.shape(y), one])]),
            ],
        )
        axes = self.op(
            "Reshape",
            [self.op("NonZero", [summed], "axes"), self.const([-1], "flat", np.int64)],
            "axes_flat",
        )
        out = self.op("ReduceSum", [grad, axes], "rsum", keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", [out, self.shape(x)], "unb")

    # -- build ---------------------------------------------------------------------

    def build(self) -> HeadGradient:
        g = self.head.graph
        logits = self.logits
        flat = self.op("Flatten", [logits], "logits_flat", axis=1)
        top1 = self.op("ArgMax", [flat], "top1", axis=1, keepdims=0)
        negative = self.op("Less", [TARGET, self.const(0, "zero", np.int64)], "own")
        target = self.op("Where", [negative, top1, TARGET], "target")
        depth = self.op(
            "Gather", [self.op("Shape", [flat], "kshape"), self.const(1, "one", np.int64)], "depth"
        )
        seed = self.op("OneHot", [target, depth, self.const([0.0, 1.0], "onoff")], "seed", axis=-1)
        seed = self.op("Reshape", [seed, self.shape(logits)], "seed_shaped")
        self.add_grad(logits, seed)
        for node in reversed(list(g.node)):
            outs = [o for o in node.output if o in self.grads]
            if not outs or not any(i in self.active for i in node.input):
                continue
            rule, multi_output = self._rule(node)
            dy = self.grad(node.output[0])
            if dy is None and not multi_output:
                continue
            rule(node, dy)
        grad = self.grad(self.feature)
        if grad is None:
            grad = self.op("Mul", [self.feature, self.const(0.0, "zero_f")], "nograd")
        nodes = [copy.deepcopy(n) for n in g.node] + self.nodes
        nodes.append(helper.make_node("Identity", [logits], [LOGITS_OUT]))
        nodes.append(helper.make_node("Identity", [grad], [GRADIENT_OUT]))
        nodes.append(helper.make_node("Identity", [target], [TARGET_USED]))
        f_in = copy.deepcopy(g.input[0])
        side_in = [copy.deepcopy(i) for i in g.input[1:]]
        t_in = helper.make_tensor_value_info(TARGET, onnx.TensorProto.INT64, ["N"])
        logits_vi = copy.deepcopy(g.output[0])
        logits_vi.name = LOGITS_OUT
        grad_vi = copy.deepcopy(g.input[0])
        grad_vi.name = GRADIENT_OUT
        outputs = [
            logits_vi,
            grad_vi,
            helper.make_tensor_value_info(TARGET_USED, onnx.TensorProto.INT64, ["N"]),
        ]
        graph = helper.make_graph(
            nodes,
            "head_gradient",
            [f_in, *side_in, t_in],
            outputs,
            initializer=[copy.deepcopy(t) for t in g.initializer] + self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[copy.deepcopy(o) for o in self.head.opset_import],
            ir_version=self.head.ir_version,
            producer_name="onnx-sp2ps",
        )
        try:
            check_model(model)
        except onnx.checker.ValidationError as exc:  # a gradient graph no rule should make
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UnsupportedHead(f"the gradient graph is not valid ONNX ({first[:200]})") from None
        quantized = any(n.op_type == "QuantizeLinear" and n.input[0] in self.active for n in g.node)
        return HeadGradient(
            model=model,
            feature=self.feature,
            note=STRAIGHT_THROUGH if quantized else None,
            side_inputs=tuple(i.name for i in side_in),
        )

    def _rule(self, node: onnx.NodeProto) -> tuple[Callable[..., None], bool]:
        """(the backward rule of ``node``, whether it reads several outputs' gradients)."""
        if node.domain in _STANDARD_DOMAINS:
            if node.op_type not in GRADIENT_OPS:
                raise UnsupportedHead(f"no gradient rule for {node.op_type}")
            return getattr(self, f"_bw_{node.op_type}"), node.op_type in _MULTI_OUTPUT
        if node.domain == MS_DOMAIN and node.op_type in CONTRIB_GRADIENT_OPS:
            rule = getattr(self, f"{_CONTRIB_PREFIX}{node.op_type}")
            return rule, node.op_type in _CONTRIB_MULTI_OUTPUT
        raise UnsupportedHead(f"no gradient rule for {node.domain}.{node.op_type}")

    def data(self, node) -> list[int]:
        return [i for i, t in enumerate(node.input) if t and t in self.active]

    # -- rules: shape only -----------------------------------------------------------

    def _pass(self, node, dy):
        self.add_grad(node.input[0], dy)

    _bw_Identity = _pass
    _bw_Dropout = _pass

    def _bw_Cast(self, node, dy):
        # Between float types (the head is float32 throughout: model.edit.float32_head) the
        # gradient passes unchanged; a cast to an integer type has none.
        if _attr(node, "to") in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
        ):
            self.add_grad(node.input[0], dy)

    def _reshape_back(self, node, dy):
        x = node.input[0]
        self.add_grad(x, self.op("Reshape", [dy, self.shape(x)], "unshape"))

    _bw_Flatten = _reshape_back
    _bw_Reshape = _reshape_back
    _bw_Squeeze = _reshape_back
    _bw_Unsqueeze = _reshape_back

    def _bw_Transpose(self, node, dy):
        perm = _attr(node, "perm")
        if perm is None:
            rank = len(self.static_shape(node.input[0]) or ())
            if not rank:
                raise UnsupportedHead("Transpose of unknown rank")
            perm = list(reversed(range(rank)))
        self.add_grad(
            node.input[0],
            self.op("Transpose", [dy], "untranspose", perm=[int(i) for i in np.argsort(perm)]),
        )

    def _bw_Concat(self, node, dy):
        # Sizes along the axis from the static shapes, else read at run time.
        axis = int(_attr(node, "axis"))
        begin = 0
        for x in node.input:
            shape = self.static_shape(x)
            size = None
            if shape is not None and -len(shape) <= axis < len(shape):
                size = shape[axis]
            if size is None:
                size = self.op(
                    "Gather", [self.shape(x), self.const([axis], "ax", np.int64)], "concat_size"
                )
            if isinstance(begin, int) and isinstance(size, int):
                end = begin + size
            else:
                end = self.op("Add", [self._ints(begin), self._ints(size)], "concat_end")
            if x in self.active:
                part = self.op(
                    "Slice",
                    [dy, self._ints(begin), self._ints(end), self.const([axis], "a", np.int64)],
                    "unconcat",
                )
                self.add_grad(x, part)
            begin = end

    def _ints(self, value: int | str) -> str:
        """A 1-D int64 tensor of one value: a constant for an int, else the tensor."""
        return self.const([value], "i", np.int64) if isinstance(value, int) else value

    def _bw_Split(self, node, dy):
        # The gradients of the parts concatenated back; zeros for parts that have none
        # (whatever gave their sizes: the split attribute or input, or num_outputs).
        axis = int(_attr(node, "axis", 0))
        parts = [self.grad(o) or self.zeros_like(o) for o in node.output]
        self.add_grad(node.input[0], self.op("Concat", parts, "unsplit", axis=axis))

    def _bw_Pad(self, node, dy):
        # Constant mode (pads as an input: opset >= 11, as MIN_OPSET is): the gradient is
        # dy padded by the negated pads (what Pad added is cut off, what it cropped comes
        # back as zeros), axes as the op's.
        mode = _attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode != "constant":
            raise UnsupportedHead(f"Pad in {mode} mode")
        if any(i in self.active for i in list(node.input)[1:]):
            raise UnsupportedHead("Pad with computed pads or value from the feature map")
        inputs = [dy, self.op("Neg", [node.input[1]], "pads_neg")]
        if len(node.input) > 3 and node.input[3]:
            inputs += ["", node.input[3]]
        self.add_grad(node.input[0], self.op("Pad", inputs, "pad_bw", mode="constant"))

    def _bw_Slice(self, node, dy):
        # Undone one axis at a time: the positions a Slice of the same starts, ends and
        # steps picks out of Range(0, size) (the op's own clamping, negative steps
        # included), and dy scattered at them into zeros.
        x = node.input[0]
        starts, ends, axes_in, steps = (list(node.input) + ["", ""])[1:5]
        xs = self.static_shape(x)
        if xs is None:
            raise UnsupportedHead("Slice of unknown rank")
        rank = len(xs)
        if axes_in:
            value = self.constant_value(axes_in)
            if value is None:
                raise UnsupportedHead("Slice with computed axes")
            axes = [int(a) % rank for a in value.reshape(-1)]
        else:
            count = self.static_shape(starts)
            if count is None or len(count) != 1 or count[0] is None:
                raise UnsupportedHead("Slice with starts of unknown length and no axes")
            axes = list(range(count[0]))
        grad = dy
        for k, axis in enumerate(axes):
            size = self.op(
                "Gather", [self.shape(x), self.const(axis, "ax", np.int64)], "slice_size"
            )
            positions = self.op(
                "Range",
                [self.const(0, "zero", np.int64), size, self.const(1, "one", np.int64)],
                "positions",
            )
            bounds = [self._element(t, k) for t in (starts, ends)]
            bounds.append(self.const([0], "a0", np.int64))
            if steps:
                bounds.append(self._element(steps, k))
            picked = self.op("Slice", [positions] + bounds, "picked")
            along = self.const([1] * axis + [-1] + [1] * (rank - axis - 1), "along", np.int64)
            index = self.op(
                "Expand", [self.op("Reshape", [picked, along]), self.shape(grad)], "slice_index"
            )
            full = self.op(
                "Where",
                [
                    self.const(np.arange(rank) == axis, "axis_mask", np.bool_),
                    self.shape(x),
                    self.shape(grad),
                ],
                "slice_full",
            )
            zeros = self.op("ConstantOfShape", [full], "zeros")
            grad = self.op("ScatterElements", [zeros, index, grad], "unslice", axis=axis)
        self.add_grad(x, grad)

    def _element(self, tensor: str, k: int) -> str:
        """Element k of a 1-D integer tensor, as a 1-D int64 tensor of one value."""
        value = self.constant_value(tensor)
        if value is not None:
            return self.const([int(value.reshape(-1)[k])], "i", np.int64)
        picked = self.op(
            "Slice",
            [tensor, self.const([k], "k", np.int64), self.const([k + 1], "k1", np.int64)],
            "elem",
        )
        return self.op("Cast", [picked], "elem64", to=onnx.TensorProto.INT64)

    def _bw_Expand(self, node, dy):
        x = node.input[0]
        self.add_grad(x, self.unbroadcast(dy, x, node.output[0]))

    def _bw_Tile(self, node, dy):
        # dy seen as (r0, d0, r1, d1, ...) and summed over the repeats.
        x, repeats = node.input
        xs = self.static_shape(x)
        if xs is None:
            raise UnsupportedHead("Tile of unknown rank")
        rank = len(xs)
        reps = self.op("Cast", [repeats], "reps", to=onnx.TensorProto.INT64)
        pairs = self.op(
            "Concat",
            [self.unsqueeze(reps, [1]), self.unsqueeze(self.shape(x), [1])],
            "tile_pairs",
            axis=1,
        )
        split = self.op("Reshape", [pairs, self.const([-1], "flat", np.int64)], "tile_shape")
        g = self.op("Reshape", [dy, split], "tile_split")
        self.add_grad(x, self.reduce_sum(g, list(range(0, 2 * rank, 2)), keepdims=0))

    # -- rules: pooling and reductions -------------------------------------------------

    def _mean_back(self, x, y, dy):
        """dx = expand(dy) * size(y) / size(x), dy already shaped with kept dims."""
        scale = self.op(
            "Div",
            [
                self.op("Cast", [self.op("Size", [y])], to=onnx.TensorProto.FLOAT),
                self.op("Cast", [self.op("Size", [x])], to=onnx.TensorProto.FLOAT),
            ],
            "inv_count",
        )
        return self.op("Mul", [self.op("Expand", [dy, self.shape(x)], "expand"), scale], "mean_bw")

    def _keepdims_shape(self, node) -> str:
        """Shape of the node's result with keepdims=1 (a copy of the node computes it)."""
        twin = copy.deepcopy(node)
        twin.name = ""
        out = self.name("keep")
        del twin.output[:]
        twin.output.append(out)
        for a in twin.attribute:
            if a.name == "keepdims":
                a.i = 1
        if not any(a.name == "keepdims" for a in twin.attribute):
            twin.attribute.append(helper.make_attribute("keepdims", 1))
        self.nodes.append(twin)
        return self.shape(out)

    def _bw_GlobalAveragePool(self, node, dy):
        x, y = node.input[0], node.output[0]
        self.add_grad(x, self._mean_back(x, y, dy))

    def _bw_ReduceMean(self, node, dy):
        x, y = node.input[0], node.output[0]
        dy = self.op("Reshape", [dy, self._keepdims_shape(node)], "keep_dy")
        y_keep = self.op("Reshape", [y, self._keepdims_shape(node)], "keep_y")
        self.add_grad(x, self._mean_back(x, y_keep, dy))

    def _bw_ReduceSum(self, node, dy):
        x = node.input[0]
        dy = self.op("Reshape", [dy, self._keepdims_shape(node)], "keep_dy")
        self.add_grad(x, self.op("Expand", [dy, self.shape(x)], "expand"))

    def _max_back(self, x, y_keep, dy_keep):
        ys = self.op("Expand", [y_keep, self.shape(x)], "expand_y")
        mask = self.op(
            "Cast", [self.op("Equal", [x, ys], "is_max")], "mask", to=onnx.TensorProto.FLOAT
        )
        return self.op(
            "Mul", [self.op("Expand", [dy_keep, self.shape(x)], "expand"), mask], "max_bw"
        )

    def _bw_GlobalMaxPool(self, node, dy):
        self.add_grad(node.input[0], self._max_back(node.input[0], node.output[0], dy))

    def _bw_ReduceMax(self, node, dy):
        keep = self._keepdims_shape(node)
        y_keep = self.op("Reshape", [node.output[0], keep], "keep_y")
        dy_keep = self.op("Reshape", [dy, keep], "keep_dy")
        self.add_grad(node.input[0], self._max_back(node.input[0], y_keep, dy_keep))

    def _pool_form(self, node) -> str:
        """'global' when the pool's output is 1x1 over a known input, 'tiled' when its
        windows tile the input without overlap or padding; else unsupported."""
        xs = self.static_shape(node.input[0])
        kernel = list(_attr(node, "kernel_shape", []))
        strides = list(_attr(node, "strides", [1] * len(kernel)))
        pads = list(_attr(node, "pads", [0] * 2 * len(kernel)))
        dil = list(_attr(node, "dilations", [1] * len(kernel)))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if len(node.output) > 1 and node.output[1]:
            raise UnsupportedHead(f"{node.op_type} with indices output")
        if any(d != 1 for d in dil) or any(pads) or auto not in ("NOTSET", "VALID"):
            raise UnsupportedHead(f"{node.op_type} with padding or dilation")
        if (
            xs is not None
            and len(xs) == 2 + len(kernel)
            and all(isinstance(d, int) and d for d in xs[2:])
        ):
            if all(k == d for k, d in zip(kernel, xs[2:])):
                return "global"
        if kernel == strides and xs is not None and xs[1]:
            return "tiled"
        raise UnsupportedHead(f"{node.op_type} with overlapping windows or unknown sizes")

    def _tile_up(self, node, t: str) -> str:
        """Repeat each pooled value over its window and pad the remainder with zeros."""
        kernel = list(_attr(node, "kernel_shape"))
        shape = self.static_shape(node.input[0])
        assert shape is not None  # (a "tiled" _pool_form has a known shape)
        channels = shape[1]
        ones = self.const(np.ones([channels, 1] + kernel), "ones")
        up = self.op("ConvTranspose", [t, ones], "tile", strides=kernel, group=channels)
        # Pad to x's size (floor mode leaves a remainder that gets no gradient).
        diff = self.op("Sub", [self.shape(node.input[0]), self.shape(up)], "rem")
        zeros = self.const([0] * (2 + len(kernel)), "z", np.int64)
        pads = self.op("Concat", [zeros, diff], "pads", axis=0)
        return self.op("Pad", [up, pads], "pad")

    def _bw_AveragePool(self, node, dy):
        x = node.input[0]
        if self._pool_form(node) == "global":
            self.add_grad(x, self._mean_back(x, node.output[0], dy))
            return
        size = float(np.prod(_attr(node, "kernel_shape")))
        scaled = self.op("Mul", [dy, self.const(1.0 / size, "inv_k")], "avg_scale")
        self.add_grad(x, self._tile_up(node, scaled))

    def _bw_MaxPool(self, node, dy):
        x = node.input[0]
        if self._pool_form(node) == "global":
            self.add_grad(x, self._max_back(x, node.output[0], dy))
            return
        # The gradient goes to the first maximum of each window (row-major), as autograd
        # routes it; every tied maximum (a window of ReLU zeros) would multiply it.
        ys = self._tile_up(node, node.output[0])
        dys = self._tile_up(node, dy)
        is_max = self.op(
            "Cast", [self.op("Equal", [x, ys], "is_max")], "mask", to=onnx.TensorProto.FLOAT
        )
        kernel = list(_attr(node, "kernel_shape"))
        shape = self.static_shape(x)
        assert shape is not None  # (a "tiled" _pool_form has a known shape)
        offsets = np.meshgrid(*(np.arange(n) % k for n, k in zip(shape[2:], kernel)), indexing="ij")
        rank = np.ravel_multi_index(tuple(offsets), kernel)  # position within its window
        earlier = self.const((np.prod(kernel) - rank)[None, None], "first_rank")  # K..1
        score = self.op("Mul", [is_max, earlier], "max_score")
        best = self.op(
            "MaxPool", [score], "max_first", kernel_shape=kernel, strides=_attr(node, "strides")
        )
        first = self.op("Equal", [score, self._tile_up(node, best)], "is_first")
        mask = self.op(
            "Mul",
            [is_max, self.op("Cast", [first], "first", to=onnx.TensorProto.FLOAT)],
            "first_max",
        )
        self.add_grad(x, self.op("Mul", [dys, mask], "maxpool_bw"))

    # -- rules: linear algebra ----------------------------------------------------------

    def _bw_Gemm(self, node, dy):
        # Y = alpha op(A) op(B) + beta C; any of A, B, C may be computed.
        a, b = node.input[0], node.input[1]
        alpha = float(_attr(node, "alpha", 1.0))
        trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
        if a in self.active:  # d op(A) = alpha dY op(B)^T
            if trans_a:
                da = self.op("Gemm", [b, dy], "gemm_bw", alpha=alpha, transA=trans_b, transB=1)
            else:
                da = self.op("Gemm", [dy, b], "gemm_bw", alpha=alpha, transB=1 - trans_b)
            self.add_grad(a, da)
        if b in self.active:  # d op(B) = alpha op(A)^T dY
            if trans_b:
                db = self.op("Gemm", [dy, a], "gemm_bw", alpha=alpha, transA=1, transB=trans_a)
            else:
                db = self.op("Gemm", [a, dy], "gemm_bw", alpha=alpha, transA=1 - trans_a)
            self.add_grad(b, db)
        if len(node.input) > 2 and node.input[2] in self.active:
            c, beta = node.input[2], float(_attr(node, "beta", 1.0))
            dc = dy if beta == 1.0 else self.op("Mul", [dy, self.const(beta)], "gemm_beta")
            self.add_grad(c, self.unbroadcast(dc, c, node.output[0]))

    def _swap_last(self, tensor: str, rank: int) -> str:
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return self.op("Transpose", [tensor], "mT", perm=perm)

    def _bw_MatMul(self, node, dy):
        # numpy matmul: dA = dY @ B^T, dB = A^T @ dY, each summed over the batch dims it
        # was broadcast along; 1-D operands promoted as numpy does, a (K,) -> (1, K) and
        # b (K,) -> (K, 1), and the result's missing dims put back in dY.
        a, b = node.input
        sa, sb = self.static_shape(a), self.static_shape(b)
        if sa is None and sb == (sb and sb[:2]) and b not in self.active:
            # data of unknown rank times a constant of rank 1 or 2: no batch dims of the
            # constant to sum over, and the same formula holds for any rank of the data.
            bp, dyp = b, dy
            if len(sb) == 1:
                bp, dyp = self.unsqueeze(b, [1]), self.unsqueeze(dy, [-1])
            self.add_grad(a, self.op("MatMul", [dyp, self._swap_last(bp, 2)], "matmul_bw"))
            return
        if not sa or not sb:
            raise UnsupportedHead("MatMul of unknown rank or of scalars")
        ap, bp, dyp = a, b, dy
        if len(sb) == 1:
            sb = sb + (1,)
            bp = self.with_shape(self.unsqueeze(b, [1]), sb)
            dyp = self.unsqueeze(dyp, [-1])
        if len(sa) == 1:
            sa = (1,) + sa
            ap = self.with_shape(self.unsqueeze(a, [0]), sa)
            dyp = self.unsqueeze(dyp, [-2])
        batch = broadcast_dims(sa[:-2], sb[:-2])
        if a in self.active:
            da = self.op("MatMul", [dyp, self._swap_last(bp, len(sb))], "matmul_bw")
            if len(sb) > 2:
                da = self.unbroadcast(self.with_shape(da, batch + sa[-2:]), ap, da)
            if ap != a:
                da = self.op("Reshape", [da, self.shape(a)], "matmul_bw1")
            self.add_grad(a, da)
        if b in self.active:
            db = self.op("MatMul", [self._swap_last(ap, len(sa)), dyp], "matmul_bw")
            if len(sa) > 2:
                db = self.unbroadcast(self.with_shape(db, batch + sb[-2:]), bp, db)
            if bp != b:
                db = self.op("Reshape", [db, self.shape(b)], "matmul_bw1")
            self.add_grad(b, db)

    def _bw_Add(self, node, dy):
        for i in self.data(node):
            self.add_grad(node.input[i], self.unbroadcast(dy, node.input[i], node.output[0]))

    def _bw_Sub(self, node, dy):
        for i in self.data(node):
            g = dy if i == 0 else self.op("Neg", [dy], "neg")
            self.add_grad(node.input[i], self.unbroadcast(g, node.input[i], node.output[0]))

    def _bw_Mul(self, node, dy):
        a, b = node.input
        y = node.output[0]
        if a in self.active:
            self.add_grad(a, self.unbroadcast(self.op("Mul", [dy, b], "mul_bw"), a, y))
        if b in self.active:
            self.add_grad(b, self.unbroadcast(self.op("Mul", [dy, a], "mul_bw"), b, y))

    def _bw_Div(self, node, dy):
        a, b = node.input
        y = node.output[0]
        if a in self.active:
            self.add_grad(a, self.unbroadcast(self.op("Div", [dy, b], "div_bw"), a, y))
        if b in self.active:  # d(a/b)/db = -y / b
            g = self.op("Neg", [self.op("Div", [self.op("Mul", [dy, y]), b])], "div_bw")
            self.add_grad(b, self.unbroadcast(g, b, y))

    def _bw_Sum(self, node, dy):
        for x in node.input:
            if x in self.active:
                self.add_grad(x, self.unbroadcast(dy, x, node.output[0]))

    def _bw_Where(self, node, dy):
        # The condition has no gradient (a mask: piecewise constant).
        cond, a, b = node.input
        y, zero = node.output[0], self.const(0.0)
        if a in self.active:
            self.add_grad(a, self.unbroadcast(self._where(cond, dy, zero), a, y))
        if b in self.active:
            self.add_grad(b, self.unbroadcast(self._where(cond, zero, dy), b, y))

    def _extremum_back(self, node, dy):
        # dy goes to the inputs equal to the result, shared among tied ones (as torch's
        # maximum/minimum halves it between two tied inputs).
        y = node.output[0]
        masks = [
            self.op("Cast", [self.op("Equal", [x, y])], "is_ext", to=onnx.TensorProto.FLOAT)
            for x in node.input
        ]
        count = masks[0] if len(masks) == 1 else self.op("Sum", masks, "ties")
        share = self.op("Div", [dy, count], "ext_share")
        for x, mask in zip(node.input, masks):
            if x in self.active:
                g = self.op("Mul", [share, mask], "ext_bw")
                self.add_grad(x, self.unbroadcast(g, x, y))

    _bw_Max = _extremum_back
    _bw_Min = _extremum_back

    def _bw_BatchNormalization(self, node, dy):
        x, scale, _, _, var = node.input[:5]
        if any(t in self.active for t in (scale, var)):
            raise UnsupportedHead("BatchNormalization with computed statistics")
        eps = float(_attr(node, "epsilon", 1e-5))
        factor = self.op(
            "Div", [scale, self.op("Sqrt", [self.op("Add", [var, self.const(eps)])])], "bn_factor"
        )
        rank = len(self.static_shape(x) or ()) or 4
        factor = self.op(
            "Reshape",
            [factor, self.const([1, -1] + [1] * (rank - 2), "bn_shape", np.int64)],
            "bn_factor_b",
        )
        self.add_grad(x, self.op("Mul", [dy, factor], "bn_bw"))

    def _bw_Conv(self, node, dy):
        # dL/dx = ConvTranspose(dy, W) with the Conv's strides, pads, dilations and groups
        # (W is (M, C/group, k...) as ConvTranspose takes it); the output padding that
        # gives x's size back is 0 at stride 1, and needs static sizes above it.
        x, w = node.input[0], node.input[1]
        if w in self.active or (len(node.input) > 2 and node.input[2] in self.active):
            raise UnsupportedHead("Conv with computed weights")
        ws = self.static_shape(w)
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if ws is None or len(ws) < 3 or auto_pad not in ("NOTSET", "VALID"):
            raise UnsupportedHead("Conv of unknown kernel size or with auto_pad SAME")
        n = len(ws) - 2
        kernel = [int(k) for k in ws[2:]]
        strides = [int(v) for v in _attr(node, "strides", [1] * n)]
        dilations = [int(v) for v in _attr(node, "dilations", [1] * n)]
        pads = [int(v) for v in _attr(node, "pads", [0] * (2 * n))]
        extra = [0] * n
        if any(v != 1 for v in strides):
            xs, ys = self.static_shape(x), self.static_shape(node.output[0])
            if xs is None or ys is None or None in xs[2:] or None in ys[2:]:
                raise UnsupportedHead("strided Conv with sizes known only at run time")
            for i in range(n):
                made = (ys[2 + i] - 1) * strides[i] - pads[i] - pads[n + i]
                extra[i] = xs[2 + i] - (made + (kernel[i] - 1) * dilations[i] + 1)
            if any(e < 0 or e >= s for e, s in zip(extra, strides)):
                raise UnsupportedHead("strided Conv whose input size cannot be recovered")
        grad = self.op(
            "ConvTranspose",
            [dy, w],
            "conv_bw",
            group=int(_attr(node, "group", 1)),
            strides=strides,
            dilations=dilations,
            pads=pads,
            output_padding=extra,
        )
        self.add_grad(x, grad)

    # -- rules: activations ---------------------------------------------------------

    def _where(self, cond: str, yes: str, no: str) -> str:
        return self.op("Where", [cond, yes, no], "where")

    def _bw_Relu(self, node, dy):
        x = node.input[0]
        self.add_grad(x, self._where(self.op("Greater", [x, self.const(0.0)]), dy, self.const(0.0)))

    def _bw_LeakyRelu(self, node, dy):
        x = node.input[0]
        alpha = float(_attr(node, "alpha", 0.01))
        self.add_grad(
            x,
            self._where(
                self.op("Greater", [x, self.const(0.0)]),
                dy,
                self.op("Mul", [dy, self.const(alpha)]),
            ),
        )

    def _bw_Clip(self, node, dy):
        x = node.input[0]  # (opset >= MIN_OPSET = 11: the bounds are inputs)
        lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
        hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
        conds = []
        if lo:
            conds.append(self.op("Greater", [x, lo]))
        if hi:
            conds.append(self.op("Less", [x, hi]))
        if not conds:
            self.add_grad(x, dy)
            return
        cond = conds[0] if len(conds) == 1 else self.op("And", conds)
        self.add_grad(x, self._where(cond, dy, self.const(0.0)))

    def _bw_HardSigmoid(self, node, dy):
        x = node.input[0]
        alpha = float(_attr(node, "alpha", 0.2))
        beta = float(_attr(node, "beta", 0.5))
        z = self.op("Add", [self.op("Mul", [x, self.const(alpha)]), self.const(beta)])
        cond = self.op(
            "And", [self.op("Greater", [z, self.const(0.0)]), self.op("Less", [z, self.const(1.0)])]
        )
        self.add_grad(
            x, self._where(cond, self.op("Mul", [dy, self.const(alpha)]), self.const(0.0))
        )

    def _bw_HardSwish(self, node, dy):
        # As torch: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3, 1 above.
        x = node.input[0]
        mid = self.op("Add", [self.op("Div", [x, self.const(3.0)]), self.const(0.5)])
        slope = self._where(
            self.op("Less", [x, self.const(-3.0)]),
            self.const(0.0),
            self._where(self.op("Greater", [x, self.const(3.0)]), self.const(1.0), mid),
        )
        self.add_grad(x, self.op("Mul", [dy, slope], "hswish_bw"))

    # -- rules: quantization (straight-through) ----------------------------------------

    def _bw_QuantizeLinear(self, node, dy):
        # q = clip(round(x / s) + zp, qmin, qmax): rounding taken as identity (with the
        # 1/s that DequantizeLinear's s cancels), zero gradient where x saturates (beyond
        # the half step that rounds onto qmin/qmax).  The quantization of the logits
        # themselves only caps the score reported, so its saturation is not applied:
        # a calibration range ends at the largest logit seen, which would otherwise zero
        # the gradient of exactly the most confident images.
        x = node.input[0]
        if self._ends_head(node.output[0]):
            self.add_grad(x, dy)
            return
        scale = self.constant_value(node.input[1])
        zp = (
            self.constant_value(node.input[2])
            if len(node.input) > 2 and node.input[2]
            else np.zeros((), np.uint8)
        )
        if scale is None or zp is None or scale.size != 1 or zp.size != 1:
            raise UnsupportedHead("QuantizeLinear of an activation with computed or per-axis scale")
        info = np.iinfo(zp.dtype)
        s, z = float(scale.reshape(())), float(zp.reshape(()))
        lo, hi = (info.min - z - 0.5) * s, (info.max - z + 0.5) * s
        inside = self.op(
            "And",
            [
                self.op("Not", [self.op("Less", [x, self.const(lo)])]),
                self.op("Not", [self.op("Greater", [x, self.const(hi)])]),
            ],
            "in_range",
        )
        self.add_grad(x, self._where(inside, dy, self.const(0.0)))

    def _ends_head(self, q: str) -> bool:
        """True when the quantized ``q`` reaches the logits through DequantizeLinear and
        shape-only ops alone."""
        current = q
        for _ in range(8):
            if current == self.logits:
                return True
            users = [n for n in self.head.graph.node if current in n.input]
            if len(users) != 1 or users[0].op_type not in (
                "DequantizeLinear",
                "Identity",
                "Flatten",
                "Reshape",
                "Squeeze",
            ):
                return False
            current = users[0].output[0]
        return False

    def _bw_DequantizeLinear(self, node, dy):
        self.add_grad(node.input[0], dy)  # (see _bw_QuantizeLinear)

    def _bw_Sigmoid(self, node, dy):
        y = node.output[0]
        slope = self.op("Mul", [y, self.op("Sub", [self.const(1.0), y])])
        self.add_grad(node.input[0], self.op("Mul", [dy, slope], "sigmoid_bw"))

    def _bw_Tanh(self, node, dy):
        y = node.output[0]
        slope = self.op("Sub", [self.const(1.0), self.op("Mul", [y, y])])
        self.add_grad(node.input[0], self.op("Mul", [dy, slope], "tanh_bw"))

    def _bw_Exp(self, node, dy):
        self.add_grad(node.input[0], self.op("Mul", [dy, node.output[0]], "exp_bw"))

    def _bw_Neg(self, node, dy):
        self.add_grad(node.input[0], self.op("Neg", [dy], "neg_bw"))

    def _bw_Reciprocal(self, node, dy):
        y = node.output[0]
        self.add_grad(
            node.input[0],
            self.op("Neg", [self.op("Mul", [dy, self.op("Mul", [y, y])])], "recip_bw"),
        )

    def _bw_Sqrt(self, node, dy):
        self.add_grad(
            node.input[0],
            self.op("Div", [self.op("Mul", [dy, self.const(0.5)]), node.output[0]], "sqrt_bw"),
        )

    def _bw_Pow(self, node, dy):
        a, b = node.input
        if b in self.active:
            raise UnsupportedHead("Pow with a computed exponent")
        b = self.op("Cast", [b], "exponent", to=onnx.TensorProto.FLOAT)
        slope = self.op("Mul", [b, self.op("Pow", [a, self.op("Sub", [b, self.const(1.0)])])])
        self.add_grad(a, self.unbroadcast(self.op("Mul", [dy, slope], "pow_bw"), a, node.output[0]))

    def _erf_slope(self, x: str, scale: float) -> str:
        """d erf(scale x) / dx = scale 2/sqrt(pi) exp(-(scale x)^2)."""
        z = self.op("Mul", [x, self.const(scale)])
        return self.op(
            "Mul",
            [
                self.op("Exp", [self.op("Neg", [self.op("Mul", [z, z])])]),
                self.const(scale * 2.0 / np.sqrt(np.pi)),
            ],
            "erf_slope",
        )

    def _bw_Erf(self, node, dy):
        x = node.input[0]
        self.add_grad(x, self.op("Mul", [dy, self._erf_slope(x, 1.0)], "erf_bw"))

    def _bw_Gelu(self, node, dy):
        x = node.input[0]
        approx = _attr(node, "approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        slope = self._gelu_slope(x, tanh=approx == "tanh")
        self.add_grad(x, self.op("Mul", [dy, slope], "gelu_bw"))

    def _gelu_slope(self, x: str, tanh: bool) -> str:
        """d gelu(x) / dx.  Exact: Phi(x) + x phi(x); tanh form: the derivative of
        0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
        if tanh:
            k, c = float(np.sqrt(2.0 / np.pi)), 0.044715
            x2 = self.op("Mul", [x, x])
            x3 = self.op("Mul", [x2, x])
            u = self.op(
                "Mul", [self.op("Add", [x, self.op("Mul", [x3, self.const(c)])]), self.const(k)]
            )
            t = self.op("Tanh", [u])
            du = self.op(
                "Mul",
                [
                    self.op("Add", [self.const(1.0), self.op("Mul", [x2, self.const(3 * c)])]),
                    self.const(k),
                ],
            )
            sech2 = self.op("Sub", [self.const(1.0), self.op("Mul", [t, t])])
            return self.op(
                "Mul",
                [
                    self.op(
                        "Add",
                        [
                            self.op("Add", [self.const(1.0), t]),
                            self.op("Mul", [self.op("Mul", [x, sech2]), du]),
                        ],
                    ),
                    self.const(0.5),
                ],
                "gelu_slope",
            )
        r2 = float(1.0 / np.sqrt(2.0))
        cdf = self.op(
            "Mul",
            [
                self.op(
                    "Add",
                    [self.op("Erf", [self.op("Mul", [x, self.const(r2)])]), self.const(1.0)],
                ),
                self.const(0.5),
            ],
        )
        pdf = self.op("Mul", [self._erf_slope(x, r2), self.const(0.5)])  # phi(x)
        return self.op("Add", [cdf, self.op("Mul", [x, pdf])], "gelu_slope")

    def _softmax_2d(self, node, dy) -> tuple[str, str, int, bool]:
        """(dy, y, axis, coerced): opset < 13 computes softmax on the input coerced to 2-D
        at ``axis`` (rows: the dims before it), so the backward works on the same rows
        (Flatten at the axis) and reshapes back."""
        y = node.output[0]
        if self.opset >= 13:
            return dy, y, int(_attr(node, "axis", -1)), False
        axis = int(_attr(node, "axis", 1))
        flat_dy = self.op("Flatten", [dy], "sm_dy2", axis=axis)
        return flat_dy, self.op("Flatten", [y], "sm_y2", axis=axis), 1, True

    def _bw_Softmax(self, node, dy):
        # dx = y (dy - sum(dy y)) along the axis.
        dy, y, axis, coerced = self._softmax_2d(node, dy)
        inner = self.reduce_sum(self.op("Mul", [dy, y]), [axis], keepdims=1)
        dx = self.op("Mul", [y, self.op("Sub", [dy, inner])], "softmax_bw")
        if coerced:
            dx = self.op("Reshape", [dx, self.shape(node.input[0])], "softmax_bw_nd")
        self.add_grad(node.input[0], dx)

    def _bw_LogSoftmax(self, node, dy):
        # dx = dy - softmax(x) sum(dy) along the axis.
        dy, y, axis, coerced = self._softmax_2d(node, dy)
        total = self.reduce_sum(dy, [axis], keepdims=1)
        dx = self.op("Sub", [dy, self.op("Mul", [self.op("Exp", [y]), total])], "logsoftmax_bw")
        if coerced:
            dx = self.op("Reshape", [dx, self.shape(node.input[0])], "logsoftmax_bw_nd")
        self.add_grad(node.input[0], dx)

    def reduce_mean(self, tensor: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op(
                "ReduceMean", [tensor, self.const(axes, "axes", np.int64)], "rmean", keepdims=1
            )
        return self.op("ReduceMean", [tensor], "rmean", axes=axes, keepdims=1)

    def _bw_LayerNormalization(self, node, dy):
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 else ""
        rank = len(self.static_shape(x) or ())
        if not rank:
            raise UnsupportedHead("LayerNormalization of unknown rank")
        axis = int(_attr(node, "axis", -1)) % rank
        dx = self._normalization_back(
            x,
            scale,
            bias,
            node.output[0],
            dy,
            d_mean=self._output_grad(node, 1),
            d_r=self._output_grad(node, 2),
            axes=list(range(axis, rank)),
            eps=float(_attr(node, "epsilon", 1e-5)),
            centre=True,
        )
        if dx is not None:
            self.add_grad(x, dx)

    def _output_grad(self, node: onnx.NodeProto, k: int) -> str | None:
        """The gradient of the node's output k; None when it has none or is absent."""
        return self.grad(node.output[k]) if len(node.output) > k and node.output[k] else None

    def _normalization_back(
        self,
        x: str,
        scale: str,
        bias: str,
        y: str,
        dy: str | None,
        *,
        d_mean: str | None,
        d_r: str | None,
        axes: list[int],
        eps: float,
        centre: bool,
    ) -> str | None:
        """The gradient of ``x`` of ``y`` = xhat scale + bias over ``axes`` (n elements),
        given the gradients of y and of the statistics outputs mean and r; the gradients
        of a computed scale or bias are added here.

        centre (LayerNormalization): xhat = (x - mean) r, r = 1 / sqrt(var + eps), and
        dx = (g - mean(g) - xhat mean(g xhat)) r, g = dy scale; the outputs mean and r add
        dmean / n - dr r^3 (x - mean) / n.  Not centre (RMSNorm, the Simplified forms):
        xhat = x r, r = 1 / sqrt(mean(x^2) + eps), the same without mean(g) and dmean.
        """
        centred = self.op("Sub", [x, self.reduce_mean(x, axes)], "ln_centred") if centre else x
        var = self.reduce_mean(self.op("Mul", [centred, centred]), axes)
        inv_std = self.op(
            "Reciprocal", [self.op("Sqrt", [self.op("Add", [var, self.const(eps)])])], "ln_inv_std"
        )
        xhat = self.op("Mul", [centred, inv_std], "ln_xhat")
        parts = []
        if dy is not None:
            g = self.op("Mul", [dy, scale], "ln_g")
            inner = self.op("Mul", [xhat, self.reduce_mean(self.op("Mul", [g, xhat]), axes)])
            if centre:
                inner = self.op("Add", [self.reduce_mean(g, axes), inner])
            parts.append(self.op("Mul", [self.op("Sub", [g, inner]), inv_std], "ln_bw"))
            if scale in self.active:
                self.add_grad(scale, self.unbroadcast(self.op("Mul", [dy, xhat]), scale, y))
            if bias and bias in self.active:
                self.add_grad(bias, self.unbroadcast(dy, bias, y))
        if d_mean is not None or d_r is not None:
            terms = []
            if d_mean is not None:
                terms.append(self.op("Expand", [d_mean, self.shape(x)], "ln_dmean"))
            if d_r is not None:
                r3 = self.op("Mul", [inv_std, self.op("Mul", [inv_std, inv_std])])
                terms.append(self.op("Neg", [self.op("Mul", [self.op("Mul", [d_r, r3]), centred])]))
            total = terms[0] if len(terms) == 1 else self.op("Add", terms)
            parts.append(self.op("Mul", [total, self._inverse_count(var, x)], "ln_stats_bw"))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else self.op("Add", parts)

    def _inverse_count(self, reduced: str, x: str) -> str:
        """1 / n, n = the number of elements of x per element of ``reduced``."""
        return self.op(
            "Div",
            [
                self.op("Cast", [self.op("Size", [reduced])], to=onnx.TensorProto.FLOAT),
                self.op("Cast", [self.op("Size", [x])], to=onnx.TensorProto.FLOAT),
            ],
            "inv_count",
        )

    # -- rules: onnxruntime's contrib ops (com.microsoft) -------------------------------

    def _skip_norm_back(self, node, dy, centre: bool) -> None:
        # s = input + skip (+ bias), normalized over the last axis: the normalization's
        # rule on s, plus the gradient of the sum output (input_skip_bias_sum: the
        # residual stream the next block adds to), to input, skip (broadcast over the
        # batch) and bias.  SkipSimplifiedLayerNormalization's inputs have no beta (its
        # bias is input 3) and its mean output is 0.
        x, skip, scale = node.input[:3]
        extra = list(node.input[3:])
        beta, bias = (extra + ["", ""])[:2] if centre else ("", (extra + [""])[0])
        if len(node.output) > 3 and node.output[3]:
            s = node.output[3]
        else:
            s = self.op("Add", [x, skip], "skip_sum")
            if bias:
                s = self.op("Add", [s, bias], "skip_sum")
        parts = []
        dn = self._normalization_back(
            s,
            scale,
            beta,
            node.output[0],
            dy,
            d_mean=self._output_grad(node, 1) if centre else None,
            d_r=self._output_grad(node, 2),
            axes=[-1],
            eps=float(_attr(node, "epsilon", 1e-12)),
            centre=centre,
        )
        if dn is not None:
            parts.append(dn)
        d_sum = self._output_grad(node, 3)
        if d_sum is not None:
            parts.append(d_sum)
        if not parts:
            return
        ds = parts[0] if len(parts) == 1 else self.op("Add", parts, "skip_bw")
        for t in (x, skip, bias):
            if t and t in self.active:
                self.add_grad(t, self.unbroadcast(ds, t, x))

    def _bw_ms_SkipLayerNormalization(self, node, dy):
        self._skip_norm_back(node, dy, centre=True)

    def _bw_ms_SkipSimplifiedLayerNormalization(self, node, dy):
        self._skip_norm_back(node, dy, centre=False)

    def _biased_gelu_back(self, node, dy, tanh: bool) -> None:
        # y = gelu(x (+ bias)), erf or tanh form.
        x = node.input[0]
        bias = node.input[1] if len(node.input) > 1 else ""
        z = self.op("Add", [x, bias], "gelu_in") if bias else x
        dz = self.op("Mul", [dy, self._gelu_slope(z, tanh=tanh)], "gelu_bw")
        for t in (x, bias):
            if t and t in self.active:
                self.add_grad(t, self.unbroadcast(dz, t, node.output[0]))

    def _bw_ms_Gelu(self, node, dy):
        self._biased_gelu_back(node, dy, tanh=False)

    def _bw_ms_BiasGelu(self, node, dy):
        self._biased_gelu_back(node, dy, tanh=False)

    def _bw_ms_FastGelu(self, node, dy):
        # 0.5 x (1 + tanh(0.797885 x + 0.035677 x^3)): Gelu's tanh form.
        self._biased_gelu_back(node, dy, tanh=True)

    def _bw_ms_QuickGelu(self, node, dy):
        # y = x sigmoid(a x): dy/dx = s + a x s (1 - s), s = sigmoid(a x).
        x = node.input[0]
        ax = self.op("Mul", [x, self.const(float(_attr(node, "alpha", 1.702)))], "quick_ax")
        sig = self.op("Sigmoid", [ax], "quick_sig")
        ds = self.op("Mul", [sig, self.op("Sub", [self.const(1.0), sig])])
        slope = self.op("Add", [sig, self.op("Mul", [ax, ds])], "quick_slope")
        self.add_grad(x, self.op("Mul", [dy, slope], "quick_bw"))

    #: Y = X + bias + skip.
    _bw_ms_BiasAdd = _bw_Add

    def _bw_Gather(self, node, dy):
        # y = x[..., idx, ...] along axis: scatter-add dy back into zeros shaped like x.
        x, idx = node.input
        if idx in self.active:
            raise UnsupportedHead("Gather with computed indices from the feature map")
        xs, ids = self.static_shape(x), self.static_shape(idx)
        if xs is None or ids is None:
            raise UnsupportedHead("Gather of unknown rank")
        rank, q = len(xs), len(ids)
        axis = int(_attr(node, "axis", 0)) % rank
        # Repeated indices need ScatterND's reduction (opset 16); a scalar index (the
        # class token, x[:, 0]) or constant distinct ones do without.
        reduction = {"reduction": "add"} if self.opset >= 16 else {}
        if not reduction and not self._distinct(idx, xs[axis]):
            raise UnsupportedHead(
                "Gather of repeated or computed indices with opset < 16 (no ScatterND reduction)"
            )
        to_front = [axis] + [i for i in range(rank) if i != axis]
        # dy dims: x's before axis, idx's, x's after axis -> idx's first.
        dy_perm = (
            list(range(axis, axis + q)) + list(range(axis)) + list(range(axis + q, rank - 1 + q))
        )
        xt = self.op("Transpose", [x], "gather_xT", perm=to_front)
        dyt = self.op("Transpose", [dy], "gather_dyT", perm=dy_perm)
        index = self.op("Cast", [idx], "gather_idx", to=onnx.TensorProto.INT64)
        size = self.op("Gather", [self.shape(x), self.const(axis, "ax", np.int64)], "gather_dim")
        index = self._where(
            self.op("Less", [index, self.const(0, "zero", np.int64)]),
            self.op("Add", [index, size]),
            index,
        )
        index = self.unsqueeze(index, [-1], "gather_i")
        zeros = self.op("ConstantOfShape", [self.shape(xt)], "gather_zeros")
        scattered = self.op("ScatterND", [zeros, index, dyt], "gather_bw", **reduction)
        self.add_grad(
            x,
            self.op(
                "Transpose", [scattered], "gather_back", perm=[int(i) for i in np.argsort(to_front)]
            ),
        )

    def _distinct(self, idx: str, size: int | None) -> bool:
        """Whether the indices ``idx`` into a dim of ``size`` are known to be distinct."""
        if self.static_shape(idx) == ():
            return True
        value = self.constant_value(idx)
        if value is None:
            return False
        value = value.astype(np.int64).reshape(-1)
        if size is not None:
            value = np.where(value < 0, value + size, value)
        elif (value < 0).any() and (value >= 0).any():
            return False
        return len(np.unique(value)) == len(value)


#: The standard-domain ops with a gradient rule: the ``_bw_<op>`` methods of
#: :class:`_Builder`.
GRADIENT_OPS = frozenset(
    name[len("_bw_") :]
    for name in vars(_Builder)
    if name.startswith("_bw_") and not name.startswith(_CONTRIB_PREFIX)
)

#: The com.microsoft ops with a gradient rule: the ``_bw_ms_<op>`` methods.
CONTRIB_GRADIENT_OPS = frozenset(
    name[len(_CONTRIB_PREFIX) :] for name in vars(_Builder) if name.startswith(_CONTRIB_PREFIX)
)


def build_head_gradient(head: onnx.ModelProto) -> HeadGradient:
    """The gradient model of ``head`` (see the module docstring).

    Raises
    ------
    UnsupportedHead
        When an op of the head has no backward rule; the message names it.
    """
    if head.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedHead("feature map not float32")
    try:
        head = qdq_form(head)
    except UnsupportedQuantizedOp as exc:
        raise UnsupportedHead(str(exc)) from None
    return _Builder(head).build()

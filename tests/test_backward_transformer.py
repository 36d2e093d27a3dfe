"""Exact head gradients of vision-transformer ops and blocks against float64 central
differences.

The reference never uses onnx_sp2ps.backward: it runs a float64 copy of the head itself
(onnxruntime where it has float64 kernels for every op, else onnx's reference evaluator,
a numpy implementation) on the feature map moved by +-eps at every position.  The heads
are written as torch.onnx (TorchScript and dynamo) and tf2onnx write them.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops._op import OpRunUnaryNum

from onnx_sp2ps.backward import UnsupportedHead, build_head_gradient

FLOAT, DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
K = 3  # classes
BIG = np.iinfo(np.int64).max


def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def i64(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def node(op, inputs, outputs="m", **attrs):
    outputs = [outputs] if isinstance(outputs, str) else outputs
    return helper.make_node(op, inputs, outputs, **attrs)


def make_head(nodes, inits, shape, out="m", opset=13, seed=0):
    """feature ``A`` of ``shape`` (a str: a symbolic dim) -> nodes -> ``out`` ->
    Flatten -> MatMul (random weights) -> logits (N, K)."""
    rng = np.random.default_rng(seed)
    a = helper.make_tensor_value_info("A", FLOAT, list(shape))
    body = helper.make_graph(
        list(nodes), "body", [a], [helper.make_tensor_value_info(out, FLOAT, None)], list(inits)
    )
    body_model = helper.make_model(
        body, opset_imports=[helper.make_opsetid("", opset)], ir_version=9
    )
    sample = np.zeros([1 if isinstance(d, str) else d for d in shape], np.float32)
    fan_in = int(np.prod(ReferenceEvaluator(body_model).run(None, {"A": sample})[0].shape[1:]))
    nodes = list(nodes) + [
        node("Flatten", [out], "flat", axis=1),
        node("MatMul", ["flat", "head_w"], "logits"),
    ]
    inits = list(inits) + [f32("head_w", rng.normal(size=(fan_in, K)) / np.sqrt(fan_in))]
    y = helper.make_tensor_value_info("logits", FLOAT, [shape[0], K])
    graph = helper.make_graph(nodes, "head", [a], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same head computing in float64: weights, constants, casts and types."""
    m = copy.deepcopy(model)

    def to64(t):
        if t.data_type == FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    for t in m.graph.initializer:
        to64(t)
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "value" and a.HasField("t"):
                to64(a.t)
            if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                a.i = DOUBLE
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if vi.type.tensor_type.elem_type == FLOAT:
            vi.type.tensor_type.elem_type = DOUBLE
    return m


class Erf(OpRunUnaryNum):
    """onnx's reference Erf computes in float32 (np.vectorize(math.erf, otypes="f")):
    this one keeps float64."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


class Gelu(OpRun):
    """onnx's reference Gelu runs its function body, with the float32 Erf."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1 + np.tanh(u))).astype(x.dtype),)
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return ((0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(x.dtype),)


def float64_runner(model: onnx.ModelProto, new_ops=()):
    """Runs the float64 copy of ``model``; with ``new_ops`` (numpy implementations of ops
    of other domains, e.g. com.microsoft), onnx's reference evaluator with them."""
    m = float64_copy(model)
    if new_ops:
        evaluator = ReferenceEvaluator(m, new_ops=[Erf, Gelu, *new_ops])
        return lambda a: evaluator.run(None, {"A": a})[0]
    try:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda a: session.run(None, {"A": a})[0]
    except Exception:  # no float64 kernel for some op (Erf, Gelu): onnx's numpy one
        evaluator = ReferenceEvaluator(m, new_ops=[Erf, Gelu])
        return lambda a: evaluator.run(None, {"A": a})[0]


def reference_gradient(model, a, targets, eps=1e-5, batched=True, new_ops=()):
    """d logits[i, targets[i]] / d A[i] by float64 central differences."""
    run = float64_runner(model, new_ops)
    a = a.astype(np.float64)
    out = np.zeros_like(a)
    for i, t in enumerate(targets):
        flat = a[i].reshape(-1)
        rows = np.repeat(flat[None], 2 * flat.size, axis=0)
        idx = np.arange(flat.size)
        rows[idx, idx] += eps
        rows[flat.size + idx, idx] -= eps
        rows = rows.reshape((-1,) + a.shape[1:])
        if batched:
            y = run(rows)
        else:
            y = np.concatenate([run(r[None]) for r in rows])
        y = y.reshape(len(rows), -1)[:, t]
        out[i] = ((y[: flat.size] - y[flat.size :]) / (2 * eps)).reshape(a.shape[1:])
    return out


def check(model, a, targets=(0, 2, -1), batched=True, rtol=1e-4, new_ops=(), edit=None):
    """The exact gradient of every image equals the float64 finite differences (``edit``:
    a change to the gradient model before it runs)."""
    grad = build_head_gradient(model)
    if edit is not None:
        edit(grad.model)
    session = ort.InferenceSession(
        grad.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    targets = np.asarray(targets[: len(a)], np.int64)
    y, g, used = session.run(
        [grad.logits, grad.gradient, grad.target_used],
        {grad.feature: a.astype(np.float32), grad.target: targets},
    )
    np.testing.assert_array_equal(used[targets >= 0], targets[targets >= 0])
    np.testing.assert_array_equal(used[targets < 0], np.argmax(y, axis=1)[targets < 0])
    ref = reference_gradient(model, a, used, batched=batched, new_ops=new_ops)
    assert g.shape == a.shape
    for i in range(len(a)):
        scale = np.abs(ref[i]).max()
        assert scale > 0
        error = np.abs(g[i] - ref[i]).max() / scale
        assert error <= rtol, f"image {i}: relative error {error:.2e}"
    return g


def separated(shape, seed=1, low=-2.0, high=2.0):
    """Random values >= 0.01 apart and away from 0 (no kinks of Relu, Max, Where within
    the finite-difference step)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    values = rng.permutation(np.linspace(low, high, n)) + 0.0123
    values[np.abs(values) < 0.005] += 0.01
    return values.reshape(shape).astype(np.float32)


# -- one rule at a time ----------------------------------------------------------------

RNG = np.random.default_rng(7)


def weights(name, *shape):
    return f32(name, RNG.normal(size=shape))


#: name: (nodes, initializers, feature shape, opset)
CASES = {
    "conv_3x3_depthwise_strided_dilated": (
        [
            node("Conv", ["A", "w1"], "c1", pads=[1, 1, 1, 1]),  # 3x3, same size
            node("Tanh", ["c1"], "t1"),
            node("Conv", ["t1", "w2"], "c2", pads=[1, 1, 1, 1], group=4),  # depthwise
            node("Conv", ["c2", "w3"], "c3", pads=[0, 1, 1, 0], strides=[2, 2]),  # strided
            node("Conv", ["c3", "w4"], dilations=[2, 2], pads=[2, 2, 2, 2]),  # dilated
        ],
        [weights("w1", 4, 3, 3, 3), weights("w2", 4, 1, 3, 3), weights("w3", 5, 4, 3, 2)]
        + [weights("w4", 2, 5, 3, 3)],
        ["N", 3, 7, 6],
        13,
    ),
    "pad_constant": (
        [
            node("Tanh", ["A"], "t"),
            node("Pad", ["t", "pads", "half"], "p"),  # H grows by 1 + 2, W by 3 on the right
            node("Pad", ["p", "pads2", "", "axes"], mode="constant"),  # axes input (18)
        ],
        [
            i64("pads", [0, 0, 1, 0, 0, 0, 2, 3]),
            f32("half", np.array(0.5, np.float32)),
            i64("pads2", [1, 1]),
            i64("axes", [1]),
        ],
        ["N", 2, 3, 4],
        18,
    ),
    "matmul_both_computed": (
        [
            node("Tanh", ["A"], "t"),
            node("Transpose", ["t"], "tT", perm=[0, 1, 3, 2]),
            node("MatMul", ["A", "tT"]),
        ],
        [],
        ["N", 2, 3, 4],
        13,
    ),
    "matmul_batch_broadcast": (
        [
            node("ReduceMean", ["A"], "p", axes=[1], keepdims=1),  # (N, 1, 3, 4)
            node("Transpose", ["p"], "pT", perm=[0, 1, 3, 2]),
            node("MatMul", ["A", "pT"], "ab"),  # (N, 2, 3, 3)
            node("MatMul", ["pT", "A"]),  # (N, 2, 4, 4)
        ],
        [],
        ["N", 2, 3, 4],
        13,
    ),
    "matmul_nd_weights": (
        [
            node("MatMul", ["A", "w2"], "a2"),  # (N, 1, 3, 4) @ (4, 5)
            node("MatMul", ["a2", "w3"], "a3"),  # (N, 1, 3, 5) @ (2, 5, 2) -> (N, 2, 3, 2)
            node("MatMul", ["w4", "a3"]),  # (3, 3) @ (N, 2, 3, 2)
        ],
        [weights("w2", 4, 5), weights("w3", 2, 5, 2), weights("w4", 3, 3)],
        ["N", 1, 3, 4],
        11,
    ),
    "matmul_rank1": (
        [
            node("MatMul", ["A", "v"], "av"),  # (N, 3, 4) @ (4,) -> (N, 3)
            node("MatMul", ["u", "A"], "ua"),  # (3,) @ (N, 3, 4) -> (N, 4)
            node("Concat", ["av", "ua"], axis=1),
        ],
        [weights("v", 4), weights("u", 3)],
        ["N", 3, 4],
        13,
    ),
    "split_attribute_opset11_part_unused": (
        [
            node("Split", ["A"], ["s0", "s1"], axis=1, split=[2, 4]),
            node("Tanh", ["s1"]),
        ],
        [],
        ["N", 6, 4],
        11,
    ),
    "split_input_opset13": (
        [
            node("Split", ["A", "sizes"], ["s0", "s1", "s2"], axis=1),
            node("Mul", ["s0", "s0"], "sq"),
            node("Concat", ["sq", "s2"], axis=1),
        ],
        [i64("sizes", [1, 2, 3])],
        ["N", 6, 4],
        13,
    ),
    "split_num_outputs_opset18_first_unused": (
        [
            node("Split", ["A"], ["s0", "s1", "s2"], axis=-1, num_outputs=3),
            node("Mul", ["s1", "s2"]),
        ],
        [],
        ["N", 3, 6],
        18,
    ),
    "slice_tokens_and_negative_steps": (
        [
            node("Slice", ["A", "st", "en", "ax"], "tokens"),  # A[:, 1:]
            node("Slice", ["tokens", "st2", "en2", "ax2", "sp2"]),  # [:, ::-2, -1:-6:-2]
        ],
        [
            i64("st", [1]),
            i64("en", [BIG]),
            i64("ax", [1]),
            i64("st2", [-1, -1]),
            i64("en2", [-BIG, -6]),
            i64("ax2", [1, -1]),
            i64("sp2", [-2, -2]),
        ],
        ["N", 5, 6],
        13,
    ),
    "slice_computed_from_shape_opset11": (
        [
            node("Shape", ["A"], "shp"),
            node("Gather", ["shp", "one"], "t"),
            node("Sub", ["t", "one"], "t1"),
            node("Unsqueeze", ["t1"], "end", axes=[0]),
            node("Slice", ["A", "zero", "end", "ax"]),  # A[:, : T - 1]
        ],
        [i64("one", 1), i64("zero", [0]), i64("ax", [1])],
        ["N", 5, 3],
        11,
    ),
    "expand_and_tile": (
        [
            node("Shape", ["A"], "shp"),
            node("Slice", ["shp", "zero", "one"], "n"),
            node("Concat", ["n", "rest"], "target", axis=0),
            node("Expand", ["A", "target"], "e"),  # (N, 1, 4) -> (N, 3, 4)
            node("Mul", ["e", "w"], "ew"),
            node("Tile", ["ew", "reps"]),  # (N, 6, 8)
            node("Expand", ["A", "lead"], "e2"),  # (N, 1, 4) -> (2, N, 1, 4) is not a
        ],  # broadcast of the batch; lead (1, 1, 1, 4) only adds a dim
        [
            i64("zero", [0]),
            i64("one", [1]),
            i64("rest", [3, 4]),
            weights("w", 3, 4),
            i64("reps", [1, 2, 2]),
            i64("lead", [1, 1, 4]),
        ],
        ["N", 1, 4],
        13,
    ),
    "reshapes_with_computed_shapes": (
        [
            node("Unsqueeze", ["A", "ax1"], "u"),  # (N, 1, 3, 4)
            node("Shape", ["A"], "shp"),
            node("Slice", ["shp", "zero", "one"], "n"),
            node("Concat", ["n", "minus1"], "flat_shape", axis=0),
            node("Reshape", ["u", "flat_shape"], "r"),  # (N, 12)
            node("Tanh", ["r"], "rt"),
            node("Reshape", ["rt", "shp"], "back"),
            node("Unsqueeze", ["back", "ax1"], "u2"),
            node("Squeeze", ["u2", "ax1"], "s"),
            node("Flatten", ["s"], "f", axis=1),
            node("Mul", ["f", "r"]),
        ],
        [i64("ax1", [1]), i64("zero", [0]), i64("one", [1]), i64("minus1", [-1])],
        ["N", 3, 4],
        13,
    ),
    "concat_symbolic_sizes_with_class_token": (
        [
            node("Shape", ["A"], "shp"),
            node("Slice", ["shp", "zero", "one"], "n"),
            node("Concat", ["n", "one", "one"], "cls_shape", axis=0),
            node("Expand", ["cls", "cls_shape"], "cls_n"),
            node("Tanh", ["A"], "t"),
            node("Concat", ["cls_n", "A", "t"], "c", axis=-2),  # (N, 1 + 2T, 4)
            node("ReduceSum", ["c"], axes=[1], keepdims=0),
        ],
        [i64("zero", [0]), i64("one", [1]), weights("cls", 1, 1, 4)],
        ["N", "T", 4],
        11,
    ),
    "constant_nodes_constant_of_shape_and_range": (
        [
            helper.make_node("Constant", [], ["two"], value=f32("v", 2.0)),
            helper.make_node("Constant", [], ["ax"], value_ints=[1]),
            node("Shape", ["A"], "shp"),
            node("ConstantOfShape", ["shp"], "twos", value=f32("v2", [2.0])),
            node("Gather", ["shp", "last"], "width"),
            node("Range", ["zero", "width", "step"], "pos"),  # 0, 1, 2, 3
            node("Cast", ["pos"], "posf", to=FLOAT),
            node("Mul", ["A", "posf"], "ap"),
            node("Mul", ["ap", "twos"], "at"),
            node("Pow", ["at", "two"], "sq"),
            node("Slice", ["sq", "zero1", "two_i", "ax"]),
        ],
        [i64("last", 2), i64("zero", 0), i64("step", 1), i64("zero1", [0]), i64("two_i", [2])],
        ["N", 3, 4],
        13,
    ),
    "where_constant_and_computed_condition": (
        [
            node("Tanh", ["A"], "t"),
            node("Where", ["mask", "A", "t"], "w1"),
            node("Greater", ["A", "zero"], "pos"),
            node("Mul", ["A", "tenth"], "small"),
            node("Where", ["pos", "w1", "small"]),
        ],
        [
            numpy_helper.from_array(np.array([[True, False, True, False]]), "mask"),
            f32("zero", 0.0),
            f32("tenth", 0.1),
        ],
        ["N", 3, 4],
        13,
    ),
    "reciprocal_neg_max_min_sum": (
        [
            node("Mul", ["A", "A"], "sq"),
            node("Add", ["sq", "one"], "sq1"),
            node("Reciprocal", ["sq1"], "r"),
            node("Relu", ["A"], "ab"),
            node("Neg", ["A"], "ng"),
            node("Tanh", ["A"], "t"),
            node("Max", ["A", "t"], "mx"),  # ties only at 0
            node("Min", ["ng", "third"], "mn"),
            node("Sum", ["r", "ab", "mx", "mn", "one"]),
        ],
        [f32("one", 1.0), f32("third", 0.3)],
        ["N", 3, 4],
        13,
    ),
    "binary_ops_of_computed_broadcast_tensors": (
        [
            node("ReduceSum", ["A"], "colsum", axes=[1], keepdims=1),  # (N, 1, 4)
            node("Mul", ["A", "colsum"], "m1"),
            node("Mul", ["A", "A"], "sq"),
            node("ReduceSum", ["sq"], "rowsq", axes=[-1], keepdims=1),  # (N, 3, 1)
            node("Add", ["rowsq", "one"], "den"),
            node("Div", ["m1", "den"], "d"),
            node("Sub", ["colsum", "d"], "s"),
            node("Add", ["s", "rowsq"]),
        ],
        [f32("one", 1.0)],
        ["N", 3, 4],
        12,
    ),
    "reduce_axes_as_input_opset18": (
        [
            node("ReduceMean", ["A", "ax1"], "mu", keepdims=0),  # (N, 4)
            node("ReduceSum", ["A", "axl"], "s", keepdims=1),  # (N, 3, 1)
            node("Mul", ["A", "s"], "as"),
            node("ReduceMean", ["as", "axl"], "mu2", keepdims=0),  # (N, 3)
            node("Concat", ["mu", "mu2"], axis=1),
        ],
        [i64("ax1", [1]), i64("axl", [-1])],
        ["N", 3, 4],
        18,
    ),
    "softmax_opset11_coerced_2d": (
        [
            node("Softmax", ["A"], "sm", axis=1),  # over the 3 x 4 of each image
            node("LogSoftmax", ["A"], "lsm", axis=2),
            node("Add", ["sm", "lsm"]),
        ],
        [],
        ["N", 3, 4],
        11,
    ),
    "softmax_opset13_middle_axis": (
        [node("Softmax", ["A"], "sm", axis=1), node("LogSoftmax", ["sm"], axis=1)],
        [],
        ["N", 3, 4],
        13,
    ),
    "layernorm_axis1_and_statistics_outputs": (
        [
            node("LayerNormalization", ["A", "s"], "ln1", axis=1, epsilon=1e-5),
            node("LayerNormalization", ["A", "s4", "b4"], ["ln2", "mu", "rstd"], epsilon=1e-3),
            node("Mul", ["mu", "two"], "mu2"),
            node("Mul", ["rstd", "half"], "rstd2"),
            node("Add", ["ln2", "mu2"], "a1"),
            node("Add", ["a1", "rstd2"], "a2"),
            node("Add", ["a2", "ln1"]),
        ],
        [
            weights("s", 3, 4),
            weights("s4", 4),
            weights("b4", 4),
            f32("two", 2.0),
            f32("half", 0.5),
        ],
        ["N", 3, 4],
        17,
    ),
    "layernorm_only_statistics_used": (
        [
            node("LayerNormalization", ["A", "s4"], ["ln", "mu", "rstd"], epsilon=1e-3),
            node("Mul", ["mu", "rstd"]),
        ],
        [weights("s4", 4)],
        ["N", 3, 4],
        17,
    ),
    "gather_class_token_and_rows_opset13": (
        [
            node("Gather", ["A", "zero"], "cls", axis=1),  # x[:, 0]
            node("Gather", ["A", "rows"], "r", axis=1),  # distinct: no reduction needed
            node("ReduceSum", ["r", "one"], "rs", keepdims=0),
            node("Mul", ["cls", "rs"]),
        ],
        [i64("zero", 0), i64("rows", [3, 1, -1]), i64("one", [1])],
        ["N", 5, 4],
        13,
    ),
    "gather_repeated_indices_opset16": (
        [node("Gather", ["A", "rows"], axis=1)],
        [i64("rows", [3, 1, -2, 1])],
        ["N", 5, 4],
        16,
    ),
    "identity_cast_gelu_tanh": (
        [
            node("Identity", ["A"], "i"),
            node("Cast", ["i"], "c", to=FLOAT),
            node("Gelu", ["c"], approximate="tanh"),
        ],
        [],
        ["N", 3, 4],
        20,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_equals_float64_finite_differences(name):
    nodes, inits, shape, opset = CASES[name]
    head = make_head(nodes, inits, shape, opset=opset)
    a = separated([3] + [2 if isinstance(d, str) else d for d in shape[1:]])
    check(head, a)


def test_gemm_with_computed_operands_and_bias():
    # (1, 6) maps: Gemm's operands and bias all computed from the one image.
    for trans_a, trans_b in [(0, 1), (1, 0), (1, 1), (0, 0)]:
        sa = [3, 2] if trans_a else [2, 3]
        sb = [2, 3] if trans_b else [3, 2]
        nodes = [
            node("Reshape", ["A", "sa"], "x"),
            node("Tanh", ["A"], "t"),
            node("Reshape", ["t", "sb"], "y"),
            node("Slice", ["A", "zero", "two", "one"], "c0"),
            node("Sigmoid", ["c0"], "c"),
            node("Gemm", ["x", "y", "c"], "g", alpha=0.7, beta=1.3, transA=trans_a, transB=trans_b),
            node("Reshape", ["g", "row"]),
        ]
        inits = [i64("sa", sa), i64("sb", sb), i64("zero", [0]), i64("two", [2]), i64("one", [1])]
        inits.append(i64("row", [1, -1]))
        head = make_head(nodes, inits, [1, 6], opset=13)
        check(head, separated((1, 6)), batched=False)


def test_gather_of_repeated_indices_needs_opset_16():
    nodes, inits, shape, _ = CASES["gather_repeated_indices_opset16"]
    with pytest.raises(UnsupportedHead, match="opset < 16"):
        build_head_gradient(make_head(nodes, inits, shape, opset=13))


def test_slice_with_computed_axes_is_refused():
    nodes = [
        node("Shape", ["A"], "shp"),
        node("Slice", ["shp", "one", "two"], "ax"),
        node("Sub", ["ax", "one"], "ax0"),
        node("Slice", ["A", "one", "two", "ax0"]),
    ]
    inits = [i64("one", [1]), i64("two", [2])]
    head = make_head(nodes, inits, ["N", 3, 4], opset=13)
    with pytest.raises(UnsupportedHead, match="computed axes"):
        build_head_gradient(head)


# -- whole transformer blocks ----------------------------------------------------------

T, D, HEADS, HIDDEN = 5, 8, 2, 16  # tokens (class token + 4 patches), width, heads, MLP


def transformer_block(opset: int, *, layernorm: str, split: str, gelu: str, pool: str):
    """Pre-norm ViT block on the tokens A (N, T, D) and a classifier on them, as timm's
    VisionTransformer exports.

    layernorm: "decomposed" (TorchScript, opset < 17) or "op" (LayerNormalization);
    split: "input" (qkv (3, N, H, T, d) split on axis 0 by sizes, then squeezed) or
    "num_outputs" (qkv split on its last axis, heads made with shapes read at run time,
    as the dynamo exporter writes); gelu: "erf" (decomposed), "op" or "tanh" (Gelu);
    pool: "token" (x[:, 0]) or "mean" (x[:, 1:].mean(1), axes as input from opset 18).
    """
    rng = np.random.default_rng(3)
    hd = D // HEADS
    nodes, inits = [], []

    def w(name, *shape, scale=None):
        scale = 1 / np.sqrt(shape[0]) if scale is None else scale
        inits.append(f32(name, rng.normal(size=shape) * scale))
        return name

    def add(op, inputs, out, **attrs):
        nodes.append(node(op, inputs, out, **attrs))
        return out

    def reduce_mean(x, out, axes):
        if opset >= 18:
            inits.append(i64(out + "_axes", axes))
            return add("ReduceMean", [x, out + "_axes"], out, keepdims=1)
        return add("ReduceMean", [x], out, axes=axes, keepdims=1)

    def layer_norm(x, p):
        s = w(p + "_s", D, scale=0.3)
        inits[-1] = f32(p + "_s", 1.0 + rng.normal(size=D) * 0.3)
        b = w(p + "_b", D, scale=0.1)
        if layernorm == "op":
            return add("LayerNormalization", [x, s, b], p, axis=-1, epsilon=1e-6)
        inits.extend([f32(p + "_two", 2.0), f32(p + "_eps", 1e-6)])
        mu = reduce_mean(x, p + "_mu", [-1])
        d = add("Sub", [x, mu], p + "_d")
        d2 = add("Pow", [d, p + "_two"], p + "_d2")
        var = reduce_mean(d2, p + "_var", [-1])
        sd = add("Sqrt", [add("Add", [var, p + "_eps"], p + "_ve")], p + "_sd")
        xh = add("Div", [d, sd], p + "_xh")
        return add("Add", [add("Mul", [xh, s], p + "_xs"), b], p)

    def linear(x, p, fan_in, fan_out):
        y = add("MatMul", [x, w(p + "_w", fan_in, fan_out)], p + "_mm")
        return add("Add", [y, w(p + "_b", fan_out, scale=0.1)], p)

    def gelu_of(x):
        if gelu == "erf":
            inits.extend([f32("r2", np.sqrt(2.0)), f32("one", 1.0), f32("half", 0.5)])
            e = add("Erf", [add("Div", [x, "r2"], "g_d")], "g_e")
            g = add("Mul", [x, add("Add", [e, "one"], "g_e1")], "g_x")
            return add("Mul", [g, "half"], "gelu")
        attrs = {"approximate": "tanh"} if gelu == "tanh" else {}
        return add("Gelu", [x], "gelu", **attrs)

    # attention
    h1 = layer_norm("A", "ln1")
    qkv = linear(h1, "qkv", D, 3 * D)  # (N, T, 3D)
    if split == "input":
        inits.extend([i64("qkv_shape", [0, 0, 3, HEADS, hd]), i64("ones3", [1, 1, 1])])
        r = add("Reshape", [qkv, "qkv_shape"], "qkv_r")
        p = add("Transpose", [r], "qkv_p", perm=[2, 0, 3, 1, 4])  # (3, N, H, T, d)
        if opset >= 13:
            add("Split", [p, "ones3"], ["q5", "k5", "v5"], axis=0)
        else:
            add("Split", [p], ["q5", "k5", "v5"], axis=0, split=[1, 1, 1])
        if opset >= 13:
            inits.append(i64("ax0", [0]))
            q, k, v = (add("Squeeze", [t + "5", "ax0"], t) for t in "qkv")
        else:
            q, k, v = (add("Squeeze", [t + "5"], t, axes=[0]) for t in "qkv")
    else:
        kw = {"num_outputs": 3} if opset >= 18 else {}
        add("Split", [qkv], ["q3", "k3", "v3"], axis=-1, **kw)
        inits.extend([i64("s0", [0]), i64("s2", [2]), i64("heads", [HEADS, hd])])
        shp = add("Shape", ["A"], "a_shape")
        nt = add("Slice", [shp, "s0", "s2"], "nt")
        hshape = add("Concat", [nt, "heads"], "h_shape", axis=0)
        q, k, v = (
            add("Transpose", [add("Reshape", [t + "3", hshape], t + "4")], t, perm=[0, 2, 1, 3])
            for t in "qkv"
        )
    kt = add("Transpose", [k], "kT", perm=[0, 1, 3, 2])
    inits.append(f32("scale", hd**-0.5))
    att = add("Mul", [add("MatMul", [q, kt], "qk"), "scale"], "att")
    att = add("Softmax", [att], "att_sm", axis=-1)
    o = add("Transpose", [add("MatMul", [att, v], "av")], "o_t", perm=[0, 2, 1, 3])
    if split == "input":
        inits.append(i64("tok_shape", [0, 0, D]))
        o = add("Reshape", [o, "tok_shape"], "o")
    else:
        o = add("Reshape", [o, add("Shape", ["A"], "a_shape2")], "o")
    x1 = add("Add", ["A", linear(o, "proj", D, D)], "x1")
    # MLP
    h2 = layer_norm(x1, "ln2")
    m = linear(gelu_of(linear(h2, "fc1", D, HIDDEN)), "fc2", HIDDEN, D)
    x2 = add("Add", [x1, m], "x2")
    x3 = layer_norm(x2, "ln3")
    if pool == "token":
        inits.append(i64("tok0", 0))
        feat = add("Gather", [x3, "tok0"], "feat", axis=1)
    else:
        inits.extend([i64("t1", [1]), i64("tend", [BIG]), i64("tax", [1])])
        patches = add("Slice", [x3, "t1", "tend", "tax"], "patches")
        if opset >= 18:
            inits.append(i64("pool_axes", [1]))
            feat = add("ReduceMean", [patches, "pool_axes"], "feat", keepdims=0)
        else:
            feat = add("ReduceMean", [patches], "feat", axes=[1], keepdims=0)
    add("Gemm", [feat, w("fc_w", K, D), w("fc_b", K, scale=0.1)], "logits", transB=1)
    a = helper.make_tensor_value_info("A", FLOAT, ["N", T, D])
    y = helper.make_tensor_value_info("logits", FLOAT, ["N", K])
    graph = helper.make_graph(nodes, "vit_head", [a], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


BLOCKS = {
    "opset13_torchscript_decomposed_layernorm": dict(
        opset=13, layernorm="decomposed", split="input", gelu="erf", pool="token"
    ),
    "opset12_decomposed_mean_pooled": dict(
        opset=12, layernorm="decomposed", split="input", gelu="erf", pool="mean"
    ),
    "opset17_layernorm_op": dict(opset=17, layernorm="op", split="input", gelu="erf", pool="token"),
    "opset18_dynamo_layernorm_op_mean_pooled": dict(
        opset=18, layernorm="op", split="num_outputs", gelu="erf", pool="mean"
    ),
    "opset18_decomposed_layernorm_axes_as_input": dict(
        opset=18, layernorm="decomposed", split="num_outputs", gelu="erf", pool="token"
    ),
    "opset20_gelu_op": dict(opset=20, layernorm="op", split="num_outputs", gelu="op", pool="token"),
    "opset20_gelu_tanh_mean_pooled": dict(
        opset=20, layernorm="op", split="input", gelu="tanh", pool="mean"
    ),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_transformer_block_head_equals_float64_finite_differences(name):
    head = transformer_block(**BLOCKS[name])
    a = np.random.default_rng(5).normal(size=(3, T, D)).astype(np.float32)
    g = check(head, a, targets=(0, 2, -1))
    # Every token gets a gradient (attention mixes them), not only the pooled ones.
    assert (np.abs(g).reshape(3, T, -1).max(axis=2) > 0).all()


def test_block_with_shapes_lost_before_opset_13_falls_back():
    # Before opset 13, onnx's shape inference does not follow Shape -> Slice -> Concat
    # into a Reshape: the ranks after it are unknown, and the rules that need them
    # refuse the head (the caller then uses finite differences).
    head = transformer_block(
        opset=12, layernorm="decomposed", split="dynamic", gelu="erf", pool="mean"
    )
    with pytest.raises(UnsupportedHead, match="unknown rank"):
        build_head_gradient(head)

"""Exact head gradients (ONNX backward graph) against per-position finite differences.

The reference here never uses onnx_sp2ps.backward: it perturbs every position of the
feature map by +-eps and runs the head model itself.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_sp2ps.backward import UnsupportedHead, build_head_gradient
from onnx_sp2ps.model import extract_head, prepare_model
from onnx_sp2ps.runtime import ModelRunner, create_session

from onnx_builders import all_variants, build_cnn

RNG = np.random.default_rng(0)
C, H, W, K = 6, 4, 4, 3


EPS = 3e-3


def fd_gradient(head: onnx.ModelProto, a: np.ndarray, target: int, eps: float = EPS):
    """d y_target / dA of one map by central differences (float32 head runs)."""
    session = create_session(head, provider="cpu")[0]
    name = head.graph.input[0].name
    flat = a.reshape(-1)
    rows = np.repeat(flat[None], 2 * flat.size, axis=0)
    idx = np.arange(flat.size)
    rows[idx, idx] += eps
    rows[flat.size + idx, idx] -= eps
    y = session.run(None, {name: rows.reshape((-1,) + a.shape).astype(np.float32)})[0]
    y = y.reshape(len(y), -1)[:, target].astype(np.float64)
    return ((y[: flat.size] - y[flat.size :]) / (2 * eps)).reshape(a.shape)


def tolerance(ref: np.ndarray, y: np.ndarray) -> float:
    """2e-3 of the largest gradient plus the float32 rounding noise of the reference."""
    noise = 20 * np.finfo(np.float32).eps * float(np.abs(y).max()) / EPS
    return 2e-3 * float(np.abs(ref).max()) + noise


def exact_gradient(head: onnx.ModelProto, a: np.ndarray, targets: np.ndarray):
    grad = build_head_gradient(head)
    session = create_session(grad.model, provider="cpu")[0]
    y, g = session.run(
        [grad.logits, grad.gradient], {grad.feature: a.astype(np.float32), grad.target: targets}
    )
    return y, g


def make_head(middle, *, shape=(None, C, H, W), pool="gap", opset=17, extra_inits=()):
    """feature (N, C, H, W) -> middle ops -> pool -> Flatten -> Gemm -> logits."""
    x = helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["N"] + list(shape[1:]))
    y = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", K])
    nodes, inits = list(middle["nodes"]), list(middle.get("inits", [])) + list(extra_inits)
    out = middle["out"]
    channels = middle.get("channels", C)
    if pool == "gap":
        nodes.append(helper.make_node("GlobalAveragePool", [out], ["pooled"]))
        nodes.append(helper.make_node("Flatten", [out if False else "pooled"], ["flat"]))
        fan_in = channels
    else:
        nodes.append(helper.make_node("Flatten", [out], ["flat"]))
        fan_in = middle["flat_size"]
    inits += [
        numpy_helper.from_array(RNG.normal(size=(K, fan_in)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(RNG.normal(size=K).astype(np.float32), "fc_b"),
    ]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "head", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def separated(shape) -> np.ndarray:
    """Random maps whose values are >= 0.04 apart: no max ties or kinks within +-EPS,
    where finite differences (the reference) would be wrong."""
    n = int(np.prod(shape))
    values = RNG.permutation(np.linspace(-2.0, 2.0, n)) + 0.011
    # Boundaries of the activations below (ReLU 0, Clip -0.5/0.6, HardSigmoid +-1.25,
    # HardSwish of 3A at +-1): keep values 2 EPS away from them.
    for kink in (0.0, -0.5, 0.6, -1.25, 1.25, -1.0, 1.0):
        near = np.abs(values - kink) < 2 * EPS
        values[near] = kink + 2.5 * EPS
    return values.reshape(shape).astype(np.float32)


def arr(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def node(op, inputs, output="m", **attrs):
    return helper.make_node(op, inputs, [output], **attrs)


MIDDLES = {
    "identity": dict(nodes=[node("Identity", ["A"])], out="m"),
    "relu": dict(nodes=[node("Relu", ["A"])], out="m"),
    "leaky_relu": dict(nodes=[node("LeakyRelu", ["A"], alpha=0.1)], out="m"),
    "clip": dict(
        nodes=[node("Clip", ["A", "lo", "hi"])], out="m", inits=[arr("lo", -0.5), arr("hi", 0.6)]
    ),
    "hard_sigmoid": dict(nodes=[node("HardSigmoid", ["A"], alpha=0.4, beta=0.5)], out="m"),
    "hard_swish": dict(
        nodes=[node("Mul", ["A", "three"], "A3"), node("HardSwish", ["A3"])],
        out="m",
        inits=[arr("three", 3.0)],
    ),
    "sigmoid": dict(nodes=[node("Sigmoid", ["A"])], out="m"),
    "batchnorm": dict(
        nodes=[node("BatchNormalization", ["A", "s", "b", "mu", "var"], epsilon=1e-3)],
        out="m",
        inits=[
            arr("s", RNG.normal(size=C)),
            arr("b", RNG.normal(size=C)),
            arr("mu", RNG.normal(size=C)),
            arr("var", RNG.uniform(0.5, 2, C)),
        ],
    ),
    "mul_div_sub_const": dict(
        nodes=[
            node("Mul", ["A", "k"], "a1"),
            node("Div", ["a1", "d"], "a2"),
            node("Sub", ["a2", "bias"], "m"),
        ],
        out="m",
        inits=[
            arr("k", RNG.normal(size=(1, C, 1, 1))),
            arr("d", 1.7),
            arr("bias", RNG.normal(size=(C, 1, 1))),
        ],
    ),
    "mul_both_data": dict(nodes=[node("Sigmoid", ["A"], "s"), node("Mul", ["A", "s"])], out="m"),
    "div_by_data": dict(
        nodes=[
            node("Sigmoid", ["A"], "s"),
            node("Add", ["s", "one"], "s1"),
            node("Div", ["A", "s1"]),
        ],
        out="m",
        inits=[arr("one", 1.0)],
    ),
    "residual_add": dict(nodes=[node("Relu", ["A"], "r"), node("Add", ["A", "r"])], out="m"),
    "conv1x1": dict(
        nodes=[node("Conv", ["A", "cw", "cb"])],
        out="m",
        channels=5,
        inits=[arr("cw", RNG.normal(size=(5, C, 1, 1))), arr("cb", RNG.normal(size=5))],
    ),
    "conv1x1_constant_node": dict(
        nodes=[
            helper.make_node(
                "Constant", [], ["cw"], value=arr("cwv", RNG.normal(size=(5, C, 1, 1)))
            ),
            node("Conv", ["A", "cw"]),
        ],
        out="m",
        channels=5,
    ),
    "transpose_pair": dict(
        nodes=[
            node("Transpose", ["A"], "t", perm=[0, 2, 3, 1]),
            node("Relu", ["t"], "tr"),
            node("Transpose", ["tr"], "m", perm=[0, 3, 1, 2]),
        ],
        out="m",
    ),
    "concat": dict(
        nodes=[node("Relu", ["A"], "r"), node("Concat", ["A", "r"], axis=1)],
        out="m",
        channels=2 * C,
    ),
    "maxpool_tiled": dict(
        nodes=[node("MaxPool", ["A"], kernel_shape=[2, 2], strides=[2, 2])], out="m"
    ),
    "avgpool_tiled": dict(
        nodes=[node("AveragePool", ["A"], kernel_shape=[2, 2], strides=[2, 2])], out="m"
    ),
    "reshape_roundtrip": dict(
        nodes=[node("Reshape", ["A", "shp"], "r"), node("Reshape", ["r", "back"])],
        out="m",
        inits=[
            numpy_helper.from_array(np.array([0, C, -1], np.int64), "shp"),
            numpy_helper.from_array(np.array([0, C, H, W], np.int64), "back"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(MIDDLES))
def test_exact_gradient_equals_finite_differences(name):
    head = make_head(MIDDLES[name])
    a = separated((3, C, H, W))
    targets = np.array([0, 2, -1], np.int64)
    y, g = exact_gradient(head, a, targets)
    own = int(np.argmax(y[2]))
    for i, t in enumerate([0, 2, own]):
        ref = fd_gradient(head, a[i], t)
        close = np.abs(g[i] - ref) <= tolerance(ref, y)
        # Kinks (ReLU, Clip, pooling ties) may sit within eps of a few positions.
        assert close.all(), f"{name}: {(~close).sum()} positions differ"
        assert np.corrcoef(g[i].ravel(), ref.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("pool", ["gap", "flatten"])
def test_reductions_and_global_pools(pool):
    for op, attrs in [
        ("ReduceMean", dict(axes=[2, 3], keepdims=1)),
        ("ReduceSum", dict(axes=[3], keepdims=1)),
        ("ReduceMax", dict(axes=[2], keepdims=1)),
        ("GlobalMaxPool", {}),
    ]:
        out_hw = {"ReduceMean": 1, "ReduceSum": H, "ReduceMax": W, "GlobalMaxPool": 1}[op]
        middle = dict(
            nodes=[helper.make_node(op, ["A"], ["m"], **attrs)], out="m", flat_size=C * out_hw
        )
        head = make_head(middle, pool=pool, opset=12)  # axes as attributes
        a = separated((2, C, H, W))
        _, g = exact_gradient(head, a, np.array([1, 0], np.int64))
        for i, t in enumerate([1, 0]):
            ref = fd_gradient(head, a[i], t)
            np.testing.assert_allclose(g[i], ref, atol=tolerance(ref, _), err_msg=op)


VARIANTS = [
    (vid, kw) for vid, kw in all_variants() if not kw.get("extra_input") and not kw.get("symbolic")
]


@pytest.mark.parametrize("vid,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_builder_heads_have_exact_gradients(vid, kw):
    built = build_cnn(**kw)
    prepared = prepare_model(built.model)
    runner = ModelRunner(prepared, provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    x = built.random_input(seed=4)
    acts, logits = runner.run(x)
    y, g = runner.head_gradients(acts, np.full(len(acts), -1))
    np.testing.assert_allclose(y, logits, rtol=1e-5, atol=1e-6)
    ref = fd_gradient(
        prepared.head_model,
        acts[0].transpose(1, 2, 0) if built.feature_layout == "NHWC" else acts[0],
        int(np.argmax(logits[0])),
    )
    if built.feature_layout == "NHWC":
        ref = ref.transpose(2, 0, 1)
    close = np.abs(g[0] - ref) <= tolerance(ref, logits)
    assert close.mean() >= 0.98


def test_unsupported_ops_are_named_and_fall_back():
    middle = dict(nodes=[node("Softsign", ["A"])], out="m")
    head = make_head(middle)
    with pytest.raises(UnsupportedHead, match="Softsign"):
        build_head_gradient(head)
    same = dict(  # (any Conv has a rule; its auto_pad SAME form has none)
        nodes=[node("Conv", ["A", "w3"], auto_pad="SAME_UPPER")],
        out="m",
        inits=[arr("w3", RNG.normal(size=(C, C, 3, 3)))],
    )
    with pytest.raises(UnsupportedHead, match="auto_pad SAME"):
        build_head_gradient(make_head(same))


def test_runner_reports_the_finite_difference_path_when_needed():
    built = build_cnn(head="gap_gemm")
    model = built.model
    # Insert a Softsign between GAP's output and Flatten: no backward rule for it.
    index = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Flatten")
    flatten = model.graph.node[index]
    model.graph.node.insert(index, helper.make_node("Softsign", [flatten.input[0]], ["soft"]))
    flatten.input[0] = "soft"
    onnx.checker.check_model(model)
    runner = ModelRunner(prepare_model(model), provider="cpu")
    assert runner.gradient_path == "finite-difference"
    assert "Softsign" in runner.gradient_note


def test_old_opsets_use_finite_differences():
    head = extract_head(
        build_cnn(opset=13).model, *(lambda b: (b.feature_map, b.logits))(build_cnn(opset=13))
    )
    head.opset_import[0].version = 10
    with pytest.raises(UnsupportedHead, match="opset"):
        build_head_gradient(head)


def ints(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


#: Ops of real heads (ConvNeXt, transformer-style and timm heads, decomposed LayerNorm of
#: old opsets): (middle, opset, pool).
MORE_MIDDLES = {
    "tanh": (dict(nodes=[node("Tanh", ["A"])], out="m"), 17, "gap"),
    "exp_neg": (dict(nodes=[node("Neg", ["A"], "n"), node("Exp", ["n"])], out="m"), 17, "gap"),
    "sqrt": (
        dict(
            nodes=[
                node("Mul", ["A", "A"], "sq"),
                node("Add", ["sq", "half"], "s1"),
                node("Sqrt", ["s1"]),
            ],
            out="m",
            inits=[arr("half", 0.5)],
        ),
        17,
        "gap",
    ),
    "pow3": (
        dict(nodes=[node("Pow", ["A", "three"])], out="m", inits=[arr("three", 3.0)]),
        17,
        "gap",
    ),
    "erf_gelu": (
        dict(
            nodes=[
                node("Div", ["A", "r2"], "d"),
                node("Erf", ["d"], "e"),
                node("Add", ["e", "one"], "e1"),
                node("Mul", ["A", "e1"], "g"),
                node("Mul", ["g", "half"]),
            ],
            out="m",
            inits=[arr("r2", np.sqrt(2.0)), arr("one", 1.0), arr("half", 0.5)],
        ),
        17,
        "gap",
    ),
    "gelu": (dict(nodes=[node("Gelu", ["A"])], out="m"), 20, "gap"),
    "gelu_tanh": (dict(nodes=[node("Gelu", ["A"], approximate="tanh")], out="m"), 20, "gap"),
    "softmax_channels": (dict(nodes=[node("Softmax", ["A"], axis=1)], out="m"), 17, "gap"),
    "logsoftmax_last": (dict(nodes=[node("LogSoftmax", ["A"])], out="m"), 17, "gap"),
    "layernorm_channels": (
        dict(
            nodes=[
                node("Transpose", ["A"], "t", perm=[0, 2, 3, 1]),
                node("LayerNormalization", ["t", "s", "b"], "ln", epsilon=1e-6),
                node("Transpose", ["ln"], "m", perm=[0, 3, 1, 2]),
            ],
            out="m",
            inits=[arr("s", RNG.normal(size=C)), arr("b", RNG.normal(size=C))],
        ),
        17,
        "gap",
    ),
    "layernorm_decomposed": (
        dict(
            nodes=[  # TorchScript exporter, opset < 17
                node("Transpose", ["A"], "t", perm=[0, 2, 3, 1]),
                node("ReduceMean", ["t"], "mu", axes=[-1]),
                node("Sub", ["t", "mu"], "d"),
                node("Pow", ["d", "two"], "d2"),
                node("ReduceMean", ["d2"], "var", axes=[-1]),
                node("Add", ["var", "eps"], "ve"),
                node("Sqrt", ["ve"], "sd"),
                node("Div", ["d", "sd"], "xh"),
                node("Mul", ["xh", "s"], "xs"),
                node("Add", ["xs", "b"], "ln"),
                node("Transpose", ["ln"], "m", perm=[0, 3, 1, 2]),
            ],
            out="m",
            inits=[
                arr("two", 2.0),
                arr("eps", 1e-6),
                arr("s", RNG.normal(size=C)),
                arr("b", RNG.normal(size=C)),
            ],
        ),
        13,
        "gap",
    ),
    "gather_channels": (
        dict(
            nodes=[node("Gather", ["A", "idx"], axis=1)],
            out="m",
            channels=4,
            inits=[ints("idx", [0, 2, -1, 2])],
        ),
        17,
        "gap",
    ),
    "gather_row_scalar": (
        dict(
            nodes=[node("Gather", ["A", "row"], axis=2)],
            out="m",
            flat_size=C * W,
            inits=[ints("row", 1)],
        ),
        17,
        "flatten",
    ),
}


@pytest.mark.parametrize("name", list(MORE_MIDDLES))
def test_more_head_ops_have_exact_gradients(name):
    middle, opset, pool = MORE_MIDDLES[name]
    head = make_head(middle, opset=opset, pool=pool)
    a = separated((2, C, H, W))
    y, g = exact_gradient(head, a, np.array([1, -1], np.int64))
    for i, t in enumerate([1, int(np.argmax(y[1]))]):
        ref = fd_gradient(head, a[i], t)
        np.testing.assert_allclose(g[i], ref, atol=tolerance(ref, y), err_msg=name)
        assert np.abs(ref).max() > 0, name


def test_broadcasts_over_symbolic_sizes_are_summed_at_run_time():
    # A head on a map of unknown height and width (a model with a dynamic input size):
    # whether "mu" (N, C, 1, 1) is broadcast against (N, C, H, W) is only known at run time.
    middle = dict(
        nodes=[
            node("ReduceMean", ["A"], "mu", axes=[2, 3]),
            node("Sub", ["A", "mu"], "d"),
            node("Relu", ["A"], "r"),
            node("Mul", ["d", "r"]),
        ],
        out="m",
    )
    head = make_head(middle, shape=(None, C, None, None))
    for shape in [(2, C, H, W), (2, C, 3, 5)]:
        a = separated(shape)
        y, g = exact_gradient(head, a, np.array([0, 2], np.int64))
        assert g.shape == a.shape
        for i, t in enumerate([0, 2]):
            ref = fd_gradient(head, a[i], t)
            np.testing.assert_allclose(g[i], ref, atol=tolerance(ref, y))


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (1, 2)])
def test_maxpool_routes_the_gradient_to_the_first_maximum_of_each_window(kernel):
    """Ties (a window of ReLU zeros in the feature map, equal values) take the gradient
    at their first maximum in row-major order, as autograd does, not at every tied one."""
    middle = dict(
        nodes=[node("MaxPool", ["A"], kernel_shape=list(kernel), strides=list(kernel))],
        out="m",
    )
    head = make_head(middle)
    a = np.maximum(np.round(RNG.normal(size=(3, C, H, W)), 1), 0).astype(np.float32)
    targets = np.array([0, 2, 1], np.int64)
    _, got = exact_gradient(head, a, targets)
    w = numpy_helper.to_array(next(t for t in head.graph.initializer if t.name == "fc_w"))
    kh, kw = kernel
    oh, ow = H // kh, W // kw
    want = np.zeros_like(a)
    for i, c in enumerate(targets):
        for k in range(C):
            for y in range(oh):
                for x in range(ow):
                    window = a[i, k, y * kh : (y + 1) * kh, x * kw : (x + 1) * kw]
                    dy, dx = np.unravel_index(np.argmax(window), kernel)  # the first maximum
                    want[i, k, y * kh + dy, x * kw + dx] = w[c, k] / (oh * ow)
    assert (a == 0).mean() > 0.3  # the case that matters: many tied zeros
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_gradient_graph_the_checker_refuses_falls_back_to_finite_differences(monkeypatch):
    """The builder's one way to fail is UnsupportedHead: a gradient graph the ONNX checker
    refuses (a shape it cannot take) is the finite-difference path, not a crash."""
    import onnx_sp2ps.backward as backward

    def refuse(model):
        raise onnx.checker.ValidationError("Field 'shape' of 'type' is required but missing")

    monkeypatch.setattr(backward, "check_model", refuse)
    prepared = prepare_model(build_cnn(head="gap_gemm").model)
    with pytest.raises(UnsupportedHead, match="not valid ONNX.*shape"):
        build_head_gradient(prepared.head_model)
    runner = ModelRunner(prepared, provider="cpu")
    assert runner.gradient_path == "finite-difference"
    assert "not valid ONNX" in runner.gradient_note

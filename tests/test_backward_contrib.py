"""Exact head gradients through onnxruntime's contrib ops (com.microsoft), as its
transformer optimizer writes them, against float64 central differences.

onnxruntime has no float64 kernels for most of these ops: the reference runs a float64
copy of the head with onnx's reference evaluator and the numpy implementations below
(written from docs/ContribOperators.md of onnxruntime and its CPU kernels).  The
end-to-end tests take the token fixture vit_cls as ``onnxruntime.transformers.optimizer``
writes it (tests/fixtures/tokens/vit_cls_ort.onnx, scripts/make_ort_optimized.py) and
compare with the autograd gradients of the original model
(tests/fixtures/tokens/ref_vit_cls.npz).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from test_backward_transformer import Erf, Gelu, check, f32, i64, node, separated

from onnx_sp2ps.backward import (
    CONTRIB_GRADIENT_OPS,
    GRADIENT_OPS,
    UnsupportedHead,
    build_head_gradient,
)

from conftest import FIXTURES

FLOAT = onnx.TensorProto.FLOAT
MS = "com.microsoft"
K = 3  # classes
RNG = np.random.default_rng(11)

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x, tanh=False):
    if tanh:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


# -- float64 numpy implementations of the contrib ops ------------------------------------


class _Contrib(OpRun):
    op_domain = MS

    def _outputs(self, *values):
        """As many results as the node has outputs (the optional ones are trailing)."""
        return tuple(values[: len(self.output)])


class SkipLayerNormalization(_Contrib):
    def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-12):
        s = x + skip + (0 if bias is None else bias)
        mean = s.mean(axis=-1, keepdims=True)
        r = 1 / np.sqrt(((s - mean) ** 2).mean(axis=-1, keepdims=True) + epsilon)
        y = (s - mean) * r * gamma + (0 if beta is None else beta)
        return self._outputs(y, mean, r, s)


class SkipSimplifiedLayerNormalization(_Contrib):
    def _run(self, x, skip, gamma, bias=None, epsilon=1e-12):
        s = x + skip + (0 if bias is None else bias)
        r = 1 / np.sqrt((s * s).mean(axis=-1, keepdims=True) + epsilon)
        return self._outputs(s * r * gamma, np.zeros_like(r), r, s)  # (mean: 0)


class BiasGelu(_Contrib):
    def _run(self, a, b):
        return (_gelu(a + b),)


class FastGelu(_Contrib):
    def _run(self, x, bias=None):
        return (_gelu(x + (0 if bias is None else bias), tanh=True),)


class QuickGelu(_Contrib):
    def _run(self, x, alpha=1.702):
        return (x / (1 + np.exp(-alpha * x)),)


class BiasAdd(_Contrib):
    def _run(self, x, bias, skip):
        return (x + bias + skip,)


def _ms_gelu(self, x, approximate="none"):
    # (onnx's reference evaluator finds classes by name and fills in the attributes of
    # the standard Gelu; com.microsoft's has none: "none")
    return (_gelu(x, tanh=approximate == "tanh"),)


#: com.microsoft.Gelu (a class of the name Gelu, as the evaluator needs).
MsGelu = type("Gelu", (_Contrib,), {"_run": _ms_gelu})

CONTRIB = (
    SkipLayerNormalization,
    SkipSimplifiedLayerNormalization,
    BiasGelu,
    FastGelu,
    QuickGelu,
    BiasAdd,
    MsGelu,
)


def ms(op, inputs, outputs="m", **attrs):
    outputs = [outputs] if isinstance(outputs, str) else outputs
    return helper.make_node(op, inputs, outputs, domain=MS, **attrs)


def make_head(nodes, inits, shape=("N", 3, 4), out="m", width=None, seed=0):
    """feature ``A`` -> nodes -> ``out`` -> Flatten -> MatMul (random weights) -> logits
    (N, K), importing com.microsoft (``width``: out's size per image, else computed)."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    a = helper.make_tensor_value_info("A", FLOAT, list(shape))
    if width is None:
        body = helper.make_graph(
            list(nodes), "body", [a], [helper.make_tensor_value_info(out, FLOAT, None)]
        )
        body.initializer.extend(inits)
        sample = np.zeros([1 if isinstance(d, str) else d for d in shape], np.float32)
        evaluator = ReferenceEvaluator(
            helper.make_model(body, opset_imports=opsets, ir_version=9),
            new_ops=[Erf, Gelu, *CONTRIB],
        )
        width = int(np.prod(evaluator.run(None, {"A": sample})[0].shape[1:]))
    rng = np.random.default_rng(seed)
    nodes = list(nodes) + [
        node("Flatten", [out], "flat", axis=1),
        node("MatMul", ["flat", "head_w"], "logits"),
    ]
    inits = list(inits) + [f32("head_w", rng.normal(size=(width, K)) / np.sqrt(width))]
    y = helper.make_tensor_value_info("logits", FLOAT, [shape[0], K])
    graph = helper.make_graph(nodes, "head", [a], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(name, *shape, mean=0.0):
    return f32(name, mean + RNG.normal(size=shape))


# -- one rule at a time ----------------------------------------------------------------

#: name: (nodes, initializers); the feature map A is (N, 3, 4).
CASES = {
    "skip_layernorm_all_inputs_sum_output_used": (
        [
            node("Tanh", ["A"], "t"),
            ms(
                "SkipLayerNormalization",
                ["A", "t", "g", "b", "bias"],
                ["y", "", "", "s"],
                epsilon=1e-5,
            ),
            node("Mul", ["s", "w"], "sw"),  # the residual stream
            node("Add", ["y", "sw"]),
        ],
        [weights("g", 4, mean=1.0), weights("b", 4), weights("bias", 4), weights("w", 3, 4)],
    ),
    "skip_layernorm_gamma_only_constant_skip_broadcast": (
        [ms("SkipLayerNormalization", ["A", "skip", "g"])],  # skip (S, H), epsilon default
        [weights("skip", 3, 4), weights("g", 4, mean=1.0)],
    ),
    "skip_layernorm_skip_1sh_and_bias_no_beta": (
        [ms("SkipLayerNormalization", ["A", "skip", "g", "", "bias"], epsilon=1e-6)],
        [weights("skip", 1, 3, 4), weights("g", 4, mean=1.0), weights("bias", 4)],
    ),
    "skip_layernorm_feature_as_input_and_skip": (
        [ms("SkipLayerNormalization", ["A", "A", "g", "b"], epsilon=1e-5)],
        [weights("g", 4, mean=1.0), weights("b", 4)],
    ),
    "skip_layernorm_statistics_outputs": (
        [
            node("Tanh", ["A"], "t"),
            ms(
                "SkipLayerNormalization", ["t", "A", "g", "b"], ["y", "mu", "rs", "s"], epsilon=1e-3
            ),
            node("Mul", ["mu", "two"], "mu2"),
            node("Mul", ["rs", "half"], "rs2"),
            node("Add", ["y", "mu2"], "a1"),
            node("Add", ["a1", "rs2"], "a2"),
            node("Mul", ["s", "w"], "sw"),
            node("Add", ["a2", "sw"]),
        ],
        [
            weights("g", 4, mean=1.0),
            weights("b", 4),
            f32("two", 2.0),
            f32("half", 0.5),
            weights("w", 3, 4),
        ],
    ),
    "skip_layernorm_only_sum_output_used": (
        [
            node("Tanh", ["A"], "t"),
            ms("SkipLayerNormalization", ["A", "t", "g", "b", "bias"], ["y", "", "", "s"]),
            node("Tanh", ["s"]),
        ],
        [weights("g", 4, mean=1.0), weights("b", 4), weights("bias", 4)],
    ),
    "skip_simplified_bias_and_sum_output": (
        [
            node("Tanh", ["A"], "t"),
            ms(
                "SkipSimplifiedLayerNormalization",
                ["A", "t", "g", "bias"],
                ["y", "", "", "s"],
                epsilon=1e-5,
            ),
            node("Mul", ["s", "w"], "sw"),
            node("Add", ["y", "sw"]),
        ],
        [weights("g", 4, mean=1.0), weights("bias", 4), weights("w", 3, 4)],
    ),
    "skip_simplified_gamma_only": (
        [ms("SkipSimplifiedLayerNormalization", ["A", "skip", "g"])],
        [weights("skip", 3, 4), weights("g", 4, mean=1.0)],
    ),
    "skip_simplified_statistics_outputs": (
        [
            node("Tanh", ["A"], "t"),
            ms(
                "SkipSimplifiedLayerNormalization", ["t", "A", "g"], ["y", "mu", "rs"], epsilon=1e-4
            ),
            node("Add", ["y", "mu"], "a1"),  # mu: 0 (onnxruntime writes zeros)
            node("Mul", ["rs", "half"], "rs2"),
            node("Add", ["a1", "rs2"]),
        ],
        [weights("g", 4, mean=1.0), f32("half", 0.5)],
    ),
    "bias_gelu": (
        [node("MatMul", ["A", "w"], "h"), ms("BiasGelu", ["h", "b"])],
        [weights("w", 4, 5), weights("b", 5)],
    ),
    "fast_gelu_with_bias": (
        [node("MatMul", ["A", "w"], "h"), ms("FastGelu", ["h", "b"])],
        [weights("w", 4, 5), weights("b", 5)],
    ),
    "fast_gelu_without_bias": ([ms("FastGelu", ["A"])], []),
    "gelu": ([ms("Gelu", ["A"])], []),
    "quick_gelu_default_alpha": ([ms("QuickGelu", ["A"])], []),
    "quick_gelu_alpha": (
        [ms("QuickGelu", ["A"], "q", alpha=-0.6), node("Mul", ["q", "A"])],
        [],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_contrib_rule_equals_float64_finite_differences(name):
    nodes, inits = CASES[name]
    head = make_head(nodes, inits)
    check(head, separated((3, 3, 4)), targets=(0, 2, -1), new_ops=CONTRIB)


def _bias_add_as_adds(model: onnx.ModelProto) -> None:
    """BiasAdd has no CPU kernel in onnxruntime: its forward node made two Adds (the
    backward nodes are standard ops and stay)."""
    g = model.graph
    (k,) = [i for i, n in enumerate(g.node) if n.op_type == "BiasAdd"]
    x, bias, skip = g.node[k].input
    y = g.node[k].output[0]
    adds = [node("Add", [x, bias], "bias_add_xb"), node("Add", ["bias_add_xb", skip], y)]
    del g.node[k]
    for n in reversed(adds):
        g.node.insert(k, n)


def test_bias_add():
    nodes = [
        node("Tanh", ["A"], "t"),
        ms("BiasAdd", ["A", "bias", "t"], "y"),
        node("Mul", ["y", "y"]),
    ]
    head = make_head(nodes, [weights("bias", 4)])
    assert any(n.op_type == "BiasAdd" for n in build_head_gradient(head).model.graph.node)
    check(head, separated((3, 3, 4)), new_ops=CONTRIB, edit=_bias_add_as_adds)


T, D, HIDDEN = 5, 8, 16


@pytest.mark.parametrize("act", ["BiasGelu", "FastGelu"])
def test_optimized_block_chain(act):
    """A block and the classifier as the optimizer fuses them: attention (standard ops),
    SkipLayerNormalization (attention output + residual, its sum the next residual), MLP
    with a fused Gelu, SkipLayerNormalization (the final norm), class token, Gemm.  The
    ranks after the contrib ops (needed by MatMul and Gather) come from their inputs'."""
    rng = np.random.default_rng(4)

    def w(name, *shape, mean=0.0, scale=None):
        scale = 1 / np.sqrt(shape[0]) if scale is None else scale
        return f32(name, mean + rng.normal(size=shape) * scale)

    nodes = [
        node("Transpose", ["A"], "AT", perm=[0, 2, 1]),  # one-head self-attention
        node("MatMul", ["A", "AT"], "qk"),
        node("Mul", ["qk", "scale"], "qks"),
        node("Softmax", ["qks"], "att", axis=-1),
        node("MatMul", ["att", "A"], "o"),
        node("MatMul", ["o", "wp"], "proj"),
        ms(
            "SkipLayerNormalization",
            ["proj", "A", "g2", "b2", "bp"],
            ["n2", "", "", "res"],
            epsilon=1e-6,
        ),
        node("MatMul", ["n2", "w1"], "f1"),
        ms(act, ["f1", "b1"], "act"),
        node("MatMul", ["act", "w2"], "f2"),
        ms("SkipLayerNormalization", ["f2", "res", "g3", "b3", "bb2"], "fin", epsilon=1e-6),
        node("Gather", ["fin", "tok0"], "cls", axis=1),
        node("Gemm", ["cls", "fc_w", "fc_b"], "logits", transB=1),
    ]
    inits = [
        f32("scale", D**-0.5),
        w("wp", D, D),
        w("g2", D, mean=1.0, scale=0.3),
        w("b2", D, scale=0.1),
        w("bp", D, scale=0.1),
        w("w1", D, HIDDEN),
        w("b1", HIDDEN, scale=0.1),
        w("w2", HIDDEN, D),
        w("g3", D, mean=1.0, scale=0.3),
        w("b3", D, scale=0.1),
        w("bb2", D, scale=0.1),
        i64("tok0", 0),
        w("fc_w", K, D),
        w("fc_b", K, scale=0.1),
    ]
    a = helper.make_tensor_value_info("A", FLOAT, ["N", T, D])
    y = helper.make_tensor_value_info("logits", FLOAT, ["N", K])
    graph = helper.make_graph(nodes, "vit_opt_head", [a], [y], initializer=inits)
    head = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
        ir_version=9,
    )
    onnx.checker.check_model(head, full_check=True)
    x = np.random.default_rng(5).normal(size=(3, T, D)).astype(np.float32)
    g = check(head, x, targets=(0, 2, -1), new_ops=CONTRIB)
    # Every token gets a gradient (attention mixes them), not only the class token.
    assert (np.abs(g).max(axis=2) > 0).all()


# -- what stays refused ----------------------------------------------------------------


def test_rules_are_listed_by_domain():
    assert CONTRIB_GRADIENT_OPS == {
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "QuickGelu",
        "BiasAdd",
    }
    assert not any(op.startswith("ms_") for op in GRADIENT_OPS)
    assert "SkipLayerNormalization" not in GRADIENT_OPS and "Gelu" in GRADIENT_OPS


def test_contrib_attention_is_refused():
    nodes = [ms("Attention", ["A", "qkv_w", "qkv_b"], num_heads=2)]
    inits = [weights("qkv_w", 4, 12), weights("qkv_b", 12)]
    head = make_head(nodes, inits, width=12)
    with pytest.raises(UnsupportedHead, match=r"no gradient rule for com\.microsoft\.Attention"):
        build_head_gradient(head)


def test_simplified_layernorm_of_the_standard_domain_is_refused():
    # onnxruntime registers SimplifiedLayerNormalization (RMSNorm) in the standard domain,
    # not com.microsoft; onnx's checker does not know it (onnx_sp2ps refuses such a
    # model on loading): no rule, and not taken for a contrib op.
    nodes = [ms("SimplifiedLayerNormalization", ["A", "g"], epsilon=1e-5)]
    head = make_head(nodes, [weights("g", 4, mean=1.0)], width=12)
    head.graph.node[0].domain = ""
    with pytest.raises(
        UnsupportedHead, match=r"no gradient rule for SimplifiedLayerNormalization$"
    ):
        build_head_gradient(head)


def test_other_custom_domains_are_refused():
    head = make_head([ms("QuickGelu", ["A"])], [])
    head.graph.node[0].domain = "com.example"
    head.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedHead, match=r"custom domain \(com\.example\)"):
        build_head_gradient(head)


# -- end to end: a timm ViT optimized by onnxruntime's transformer optimizer ------------

TOKENS = FIXTURES / "tokens"
#: blocks[1].norm1's output: kept by the optimizer as a SkipLayerNormalization output.
FEATURE = "/blocks/blocks.1/norm1/LayerNormalization_output_0"
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def optimized_vit():
    """vit_cls through onnxruntime's transformer optimizer (scripts/make_ort_optimized.py)."""
    path = TOKENS / "vit_cls_ort.onnx"
    graph = onnx.load(str(path)).graph
    (producer,) = [n for n in graph.node if FEATURE in n.output]
    assert (producer.domain, producer.op_type) == (MS, "SkipLayerNormalization")
    return path


@pytest.fixture(scope="module")
def reference():
    from onnx_sp2ps.data import InputSpec, Preprocess, open_images

    ref = dict(np.load(TOKENS / "ref_vit_cls.npz"))
    n = len(ref["grads"])
    root = FIXTURES.parent.parent / "sample_models" / "images"
    data = open_images(
        root, spec=InputSpec("NCHW", 3, 64, 64), preprocess=Preprocess(preset="unit")
    )
    x = np.concatenate([b.inputs for b in data.iter_batches(50)])[:n]
    assert [str(p) for p in ref["grad_paths"]] == [str(p) for p in data.paths[:n]]
    return ref, x


def _check_gradients(grads, want):
    assert grads.shape == want.shape
    scale = np.abs(want).max(axis=tuple(range(1, want.ndim)), keepdims=True)
    err = np.abs(grads - want) / scale
    assert err.max() <= GRAD_RTOL, f"max relative gradient error {err.max():.2e}"


def test_optimized_vit_head_gradient_equals_autograd(optimized_vit, reference):
    """build_head_gradient of the optimized model's head (two SkipLayerNormalization, a
    BiasGelu; the residual stream a side input) against torch autograd, per token."""
    import onnxruntime as ort

    from onnx_sp2ps.model.edit import extract_head

    ref, x = reference
    model = onnx.load(str(optimized_vit))
    head = extract_head(model, FEATURE, "logits")
    ops = {(n.domain, n.op_type) for n in head.graph.node}
    assert {(MS, "SkipLayerNormalization"), (MS, "BiasGelu")} <= ops
    grad = build_head_gradient(head)
    assert len(grad.side_inputs) == 1  # the residual stream before blocks[1]

    wanted = [FEATURE, *grad.side_inputs]
    for name in wanted:
        model.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    acts = dict(zip(wanted, session.run(wanted, {model.graph.input[0].name: x})))
    grad_session = ort.InferenceSession(
        grad.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    targets = ref["targets"][: len(x)]
    logits, grads = grad_session.run([grad.logits, grad.gradient], {**acts, grad.target: targets})
    np.testing.assert_allclose(logits, ref["logits"][: len(x)], rtol=1e-4, atol=1e-4)
    _check_gradients(grads, ref["grads"])


def test_optimized_vit_model_runner_takes_the_exact_path(optimized_vit, reference):
    from onnx_sp2ps.model import prepare_model
    from onnx_sp2ps.runtime import ModelRunner

    ref, x = reference
    prepared = prepare_model(optimized_vit, feature_layer=FEATURE)
    # Detection picks the same layer by itself.
    assert prepare_model(optimized_vit).spec.feature_map.name == FEATURE
    runner = ModelRunner(prepared, provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    acts, logits = runner.run(x)
    np.testing.assert_allclose(logits, ref["logits"][: len(x)], rtol=1e-4, atol=1e-4)
    n = len(x)
    targets = ref["targets"][:n]
    _, grads = runner.head_gradients(acts, targets, rows=np.arange(n))
    prefix, (h, w) = int(ref["prefix_tokens"]), (int(g) for g in ref["grid"])
    want = ref["grads"][:, prefix:, :].reshape(n, h, w, -1).transpose(0, 3, 1, 2)
    _check_gradients(grads, want)

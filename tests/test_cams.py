"""CAM methods and map helpers, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from scipy import ndimage

from onnx_sp2ps.cams import EigenCAM, GradCAM, get_method
from onnx_sp2ps.cams.base import bilinear_matrix, normalise_maps, relu, upsample_bilinear
from onnx_sp2ps.cams.gradcam import REL_EPS, channel_gradient_sums
from onnx_sp2ps.errors import UsageError
from onnx_sp2ps.model import prepare_model
from onnx_sp2ps.runtime import ModelRunner

from onnx_builders import build_cnn


def _runner(**kw):
    built = build_cnn(**kw)
    return built, ModelRunner(prepare_model(built.model), provider="cpu")


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _gemms(model):
    return [n for n in model.graph.node if n.op_type == "Gemm"]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gradient_sums_of_a_linear_head_equal_the_weights(layout):
    # GAP -> Flatten -> Gemm: d y_c / d A_kij = W[c, k] / (h w) exactly.
    built, runner = _runner(head="gap_gemm", layout=layout, num_classes=7)
    x = built.random_input(seed=1)
    acts, logits = runner.run(x)
    targets = np.array([0, 6])
    sums = channel_gradient_sums(runner, acts, targets)
    gemm = _gemms(built.model)[0]
    w = _weights(built.model)[gemm.input[1]]  # (K, C), transB=1
    expected = w[targets]  # sum over h*w positions of W/(hw) = W
    np.testing.assert_allclose(sums, expected, rtol=2e-3, atol=1e-4 * np.abs(w).max())


def test_gradient_sums_of_an_mlp_head_match_the_analytic_gradient():
    # Flatten -> Gemm -> Relu -> Gemm: gradient = W1^T (relu'(h) * W2[c]).
    built, runner = _runner(head="flatten_mlp", num_classes=5)
    acts, logits = runner.run(built.random_input(seed=2))
    g1, g2 = _gemms(built.model)
    w = _weights(built.model)
    w1, b1, w2 = w[g1.input[1]], w[g1.input[2]], w[g2.input[1]]
    targets = np.argmax(logits, axis=1)
    for i, c in enumerate(targets):
        flat = acts[i].reshape(-1).astype(np.float64)  # NCHW flatten order
        hidden = w1 @ flat + b1
        grad = w1.T @ ((hidden > 0) * w2[c])
        expected = grad.reshape(acts.shape[1], -1).sum(axis=1)
        got = channel_gradient_sums(runner, acts[i : i + 1], targets[i : i + 1])[0]
        r = np.corrcoef(got, expected)[0, 1]
        assert r > 0.999
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())


class _KinkHead:
    """A head y = relu(s - t1) + slope2 * relu(t2 - s), s = sum(A_0), on (N, 2, 2, 2) maps:
    only ``map_head`` (what the finite differences use), counting the maps it runs."""

    def __init__(self, t1: float, t2: float = -1e9, slope2: float = 0.0):
        import onnx
        from onnx import helper

        from onnx_sp2ps.runtime import create_session

        x = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["N", 2, 2, 2])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])
        consts = {
            "t1": np.array([[t1]], np.float32),
            "t2": np.array([[t2]], np.float32),
            "k": np.array([[slope2]], np.float32),
            "st": np.array([0], np.int64),
            "en": np.array([1], np.int64),
            "ax": np.array([1], np.int64),
        }
        nodes = [
            helper.make_node("ReduceSum", ["a"], ["s"], axes=[2, 3], keepdims=0),
            helper.make_node("Slice", ["s", "st", "en", "ax"], ["s0"]),
            helper.make_node("Sub", ["s0", "t1"], ["z1"]),
            helper.make_node("Relu", ["z1"], ["r1"]),
            helper.make_node("Sub", ["t2", "s0"], ["z2"]),
            helper.make_node("Relu", ["z2"], ["r2"]),
            helper.make_node("Mul", ["r2", "k"], ["r2k"]),
            helper.make_node("Add", ["r1", "r2k"], ["y"]),
        ]
        graph = helper.make_graph(
            nodes,
            "kink",
            [x],
            [y],
            initializer=[numpy_helper.from_array(v, n) for n, v in consts.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
        self.session = create_session(model, provider="cpu")[0]
        self.runs = 0

    def map_head(self, make, total, shape, row=None):
        self.runs += total
        return self.session.run(None, {"a": make(0, total)})[0]


#: The finite-difference step on maps of ones (RMS 1), in units of the channel sum s.
_STEP = 4 * float(np.float32(REL_EPS))


@pytest.mark.parametrize("where", [0.025, 1 / 3, 0.7, -0.025, -1 / 3, -0.7])
def test_a_relu_kink_within_the_step_gives_the_slope_of_its_side(where):
    # y = relu(s - t1) with the kink at `where` steps from s = 4: the central difference
    # mixes both slopes; autograd (and the fallback) gives the slope on the side of s = 4.
    # A third of the step is where the curvature check e(h) - 4 e(h/2) reads zero.
    acts = np.ones((1, 2, 2, 2), np.float32)  # s = 4
    head = _KinkHead(t1=4.0 + where * _STEP)
    sums = channel_gradient_sums(head, acts, np.array([0]))
    expected = 0.0 if where > 0 else 4.0  # dy/dt of relu(4 + 4t - t1)
    np.testing.assert_allclose(sums[0], [expected, 0.0], atol=1e-3)


def test_kinks_on_both_sides_of_the_step_are_refined():
    # Kinks at +-0.15 steps with different slopes beyond them: no side is straight and
    # the central difference is 0.85 * (4 - 4 * 0.5) / 2 off; a step 10 times smaller
    # puts both kinks outside it, where the slope is 0.
    acts = np.ones((1, 2, 2, 2), np.float32)
    head = _KinkHead(t1=4.0 + 0.15 * _STEP, t2=4.0 - 0.15 * _STEP, slope2=0.5)
    plain = channel_gradient_sums(head, acts, np.array([0]), refinements=0)
    refined = channel_gradient_sums(head, acts, np.array([0]))
    assert abs(plain[0, 0]) > 0.1  # the kinks were crossed: the plain estimate is off
    np.testing.assert_allclose(refined[0], [0.0, 0.0], atol=1e-3)


def test_gradcam_is_the_weighted_channel_sum_after_relu():
    built, runner = _runner(head="gap_gemm")
    acts, logits = runner.run(built.random_input(seed=4))
    targets = np.argmax(logits, axis=1)
    gemm = _gemms(built.model)[0]
    w = _weights(built.model)[gemm.input[1]]
    h, wd = acts.shape[2:]
    expected = np.maximum(np.einsum("nc,nchw->nhw", w[targets] / (h * wd), acts), 0)
    got = GradCAM(runner)(acts, targets)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * expected.max())


def test_head_runs_are_chunked(monkeypatch):
    import onnx_sp2ps.runtime as runtime

    built, runner = _runner(head="gap_gemm")
    acts, logits = runner.run(built.random_input(seed=5))
    targets = np.argmax(logits, axis=1)
    whole = channel_gradient_sums(runner, acts, targets)
    calls = []
    original = runner.run_head
    monkeypatch.setattr(
        runner, "run_head", lambda a, rows=None: calls.append(len(a)) or original(a, rows)
    )
    per_map = acts[0].nbytes
    monkeypatch.setattr(runtime, "HEAD_CHUNK_BYTES", per_map * 5)
    chunked = channel_gradient_sums(runner, acts, targets)
    assert max(calls) <= 5 and len(calls) > 2
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


def test_eigencam_is_the_first_principal_component_with_a_positive_sign():
    rng = np.random.default_rng(0)
    h, w, c = 6, 7, 5
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-((yy - 2) ** 2 + (xx - 4) ** 2) / 3.0)
    loads = rng.uniform(0.5, 2.0, size=c)
    acts = (loads[:, None, None] * blob[None] + 0.01 * rng.normal(size=(c, h, w)))[None]
    raw = EigenCAM(None).compute_raw(acts.astype(np.float32), np.array([0]))
    assert np.corrcoef(raw[0].ravel(), blob.ravel())[0, 1] > 0.99
    flipped = EigenCAM(None).compute_raw(-acts.astype(np.float32) + 5, np.array([0]))
    # Sign follows the mean activation map, whatever the SVD returns.
    mean_map = (-acts[0] + 5).mean(axis=0)
    assert np.corrcoef(flipped[0].ravel(), mean_map.ravel())[0, 1] > 0


@pytest.mark.parametrize(
    "shape,size", [((7, 7), (224, 224)), ((8, 8), (64, 64)), ((5, 9), (40, 27)), ((1, 1), (4, 4))]
)
def test_upsampling_matches_half_pixel_bilinear(shape, size):
    rng = np.random.default_rng(1)
    maps = rng.random((3,) + shape).astype(np.float32)
    got = upsample_bilinear(maps, size)
    zoom = (size[0] / shape[0], size[1] / shape[1])
    expected = np.stack(
        [
            ndimage.zoom(m.astype(np.float64), zoom, order=1, grid_mode=True, mode="nearest")
            for m in maps
        ]
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bilinear_matrix_rows_sum_to_one():
    m = bilinear_matrix(50, 7)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    with pytest.raises(UsageError):
        bilinear_matrix(0, 3)


def test_normalise_maps_scales_to_unit_range_and_zeroes_flat_maps():
    maps = np.stack(
        [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.full((3, 4), 2.5, np.float32),
            np.zeros((3, 4), np.float32),
            np.full((3, 4), np.nan, np.float32),
        ]
    )
    out, flat = normalise_maps(maps)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    np.testing.assert_allclose(out[0], maps[0] / 11.0, rtol=1e-6)
    assert (out[1] == 0).all() and (out[2] == 0).all()
    assert flat.tolist() == [False, True, True, False]
    assert np.isnan(out[3]).all()


def test_relu_keeps_nan_visible():
    out = relu(np.array([[[-1.0, 2.0, np.nan]]], dtype=np.float32))
    assert out[0, 0, 0] == 0 and out[0, 0, 1] == 2 and np.isnan(out[0, 0, 2])


def test_cam_validates_its_arguments():
    cam = EigenCAM(None)
    with pytest.raises(UsageError):
        cam(np.zeros((2, 3, 4), np.float32), np.zeros(2))
    with pytest.raises(UsageError):
        cam(np.zeros((2, 3, 4, 4), np.float32), np.zeros(3))
    with pytest.raises(UsageError, match="gradcam"):
        get_method("nope")


@pytest.mark.parametrize("positions,channels", [(49, 512), (64, 16)])
def test_first_component_from_the_gram_matrix_equals_the_svd(positions, channels):
    from onnx_sp2ps.cams.eigencam import _first_component_projection

    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, positions, channels))
    x -= x.mean(axis=1, keepdims=True)
    got = _first_component_projection(x)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    want = np.einsum("npc,nc->np", x, vt[:, 0, :])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g * np.sign(g @ w), w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("stem", ["fc_original", "fc_l1_60"])
def test_finite_difference_weights_of_relu_mlp_heads_match_autograd(stem, samples):
    # The fallback called directly on the sample Flatten -> Gemm -> Relu -> Gemm heads
    # (kinks near many channels), against torch autograd's Grad-CAM weights. Measured:
    # <= 1.9e-4 of the largest weight (the one-sided kink refinement gave 7.9e-4).
    from onnx_sp2ps.data import InputSpec, Preprocess, open_images

    from conftest import FIXTURES

    ref = np.load(FIXTURES / f"gradcam_{stem}.npz")
    runner = ModelRunner(prepare_model(samples / f"{stem}.onnx"), provider="cpu")
    images = open_images(
        samples / "images", spec=InputSpec("NCHW", 3, 64, 64), preprocess=Preprocess(preset="unit")
    )
    acts = np.concatenate([runner.run(batch.inputs)[0] for batch in images.iter_batches(25)])
    weights = channel_gradient_sums(runner, acts, ref["targets"]) / acts[0, 0].size
    err = np.abs(weights - ref["weights"]) / np.abs(ref["weights"]).max(axis=1, keepdims=True)
    assert err.max() < 5e-4, f"{stem}: max relative weight error {err.max():.2e}"

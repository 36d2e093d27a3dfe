"""Every CAM method against an independent computation on a GAP + linear head.

For y = W mean_ij(A) + b the gradient is W[c] / (h w) at every position, so each method
has a closed form in W, b and A alone; Score-CAM is checked with scipy's aligned-corner
zoom and a plain onnxruntime session on the unmodified model.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from scipy import ndimage

from onnx_sp2ps.cams import METHODS, make_cam
from onnx_sp2ps.errors import ModelError, UsageError
from onnx_sp2ps.model import linear_classifier_weights, prepare_model
from onnx_sp2ps.runtime import ModelRunner, create_session

from onnx_builders import build_cnn


@pytest.fixture(scope="module", params=["NCHW", "NHWC"])
def setup(request):
    built = build_cnn(head="gap_gemm", layout=request.param, num_classes=6, seed=3)
    prepared = prepare_model(built.model)
    runner = ModelRunner(prepared, provider="cpu")
    x = built.random_input(seed=7)
    acts, logits = runner.run(x)
    gemm = next(n for n in built.model.graph.node if n.op_type == "Gemm")
    inits = {t.name: numpy_helper.to_array(t) for t in built.model.graph.initializer}
    w, b = inits[gemm.input[1]].astype(np.float64), inits[gemm.input[2]].astype(np.float64)
    targets = np.argmax(logits, axis=1)
    return built, runner, x, acts.astype(np.float64), targets, w, b


def relu(x):
    return np.maximum(x, 0)


def closed_form(method, acts, targets, w, b):
    n, c, h, wd = acts.shape
    g = (w[targets] / (h * wd))[:, :, None, None] * np.ones_like(acts)  # dy/dA
    weighted = lambda alpha: np.einsum("nc,nchw->nhw", alpha, acts)  # noqa: E731
    if method in ("gradcam", "xgradcam"):
        return relu(weighted(g.mean(axis=(2, 3))))
    if method == "hirescam":
        return relu((g * acts).sum(axis=1))
    if method == "layercam":
        return relu((relu(g) * acts).sum(axis=1))
    if method == "cam":
        return relu(weighted(w[targets]))
    if method == "gradcam++":
        s = acts.sum(axis=(2, 3))[:, :, None, None]
        aij = np.where(g != 0, g**2 / (2 * g**2 + s * g**3 + 1e-6), 0)
        return relu(weighted((relu(g) * aij).sum(axis=(2, 3))))
    if method == "ablationcam":
        y = np.einsum("nc,nc->n", w[targets], acts.mean(axis=(2, 3))) + b[targets]
        drop = w[targets] * acts.mean(axis=(2, 3))  # y - y_k when channel k is zeroed
        return relu(weighted(drop / y[:, None]))
    if method == "reciprocam":
        cells = acts.reshape(n, c, h * wd) / (h * wd)  # GAP of a one-cell mosaic
        logits = np.einsum("kc,ncp->npk", w, cells) + b
        p = np.exp(logits - logits.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        return p[np.arange(n), :, targets].reshape(n, h, wd)
    raise KeyError(method)


CLOSED = [
    "gradcam",
    "xgradcam",
    "hirescam",
    "layercam",
    "cam",
    "gradcam++",
    "ablationcam",
    "reciprocam",
]


@pytest.mark.parametrize("method", CLOSED)
def test_method_equals_its_closed_form(setup, method):
    _, runner, x, acts, targets, w, b = setup
    got = make_cam(method, runner)(acts.astype(np.float32), targets, x)
    want = closed_form(method, acts, targets, w, b)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_scorecam_matches_masked_forward_passes(setup):
    built, runner, x, acts, targets, _, _ = setup
    session = create_session(built.model, provider="cpu")[0]
    nhwc = built.layout == "NHWC"
    h_in, w_in = x.shape[1:3] if nhwc else x.shape[2:4]
    c, h, wd = acts.shape[1:]
    got = make_cam("scorecam", runner)(acts.astype(np.float32), targets, x)
    for i in range(len(x)):
        ups = np.stack(
            [ndimage.zoom(a, (h_in / h, w_in / wd), order=1, grid_mode=False) for a in acts[i]]
        )  # align_corners=True resampling
        lo, hi = ups.min(axis=(1, 2), keepdims=True), ups.max(axis=(1, 2), keepdims=True)
        masks = (ups - lo) / (hi - lo + 1e-8)
        masked = x[i][None] * (masks[:, :, :, None] if nhwc else masks[:, None])
        out = session.run(None, {built.input_name: masked.astype(np.float32)})[0]
        scores = out[:, targets[i]].astype(np.float64)
        alpha = np.exp(scores - scores.max())
        alpha /= alpha.sum()
        want = relu(np.einsum("c,chw->hw", alpha, acts[i]))
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_scorecam_channel_subset_uses_the_most_active_channels(setup):
    _, runner, x, acts, targets, _, _ = setup
    cam = make_cam("scorecam", runner, scorecam_channels=3)
    weights = cam.get_cam_weights(acts.astype(np.float32), targets, x)
    for i in range(len(x)):
        top = set(np.argsort(-acts[i].mean(axis=(1, 2)))[:3])
        assert set(np.nonzero(weights[i])[0]) <= top
        assert weights[i].sum() == pytest.approx(1.0)


def test_gradient_methods_fall_back_to_position_differences(setup, monkeypatch):
    _, runner, x, acts, targets, w, b = setup
    monkeypatch.setattr(type(runner), "has_exact_gradient", property(lambda self: False))
    for method in ("hirescam", "layercam", "gradcam++"):
        got = make_cam(method, runner)(acts.astype(np.float32), targets, x)
        want = closed_form(method, acts, targets, w, b)
        np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3 * np.abs(want).max())


def test_classic_cam_refuses_heads_without_a_single_linear_layer():
    built = build_cnn(head="flatten_mlp")
    with pytest.raises(ModelError, match="gradcam"):
        linear_classifier_weights(prepare_model(built.model).head_model)


@pytest.mark.parametrize("head", ["reducemean_matmul", "gap_reshape_matmul", "conv1x1_gap"])
def test_classic_cam_reads_matmul_heads_or_refuses(head):
    built = build_cnn(head=head)
    head_model = prepare_model(built.model).head_model
    if head == "conv1x1_gap":
        with pytest.raises(ModelError):
            linear_classifier_weights(head_model)
    else:
        assert linear_classifier_weights(head_model).shape == (built.num_classes, 16)


def test_registry_lists_every_method_and_options_are_checked():
    assert set(METHODS) == {
        "gradcam",
        "gradcam++",
        "xgradcam",
        "hirescam",
        "layercam",
        "ablationcam",
        "reciprocam",
        "scorecam",
        "eigencam",
        "cam",
    }
    runner = ModelRunner(prepare_model(build_cnn().model), provider="cpu")
    with pytest.raises(UsageError, match="scorecam"):
        make_cam("gradcam", runner, scorecam_channels=4)
    with pytest.raises(UsageError):
        make_cam("scorecam", runner, scorecam_channels=0)
    with pytest.raises(UsageError, match="inputs"):
        make_cam("scorecam", runner)(np.zeros((1, 16, 8, 8), np.float32), np.zeros(1))

"""Every CAM method against independent references (pytorch-grad-cam and torch autograd).

The fixtures ``tests/fixtures/cams_*.npz`` are made by ``scripts/make_reference_cams.py``
(run at the end of ``scripts/build_sample_models.py``): a torch interpreter of each sample
ONNX graph, pytorch-grad-cam's own classes for Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM,
LayerCAM, Ablation-CAM, Score-CAM and Eigen-CAM (the raw map at feature resolution:
``max(get_cam_image(...), 0)``), an independent torch ReciproCAM, and autograd gradients.
No torch is needed here.

Maps are compared per image at feature resolution: Pearson correlation >= 0.99 and values
within 1e-4 of the map's maximum; a reference map that is all zero (the method's map is
<= 0 everywhere, so the library's ReLU leaves nothing) has no correlation: ours must then
be all (near) zero too (no sample image is in that case today; the branch is a guard).
Note: on the GAP heads dy/dA is constant over positions, so Grad-CAM, XGrad-CAM and
HiResCAM give the same map there (and Grad-CAM++ ~ LayerCAM); the fc heads (Flatten ->
Linear -> ReLU -> Linear) tell them apart.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from onnx_sp2ps.cams import make_cam
from onnx_sp2ps.data import InputSpec, Preprocess, open_images
from onnx_sp2ps.model import prepare_model
from onnx_sp2ps.runtime import ModelRunner

from conftest import FIXTURES, check_maps, pearson

STEMS = ["gap_original", "gap_l1_60", "fc_original", "fc_l1_60"]
#: onnx-sp2ps method name -> fixture key suffix (``raw_<suffix>``).
LIBRARY_METHODS = {
    "gradcam": "gradcam",
    "gradcam++": "gradcampp",
    "xgradcam": "xgradcam",
    "hirescam": "hirescam",
    "layercam": "layercam",
    "ablationcam": "ablationcam",
    "scorecam": "scorecam",
}
MIN_PEARSON = 0.99
#: Values too, not only the pattern (Pearson is blind to a per-image factor, as Ablation-
#: CAM's 1/y_c): |ours - ref| <= VALUE_RTOL * max|ref| per image.  Measured <= 2.3e-5.
VALUE_RTOL = 1e-4
#: An all-zero reference map: ours may not exceed this fraction of the largest reference
#: value of the same method and model.
ZERO_TOL = 1e-5
GRAD_RTOL = 1e-4
_check_maps = functools.partial(
    check_maps, min_pearson=MIN_PEARSON, value_rtol=VALUE_RTOL, zero_tol=ZERO_TOL
)


@pytest.fixture(scope="module", params=STEMS)
def model(request, samples):
    stem = request.param
    path = FIXTURES / f"cams_{stem}.npz"
    if not path.exists():
        pytest.fail(f"{path.name} missing: run scripts/make_reference_cams.py")
    ref = dict(np.load(path))
    images = open_images(
        samples / "images", spec=InputSpec("NCHW", 3, 64, 64), preprocess=Preprocess(preset="unit")
    )
    x = np.concatenate([b.inputs for b in images.iter_batches(50)])
    runner = ModelRunner(prepare_model(samples / f"{stem}.onnx"), provider="cpu")
    acts, logits = runner.run(x)
    return dict(
        stem=stem,
        ref=ref,
        paths=list(images.paths),
        x=x,
        runner=runner,
        acts=acts,
        logits=logits,
        targets=ref["targets"],
    )


def test_same_images_logits_and_targets(model):
    ref = model["ref"]
    assert model["paths"] == [str(p) for p in ref["paths"]]
    np.testing.assert_allclose(model["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    assert (np.argmax(model["logits"], axis=1) == ref["targets"]).all()
    assert model["acts"].shape[2:] == ref["raw_gradcam"].shape[1:]


@pytest.mark.parametrize("method", list(LIBRARY_METHODS))
def test_method_matches_pytorch_grad_cam(model, method):
    """Same definition as pytorch-grad-cam (README "CAM methods"): raw maps correlate."""
    # (Score-CAM: C full-model runs per image, 96 for gap_original; all 50 images ~1 s)
    raw = make_cam(method, model["runner"])(model["acts"], model["targets"], model["x"])
    ref = model["ref"][f"raw_{LIBRARY_METHODS[method]}"]
    _check_maps(raw, ref, model["paths"], f"{model['stem']} {method}")


def test_eigencam_matches_pytorch_grad_cam_up_to_documented_sign(model):
    """On purpose different from pytorch-grad-cam: the sign of the principal component.

    pytorch-grad-cam keeps whatever sign the SVD returns (``get_2d_projection``), so its
    map can be the negated projection; onnx-sp2ps fixes the sign so that the projection
    correlates positively with the centred mean activation map (README "CAM methods").
    Checked here: (1) the unclipped projections agree up to sign; (2) our map equals
    ReLU(s * P_lib) with s from that documented rule.
    """
    acts, ref = model["acts"], model["ref"]
    proj_ref = ref["eigen_projection"].astype(np.float64)
    cam = make_cam("eigencam", model["runner"])
    ours_signed = cam.compute_raw(acts, model["targets"])
    for i in range(len(acts)):
        r = pearson(ours_signed[i], proj_ref[i])
        assert abs(r) >= MIN_PEARSON, f"{model['paths'][i]}: |Pearson| {abs(r):.4f}"
    mean_map = acts.astype(np.float64).mean(axis=1)
    mean_map -= mean_map.mean(axis=(1, 2), keepdims=True)
    sign = np.where((proj_ref * mean_map).sum(axis=(1, 2)) < 0, -1.0, 1.0)
    documented = np.maximum(sign[:, None, None] * proj_ref, 0)
    _check_maps(
        cam(acts, model["targets"]),
        documented,
        model["paths"],
        f"{model['stem']} eigencam (sign fixed)",
    )


def test_reciprocam_matches_torch_reference(model):
    """Not in pytorch-grad-cam: against the fixture's independent torch ReciproCAM
    (single-cell mosaics, softmax probability of the target)."""
    raw = make_cam("reciprocam", model["runner"])(model["acts"], model["targets"], model["x"])
    ref = model["ref"]["raw_reciprocam"]
    _check_maps(raw, ref, model["paths"], f"{model['stem']} reciprocam")


def test_head_gradients_match_autograd(model):
    ref = model["ref"]
    n = len(ref["grads"])
    assert [str(p) for p in ref["grad_paths"]] == model["paths"][:n]
    grads = model["runner"].head_gradients(model["acts"][:n], model["targets"][:n])[1]
    assert grads.shape == ref["grads"].shape
    scale = np.abs(ref["grads"]).reshape(n, -1).max(axis=1)
    err = np.abs(grads - ref["grads"]).reshape(n, -1).max(axis=1) / scale
    assert (err <= GRAD_RTOL).all(), f"{model['stem']}: max relative error {err.max():.2e}"

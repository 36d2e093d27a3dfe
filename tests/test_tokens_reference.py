"""Token (vision-transformer) models against PyTorch / pytorch-grad-cam references.

The models ``tests/fixtures/tokens/*.onnx`` and the references ``ref_*.npz`` are made by
``scripts/make_token_models.py`` (timm models with random, non-degenerate weights; float64
torch; pytorch-grad-cam 1.5.7 with the usual ViT ``reshape_transform``: prefix tokens
dropped, (N, h, w, D) -> (N, D, h, w)); see tests/fixtures/tokens/README.md.  No torch here.

What a token model must give (the library's token support):

- detection picks the input of the last block's attention (``blocks[-1].norm1``'s output;
  LeViT: the last stage's second-to-last block output), the fixture's ``feature_tensor``,
  with ``spec.tokens.prefix`` prefix tokens (class, distillation, register tokens) and
  ``spec.tokens.grid`` = (h, w).  For the mean-pooled models (vit_avg, levit) the last
  block's output (``block_tensor``) is accepted as well: the references exist for both;
- ``ModelRunner.run`` gives the patch tokens of that tensor as (N, D, h, w) and logits
  that match torch (1e-4);
- Grad-CAM and Eigen-CAM raw maps at grid resolution correlate per image (Pearson >= 0.99)
  with pytorch-grad-cam's (Eigen-CAM up to the documented sign rule), for the originals
  and the 50 %-MLP-pruned copies (target: the original's top-1, the audit default);
- ``head_gradients`` equals autograd's d logit_target / d tokens (patch part) within 1e-4
  of each image's largest gradient;
- ``onnx-sp2ps audit`` of vit_cls against its pruned copy runs and scores.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from onnx_sp2ps.cams import EigenCAM, GradCAM
from onnx_sp2ps.data import InputSpec, Preprocess, open_images
from onnx_sp2ps.model import prepare_model
from onnx_sp2ps.runtime import ModelRunner

from conftest import FIXTURES, check_maps, pearson, run_cli

TOKENS = FIXTURES / "tokens"
ORIGINALS = ["vit_cls", "vit_avg", "deit_dist", "vit_reg", "levit"]
POOLED = {"vit_avg", "levit"}
#: ONNX file stem -> reference stem (vit_cls_dynamo: the same torch model as vit_cls,
#: exported by the dynamo exporter; its tensor names are ``dynamo_*`` in ref_vit_cls).
CASES = {
    **{m: m for m in ORIGINALS},
    **{f"{m}_pruned": f"{m}_pruned" for m in ORIGINALS},
    "vit_cls_dynamo": "vit_cls",
}
MIN_PEARSON = 0.99
LOGITS_TOL = 1e-4
GRAD_RTOL = 1e-4
#: An all-zero reference map (ReLU removed everything): ours may not exceed this fraction
#: of the largest reference value of the same model.
ZERO_TOL = 1e-5
_check_maps = functools.partial(check_maps, min_pearson=MIN_PEARSON, zero_tol=ZERO_TOL)


def _tokens_to_grid(tokens: np.ndarray, prefix: int, grid) -> np.ndarray:
    """(N, T, D) tokens -> (N, D, h, w): prefix dropped, as the references' transform."""
    h, w = (int(g) for g in grid)
    patches = tokens[:, prefix:, :]
    return patches.reshape(len(tokens), h, w, -1).transpose(0, 3, 1, 2)


def _names(stem: str, ref: dict) -> tuple[str, str]:
    """(feature_tensor, block_tensor) of the ONNX file ``stem``."""
    key = "dynamo_" if stem.endswith("_dynamo") else ""
    return str(ref[f"{key}feature_tensor"]), str(ref[f"{key}block_tensor"])


@pytest.fixture(scope="module")
def images():
    root = FIXTURES.parent.parent / "sample_models" / "images"
    data = open_images(
        root, spec=InputSpec("NCHW", 3, 64, 64), preprocess=Preprocess(preset="unit")
    )
    x = np.concatenate([b.inputs for b in data.iter_batches(50)])
    return list(data.paths), x


def _run(prepared, x):
    runner = ModelRunner(prepared, provider="cpu")
    acts, logits = runner.run(x)
    return runner, acts, logits


@pytest.fixture(scope="module", params=list(CASES))
def case(request, images):
    """The model with its norm1 tensor named (``feature_layer``): activations, gradients
    and the norm1 references, whatever detection would choose; ``detected()`` prepares
    and runs the model with detection, once."""
    stem = request.param
    path = TOKENS / f"ref_{CASES[stem]}.npz"
    if not path.exists():
        pytest.fail(f"{path.name} missing: run scripts/make_token_models.py")
    ref = dict(np.load(path))
    paths, x = images
    assert paths == [str(p) for p in ref["paths"]]
    feature, block = _names(stem, ref)
    out = dict(stem=stem, ref=ref, paths=paths, x=x, feature=feature, block=block)
    out["targets"] = ref["targets"]
    cache: dict = {}

    def detected():
        if not cache:
            prepared = prepare_model(TOKENS / f"{stem}.onnx")
            runner, acts, logits = _run(prepared, x)
            cache.update(prepared=prepared, runner=runner, acts=acts, logits=logits)
        return cache

    def forced():
        if "forced" not in cache:
            prepared = prepare_model(TOKENS / f"{stem}.onnx", feature_layer=feature)
            cache["forced"] = _run(prepared, x)
        return cache["forced"]

    out.update(detected=detected, forced=forced)
    return out


def _detected_suffix(case) -> str:
    """Reference key suffix of the tensor detection chose: '' (norm1) or '_block'."""
    return (
        "" if case["detected"]()["prepared"].spec.feature_map.name == case["feature"] else "_block"
    )


def _which(case, which: str):
    """(runner, activations, reference key suffix) of the forced or detected model."""
    if which == "forced":
        runner, acts, _ = case["forced"]()
        return runner, acts, ""
    det = case["detected"]()
    return det["runner"], det["acts"], _detected_suffix(case)


def test_detection_picks_the_token_feature_tensor(case):
    spec, ref = case["detected"]()["prepared"].spec, case["ref"]
    name = spec.feature_map.name
    base = case["stem"].removesuffix("_dynamo").removesuffix("_pruned")
    allowed = {case["feature"]} | ({case["block"]} if base in POOLED else set())
    assert name in allowed, f"{case['stem']}: detected {name!r}, expected one of {allowed}"
    tokens = spec.tokens
    assert tokens is not None, f"{case['stem']}: not detected as a token model"
    assert tokens.prefix == int(ref["prefix_tokens"])
    assert tuple(tokens.grid) == tuple(int(g) for g in ref["grid"])


@pytest.mark.parametrize("which", ["forced", "detected"])
def test_logits_match_torch(case, which):
    ref = case["ref"]
    logits = case["forced"]()[2] if which == "forced" else case["detected"]()["logits"]
    np.testing.assert_allclose(logits, ref["logits"], rtol=LOGITS_TOL, atol=LOGITS_TOL)
    if not case["stem"].endswith("_pruned"):
        assert (np.argmax(logits, axis=1) == ref["targets"]).all()
    if which == "detected":
        h, w = (int(g) for g in ref["grid"])
        acts = case["detected"]()["acts"]
        assert acts.shape[0] == len(case["x"]) and acts.shape[2:] == (h, w)


def test_activations_match_torch(case):
    """The named norm1 tensor's patch tokens, (N, D, h, w), against torch's (first 8)."""
    ref = case["ref"]
    h, w = (int(g) for g in ref["grid"])
    d = ref["acts"].shape[2]
    acts = case["forced"]()[1]
    assert acts.shape == (len(case["x"]), d, h, w)
    want = _tokens_to_grid(ref["acts"], int(ref["prefix_tokens"]), ref["grid"])
    n = len(want)
    scale = np.abs(want).max(axis=(1, 2, 3), keepdims=True)
    err = np.abs(acts[:n] - want) / scale
    assert err.max() <= 1e-4, f"{case['stem']}: activations differ by {err.max():.2e}"


@pytest.mark.parametrize("which", ["forced", "detected"])
def test_gradcam_matches_pytorch_grad_cam(case, which):
    runner, acts, suffix = _which(case, which)
    raw = GradCAM(runner)(acts, case["targets"])
    ref = case["ref"][f"raw_gradcam{suffix}"]
    _check_maps(raw, ref, case["paths"], f"{case['stem']} gradcam{suffix} ({which})")


@pytest.mark.parametrize("which", ["forced", "detected"])
def test_eigencam_matches_pytorch_grad_cam_up_to_documented_sign(case, which):
    """As tests/test_reference_methods.py: the projections agree up to sign; our map is
    ReLU(s * P_lib) with s making the projection correlate positively with the centred
    mean activation map."""
    runner, acts, suffix = _which(case, which)
    proj_ref = case["ref"][f"eigen_projection{suffix}"].astype(np.float64)
    cam = EigenCAM(runner)
    signed = cam.compute_raw(acts, case["targets"])
    for i in range(len(acts)):
        r = pearson(signed[i], proj_ref[i])
        assert abs(r) >= MIN_PEARSON, f"{case['stem']} {case['paths'][i]}: |Pearson| {abs(r):.4f}"
    mean_map = acts.astype(np.float64).mean(axis=1)
    mean_map -= mean_map.mean(axis=(1, 2), keepdims=True)
    sign = np.where((proj_ref * mean_map).sum(axis=(1, 2)) < 0, -1.0, 1.0)
    documented = np.maximum(sign[:, None, None] * proj_ref, 0)
    _check_maps(
        cam(acts, case["targets"]),
        documented,
        case["paths"],
        f"{case['stem']} eigencam{suffix} ({which}, sign fixed)",
    )


def test_exact_gradients_match_autograd(case):
    ref = case["ref"]
    n = len(ref["grads"])
    assert [str(p) for p in ref["grad_paths"]] == case["paths"][:n]
    runner, acts, _ = case["forced"]()
    logits, grads = runner.head_gradients(acts[:n], case["targets"][:n], rows=np.arange(n))
    np.testing.assert_allclose(logits, ref["logits"][:n], rtol=LOGITS_TOL, atol=LOGITS_TOL)
    want = _tokens_to_grid(ref["grads"], int(ref["prefix_tokens"]), ref["grid"])
    assert grads.shape == want.shape
    scale = np.abs(want).max(axis=(1, 2, 3), keepdims=True)
    err = np.abs(grads - want) / scale
    assert err.max() <= GRAD_RTOL, f"{case['stem']}: max relative gradient error {err.max():.2e}"


def test_cli_audit_of_a_token_model_scores(capsys, tmp_path):
    out = tmp_path / "audit"
    code, _, err = run_cli(
        capsys,
        "audit",
        TOKENS / "vit_cls.onnx",
        TOKENS / "vit_cls_pruned.onnx",
        "--images",
        FIXTURES.parent.parent / "sample_models" / "images",
        "--preprocess",
        "unit",
        "--out",
        out,
        "--overlays",
        "none",
        "-q",
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["scored"] == 50
    (cand,) = report["candidates"]
    assert np.isfinite(cand["sp2ps"]["mean"])
    assert 0.0 <= cand["sp2ps"]["mean"] <= 1.0

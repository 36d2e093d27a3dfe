"""onnx-sp2ps on random small CNNs (tests/random_cnn.py) against their numpy twins.

For each seed: detection finds the drawn feature map and logits; the activations, logits
and head gradients onnx-sp2ps computes equal the numpy forward pass and the analytic
gradient; and the Grad-CAM maps of ``compute_cams`` equal
``normalise(zoom(relu(sum_k mean(dy_c/dA_k) A_k)))`` computed in numpy/scipy (README,
"CAM methods" and "The score"). Heads with an op without a backward rule
(Abs; Softplus and Atan, smooth and curved, in the heads asked for by ``SMOOTH_CASES``) must
take the documented finite-difference path and still agree, to ``FD_RTOL``.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from onnx_sp2ps.cams.base import position_gradients
from onnx_sp2ps.cams.gradcam import channel_gradient_sums
from onnx_sp2ps.errors import UsageError
from onnx_sp2ps.model import analyse_model, prepare_model
from onnx_sp2ps.pipeline import compute_cams
from onnx_sp2ps.runtime import ModelRunner

from random_cnn import (
    ACTIVATIONS,
    HEADS,
    LAYOUTS,
    MLP_ACTIVATIONS,
    OPSETS,
    SMOOTH_HEADS,
    STYLES,
    WEIGHTS,
    random_cnn,
)

#: Seed 107 drew a Tanh head (Tanh had no backward rule then) on which the finite-difference
#: Grad-CAM once refined smooth channels into float32 noise (a map 6 % off); the
#: fallback head is now Abs (piecewise linear: central differences are exact off kinks).
SEEDS = (*range(30), 107)
#: Seeds 5 and 107 with a Softplus or Atan hidden layer: the finite-difference Grad-CAM
#: was 8 % and 3 % off there (a kink refinement that shrank the step into float32 noise);
#: 17, 21 and 23 gave the largest errors after the fix.
SMOOTH_CASES = [(seed, head) for head in SMOOTH_HEADS for seed in (5, 17, 21, 23, 107)]
CASES = [(seed, None) for seed in SEEDS] + SMOOTH_CASES
BATCH = 3
#: float32 onnxruntime against float64 numpy, relative to the largest value.
RTOL = 1e-4
#: Finite differences (Richardson-extrapolated, float32 head) against the analytic
#: gradient, relative to the largest value: measured <= 2.5e-4 (channel sums), 5e-4
#: (per position) and 4.4e-4 (normalised maps) over these seeds.
FD_RTOL = 1e-3


@lru_cache(maxsize=None)
def built(seed: int, head: str | None = None):
    net = random_cnn(seed, head=head)
    return net, prepare_model(net.built.model)


def assert_close(got, expected, *, rtol=RTOL, what=""):
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def reference_gradcam(net, images: np.ndarray, targets: np.ndarray):
    """(raw R before ReLU (N, h, w), CAM images (N, H, W)) from the numpy twin only."""
    acts, _ = net.reference.forward(images)
    alpha = net.reference.head_gradient(acts, targets).mean(axis=(2, 3))
    raw = np.einsum("nc,nchw->nhw", alpha, acts)
    shape = net.built.input_shape
    height, width = shape[2:] if net.built.layout == "NCHW" else shape[1:3]
    up = np.stack(
        [
            ndimage.zoom(
                np.maximum(r, 0.0),
                (height / r.shape[0], width / r.shape[1]),
                order=1,
                grid_mode=True,
                mode="nearest",
            )
            for r in raw
        ]
    )
    low = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - low
    maps = np.where(span > 0, (up - low) / np.where(span > 0, span, 1.0), 0.0)
    return raw, maps


def gradcam_of(seed: int, head: str | None, tmp_path):
    """(images, ModelMaps, info) of ``compute_cams`` Grad-CAM on the seed's test images."""
    net, prepared = built(seed, head)
    images = net.built.random_input(seed=seed + 1000, batch=BATCH)
    np.save(tmp_path / "x.npy", images)
    maps, info, _ = compute_cams(
        prepared, tmp_path / "x.npy", method="gradcam", provider="cpu", threads=1
    )
    return images, maps, info


def test_the_seeds_cover_every_form_the_generator_draws():
    nets = [built(seed)[0] for seed in SEEDS]
    drawn = Counter()
    for net in nets:
        c = net.config
        drawn.update(
            {
                ("head", net.built.head),
                ("style", c["style"]),
                ("layout", c["layout"]),
                ("weights", c["weights"]),
                ("act", c["act"]),
                ("final", c["final"]),
                ("opset", c["opset"]),
                ("depth", c["depth"]),
            }
        )
        drawn.update(("kernel", k) for k in c["kernels"])
        drawn.update(("stride", s) for s in c["strides"])
        drawn.update(("batch_norm", b) for b in c["batch_norm"])
        drawn.update({("square", c["size"][0] == c["size"][1])})
    expected = (
        [("head", h) for h in HEADS]
        + [("style", s) for s in STYLES]
        + [("layout", v) for v in LAYOUTS]
        + [("weights", w) for w in WEIGHTS]
        + [("act", a) for a in ACTIVATIONS]
        + [("final", "Softmax"), ("final", None)]
        + [("opset", o) for o in OPSETS]
        + [("depth", d) for d in (1, 2, 3, 4)]
        + [
            ("kernel", 1),
            ("kernel", 3),
            ("stride", 1),
            ("stride", 2),
            ("batch_norm", True),
            ("batch_norm", False),
            ("square", False),
        ]
    )
    assert [form for form in expected if not drawn[form]] == []


@pytest.mark.parametrize("seed", SEEDS)
def test_detection_finds_the_drawn_feature_map_and_logits(seed):
    net, prepared = built(seed)
    spec = analyse_model(net.built.model)
    found = (
        spec.input.name,
        spec.layout,
        spec.feature_map.name,
        spec.feature_layout,
        spec.logits.name,
        spec.activation,
        spec.num_classes,
    )
    assert found == (
        net.built.input_name,
        net.built.layout,
        net.built.feature_map,
        net.built.feature_layout,
        net.built.logits,
        net.built.activation,
        net.built.num_classes,
    ), net.description
    assert prepared.spec == spec
    assert ("Abs" in spec.head_ops) == (net.built.head == "flatten_abs_mlp")


@pytest.mark.parametrize("seed, head", CASES)
def test_runner_activations_logits_and_gradients_equal_the_numpy_twin(seed, head):
    net, prepared = built(seed, head)
    runner = ModelRunner(prepared, provider="cpu", threads=1)
    images = net.built.random_input(seed=seed, batch=BATCH)
    acts, logits = runner.run(images)
    ref_acts, ref_logits = net.reference.forward(images)
    assert acts.shape == ref_acts.shape  # NCHW whatever the model's layout
    assert_close(acts, ref_acts, what=f"activations, {net.description}")
    assert_close(logits, ref_logits, what=f"logits, {net.description}")
    assert_close(runner.run_head(acts), ref_logits, what=f"head, {net.description}")
    targets = np.random.default_rng(seed).integers(0, net.built.num_classes, BATCH)
    # The twin's head at onnxruntime's activations, so a kink in the trunk cannot matter.
    expected = net.reference.head_gradient(acts, targets)
    if net.exact_gradient:
        assert runner.gradient_path == "exact", runner.gradient_note
        head_logits, grads = runner.head_gradients(acts.copy(), targets)  # head graph
        assert_close(head_logits, ref_logits, what=f"gradient-graph logits, {net.description}")
        assert_close(grads, expected, what=f"head gradient, {net.description}")
        fused_acts, _ = runner.run(images, targets=targets)  # fused into the model run
        assert_close(
            runner.head_gradients(fused_acts, targets)[1],
            net.reference.head_gradient(fused_acts, targets),
            what=f"fused gradient, {net.description}",
        )
    else:  # documented fallback: no backward rule for Abs/Softplus/Atan -> differences
        assert runner.gradient_path == "finite-difference"
        assert MLP_ACTIVATIONS[net.built.head][0] in runner.gradient_note
        with pytest.raises(UsageError, match="no exact gradient"):
            runner.head_gradients(acts, targets)
        assert_close(
            position_gradients(runner, acts, targets),
            expected,
            rtol=FD_RTOL,
            what=f"finite-difference gradient, {net.description}",
        )
        assert_close(
            channel_gradient_sums(runner, acts, targets),
            expected.sum(axis=(2, 3)),
            rtol=FD_RTOL,
            what=f"finite-difference channel sums, {net.description}",
        )


@pytest.mark.parametrize("seed, head", CASES)
def test_gradcam_maps_equal_the_numpy_twin(seed, head, tmp_path):
    net = built(seed, head)[0]
    images, maps, info = gradcam_of(seed, head, tmp_path)
    assert info.gradient == ("exact" if net.exact_gradient else "finite-difference")
    np.testing.assert_array_equal(maps.targets, np.argmax(maps.logits, axis=1))
    assert_close(maps.logits, net.reference.forward(images)[1], what=net.description)
    raw, expected = reference_gradcam(net, images, maps.targets)
    rtol = RTOL if net.exact_gradient else FD_RTOL
    scale = np.abs(raw).max(axis=(1, 2))
    compared = 0
    for i in range(BATCH):
        what = f"image {i}, {net.description}"
        np.testing.assert_allclose(
            maps.raw[i], np.maximum(raw[i], 0), rtol=rtol, atol=rtol * scale[i], err_msg=what
        )
        assert maps.maps[i].shape == expected[i].shape
        span = raw[i].max() - max(raw[i].min(), 0)
        if span > 0.05 * scale[i]:  # else normalising would only magnify rounding
            assert not maps.flat[i], what
            # Normalising divides the raw map's error (rtol * scale) by its span.
            np.testing.assert_allclose(
                maps.maps[i], expected[i], rtol=0, atol=2 * rtol * scale[i] / span, err_msg=what
            )
            compared += 1
    assert compared, f"every map is nearly flat, pick another seed: {net.description}"


@pytest.mark.parametrize("seed, head", SMOOTH_CASES)
def test_finite_difference_maps_of_smooth_heads_are_within_1e_3(seed, head, tmp_path):
    # Normalised maps in [0, 1]: an absolute bound, on every image (flat-ish ones too).
    net = built(seed, head)[0]
    images, maps, info = gradcam_of(seed, head, tmp_path)
    assert info.gradient == "finite-difference"
    _, expected = reference_gradcam(net, images, maps.targets)
    assert np.abs(maps.maps - expected).max() < 1e-3, net.description

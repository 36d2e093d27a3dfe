"""Property-based tests (hypothesis) of the similarity functions and of preprocessing.

Similarity (onnx_sp2ps.similarity): bounds, symmetry, identity, the closed forms for flat
(constant) maps, non-finite pairs scoring 0, batch results equal to one-pair results, shift
and scale behaviour of the spectral term, and the summary's order statistics.

Preprocessing (onnx_sp2ps.data.preprocess): images of any size and colour mode give arrays
of exactly the declared shape, float32, C-contiguous and finite; NHWC is the transpose of
NCHW; values stay inside the range the preset maps 0..255 to.

Fixed examples of the same functions live in test_similarity.py and test_data.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from onnx_sp2ps import data
from onnx_sp2ps.data import InputSpec, Preprocess, display_image, parse_size, preprocess_image
from onnx_sp2ps.errors import MismatchError
from onnx_sp2ps.similarity import (
    PairScores,
    harmonic_mean,
    score_pairs,
    spectral_similarity,
    ssim,
    summarise_scores,
)

FEW = settings(max_examples=25, deadline=None)

# --------------------------------------------------------------------------- strategies

unit = st.floats(0, 1)
#: Similarities as they occur: 0 or not so small that 2 s f underflows.
similarities = st.one_of(st.just(0.0), st.floats(1e-100, 1))
shapes = st.tuples(st.integers(1, 3), st.integers(11, 16), st.integers(11, 16))


def map_stacks(shape):
    return arrays(np.float64, shape, elements=unit)


map_pairs = shapes.flatmap(lambda shape: st.tuples(map_stacks(shape), map_stacks(shape)))


@contextmanager
def _no_warnings():
    """Any warning (a NaN or a division by zero) inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------- similarity


@FEW
@given(map_pairs)
def test_scores_are_finite_and_within_zero_and_one(pair):
    scores = score_pairs(*pair)
    for values in (scores.spatial, scores.spectral, scores.score):
        assert np.isfinite(values).all()
        assert ((values >= 0) & (values <= 1)).all()
    raw = ssim(*pair)
    assert ((raw >= -1 - 1e-12) & (raw <= 1 + 1e-12)).all()
    np.testing.assert_array_equal(scores.spatial, np.clip(raw, 0, 1))
    assert scores.finite.all()


@FEW
@given(map_pairs)
def test_every_term_is_symmetric(pair):
    maps_a, maps_b = pair
    np.testing.assert_allclose(ssim(maps_a, maps_b), ssim(maps_b, maps_a), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        spectral_similarity(maps_a, maps_b), spectral_similarity(maps_b, maps_a), rtol=0, atol=1e-12
    )
    forward, backward = score_pairs(maps_a, maps_b), score_pairs(maps_b, maps_a)
    np.testing.assert_allclose(forward.score, backward.score, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(forward.flat_a, backward.flat_b)


@FEW
@given(shapes.flatmap(map_stacks))
def test_identical_maps_score_one(maps):
    scores = score_pairs(maps, maps.copy())
    np.testing.assert_array_equal(scores.spatial, 1.0)
    np.testing.assert_array_equal(scores.spectral, 1.0)
    np.testing.assert_array_equal(scores.score, 1.0)


@FEW
@given(shapes, st.lists(unit, min_size=3, max_size=3), st.lists(unit, min_size=3, max_size=3))
def test_flat_maps_follow_the_closed_forms(shape, levels_a, levels_b):
    # Constant maps: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (both variances 0), and the
    # spectra are DC only, so F = 1 - |a - b| / (a + b), and 1 for two zero maps.
    n, height, width = shape
    a = np.asarray(levels_a[:n])
    b = np.asarray(levels_b[:n])
    maps_a = np.broadcast_to(a[:, None, None], shape).copy()
    maps_b = np.broadcast_to(b[:, None, None], shape).copy()
    with _no_warnings():
        scores = score_pairs(maps_a, maps_b)
    c1 = 0.01**2
    np.testing.assert_allclose(
        ssim(maps_a, maps_b), (2 * a * b + c1) / (a**2 + b**2 + c1), rtol=0, atol=1e-9
    )
    total = a + b
    expected_f = np.where(total > 0, 1 - np.abs(a - b) / np.where(total > 0, total, 1), 1.0)
    np.testing.assert_allclose(scores.spectral, expected_f, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(scores.flat_a, True)
    np.testing.assert_array_equal(scores.flat_b, True)
    zero_vs_nonzero = (a == 0) != (b == 0)
    np.testing.assert_array_equal(scores.score[zero_vs_nonzero], 0.0)


@FEW
@given(shapes.flatmap(map_stacks).filter(lambda m: (m.max(axis=(1, 2)) > 0).all()))
def test_an_all_zero_map_against_a_non_zero_map_scores_zero(maps):
    zeros = np.zeros_like(maps)
    for scores in (score_pairs(zeros, maps), score_pairs(maps, zeros)):
        np.testing.assert_array_equal(scores.spectral, 0.0)
        np.testing.assert_array_equal(scores.score, 0.0)
    np.testing.assert_array_equal(score_pairs(zeros, maps).flat_a, True)


@FEW
@given(
    map_pairs,
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.data(),
)
def test_a_non_finite_pair_scores_zero_and_leaves_the_others_alone(pair, bad, draw):
    maps_a, maps_b = (m.copy() for m in pair)
    n, height, width = maps_a.shape
    clean = score_pairs(maps_a, maps_b)
    i = draw.draw(st.integers(0, n - 1), label="pair")
    y = draw.draw(st.integers(0, height - 1), label="row")
    x = draw.draw(st.integers(0, width - 1), label="column")
    side = draw.draw(st.sampled_from([maps_a, maps_b]), label="side")
    side[i, y, x] = bad
    with _no_warnings():
        scores = score_pairs(maps_a, maps_b)
    others = np.arange(n) != i
    assert not scores.finite[i] and scores.finite[others].all()
    for name in ("spatial", "spectral", "score"):
        assert getattr(scores, name)[i] == 0.0
        np.testing.assert_array_equal(getattr(scores, name)[others], getattr(clean, name)[others])
    assert not scores.flat_a[i] and not scores.flat_b[i]
    with np.errstate(invalid="ignore"):
        assert np.isnan(ssim(maps_a, maps_b)[i])
    assert summarise_scores(scores, np.zeros(n, dtype=int)).non_finite == 1


@FEW
@given(map_pairs)
def test_a_batch_scores_as_each_pair_alone(pair):
    maps_a, maps_b = pair
    batch = score_pairs(maps_a, maps_b)
    for i in range(len(maps_a)):
        alone = score_pairs(maps_a[i : i + 1], maps_b[i : i + 1])
        for name in ("spatial", "spectral", "score", "finite", "flat_a", "flat_b"):
            # SSIM's windows are banded matrix products over stacked maps: BLAS blocks a
            # stack of N maps differently from one, so sums may round apart by a few
            # hundred ulp (4e-14 seen); far below the six decimals a gate prints.
            np.testing.assert_allclose(
                getattr(batch, name)[i : i + 1],
                getattr(alone, name),
                rtol=0,
                atol=1e-12,
                err_msg=name,
            )


@FEW
@given(shapes.flatmap(map_stacks), st.integers(0, 15), st.integers(0, 15))
def test_spectral_similarity_ignores_circular_shifts(maps, dy, dx):
    shifted = np.roll(maps, shift=(dy, dx), axis=(1, 2))
    np.testing.assert_allclose(spectral_similarity(maps, shifted), 1.0, rtol=0, atol=1e-9)


@FEW
@given(
    shapes.flatmap(map_stacks).filter(lambda m: (m.max(axis=(1, 2)) > 1e-3).all()),
    st.floats(0.01, 1.0),
)
def test_spectral_similarity_of_a_scaled_map_is_two_min_over_sum(maps, k):
    # A(k m) = k A(m), so F = 1 - (1 - k) / (1 + k) = 2k / (1 + k) for k <= 1.
    np.testing.assert_allclose(
        spectral_similarity(maps, k * maps), 2 * k / (1 + k), rtol=0, atol=1e-9
    )


@FEW
@given(
    arrays(np.float64, st.integers(0, 8), elements=similarities).flatmap(
        lambda s: st.tuples(st.just(s), arrays(np.float64, s.shape, elements=similarities))
    )
)
def test_harmonic_mean_lies_between_min_and_arithmetic_mean(pair):
    s, f = pair
    with _no_warnings():
        h = harmonic_mean(s, f)
    assert h.shape == s.shape and h.dtype == np.float64
    np.testing.assert_array_equal(h, harmonic_mean(f, s))
    assert (h >= np.minimum(s, f) - 1e-12).all()
    assert (h <= (s + f) / 2 + 1e-12).all()
    np.testing.assert_array_equal(h[(s == 0) | (f == 0)], 0.0)
    np.testing.assert_allclose(harmonic_mean(s, s), s, rtol=1e-15, atol=0)


@FEW
@given(
    arrays(np.float64, st.integers(1, 12), elements=unit).flatmap(
        lambda score: st.tuples(
            st.just(score), arrays(np.int64, score.shape, elements=st.integers(0, 3)), unit
        )
    )
)
def test_summary_statistics_are_ordered_and_bounded(drawn):
    score, classes, threshold = drawn
    n = len(score)
    flags = np.zeros(n, dtype=bool)
    scores = PairScores(
        spatial=score, spectral=score, score=score, finite=~flags, flat_a=flags, flat_b=flags
    )
    summary = summarise_scores(scores, classes, threshold=threshold)
    tol = 1e-12
    assert summary.minimum - tol <= summary.p5 <= summary.median + tol
    assert summary.median <= score.max() + tol
    assert summary.minimum - tol <= summary.mean <= score.max() + tol
    assert summary.minimum - tol <= summary.class_balanced_mean <= score.max() + tol
    assert summary.share_below == pytest.approx(np.mean(score < threshold))
    one_class = summarise_scores(scores, np.zeros(n, dtype=np.int64))
    assert one_class.class_balanced_mean == pytest.approx(one_class.mean)


# --------------------------------------------------------------------------- preprocessing

#: Modes an image folder may hold, with the bytes per pixel of Image.frombytes (random
#: bytes: "F" images hold NaN, infinities and huge values too).
IMAGE_MODES = {
    "L": 1,
    "RGB": 3,
    "RGBA": 4,
    "P": 1,
    "I;16": 2,
    "I": 4,
    "F": 4,
    "CMYK": 4,
    "LA": 2,
    "1": None,
}


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8) * 255).convert(
            "1"
        )
    raw = rng.integers(0, 256, width * height * IMAGE_MODES[mode], dtype=np.uint8).tobytes()
    image = Image.frombytes(mode, (width, height), raw)
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


images = st.builds(
    random_image,
    mode=st.sampled_from(sorted(IMAGE_MODES)),
    width=st.integers(1, 20),
    height=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)


@st.composite
def preprocessings(draw):
    channels = draw(st.sampled_from([1, 3]))
    size = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    preset = draw(st.sampled_from(sorted(data.PRESETS)))
    # The ImageNet preset has 3 means and stds: a grey model needs one of each.
    grey_imagenet = channels == 1 and preset == "imagenet"
    # A model with a dynamic size takes the size asked; one with a static size its own.
    dynamic = draw(st.booleans())
    pre = Preprocess(
        preset=preset,
        size=size if dynamic else None,
        center_crop=draw(st.booleans()),
        bgr=channels == 3 and draw(st.booleans()),
        mean=(0.449,) if grey_imagenet else None,
        std=(0.226,) if grey_imagenet else None,
    )
    spec = InputSpec("NCHW", channels, None if dynamic else size[0], None if dynamic else size[1])
    return pre, spec, size


def _with_layout(pre: Preprocess, layout: str) -> Preprocess:
    return dataclasses.replace(pre, layout=layout)


@FEW
@given(images, preprocessings())
def test_preprocessing_gives_the_declared_shape_dtype_and_layout(image, setup):
    pre, spec, (height, width) = setup
    nchw = preprocess_image(image, _with_layout(pre, "NCHW").resolved(spec))
    nhwc = preprocess_image(image, _with_layout(pre, "NHWC").resolved(spec))
    channels = spec.channels
    assert nchw.shape == (channels, height, width)
    assert nhwc.shape == (height, width, channels)
    for x in (nchw, nhwc):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert np.isfinite(x).all()
    np.testing.assert_array_equal(nhwc, nchw.transpose(1, 2, 0))
    # Every value is the image of a pixel level 0..255 under (p * scale - mean) / std.
    resolved = pre.resolved(spec)
    mean = np.asarray(resolved.mean)[:, None, None]
    std = np.asarray(resolved.std)[:, None, None]
    ends = [(level * resolved.scale - mean) / std for level in (0.0, 255.0)]
    low, high = np.minimum(*ends), np.maximum(*ends)
    if resolved.bgr:
        low, high = low[::-1], high[::-1]
    assert (nchw >= low - 1e-5).all() and (nchw <= high + 1e-5).all()
    shown = display_image(image, resolved)
    assert shown.shape == (height, width, 3) and shown.dtype == np.uint8


@FEW
@given(images, st.integers(1, 12), st.integers(1, 12))
def test_raw_preset_keeps_pixel_levels(image, height, width):
    spec = InputSpec("NHWC", 3, height, width)
    x = preprocess_image(image, Preprocess(preset="raw").resolved(spec))
    np.testing.assert_array_equal(x, np.rint(x))  # whole levels, as decoded
    assert x.min() >= 0 and x.max() <= 255
    np.testing.assert_array_equal(
        x.astype(np.uint8), display_image(image, Preprocess(preset="raw").resolved(spec))
    )


@FEW
@given(st.integers(1, 4096), st.integers(1, 4096))
def test_parse_size_reads_back_what_is_written(height, width):
    assert parse_size(f"{height}x{width}") == (height, width)
    assert parse_size(f" {height} X {width} ") == (height, width)
    assert parse_size(str(height)) == (height, height)


@FEW
@given(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
)
def test_a_size_other_than_the_models_static_size_is_a_mismatch(model_size, asked):
    spec = InputSpec("NCHW", 3, *model_size)
    if asked == model_size:
        assert Preprocess(size=asked).resolved(spec).size == model_size
    else:
        with pytest.raises(MismatchError):
            Preprocess(size=asked).resolved(spec)
    assert Preprocess().resolved(spec).size == model_size

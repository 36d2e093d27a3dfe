"""Tests of onnx_sp2ps.similarity: SSIM, spectral similarity, Sp2PS and its summary."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from onnx_sp2ps import similarity
from onnx_sp2ps.errors import UsageError
from onnx_sp2ps.similarity import (
    PairScores,
    ScoreSummary,
    harmonic_mean,
    magnitude_spectrum,
    score_pairs,
    spatial_similarity,
    spectral_similarity,
    ssim,
    summarise_scores,
)


def skimage_ssim(map_a: np.ndarray, map_b: np.ndarray) -> float:
    return structural_similarity(
        map_a,
        map_b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )


def random_maps(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    return rng.random((n, height, width))


def smooth_maps(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Blurred noise rescaled to [0, 1] per map, like a CAM image."""
    maps = ndimage.gaussian_filter(rng.random((n, height, width)), sigma=(0, 4, 4))
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps - low) / (high - low)


def gaussian_blob(height: int, width: int, *, y: float, x: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * radius**2))


# --------------------------------------------------------------------------- ssim vs skimage


@pytest.mark.parametrize("shape", [(64, 64), (224, 224), (30, 45), (11, 11), (45, 12)])
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_ssim_equals_skimage_on_each_pair(shape, kind):
    rng = np.random.default_rng([*shape, kind == "smooth"])
    make = random_maps if kind == "random" else smooth_maps
    n = 3 if shape == (224, 224) else 6
    maps_a = make(rng, n, *shape)
    # candidates: a noisy copy of a, so SSIM spans a useful range, plus unrelated maps
    maps_b = np.clip(maps_a + rng.normal(0, 0.1, maps_a.shape), 0, 1)
    maps_b[::2] = make(rng, len(maps_b[::2]), *shape)
    expected = np.array([skimage_ssim(a, b) for a, b in zip(maps_a, maps_b)])
    got = ssim(maps_a, maps_b)
    assert got.shape == (n,)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_ssim_equals_skimage_for_other_options():
    rng = np.random.default_rng(1)
    maps_a = smooth_maps(rng, 4, 40, 50)
    maps_b = smooth_maps(rng, 4, 40, 50)
    got = ssim(maps_a, maps_b, sigma=2.0, k1=0.02, k2=0.05, data_range=2.0)
    expected = [
        structural_similarity(
            a,
            b,
            gaussian_weights=True,
            sigma=2.0,
            K1=0.02,
            K2=0.05,
            use_sample_covariance=False,
            data_range=2.0,
        )
        for a, b in zip(maps_a, maps_b)
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_ssim_of_float32_maps_is_computed_in_float64():
    rng = np.random.default_rng(2)
    maps_a = smooth_maps(rng, 2, 32, 32).astype(np.float32)
    maps_b = smooth_maps(rng, 2, 32, 32).astype(np.float32)
    expected = [
        skimage_ssim(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(maps_a, maps_b)
    ]
    np.testing.assert_allclose(ssim(maps_a, maps_b), expected, rtol=0, atol=1e-12)


def test_ssim_rejects_maps_smaller_than_the_window():
    maps = np.zeros((2, 10, 30))
    with pytest.raises(UsageError, match="11x11"):
        ssim(maps, maps)


@pytest.mark.parametrize("options", [{"sigma": 0.0}, {"k1": -0.1}, {"data_range": 0.0}])
def test_ssim_rejects_bad_options(options):
    maps = np.zeros((1, 16, 16))
    with pytest.raises(UsageError):
        ssim(maps, maps, **options)


def test_ssim_is_the_same_whatever_the_chunk_size(monkeypatch):
    rng = np.random.default_rng(12)
    maps_a = smooth_maps(rng, 7, 20, 24)
    maps_b = smooth_maps(rng, 7, 20, 24)
    whole = ssim(maps_a, maps_b)
    monkeypatch.setattr(similarity, "_CHUNK_PIXELS", 3 * 20 * 24)  # chunks of 3, 3, 1
    np.testing.assert_array_equal(ssim(maps_a, maps_b), whole)


def test_ssim_of_empty_batch_is_empty():
    assert ssim(np.zeros((0, 16, 16)), np.zeros((0, 16, 16))).shape == (0,)


# --------------------------------------------------------------------------- identity, shifts


def test_identical_maps_score_exactly_one():
    rng = np.random.default_rng(3)
    maps = np.concatenate([random_maps(rng, 3, 40, 30), smooth_maps(rng, 3, 40, 30)])
    scores = score_pairs(maps, maps.copy())
    np.testing.assert_array_equal(scores.spatial, 1.0)
    np.testing.assert_array_equal(scores.spectral, 1.0)
    np.testing.assert_array_equal(scores.score, 1.0)
    assert scores.finite.all()


def test_circular_shift_lowers_spatial_but_keeps_spectral_exactly():
    blob = gaussian_blob(64, 64, y=20, x=24, radius=5)
    shifted = np.roll(blob, shift=(17, 21), axis=(0, 1))
    scores = score_pairs(blob[None], shifted[None])
    assert scores.spatial[0] < 0.5
    assert scores.spectral[0] > 0.95
    # |DFT| is invariant under circular shifts, up to FFT rounding
    np.testing.assert_allclose(
        magnitude_spectrum(shifted[None]), magnitude_spectrum(blob[None]), rtol=0, atol=1e-10
    )
    assert scores.spectral[0] == pytest.approx(1.0, abs=1e-12)
    assert scores.score[0] < scores.spectral[0]


def test_non_circular_shift_lowers_spatial_while_spectral_stays_high():
    blob = gaussian_blob(64, 64, y=22, x=22, radius=5)
    shifted = gaussian_blob(64, 64, y=38, x=42, radius=5)
    scores = score_pairs(blob[None], shifted[None])
    assert scores.spatial[0] < 0.5
    assert scores.spectral[0] > 0.9


def test_blob_of_another_size_lowers_spectral():
    small = gaussian_blob(64, 64, y=32, x=32, radius=3)
    large = gaussian_blob(64, 64, y=32, x=32, radius=10)
    assert spectral_similarity(small[None], large[None])[0] < 0.5


# --------------------------------------------------------------------------- flat maps


def test_two_flat_zero_maps_score_one():
    zeros = np.zeros((2, 20, 20))
    scores = score_pairs(zeros, zeros)
    np.testing.assert_array_equal(scores.spectral, 1.0)
    np.testing.assert_array_equal(scores.spatial, 1.0)
    np.testing.assert_array_equal(scores.score, 1.0)
    np.testing.assert_array_equal(scores.flat_a, True)
    np.testing.assert_array_equal(scores.flat_b, True)


def test_flat_zero_map_against_a_non_zero_map_scores_zero():
    rng = np.random.default_rng(4)
    zeros = np.zeros((2, 20, 20))
    maps = smooth_maps(rng, 2, 20, 20)
    for maps_a, maps_b in [(zeros, maps), (maps, zeros)]:
        scores = score_pairs(maps_a, maps_b)
        np.testing.assert_array_equal(scores.spectral, 0.0)
        np.testing.assert_array_equal(scores.score, 0.0)
    scores = score_pairs(zeros, maps)
    np.testing.assert_array_equal(scores.flat_a, True)
    np.testing.assert_array_equal(scores.flat_b, False)


def test_flat_flags_mark_constant_maps_only():
    rng = np.random.default_rng(5)
    maps_a = smooth_maps(rng, 3, 16, 16)
    maps_a[1] = 0.5
    maps_b = smooth_maps(rng, 3, 16, 16)
    maps_b[2] = 0.0
    scores = score_pairs(maps_a, maps_b)
    np.testing.assert_array_equal(scores.flat_a, [False, True, False])
    np.testing.assert_array_equal(scores.flat_b, [False, False, True])


# --------------------------------------------------------------------------- bounds, symmetry


def test_scores_are_within_zero_and_one_and_ssim_is_clipped():
    rng = np.random.default_rng(6)
    maps_a = random_maps(rng, 8, 24, 24)
    maps_b = 1.0 - maps_a  # anti-correlated: raw SSIM is negative
    assert (ssim(maps_a, maps_b) < 0).all()
    scores = score_pairs(maps_a, maps_b)
    np.testing.assert_array_equal(scores.spatial, 0.0)
    for values in (scores.spatial, scores.spectral, scores.score):
        assert ((values >= 0) & (values <= 1)).all()


def test_scores_are_symmetric_in_a_and_b():
    rng = np.random.default_rng(7)
    maps_a = smooth_maps(rng, 5, 32, 28)
    maps_b = smooth_maps(rng, 5, 32, 28)
    forward = score_pairs(maps_a, maps_b)
    backward = score_pairs(maps_b, maps_a)
    for name in ("spatial", "spectral", "score"):
        np.testing.assert_allclose(
            getattr(forward, name), getattr(backward, name), rtol=0, atol=1e-12
        )


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pair_scores_zero_and_other_pairs_are_unaffected(bad):
    rng = np.random.default_rng(8)
    maps_a = smooth_maps(rng, 4, 20, 20)
    maps_b = smooth_maps(rng, 4, 20, 20)
    clean = score_pairs(maps_a, maps_b)
    maps_a[1, 3, 4] = bad
    maps_b[2, :, :] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may leak
        scores = score_pairs(maps_a, maps_b)
    np.testing.assert_array_equal(scores.finite, [True, False, False, True])
    for name in ("spatial", "spectral", "score"):
        values = getattr(scores, name)
        np.testing.assert_array_equal(values[1:3], 0.0)
        np.testing.assert_array_equal(values[[0, 3]], getattr(clean, name)[[0, 3]])
    np.testing.assert_array_equal(scores.flat_b, False)
    summary = summarise_scores(scores, np.zeros(4, dtype=int))
    assert summary.non_finite == 2


# --------------------------------------------------------------------------- harmonic mean


def test_harmonic_mean_values():
    s = np.array([1.0, 0.5, 0.0, 0.0, 0.25, 1.0])
    f = np.array([1.0, 0.5, 0.0, 0.8, 0.75, 0.5])
    expected = np.array([1.0, 0.5, 0.0, 0.0, 0.375, 2 / 3])
    np.testing.assert_allclose(harmonic_mean(s, f), expected, rtol=0, atol=1e-15)


def test_harmonic_mean_of_both_zero_gives_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert harmonic_mean(np.zeros(3), np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_score_is_harmonic_mean_of_spatial_and_spectral():
    rng = np.random.default_rng(9)
    maps_a = smooth_maps(rng, 6, 24, 24)
    maps_b = smooth_maps(rng, 6, 24, 24)
    scores = score_pairs(maps_a, maps_b)
    np.testing.assert_array_equal(scores.spatial, spatial_similarity(maps_a, maps_b))
    np.testing.assert_array_equal(scores.spectral, spectral_similarity(maps_a, maps_b))
    s, f = scores.spatial, scores.spectral
    np.testing.assert_allclose(scores.score, 2 * s * f / (s + f), rtol=1e-15)


# --------------------------------------------------------------------------- spectra


def test_magnitude_spectrum_is_abs_fft2_unshifted():
    rng = np.random.default_rng(10)
    maps = rng.random((2, 6, 9))
    spectra = magnitude_spectrum(maps)
    assert spectra.shape == (2, 6, 9)
    np.testing.assert_allclose(spectra[1], np.abs(np.fft.fft2(maps[1])))
    np.testing.assert_allclose(spectra[:, 0, 0], maps.sum(axis=(1, 2)))  # DC at [0, 0]


def test_spectral_similarity_is_bray_curtis_of_spectra():
    rng = np.random.default_rng(11)
    maps_a = rng.random((3, 12, 12))
    maps_b = rng.random((3, 12, 12))
    for i in range(3):
        a = np.abs(np.fft.fft2(maps_a[i]))
        b = np.abs(np.fft.fft2(maps_b[i]))
        expected = 1 - np.abs(a - b).sum() / (a + b).sum()
        assert spectral_similarity(maps_a, maps_b)[i] == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- summary


def hand_made_scores() -> tuple[PairScores, np.ndarray]:
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 1.0, 0.0])
    spatial = np.array([0.85, 0.75, 0.6, 0.5, 0.15, 1.0, 0.0])
    spectral = np.array([0.95, 0.85, 0.85, 0.75, 0.3, 1.0, 0.0])
    finite = np.array([True, True, True, True, True, True, False])
    flat_a = np.array([False, False, False, False, False, True, False])
    flat_b = np.array([False, False, False, False, True, True, False])
    classes = np.array([0, 0, 0, 0, 0, 3, 7])  # unbalanced: five of class 0
    return PairScores(spatial, spectral, score, finite, flat_a, flat_b), classes


def test_summary_aggregates_match_numpy():
    scores, classes = hand_made_scores()
    summary = summarise_scores(scores, classes)
    assert summary.n == 7
    assert summary.mean == pytest.approx(np.mean(scores.score))
    per_class = [scores.score[classes == c].mean() for c in np.unique(classes)]
    assert summary.class_balanced_mean == pytest.approx(np.mean(per_class))
    assert summary.class_balanced_mean == pytest.approx((0.64 + 1.0 + 0.0) / 3)
    assert summary.class_balanced_mean != pytest.approx(summary.mean)
    assert summary.median == pytest.approx(0.7)
    assert summary.minimum == 0.0
    assert summary.spatial_mean == pytest.approx(np.mean(scores.spatial))
    assert summary.spectral_mean == pytest.approx(np.mean(scores.spectral))
    assert summary.non_finite == 1
    assert summary.flat_original == 1
    assert summary.flat_candidate == 2
    assert summary.threshold is None
    assert summary.share_below is None


def test_summary_class_balanced_mean_equals_mean_for_balanced_classes():
    scores, _ = hand_made_scores()
    summary = summarise_scores(scores, np.zeros(7, dtype=np.int64))
    assert summary.class_balanced_mean == pytest.approx(summary.mean)


def test_summary_p5_and_share_below():
    scores, classes = hand_made_scores()
    summary = summarise_scores(scores, classes, threshold=0.7)
    # sorted: 0, .2, .6, .7, .8, .9, 1 -> 5th percentile at rank 0.3 -> 0.3 * 0.2
    assert summary.p5 == pytest.approx(0.06)
    assert summary.p5 == pytest.approx(np.percentile(scores.score, 5))
    assert summary.share_below == pytest.approx(3 / 7)  # 0.0, 0.2, 0.6; 0.7 is not below
    assert summary.threshold == 0.7


def test_summary_to_dict_is_json_safe():
    scores, classes = hand_made_scores()
    result = summarise_scores(scores, classes, threshold=np.float32(0.5)).to_dict()
    assert set(result) == set(ScoreSummary.__dataclass_fields__)
    assert all(type(v) in (int, float) for v in result.values())
    assert json.loads(json.dumps(result)) == result
    without = summarise_scores(scores, classes).to_dict()
    assert without["share_below"] is None and without["threshold"] is None
    json.dumps(without)


def test_summary_of_no_pairs_raises():
    empty = score_pairs(np.zeros((0, 16, 16)), np.zeros((0, 16, 16)))
    with pytest.raises(UsageError, match="nothing to summarise"):
        summarise_scores(empty, np.zeros(0, dtype=int))


def test_summary_rejects_classes_of_wrong_length():
    scores, _ = hand_made_scores()
    with pytest.raises(UsageError, match="classes"):
        summarise_scores(scores, np.zeros(3, dtype=int))


def test_summary_rejects_non_finite_threshold():
    scores, classes = hand_made_scores()
    with pytest.raises(UsageError, match="threshold"):
        summarise_scores(scores, classes, threshold=float("nan"))


# --------------------------------------------------------------------------- shape errors


def test_shape_mismatch_raises_with_both_shapes():
    with pytest.raises(UsageError, match=r"\(2, 16, 16\).*\(2, 16, 17\)"):
        score_pairs(np.zeros((2, 16, 16)), np.zeros((2, 16, 17)))
    with pytest.raises(UsageError, match=r"\(2, 16, 16\).*\(3, 16, 16\)"):
        spectral_similarity(np.zeros((2, 16, 16)), np.zeros((3, 16, 16)))


def test_map_stack_of_wrong_rank_raises():
    with pytest.raises(UsageError, match=r"\(N, H, W\)"):
        score_pairs(np.zeros((16, 16)), np.zeros((16, 16)))


@pytest.mark.parametrize("workers", [1, 4])
def test_the_callers_errstate_holds_in_worker_threads(workers, monkeypatch):
    monkeypatch.setattr(similarity, "_MIN_CHUNK_PIXELS", 0)  # small maps on threads too
    rng = np.random.default_rng(3)
    maps = rng.random((8, 32, 32))
    other = maps.copy()
    other[5, 3, 3] = np.inf  # one bad pair among chunks run on worker threads
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("error")
        values = ssim(maps, other, workers=workers)
    assert np.isnan(values[5])
    np.testing.assert_allclose(np.delete(values, 5), 1.0)

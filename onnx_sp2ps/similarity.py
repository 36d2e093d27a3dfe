r"""Similarity of two stacks of class activation maps: the Sp2PS score.

Every function here is pure and works on a whole batch at once.  Maps are
``(N, H, W)`` arrays of floats in ``[0, 1]`` (CAM images, see README, "The score");
pair ``i`` is ``maps_a[i]`` (the original model) against ``maps_b[i]`` (the
candidate).  Everything is computed in float64.

The score of one pair is the harmonic mean of a spatial similarity (SSIM,
clipped to ``[0, 1]``) and a spectral similarity (Bray-Curtis similarity of the
magnitude spectra) [1]_:

.. math::

    \mathrm{Sp2PS}_i = \frac{2 S_i F_i}{S_i + F_i}

References
----------
.. [1] L. Renza and D. M. Ballesteros, "Sp2PS: Pruning Score by Spectral and
   Spatial Evaluation of CAM Images", Informatics, vol. 10, no. 3, p. 72, 2023.
   doi:10.3390/informatics10030072
.. [2] Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality
   assessment: from error visibility to structural similarity", IEEE Trans.
   Image Process., vol. 13, no. 4, pp. 600-612, 2004.
   doi:10.1109/TIP.2003.819861
.. [3] J. R. Bray and J. T. Curtis, "An ordination of the upland forest
   communities of southern Wisconsin", Ecological Monographs, vol. 27, no. 4,
   pp. 325-349, 1957. doi:10.2307/1942268
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from onnx_sp2ps.errors import UsageError

__all__ = [
    "PairScores",
    "ScoreSummary",
    "harmonic_mean",
    "magnitude_spectrum",
    "score_pairs",
    "spatial_similarity",
    "spectral_similarity",
    "ssim",
    "summarise_scores",
]

#: Gaussian window truncation of scikit-image (11 taps for sigma 1.5).
SSIM_TRUNCATE = 3.5

#: Pixels per chunk when filtering (5 maps of 224x224): bounds memory, stays in cache.
_CHUNK_PIXELS = 1 << 18

#: Fewest pixels per chunk worth a thread of its own (16 maps of 64x64): below it,
#: starting threads costs more than they save.
_MIN_CHUNK_PIXELS = 1 << 16

#: Output pixels per block of the banded filter matrix: the products are 18 x 8 for
#: sigma 1.5, wasting few multiplications on zeros while BLAS runs at full speed.
_BLOCK = 8

#: A stack of maps as callers give it: floats, integers or booleans (see _as_map_stack).
RealArray = npt.NDArray[np.floating[Any] | np.integer[Any] | np.bool_]
#: What the measures return: float64 scores, or bool flags.
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------- checks


def _as_map_stack(maps: npt.ArrayLike, name: str) -> RealArray:
    """Return ``maps`` as an ``(N, H, W)`` array of real numbers, or raise UsageError.

    The dtype is kept: the chunked functions convert one chunk at a time to float64
    (a whole-batch float64 copy costs more in page faults than in arithmetic).
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise UsageError(
            f"{name} must be an (N, H, W) stack of maps; got shape {maps.shape}. "
            "Add a leading batch axis for a single map."
        )
    if not (
        np.issubdtype(maps.dtype, np.floating)
        or np.issubdtype(maps.dtype, np.integer)
        or maps.dtype == np.bool_
    ):
        raise UsageError(f"{name} must hold real numbers; got dtype {maps.dtype}.")
    return maps


def _as_map_pair(maps_a: npt.ArrayLike, maps_b: npt.ArrayLike) -> tuple[RealArray, RealArray]:
    """Validate two map stacks of the same ``(N, H, W)`` shape (see :func:`_as_map_stack`)."""
    maps_a = _as_map_stack(maps_a, "maps_a")
    maps_b = _as_map_stack(maps_b, "maps_b")
    if maps_a.shape != maps_b.shape:
        raise UsageError(
            f"maps_a and maps_b must have the same shape; got {maps_a.shape} and "
            f"{maps_b.shape}. Resize both stacks to one (N, H, W)."
        )
    return maps_a, maps_b


def _ssim_window(sigma: float) -> int:
    """Side of the Gaussian window, as in scipy.ndimage and scikit-image."""
    return 2 * int(SSIM_TRUNCATE * sigma + 0.5) + 1


# --------------------------------------------------------------------------- spatial


def ssim(
    maps_a: RealArray,
    maps_b: RealArray,
    *,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
    workers: int | None = None,
) -> FloatArray:
    r"""Mean structural similarity (SSIM) of each pair of maps.

    Equals ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=sigma, use_sample_covariance=False, data_range=data_range)`` on each
    pair, computed for the whole batch at once.

    Parameters
    ----------
    maps_a, maps_b : ndarray, shape (N, H, W)
        Maps, float in ``[0, data_range]``.  H and W must be at least the window
        side ``2 * int(3.5 * sigma + 0.5) + 1`` (11 for ``sigma=1.5``).
    sigma : float, optional
        Standard deviation of the Gaussian window, truncated at 3.5 sigma.
    k1, k2 : float, optional
        Stabilising constants.
    data_range : float, optional
        Dynamic range of the maps.
    workers : int, optional
        Threads filtering chunks of pairs at once (the filters release the GIL);
        default: all CPUs.  The result does not depend on it.

    Returns
    -------
    ssim : ndarray, shape (N,), float64
        Mean SSIM of each pair, in ``[-1, 1]``; NaN for a pair with non-finite values.

    Raises
    ------
    UsageError
        If the stacks are not (N, H, W) of one shape, a map is smaller than the
        window, or an option is out of range.

    Notes
    -----
    With Gaussian-weighted local means :math:`\mu`, population variances
    :math:`\sigma^2` and covariance :math:`\sigma_{ab}` (filter mode
    ``'reflect'``), :math:`C_1 = (k_1 L)^2`, :math:`C_2 = (k_2 L)^2`, :math:`L` the
    data range [1]_:

    .. math::

        \mathrm{SSIM}(x) = \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
                               {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)}

    The result is the mean of the SSIM map after cropping ``(win - 1) // 2``
    pixels off each border, as scikit-image does.

    References
    ----------
    .. [1] Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality
       assessment: from error visibility to structural similarity", IEEE Trans.
       Image Process., vol. 13, no. 4, pp. 600-612, 2004.
       doi:10.1109/TIP.2003.819861
    """
    maps_a, maps_b = _as_map_pair(maps_a, maps_b)
    if not (math.isfinite(sigma) and sigma > 0):
        raise UsageError(f"sigma must be a positive number; got {sigma!r}.")
    if not (math.isfinite(k1) and k1 >= 0 and math.isfinite(k2) and k2 >= 0):
        raise UsageError(f"k1 and k2 must be non-negative numbers; got {k1!r} and {k2!r}.")
    if not (math.isfinite(data_range) and data_range > 0):
        raise UsageError(f"data_range must be a positive number; got {data_range!r}.")
    n, height, width = maps_a.shape
    win = _ssim_window(sigma)
    if height < win or width < win:
        raise UsageError(
            f"maps of {height}x{width} are smaller than the {win}x{win} SSIM window "
            f"(sigma={sigma}); use maps of at least {win}x{win} pixels."
        )
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    result = _by_chunks(
        lambda a, b: _ssim_chunk(a, b, sigma=sigma, c1=c1, c2=c2, pad=(win - 1) // 2),
        maps_a,
        maps_b,
        workers,
    )
    # Identical maps: numerator == denominator in the formula, so exactly 1, whatever
    # rounding the BLAS kernels of the filtering do on this machine.
    result[(maps_a == maps_b).all(axis=(1, 2))] = 1.0
    return result


def _by_chunks(
    function: Callable[[RealArray, RealArray], FloatArray],
    maps_a: RealArray,
    maps_b: RealArray,
    workers: int | None,
) -> FloatArray:
    """``function(a, b) -> (n,)`` over chunks of pairs, on a pool of ``workers`` threads.

    A few pairs per chunk (not one per loop), at most ``_CHUNK_PIXELS`` pixels, and one
    chunk per worker unless chunks would hold under ``_MIN_CHUNK_PIXELS``; each pair's
    result does not depend on the chunking.
    """
    n, height, width = maps_a.shape
    workers = _workers(workers)
    result = np.empty(n, dtype=np.float64)
    if n == 0:
        return result
    pixels = height * width
    step = max(1, min(_CHUNK_PIXELS // pixels, max(-(-n // workers), _MIN_CHUNK_PIXELS // pixels)))
    chunks = [slice(start, min(n, start + step)) for start in range(0, n, step)]

    errors = np.geterr()  # the caller's np.errstate, which worker threads do not inherit

    def run(chunk: slice) -> None:
        with np.errstate(**errors):
            result[chunk] = function(maps_a[chunk], maps_b[chunk])

    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
            list(pool.map(run, chunks))
    else:
        for chunk in chunks:
            run(chunk)
    return result


def _workers(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if not (isinstance(workers, (int, np.integer)) and workers >= 1):
        raise UsageError(f"workers must be a positive integer; got {workers!r}.")
    return int(workers)


def _ssim_chunk(
    maps_a: RealArray, maps_b: RealArray, *, sigma: float, c1: float, c2: float, pad: int
) -> FloatArray:
    """Mean SSIM of each pair of an (n, H, W) chunk, in float64 (see :func:`ssim`).

    Only the pixels the mean keeps (``pad`` off each border) are filtered, so no
    border mode is needed: each output reads its whole window inside the map, and
    the values equal scikit-image's ``'reflect'`` filtering there.  The separable
    Gaussian is applied as matrix products with a small banded (Toeplitz) block,
    rows first, then columns, on one stack of the four images the formula needs:
    ``a``, ``b``, ``a*a + b*b`` (only the sum of the variances enters) and ``a*b``.
    """
    n, height, width = maps_a.shape
    out_h, out_w = height - 2 * pad, width - 2 * pad
    band = _gaussian_band(sigma)  # (_BLOCK + 2 pad, _BLOCK)
    # (4, H, n, W): the H axis of each image leads, so the row pass is one matrix
    # product per block of rows; the 4 images stay apart, so the formula below runs
    # on long contiguous runs.
    stack = np.empty((4, height, n, width))
    stack[0] = maps_a.transpose(1, 0, 2)
    stack[1] = maps_b.transpose(1, 0, 2)
    np.multiply(stack[0], stack[0], out=stack[2])
    np.multiply(stack[1], stack[1], out=stack[3])
    stack[2] += stack[3]
    np.multiply(stack[0], stack[1], out=stack[3])
    images = stack.reshape(4, height, -1)
    smooth_rows = np.empty((4, out_h, images.shape[2]))
    band_t = band.T
    for start in range(0, out_h, _BLOCK):
        size = min(_BLOCK, out_h - start)
        np.matmul(
            band_t[:size, : size + 2 * pad],
            images[:, start : start + size + 2 * pad],
            out=smooth_rows[:, start : start + size],
        )
    del stack, images
    # Column pass into (blocks, 4 * out_h * n, _BLOCK); the last block's unused
    # columns are zeroed below, after the formula.
    smooth_rows = smooth_rows.reshape(-1, width)
    blocks = -(-out_w // _BLOCK)
    smooth = np.zeros((blocks, smooth_rows.shape[0], _BLOCK))
    for block in range(blocks):
        start = block * _BLOCK
        size = min(_BLOCK, out_w - start)
        np.matmul(
            smooth_rows[:, start : start + size + 2 * pad],
            band[: size + 2 * pad, :size],
            out=smooth[block, :, :size],
        )
    del smooth_rows
    smooth = smooth.reshape(blocks, 4, out_h, n, _BLOCK)
    mean_a, mean_b, squares, numerator = (smooth[:, k] for k in range(4))
    # The formula, in place; each product is taken in the same order for (a, b) and
    # (b, a), and identical maps give numerator == denominator exactly.
    mean_ab = mean_a * mean_b
    numerator -= mean_ab  # covariance
    numerator *= 2
    numerator += c2
    mean_ab *= 2
    mean_ab += c1
    numerator *= mean_ab
    del mean_ab
    mean_a *= mean_a
    mean_b *= mean_b
    mean_a += mean_b  # mu_a^2 + mu_b^2
    squares -= mean_a  # the sum of the variances
    squares += c2
    mean_a += c1
    mean_a *= squares  # the denominator
    numerator /= mean_a
    numerator[-1, :, :, out_w - (blocks - 1) * _BLOCK :] = 0.0
    # Sum each pair's map in one layout whatever n is, so chunking changes nothing.
    per_pair = np.ascontiguousarray(numerator.transpose(2, 0, 1, 3))
    means: FloatArray = per_pair.sum(axis=(1, 2, 3)) / (out_h * out_w)
    return means


@functools.lru_cache(maxsize=8)
def _gaussian_band(sigma: float) -> FloatArray:
    """(_BLOCK + 2 r, _BLOCK) matrix: column j holds the Gaussian taps at rows j..j+2r.

    A block of rows ``x[s:s + _BLOCK + 2 r]`` times it gives the Gaussian-filtered
    ``y[s + r:s + r + _BLOCK]``.  Taps as ``scipy.ndimage.gaussian_filter`` (truncated
    at ``SSIM_TRUNCATE`` sigma, normalised to sum 1), which scikit-image uses.
    """
    radius = int(SSIM_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    taps /= taps.sum()
    band = np.zeros((_BLOCK + 2 * radius, _BLOCK))
    for column in range(_BLOCK):
        band[column : column + 2 * radius + 1, column] = taps
    band.setflags(write=False)
    return band


def spatial_similarity(
    maps_a: RealArray, maps_b: RealArray, *, workers: int | None = None
) -> FloatArray:
    r"""Spatial similarity of each pair: SSIM clipped to ``[0, 1]``.

    Parameters
    ----------
    maps_a, maps_b : ndarray, shape (N, H, W)
        Maps, float in ``[0, 1]``, at least 11x11.
    workers : int, optional
        Threads; see :func:`ssim`.

    Returns
    -------
    spatial : ndarray, shape (N,), float64

    Notes
    -----
    .. math::

        S_i = \min(1, \max(0, \mathrm{SSIM}(a_i, b_i)))

    with the SSIM of :func:`ssim` (sigma 1.5, K1 0.01, K2 0.03, data range 1) [1]_.

    References
    ----------
    .. [1] L. Renza and D. M. Ballesteros, "Sp2PS: Pruning Score by Spectral and
       Spatial Evaluation of CAM Images", Informatics, vol. 10, no. 3, p. 72, 2023.
       doi:10.3390/informatics10030072
    """
    return np.clip(ssim(maps_a, maps_b, workers=workers), 0.0, 1.0)


# --------------------------------------------------------------------------- spectral


def magnitude_spectrum(maps: RealArray) -> FloatArray:
    r"""Magnitude of the 2-D discrete Fourier transform of each map.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)

    Returns
    -------
    spectra : ndarray, shape (N, H, W), float64
        Not shifted: the DC term is at ``[:, 0, 0]``.

    Notes
    -----
    .. math::

        A(u, v) = \left| \sum_{y=0}^{H-1} \sum_{x=0}^{W-1} M(y, x)\,
                  e^{-2\pi i (uy/H + vx/W)} \right|
    """
    maps = _as_map_stack(maps, "maps").astype(np.float64, copy=False)
    return np.abs(np.fft.fft2(maps, axes=(-2, -1)))


def spectral_similarity(
    maps_a: RealArray, maps_b: RealArray, *, workers: int | None = None
) -> FloatArray:
    r"""Spectral similarity of each pair: Bray-Curtis similarity of magnitude spectra.

    Parameters
    ----------
    maps_a, maps_b : ndarray, shape (N, H, W)
    workers : int, optional
        Threads computing chunks of pairs at once; default: all CPUs.  The result
        does not depend on it.

    Returns
    -------
    spectral : ndarray, shape (N,), float64
        In ``[0, 1]``; 1 when both maps are all zero.

    Notes
    -----
    With :math:`A = |\mathrm{DFT2}(M)|` (:func:`magnitude_spectrum`) [1]_ [2]_:

    .. math::

        F_i = 1 - \frac{\sum_{u,v} |A_a(u,v) - A_b(u,v)|}{\sum_{u,v} (A_a(u,v) + A_b(u,v))}

    The magnitude spectrum ignores circular shifts, so ``F`` asks whether the two
    maps have the same shape and scale of attention, not the same place.

    References
    ----------
    .. [1] L. Renza and D. M. Ballesteros, "Sp2PS: Pruning Score by Spectral and
       Spatial Evaluation of CAM Images", Informatics, vol. 10, no. 3, p. 72, 2023.
       doi:10.3390/informatics10030072
    .. [2] J. R. Bray and J. T. Curtis, "An ordination of the upland forest
       communities of southern Wisconsin", Ecological Monographs, vol. 27, no. 4,
       pp. 325-349, 1957. doi:10.2307/1942268
    """
    maps_a, maps_b = _as_map_pair(maps_a, maps_b)
    return _by_chunks(_spectral_chunk, maps_a, maps_b, workers)


def _spectral_chunk(maps_a: RealArray, maps_b: RealArray) -> FloatArray:
    """Spectral similarity of each pair of an (n, H, W) chunk, in float64."""
    n, _, width = maps_a.shape
    maps = np.empty((2 * n, *maps_a.shape[1:]))
    maps[:n] = maps_a
    maps[n:] = maps_b
    # The spectrum of a real map is Hermitian, so the half spectrum of rfft2, with
    # every column that stands for two columns counted twice, gives the same sums.
    # (numpy.fft gives the same bits as scipy.fft and imports in a fraction of the time.)
    spectra = np.abs(np.fft.rfft2(maps, axes=(-2, -1)))
    del maps
    spectra_a, spectra_b = spectra[:n], spectra[n:]
    weights = np.full(spectra.shape[-1], 2.0)
    weights[0] = 1.0
    if width % 2 == 0:
        weights[-1] = 1.0
    total = spectra_a.sum(axis=1) + spectra_b.sum(axis=1)
    spectra_a -= spectra_b
    np.abs(spectra_a, out=spectra_a)
    difference = (spectra_a.sum(axis=1) * weights).sum(axis=1)
    total = (total * weights).sum(axis=1)
    ratio: FloatArray = np.divide(difference, total, out=np.zeros_like(total), where=total > 0)
    return np.clip(1.0 - ratio, 0.0, 1.0)


# --------------------------------------------------------------------------- score


def harmonic_mean(s: npt.ArrayLike, f: npt.ArrayLike) -> FloatArray:
    r"""Harmonic mean of two arrays of non-negative similarities, element by element.

    Parameters
    ----------
    s, f : ndarray, shape (N,)

    Returns
    -------
    h : ndarray, shape (N,), float64
        0 where ``s + f == 0``.

    Notes
    -----
    .. math::

        H_i = \frac{2 s_i f_i}{s_i + f_i}
    """
    s = np.asarray(s, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if s.shape != f.shape:
        raise UsageError(f"s and f must have the same shape; got {s.shape} and {f.shape}.")
    total = s + f
    mean: FloatArray = np.divide(2.0 * s * f, total, out=np.zeros_like(total), where=total != 0)
    return mean


@dataclass(frozen=True)
class PairScores:
    """Scores of N pairs of maps (original ``a``, candidate ``b``).

    Attributes
    ----------
    spatial : ndarray, shape (N,), float64
        ``S_i``, clipped SSIM; 0 for a non-finite pair.
    spectral : ndarray, shape (N,), float64
        ``F_i``, spectral similarity; 0 for a non-finite pair.
    score : ndarray, shape (N,), float64
        ``Sp2PS_i``, harmonic mean of ``S_i`` and ``F_i``; 0 for a non-finite pair.
    finite : ndarray, shape (N,), bool
        Both maps of the pair hold only finite values.
    flat_a, flat_b : ndarray, shape (N,), bool
        The map is finite and constant (after normalisation it is all zeros).
    """

    spatial: FloatArray
    spectral: FloatArray
    score: FloatArray
    finite: BoolArray
    flat_a: BoolArray
    flat_b: BoolArray


def _flat(maps: RealArray, finite: BoolArray) -> BoolArray:
    """(N,) bool: map is finite and constant; ``maps`` has non-finite maps zeroed."""
    if maps.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    constant: BoolArray = maps.max(axis=(1, 2)) == maps.min(axis=(1, 2))
    return finite & constant


def score_pairs(maps_a: RealArray, maps_b: RealArray, *, workers: int | None = None) -> PairScores:
    r"""Sp2PS score of each pair of maps.

    Parameters
    ----------
    maps_a : ndarray, shape (N, H, W)
        Maps of the original model, float in ``[0, 1]``, at least 11x11.
    maps_b : ndarray, shape (N, H, W)
        Maps of the candidate model, same shape.
    workers : int, optional
        Threads for the filters and FFTs (default: all CPUs); the scores do not
        depend on it.

    Returns
    -------
    scores : PairScores
        A pair where either map holds a non-finite value scores
        ``spatial = spectral = score = 0`` and has ``finite = False``.

    Raises
    ------
    UsageError
        If the stacks are not (N, H, W) of one shape or are smaller than 11x11.

    Notes
    -----
    .. math::

        \mathrm{Sp2PS}_i = \frac{2 S_i F_i}{S_i + F_i}

    with ``S`` from :func:`spatial_similarity` and ``F`` from
    :func:`spectral_similarity` [1]_.  Identical maps score 1; two all-zero
    (flat) maps score 1; an all-zero map against a non-zero one scores 0.

    References
    ----------
    .. [1] L. Renza and D. M. Ballesteros, "Sp2PS: Pruning Score by Spectral and
       Spatial Evaluation of CAM Images", Informatics, vol. 10, no. 3, p. 72, 2023.
       doi:10.3390/informatics10030072
    """
    maps_a, maps_b = _as_map_pair(maps_a, maps_b)
    # (N,) arrays, as the maps are (N, H, W); np.asarray tells the type checker so.
    finite = np.asarray(np.isfinite(maps_a).all(axis=(1, 2)) & np.isfinite(maps_b).all(axis=(1, 2)))
    if not finite.all():  # score zeros instead, so no NaN or warning is produced
        maps_a = np.where(finite[:, None, None], maps_a, 0.0)
        maps_b = np.where(finite[:, None, None], maps_b, 0.0)
    spatial = np.where(finite, spatial_similarity(maps_a, maps_b, workers=workers), 0.0)
    spectral = np.where(finite, spectral_similarity(maps_a, maps_b, workers=workers), 0.0)
    score = np.clip(harmonic_mean(spatial, spectral), 0.0, 1.0)
    return PairScores(
        spatial=spatial,
        spectral=spectral,
        score=score,
        finite=finite,
        flat_a=_flat(maps_a, finite),
        flat_b=_flat(maps_b, finite),
    )


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class ScoreSummary:
    """Data-set aggregates of :class:`PairScores` (README, "The score").

    Attributes
    ----------
    n : int
        Number of pairs.
    mean : float
        Sp2PS of the data set, the mean of ``score``.
    class_balanced_mean : float
        Mean over the distinct classes of each class's mean score.
    median, p5, minimum : float
        Median, 5th percentile (linear interpolation) and minimum of ``score``.
    share_below : float or None
        Fraction of pairs with ``score < threshold``; None without a threshold.
    threshold : float or None
        The gate threshold used for ``share_below``.
    spatial_mean, spectral_mean : float
        Means of ``spatial`` and ``spectral``.
    non_finite : int
        Pairs with a non-finite map (included above with score 0).
    flat_original, flat_candidate : int
        Pairs whose original (``a``) or candidate (``b``) map is flat.
    """

    n: int
    mean: float
    class_balanced_mean: float
    median: float
    p5: float
    minimum: float
    share_below: float | None
    threshold: float | None
    spatial_mean: float
    spectral_mean: float
    non_finite: int
    flat_original: int
    flat_candidate: int

    def to_dict(self) -> dict[str, float | int | None]:
        """Return the fields as a JSON-safe dict of python floats, ints and None."""
        return {
            "n": int(self.n),
            "mean": float(self.mean),
            "class_balanced_mean": float(self.class_balanced_mean),
            "median": float(self.median),
            "p5": float(self.p5),
            "minimum": float(self.minimum),
            "share_below": None if self.share_below is None else float(self.share_below),
            "threshold": None if self.threshold is None else float(self.threshold),
            "spatial_mean": float(self.spatial_mean),
            "spectral_mean": float(self.spectral_mean),
            "non_finite": int(self.non_finite),
            "flat_original": int(self.flat_original),
            "flat_candidate": int(self.flat_candidate),
        }


def summarise_scores(
    scores: PairScores, classes: npt.NDArray[np.integer[Any]], *, threshold: float | None = None
) -> ScoreSummary:
    r"""Aggregate per-pair scores over the data set.

    Parameters
    ----------
    scores : PairScores
        Scores of N pairs (N >= 1).
    classes : ndarray, shape (N,), int
        Class of each pair (for example the original model's top-1 or the label).
    threshold : float, optional
        Gate threshold; ``share_below`` is the fraction of pairs scoring under it.

    Returns
    -------
    summary : ScoreSummary

    Raises
    ------
    UsageError
        If there are no pairs, ``classes`` is not (N,) integers, or ``threshold``
        is not a finite number.

    Notes
    -----
    With :math:`C` the set of distinct classes and :math:`I_c` the pairs of class c:

    .. math::

        \mathrm{Sp2PS} = \frac{1}{N}\sum_i \mathrm{Sp2PS}_i, \qquad
        \mathrm{Sp2PS}_{\mathrm{balanced}} = \frac{1}{|C|}\sum_{c \in C}
            \frac{1}{|I_c|}\sum_{i \in I_c} \mathrm{Sp2PS}_i
    """
    score = np.asarray(scores.score, dtype=np.float64)
    n = score.shape[0] if score.ndim == 1 else -1
    if n <= 0:
        raise UsageError(
            f"nothing to summarise: scores hold {score.size} pairs; score at least one pair."
        )
    classes = np.asarray(classes)
    if classes.shape != (n,) or not np.issubdtype(classes.dtype, np.integer):
        raise UsageError(
            f"classes must be ({n},) integers, one per pair; got shape {classes.shape} "
            f"and dtype {classes.dtype}."
        )
    if threshold is not None and not (
        isinstance(threshold, (int, float, np.number)) and math.isfinite(threshold)
    ):
        raise UsageError(f"threshold must be a finite number or None; got {threshold!r}.")
    _, class_index = np.unique(classes, return_inverse=True)
    class_means = np.bincount(class_index, weights=score) / np.bincount(class_index)
    return ScoreSummary(
        n=int(n),
        mean=float(score.mean()),
        class_balanced_mean=float(class_means.mean()),
        median=float(np.median(score)),
        p5=float(np.percentile(score, 5)),
        minimum=float(score.min()),
        share_below=None if threshold is None else float(np.mean(score < threshold)),
        threshold=None if threshold is None else float(threshold),
        spatial_mean=float(np.mean(scores.spatial)),
        spectral_mean=float(np.mean(scores.spectral)),
        non_finite=int(np.count_nonzero(~np.asarray(scores.finite, dtype=bool))),
        flat_original=int(np.count_nonzero(scores.flat_a)),
        flat_candidate=int(np.count_nonzero(scores.flat_b)),
    )

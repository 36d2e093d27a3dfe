r"""Confidence intervals of an audit's scores, and paired comparisons of candidates
(README, "Intervals"): bootstrap over images, pure numpy, no I/O.

An audit's Sp2PS is a mean over a sample of images; this module says how far it could
move on another sample of the same size.  For each candidate, :func:`audit_intervals`
gives an interval of the mean, of the class-balanced mean (resampling within each
target class) and of the 5th percentile; for each pair of candidates, the interval of
the mean difference of their per-image scores, resampled in pairs (both candidates were
scored on the same images).

The variant is BCa (bias-corrected and accelerated) [1]_, as the literature recommends
for skewed statistics [2]_ [3]_: per-image Sp2PS lies in [0, 1] with a long tail
toward 0 (flat or misplaced maps), so the mean's sampling distribution is skewed at the
sample sizes audits use.  The percentile interval is only first-order accurate there
(its coverage error is O(n^-1/2) on each side, and it leans the wrong way for skewed
data), while BCa is second-order accurate (O(n^-1)), invariant under monotone
transformations and, like the percentile interval, range-preserving: its ends are
bootstrap replicates, so they stay inside [0, 1], which normal-theory or studentized
intervals do not guarantee.  Measured coverage: README, "Intervals".

- Bias correction :math:`z_0 = \Phi^{-1}(\#\{\theta^*_b < \hat\theta\} / B + \tfrac12
  \#\{\theta^*_b = \hat\theta\} / B)` (ties counted half, so a discrete statistic such
  as a percentile is not pushed to one side).
- Acceleration :math:`a = \sum_i L_i^3 / (6 (\sum_i L_i^2)^{3/2})` from the empirical
  influence values :math:`L_i` [3]_: :math:`x_i - \bar x` for a mean (or a paired
  difference); for the class-balanced mean, resampled within strata, the stratified
  form :math:`a = \sum_c n_c^{-3} \sum_{i \in c} e_i^3 / (6 (\sum_c n_c^{-2}
  \sum_{i \in c} e_i^2)^{3/2})` with :math:`e_i = x_i - \bar x_c` [3]_ (section 3.7);
  for the 5th percentile, the jackknife (its leave-one-out values in closed form).
- Ends: the :math:`\Phi(z_0 + (z_0 + z_\alpha) / (1 - a (z_0 + z_\alpha)))` quantiles
  of the replicates, for :math:`\alpha` and :math:`1 - \alpha`, :math:`\alpha = (1 -
  \mathrm{confidence}) / 2`.

Resampling is vectorised: the replicates of a mean are sums of a score vector gathered
at a (resamples x images) index matrix, drawn in blocks; every candidate uses the same
indices, so paired differences are differences of replicates.  The 5th percentile of a
resample needs only two of its order statistics, which are drawn directly: the k-th
smallest of n uniform draws is Beta(k, n - k + 1), the next one follows it by the
minimum of the remaining draws, and the order statistics of the resampled positions
are ``floor(n U)`` of those (exactly the bootstrap distribution, in O(resamples)).

Exact where it can be: with fewer than 2 images, or when every score is equal (for a
difference: every per-image difference), the interval is the point itself and says so
(``exact``).  The random numbers come from ``key`` (:func:`seed_key`: the image
positions), never from the order the images were processed in, so the same records give
the same intervals bit for bit however the audit was split.

References
----------
.. [1] B. Efron, "Better Bootstrap Confidence Intervals", Journal of the American
   Statistical Association, vol. 82, no. 397, pp. 171-185, 1987.
   doi:10.1080/01621459.1987.10478410
.. [2] T. J. DiCiccio and B. Efron, "Bootstrap Confidence Intervals", Statistical
   Science, vol. 11, no. 3, pp. 189-228, 1996. doi:10.1214/ss/1032280214
.. [3] A. C. Davison and D. V. Hinkley, "Bootstrap Methods and their Application",
   Cambridge University Press, 1997, sections 2.7, 3.7 and 5.3.
   doi:10.1017/CBO9780511802843
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from onnx_sp2ps.errors import UsageError

__all__ = [
    "IntervalSettings",
    "Interval",
    "ScoreIntervals",
    "Comparison",
    "AuditIntervals",
    "audit_intervals",
    "bca_interval",
    "images_for_half_width",
    "seed_key",
    "P5",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

#: The percentile reported as ``p5`` (as :func:`onnx_sp2ps.similarity.summarise_scores`).
P5 = 5.0
#: Index-matrix elements per block of resamples (2 MiB of int64: stays in cache). The
#: random streams are drawn block by block, so changing it changes the intervals.
BLOCK_ELEMENTS = 1 << 18
#: Bounds of ``--resamples`` and ``--confidence``.
MIN_RESAMPLES, MAX_RESAMPLES = 100, 100_000
METHOD = "bca"

_NORMAL = NormalDist()


@dataclass(frozen=True)
class IntervalSettings:
    """How intervals are made: the confidence level and the number of bootstrap
    resamples (``--confidence``, ``--resamples``)."""

    confidence: float = 0.95
    resamples: int = 2000

    def __post_init__(self) -> None:
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c < 1.0:
            raise UsageError(
                f"confidence must be a number between 0 and 1 (exclusive); got {self.confidence!r}"
            )
        if not MIN_RESAMPLES <= self.resamples <= MAX_RESAMPLES:
            raise UsageError(
                f"resamples must be {MIN_RESAMPLES} to {MAX_RESAMPLES}; got {self.resamples!r}"
            )


@dataclass(frozen=True)
class Interval:
    """``[low, high]`` at the settings' confidence; ``exact`` when it is the point
    itself because the data leave nothing to resample (``note`` says why).  NaN ends
    when the statistic is not finite."""

    low: float
    high: float
    exact: bool = False
    note: str | None = None

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def half_width(self) -> float:
        return self.width / 2.0

    def excludes(self, value: float) -> bool:
        return bool(self.low > value or self.high < value)

    def to_list(self) -> list[float | None]:
        return [_finite(self.low), _finite(self.high)]


@dataclass(frozen=True)
class ScoreIntervals:
    """One candidate's intervals: of the mean, the class-balanced mean and the 5th
    percentile of per-image Sp2PS."""

    settings: IntervalSettings
    mean: Interval
    class_balanced_mean: Interval
    p5: Interval

    @property
    def method(self) -> str:
        """``bca``, or ``exact`` when every interval is its point."""
        exact = self.mean.exact and self.class_balanced_mean.exact and self.p5.exact
        return "exact" if exact else METHOD

    def to_dict(self) -> dict[str, Any]:
        """report.json's ``sp2ps.ci``."""
        notes = {self.mean.note, self.class_balanced_mean.note, self.p5.note} - {None}
        return {
            "confidence": self.settings.confidence,
            "method": self.method,
            "resamples": self.settings.resamples,
            "mean": self.mean.to_list(),
            "class_balanced_mean": self.class_balanced_mean.to_list(),
            "p5": self.p5.to_list(),
            "note": "; ".join(sorted(n for n in notes if n)) or None,
        }


@dataclass(frozen=True)
class Comparison:
    """Candidates ``a`` and ``b`` (positions among the candidates, ``a < b``): the mean
    of their per-image score differences (``mean_a - mean_b``) and its interval;
    ``better`` is the position of the better one when the interval excludes 0."""

    a: int
    b: int
    difference: float
    ci: Interval

    @property
    def better(self) -> int | None:
        if not self.ci.excludes(0.0):
            return None
        return self.a if self.difference > 0 else self.b


@dataclass(frozen=True)
class AuditIntervals:
    """Intervals of every candidate, and the comparison of every pair (``(0, 1), (0,
    2), ..., (1, 2), ...``)."""

    candidates: tuple[ScoreIntervals, ...]
    comparisons: tuple[Comparison, ...]

    def comparison(self, a: int, b: int) -> Comparison:
        """The comparison of candidates ``a`` and ``b`` in either order (its
        ``difference`` is then ``mean_a - mean_b`` as asked)."""
        for c in self.comparisons:
            if (c.a, c.b) == (a, b):
                return c
            if (c.a, c.b) == (b, a):
                flipped = Interval(-c.ci.high, -c.ci.low, c.ci.exact, c.ci.note)
                return Comparison(a, b, -c.difference, flipped)
        raise KeyError((a, b))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def seed_key(positions: npt.NDArray[np.int64]) -> bytes:
    """The key the random numbers come from: the scored images' positions in the image
    set (identical however the audit was split, merged or ordered)."""
    digest = hashlib.sha256(b"onnx-sp2ps/intervals/1\0")
    digest.update(np.ascontiguousarray(positions, dtype="<i8").tobytes())
    return digest.digest()


def _generators(key: bytes) -> list[np.random.Generator]:
    """Independent streams: the images' resamples, the stratified resamples, the
    order statistics of the 5th percentile."""
    root = np.random.SeedSequence(int.from_bytes(key[:16], "little"))
    return [np.random.Generator(np.random.PCG64(s)) for s in root.spawn(3)]


# --------------------------------------------------------------------------- BCa


def _acceleration(cubes: float, squares: float) -> float:
    if not squares > 0.0:
        return 0.0
    return float(cubes / (6.0 * squares**1.5))


def _influence_acceleration(influence: FloatArray) -> float:
    return _acceleration(float(np.sum(influence**3)), float(np.sum(influence**2)))


def bca_interval(
    replicates: FloatArray, point: float, acceleration: float, confidence: float
) -> Interval:
    r"""The BCa interval from bootstrap ``replicates`` of a statistic whose value on the
    sample is ``point`` (module docstring for the formulas).

    Parameters
    ----------
    replicates : ndarray, shape (B,)
        The statistic on each resample.
    point : float
        The statistic on the sample.
    acceleration : float
        :math:`a`, from the empirical influence values or the jackknife.
    confidence : float
        Two-sided level, in (0, 1).
    """
    reps = np.asarray(replicates, dtype=np.float64)
    if not (math.isfinite(point) and np.isfinite(reps).all()):
        return Interval(math.nan, math.nan, note="non-finite scores")
    b = reps.size
    below = np.count_nonzero(reps < point) + 0.5 * np.count_nonzero(reps == point)
    share = min(max(below / b, 0.5 / b), 1.0 - 0.5 / b)
    z0 = _NORMAL.inv_cdf(share)
    alpha = (1.0 - confidence) / 2.0
    levels = []
    for z in (_NORMAL.inv_cdf(alpha), _NORMAL.inv_cdf(1.0 - alpha)):
        shifted = z0 + z
        denominator = 1.0 - acceleration * shifted
        level = _NORMAL.cdf(z0 + shifted / denominator) if denominator > 0 else 1.0
        levels.append(level)
    low, high = np.quantile(reps, levels)
    return Interval(float(low), float(high))


# --------------------------------------------------------------------------- statistics


def _percentile_position(n: int) -> tuple[int, float]:
    """(k, f): numpy's linear percentile of ``n`` sorted values is
    ``v[k] + f (v[k + 1] - v[k])``."""
    h = (n - 1) * P5 / 100.0
    k = int(math.floor(h))
    return k, h - k


def _percentile_jackknife(sorted_scores: FloatArray) -> FloatArray:
    """The 5th percentile of the sample without each value (n leave-one-out values, in
    the sorted order; closed form, O(n))."""
    n = sorted_scores.size
    k, f = _percentile_position(n - 1)
    removed = np.arange(n)
    last = n - 1

    def kept(j: int) -> FloatArray:  # value j of the sample without `removed`
        j = min(j, n - 2)
        out: FloatArray = np.where(j < removed, sorted_scores[j], sorted_scores[min(j + 1, last)])
        return out

    low = kept(k)
    return low + f * (kept(k + 1) - low) if f else low


def _percentile_replicates(
    sorted_scores: Sequence[FloatArray], resamples: int, rng: np.random.Generator
) -> list[FloatArray]:
    """Bootstrap replicates of the 5th percentile for each score vector (all of length
    n): the two order statistics the percentile reads, drawn directly (module
    docstring), the same draws for every vector."""
    n = sorted_scores[0].size
    k, f = _percentile_position(n)
    first = rng.beta(k + 1, n - k, size=resamples)  # the (k+1)-th smallest of n uniforms
    lo = np.minimum((first * n).astype(np.intp), n - 1)
    if f and k + 1 < n:
        second = first + (1.0 - first) * rng.beta(1, n - k - 1, size=resamples)
        hi = np.maximum(np.minimum((second * n).astype(np.intp), n - 1), lo)
        return [s[lo] + f * (s[hi] - s[lo]) for s in sorted_scores]
    return [s[lo] for s in sorted_scores]


def _all_equal(x: FloatArray) -> bool:
    return bool(x.size == 0 or (x == x[0]).all())


def _exact(point: float, n: int) -> Interval:
    note = f"{'fewer than 2 images' if n < 2 else f'all {n} values are equal'}: exact"
    return Interval(point, point, exact=True, note=note)


def _blocks(resamples: int, n: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    return [(s, min(s + step, resamples)) for s in range(0, resamples, step)]


def audit_intervals(
    scores: Sequence[npt.ArrayLike],
    classes: npt.ArrayLike,
    *,
    settings: IntervalSettings = IntervalSettings(),
    key: bytes = b"",
) -> AuditIntervals:
    r"""Intervals of every candidate's mean, class-balanced mean and 5th percentile of
    per-image scores, and the paired comparison of every two candidates.

    Parameters
    ----------
    scores : sequence of ndarray, each shape (N,)
        Per-image Sp2PS of each candidate, on the same N images (a non-finite pair's
        0 included, as the mean includes it).
    classes : ndarray, shape (N,), int
        Each image's class (the strata of the class-balanced mean).
    settings : IntervalSettings
        Confidence and resamples.
    key : bytes
        Where the random numbers come from (:func:`seed_key`).

    Returns
    -------
    AuditIntervals

    Raises
    ------
    UsageError
        No candidate, score vectors of different lengths, or classes not (N,) integers.
    """
    xs = [np.asarray(s, dtype=np.float64) for s in scores]
    if not xs or any(x.ndim != 1 or x.shape != xs[0].shape for x in xs):
        raise UsageError("scores must be one (N,) vector per candidate, all of one length")
    n = xs[0].size
    cls = np.asarray(classes)
    if cls.shape != (n,) or not np.issubdtype(cls.dtype, np.integer):
        raise UsageError(f"classes must be ({n},) integers, one per image")
    confidence, resamples = settings.confidence, settings.resamples
    rng_images, rng_strata, rng_order = _generators(key)
    finite = [bool(np.isfinite(x).all()) for x in xs]
    resample = n >= 2 and any(f and not _all_equal(x) for f, x in zip(finite, xs))

    # Strata: images sorted by class; a stratified resample draws each image from its
    # own class, as start of its class + floor(u * size of its class).
    order = np.argsort(cls, kind="stable")
    _, class_index, sizes = np.unique(cls[order], return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[class_index]
    size_at = sizes[class_index]
    size_float = size_at.astype(np.float64)
    weights = 1.0 / (sizes.size * size_at)  # the class-balanced mean is sum(w x)
    stratified = [x[order] * weights for x in xs]

    means = np.zeros((len(xs), resamples))
    balanced = np.zeros((len(xs), resamples))
    if resample:
        for start, stop in _blocks(resamples, n):
            rows = rng_images.integers(0, n, size=(stop - start, n))
            for j, x in enumerate(xs):
                means[j, start:stop] = x[rows].sum(axis=1)

            # u in [0, 1) is a multiple of 2**-53, so u * size rounds to below size
            u = rng_strata.random((stop - start, n))
            u *= size_float
            rows = u.astype(np.intp)
            rows += starts
            for j, y in enumerate(stratified):
                balanced[j, start:stop] = y[rows].sum(axis=1)
    means /= n
    sorted_xs = [np.sort(x) for x in xs]
    p5_reps = (
        _percentile_replicates(sorted_xs, resamples, rng_order)
        if n >= 2
        else [np.zeros(resamples) for _ in xs]
    )

    out = []
    for j, x in enumerate(xs):
        mean = float(x.mean()) if n else math.nan
        # (summed per class in the images' order, as summarise_scores does: same bits)
        bal = float((np.bincount(class_index, weights=x[order]) / sizes).mean()) if n else math.nan
        p5 = float(np.percentile(x, P5)) if n else math.nan
        if n < 2 or (finite[j] and _all_equal(x)):
            out.append(ScoreIntervals(settings, _exact(mean, n), _exact(bal, n), _exact(p5, n)))
            continue
        e = x[order] - (np.bincount(class_index, weights=x[order]) / sizes)[class_index]
        bal_a = _acceleration(float(np.sum(e**3 / size_at**3)), float(np.sum(e**2 / size_at**2)))
        jack = _percentile_jackknife(sorted_xs[j])
        out.append(
            ScoreIntervals(
                settings,
                bca_interval(means[j], mean, _influence_acceleration(x - mean), confidence),
                bca_interval(balanced[j], bal, bal_a, confidence),
                bca_interval(
                    p5_reps[j], p5, _influence_acceleration(jack.mean() - jack), confidence
                ),
            )
        )

    comparisons = []
    for a in range(len(xs)):
        for b in range(a + 1, len(xs)):
            d = xs[a] - xs[b]
            diff = float(d.mean()) if n else math.nan
            if n < 2 or (bool(np.isfinite(d).all()) and _all_equal(d)):
                ci = _exact(diff, n)
            else:
                acc = _influence_acceleration(d - diff)
                ci = bca_interval(means[a] - means[b], diff, acc, confidence)
            comparisons.append(Comparison(a, b, diff, ci))
    return AuditIntervals(tuple(out), tuple(comparisons))


def images_for_half_width(
    scores: npt.ArrayLike, half_width: float, confidence: float
) -> int | None:
    r"""About how many images give an interval of the mean of half-width
    ``half_width``, from the observed variance: :math:`\lceil (z s / h)^2 \rceil` with
    :math:`s` the sample standard deviation and :math:`z` the normal quantile of the
    confidence.  None when it cannot be said (fewer than 2 finite scores)."""
    x = np.asarray(scores, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2 or not half_width > 0:
        return None
    z = _NORMAL.inv_cdf(0.5 + confidence / 2.0)
    return max(2, int(math.ceil((z * float(np.std(x, ddof=1)) / half_width) ** 2)))

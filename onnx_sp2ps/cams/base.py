"""The CAM base class and the map helpers every method shares.

A method turns activations ``(N, C, h, w)`` (NCHW, float32, as
:class:`onnx_sp2ps.runtime.ModelRunner` hands them out) and target classes ``(N,)`` into
raw maps ``(N, h, w)``.  The pipeline after that (README, "The score") is explicit and the
same for every method: ``M = normalise(upsample_bilinear(ReLU(R), (H, W)))``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from onnx_sp2ps.errors import UsageError

__all__ = [
    "BaseCAM",
    "bilinear_matrix",
    "upsample_bilinear",
    "normalise_maps",
    "relu",
    "softmax",
    "position_gradients",
    "directional_slopes",
    "REL_EPS",
]


def relu(maps: np.ndarray) -> np.ndarray:
    """max(maps, 0), keeping NaN (so that non-finite maps stay visible)."""
    return np.where(maps > 0, maps, np.where(np.isnan(maps), maps, 0)).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax in float64 along ``axis`` (max subtracted; NaN rows stay NaN, quietly)."""
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        x = x - np.max(x, axis=axis, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=axis, keepdims=True)


@lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    r"""Interpolation matrix ``(out_size, in_size)`` of 1-D linear resampling with the
    half-pixel convention (``align_corners=False``, as torch, cv2 and PIL use).

    Output pixel :math:`i` samples the input at
    :math:`x = (i + 0.5)\,\frac{in}{out} - 0.5`, clamped to :math:`[0, in - 1]`, and
    mixes its two neighbours linearly.
    """
    if out_size < 1 or in_size < 1:
        raise UsageError(f"cannot resample {in_size} pixels to {out_size}")
    x = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    x = np.clip(x, 0.0, in_size - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = x - lo
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    m.setflags(write=False)
    return m


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize maps ``(N, h, w)`` to ``(N, H, W)`` bilinearly (half-pixel centres).

    Separable: ``Wy @ map @ Wx.T`` with the matrices of :func:`bilinear_matrix`; equal to
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise UsageError(f"maps must be (N, h, w), got shape {maps.shape}")
    height, width = size
    wy = bilinear_matrix(int(height), maps.shape[1])
    wx = bilinear_matrix(int(width), maps.shape[2])
    out = np.matmul(np.matmul(wy, maps.astype(np.float64)), wx.T)
    return out.astype(np.float32)


def normalise_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Min-max normalise each map of ``(N, H, W)`` to [0, 1].

    .. math:: M = \frac{m - \min m}{\max m - \min m}

    A flat map (:math:`\max m - \min m \le 10^{-6}\max|m|`, or exactly constant) becomes
    all zeros.  Maps with non-finite values are returned as NaN.

    Returns
    -------
    maps : (N, H, W) float32
    flat : (N,) bool
    """
    maps = np.asarray(maps, dtype=np.float32)
    n = len(maps)
    flat_view = maps.reshape(n, -1)
    finite = np.isfinite(flat_view).all(axis=1)
    with np.errstate(invalid="ignore"):
        lo = flat_view.min(axis=1) if flat_view.shape[1] else np.zeros(n, np.float32)
        hi = flat_view.max(axis=1) if flat_view.shape[1] else np.zeros(n, np.float32)
    lo = np.where(finite, lo, 0.0).astype(np.float64)
    hi = np.where(finite, hi, 0.0).astype(np.float64)
    span = hi - lo
    scale = np.maximum(np.abs(hi), np.abs(lo))
    flat = finite & (span <= 1e-6 * scale)
    inv = np.where(flat | ~finite, 0.0, 1.0 / np.where(span > 0, span, 1.0))
    out = (flat_view - lo[:, None].astype(np.float32)) * inv[:, None].astype(np.float32)
    out = np.clip(out, 0.0, 1.0, out=out).reshape(maps.shape)
    out[~finite] = np.nan
    return out, flat


class BaseCAM:
    """One CAM method.  Subclasses override :meth:`get_cam_weights` (weights per channel,
    as Grad-CAM) or :meth:`compute_raw` (anything else, as Eigen-CAM).

    Parameters
    ----------
    runner
        A :class:`onnx_sp2ps.runtime.ModelRunner`; methods that need the head call
        ``runner.run_head`` / ``runner.map_head``.
    """

    name = "base"
    #: True when the map depends on the target class.
    uses_target = True
    #: True when the method needs per-position gradients (not only their channel sums).
    needs_exact_gradient = False
    #: True when the method uses gradients at all (the runner can then compute them in
    #: the same run as the activations).
    uses_gradients = False
    #: True when the method runs the full model on (masked) inputs.
    needs_inputs = False

    def __init__(self, runner):
        self.runner = runner

    def get_cam_weights(
        self, activations: np.ndarray, targets: np.ndarray, inputs: np.ndarray | None = None
    ) -> np.ndarray:
        """Channel weights ``(N, C)``."""
        raise NotImplementedError

    def gradients(self, activations: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """d y_target / dA ``(N, C, h, w)``: exact from the head's backward graph, or by
        finite differences position by position (:func:`position_gradients`) when the
        head has ops without a backward rule."""
        if self.runner.has_exact_gradient:
            return self.runner.head_gradients(activations, targets)[1].astype(np.float64)
        return position_gradients(self.runner, activations, targets)

    def compute_raw(
        self, activations: np.ndarray, targets: np.ndarray, inputs: np.ndarray | None = None
    ) -> np.ndarray:
        """The raw map R ``(N, h, w)`` before ReLU: the weighted sum of the channels."""
        weights = self.get_cam_weights(activations, targets, inputs)
        return np.einsum(
            "nc,nchw->nhw", weights.astype(np.float64), activations.astype(np.float64)
        ).astype(np.float32)

    def __call__(
        self, activations: np.ndarray, targets: np.ndarray, inputs: np.ndarray | None = None
    ) -> np.ndarray:
        """ReLU(R) ``(N, h, w)`` float32: the ``raw`` maps of the reports.  ``inputs``
        (the model inputs of the batch) are needed by methods with ``needs_inputs``."""
        activations = np.asarray(activations, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.int64)
        if activations.ndim != 4:
            raise UsageError(f"activations must be (N, C, h, w), got {activations.shape}")
        if targets.shape != (len(activations),):
            raise UsageError(
                f"need one target per image: {targets.shape} for {len(activations)} images"
            )
        if self.needs_inputs and inputs is None:
            raise UsageError(f"{self.name} needs the model inputs")
        return relu(self.compute_raw(activations, targets, inputs))


#: Finite-difference step, relative to the root mean square of the image's activations.
REL_EPS = 2e-2
#: Copies of the map with every value moved by one float32 ulp (random signs, fixed seed)
#: that the head runs to measure its own float32 rounding noise.
NOISE_PROBES = 4
#: A kink (slope jump) within the step is refined only when its effect exceeds this share
#: of the largest slope, as well as the rounding noise.
KINK_RTOL = 1e-4


def position_gradients(
    runner, activations: np.ndarray, targets: np.ndarray, *, rel_eps: float = REL_EPS
) -> np.ndarray:
    """Per-position finite differences of the target logit, ``(N, C, h, w)``: the fallback
    for heads whose ops have no backward rule (:func:`directional_slopes` along each
    position: 2 to 4 head runs per position and image)."""

    def move(maps, dirs, steps):
        maps.reshape(len(maps), -1)[np.arange(len(maps)), dirs] += steps

    out = np.zeros(activations.shape, dtype=np.float64)
    for i, a in enumerate(activations):
        out[i] = directional_slopes(
            runner, a, int(targets[i]), a.size, move, rel_eps=rel_eps, row=i
        ).reshape(a.shape)
    return out


def directional_slopes(
    runner,
    a: np.ndarray,
    target: int,
    count: int,
    move,
    *,
    rel_eps: float = REL_EPS,
    refinements: int = 3,
    row: int | None = None,
) -> np.ndarray:
    r"""Slopes :math:`y'(0)` of the target logit :math:`y(t) = y_c(A + t V_r)` along
    ``count`` directions :math:`V_r`, ``(count,)``, by finite differences.

    ``a`` (C, h, w) is one image's map (image ``row`` of the runner's latest run, see
    ``runner.run_head``); ``move(maps, dirs, steps)`` adds ``steps[m]`` times
    direction ``dirs[m]`` to ``maps[m]`` in place (a whole channel for Grad-CAM's channel
    sums, one position for per-position gradients).

    The head runs in float32 (onnxruntime has no double kernels for many ops,
    GlobalAveragePool and Atan among them), whose rounding error grows with the head's
    intermediate values, not with :math:`|y|`: a small step drowns in it (a step of
    :math:`10^{-5}` RMS gave 8 % errors on a Softplus head).  So the step stays large,
    :math:`h` = ``rel_eps`` times the RMS of ``a``, and the truncation error is removed
    instead of shrunk (Richardson extrapolation):

    .. math::

        D(h) = \frac{y(h) - y(-h)}{2h} = y' + \frac{y'''}{6} h^2 + O(h^4), \qquad
        y' = D(h/2) + \frac{D(h/2) - D(h)}{3} + O(h^4)

    where the head bends along :math:`V_r`, i.e. where :math:`e(h) = y(h) + y(-h) - 2y(0)`
    exceeds the noise (along every direction when most bend: :math:`y'''` can be large
    where :math:`y''` is small); :math:`D(h)` alone elsewhere (linear heads, ReLU heads
    off their kinks: exact).  A kink (a ReLU or Abs switching within :math:`\pm h`) is
    exact too when the points on one side lie on a line while those on the other side
    bend: that side's slope is taken, where most bent directions look so (on a smooth
    head the pattern is a coincidence, :math:`y''' h = \pm 2 y''`).  Other kinks show in
    :math:`e(h) - 4e(h/2)`, which smooth curvature leaves at :math:`y'''' h^4 / 16`:
    where it exceeds ``KINK_RTOL`` times the largest slope plus its noise, the direction
    runs again with :math:`h / 10`, up to ``refinements`` times.

    The noise is measured, not assumed: the head runs on ``NOISE_PROBES`` copies of ``a``
    moved by one ulp (random signs), and the largest change of :math:`y`, :math:`\nu`,
    bounds the float32 error of one logit (the rounding of :math:`A \pm h` included).
    :math:`e` bends beyond :math:`8\nu`, a line is straight within :math:`8\nu / h`, a
    kink needs :math:`16\nu / h` (the noise of :math:`e(h) - 4e(h/2)` over :math:`h`):
    a 10 times smaller step then removes more error than its noise adds.  Head runs per
    image: :math:`5 + 2\,count`, plus 2 per bent direction, plus 2 to 4 per refinement.
    """
    y0, noise = _base_and_noise(runner, a, target, row)
    slopes = np.full(count, np.nan)
    if not (np.isfinite(y0) and np.isfinite(noise)):
        return slopes
    rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
    step = np.float32(rel_eps * (rms if rms > 0 else 1.0))
    dirs = np.arange(count)
    scale = everywhere = None
    for _ in range(refinements + 1):
        h = float(step)
        yp, ym = _pair(runner, a, target, dirs, step, move, row)
        slopes[dirs] = (yp - ym) / (2.0 * h)
        if scale is None:
            scale = float(np.nanmax(np.abs(slopes), initial=0.0))
        curved = np.abs(yp + ym - 2.0 * y0) > 8.0 * noise
        if everywhere is None:  # curved along most directions: y''' can matter anywhere
            everywhere = bool(curved.mean() >= 0.5)
        run = np.ones_like(curved) if everywhere else curved
        if not run.any():
            break
        half = _pair(runner, a, target, dirs[run], step / np.float32(2), move, row)
        estimate, side, clean, jump = _extrapolate(
            y0, yp[run], ym[run], *half, h, noise, KINK_RTOL * scale
        )
        # Kinks, not curvature, when most bent directions have a straight side.
        clean &= bool(clean[curved[run]].mean() >= 0.5) if curved.any() else False
        slopes[dirs[run]] = np.where(clean, side, estimate)
        dirs = dirs[run][~clean & (jump > KINK_RTOL * scale + 16.0 * noise / h)]
        if not dirs.size:
            break
        step = np.float32(step / np.float32(10))
    return slopes


def _extrapolate(y0, yp, ym, yp2, ym2, h, noise, tol):
    """From the logits at ``+-h`` and ``+-h/2`` (see :func:`directional_slopes`):
    Richardson's estimate, the straight side's estimate, where one side is straight and
    the other bends (a kink on that other side; this also catches a kink at a third of
    the step, which the check :math:`e(h) - 4e(h/2)` cannot see), and that check's
    :math:`|e(h) - 4e(h/2)| / h`."""
    right, right2 = (yp - y0) / h, (yp2 - y0) / (h / 2)  # one-sided slopes
    left, left2 = (y0 - ym) / h, (y0 - ym2) / (h / 2)
    d1, d2 = (right + left) / 2, (right2 + left2) / 2
    estimate = d2 + (d2 - d1) / 3.0  # Richardson: exact to O(h^4) on smooth heads
    bend_right, bend_left = right - right2, left - left2  # +-y''h/4 on smooth heads
    jump = np.abs(2.0 * (bend_right - bend_left) - (right - left))
    line = 8.0 * noise / h  # twice the noise of a bend
    straight_left = (np.abs(bend_left) <= line) & (
        np.abs(bend_right) > 4.0 * np.abs(bend_left) + line + tol
    )
    straight_right = (np.abs(bend_right) <= line) & (
        np.abs(bend_left) > 4.0 * np.abs(bend_right) + line + tol
    )
    side = np.where(straight_left, 2.0 * left2 - left, 2.0 * right2 - right)
    return estimate, side, straight_left | straight_right, jump


def _base_and_noise(runner, a: np.ndarray, target: int, row: int | None) -> tuple[float, float]:
    """The target logit at ``a`` and its float32 noise (see :func:`directional_slopes`)."""
    rng = np.random.default_rng(0)  # fixed: the same maps on every run
    away = np.where(rng.random((NOISE_PROBES,) + a.shape) < 0.5, -np.inf, np.inf)
    maps = np.concatenate([a[None], np.nextafter(a[None], away.astype(np.float32))])
    y = runner.map_head(lambda start, stop: maps[start:stop], len(maps), a.shape, row)
    y = y[:, target].astype(np.float64)
    floor = 4.0 * np.finfo(np.float32).eps * abs(y[0])
    return float(y[0]), max(float(np.abs(y[1:] - y[0]).max()), floor)


def _pair(
    runner,
    a: np.ndarray,
    target: int,
    dirs: np.ndarray,
    step: np.float32,
    move,
    row: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The target logit at ``a`` + ``step`` and ``a`` - ``step`` along each direction of
    ``dirs``, ``(len(dirs),)`` each; chunked by ``runner.map_head``."""
    k = len(dirs)

    def make(start: int, stop: int) -> np.ndarray:
        rows = np.arange(start, stop)
        maps = np.repeat(a[None], stop - start, axis=0)
        move(maps, dirs[rows % k], np.where(rows < k, step, -step).astype(np.float32))
        return maps

    y = runner.map_head(make, 2 * k, a.shape, row)[:, target].astype(np.float64)
    return y[:k], y[k:]

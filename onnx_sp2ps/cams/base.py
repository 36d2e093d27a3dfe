"""The CAM base class and the map helpers every method shares.

A method turns activations ``(N, C, h, w)`` (NCHW, float32, as
:class:`onnx_sp2ps.runtime.ModelRunner` hands them out) and target classes ``(N,)`` into
raw maps ``(N, h, w)``.  The pipeline after that (DESIGN.md, step 5) is explicit and the
same for every method: ``M = normalise(upsample_bilinear(ReLU(R), (H, W)))``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from onnx_sp2ps.errors import UsageError

__all__ = ["BaseCAM", "bilinear_matrix", "upsample_bilinear", "normalise_maps", "relu",
           "softmax"]


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

    def get_cam_weights(self, activations: np.ndarray, targets: np.ndarray,
                        inputs: np.ndarray | None = None) -> np.ndarray:
        """Channel weights ``(N, C)``."""
        raise NotImplementedError

    def gradients(self, activations: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """d y_target / dA ``(N, C, h, w)``: exact from the head's backward graph, or by
        central differences position by position when the head has ops without a
        backward rule (2 C h w head runs per image, chunked)."""
        if self.runner.has_exact_gradient:
            return self.runner.head_gradients(activations, targets)[1].astype(np.float64)
        return position_gradients(self.runner, activations, targets)

    def compute_raw(self, activations: np.ndarray, targets: np.ndarray,
                    inputs: np.ndarray | None = None) -> np.ndarray:
        """The raw map R ``(N, h, w)`` before ReLU: the weighted sum of the channels."""
        weights = self.get_cam_weights(activations, targets, inputs)
        return np.einsum("nc,nchw->nhw", weights.astype(np.float64),
                         activations.astype(np.float64)).astype(np.float32)

    def __call__(self, activations: np.ndarray, targets: np.ndarray,
                 inputs: np.ndarray | None = None) -> np.ndarray:
        """ReLU(R) ``(N, h, w)`` float32: the ``raw`` maps of the reports.  ``inputs``
        (the model inputs of the batch) are needed by methods with ``needs_inputs``."""
        activations = np.asarray(activations, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.int64)
        if activations.ndim != 4:
            raise UsageError(f"activations must be (N, C, h, w), got {activations.shape}")
        if targets.shape != (len(activations),):
            raise UsageError(f"need one target per image: {targets.shape} for "
                             f"{len(activations)} images")
        if self.needs_inputs and inputs is None:
            raise UsageError(f"{self.name} needs the model inputs")
        return relu(self.compute_raw(activations, targets, inputs))


def position_gradients(runner, activations: np.ndarray, targets: np.ndarray, *,
                       rel_eps: float = 1e-3) -> np.ndarray:
    """Per-position central differences of the target logit, ``(N, C, h, w)``: the
    fallback for heads whose ops have no backward rule."""
    n = len(activations)
    out = np.zeros(activations.shape, dtype=np.float64)
    for i in range(n):
        a = activations[i]
        size = a.size
        rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
        eps = np.float32(rel_eps * (rms if rms > 0 else 1.0))

        def make(start, stop, a=a, eps=eps):
            rows = np.arange(start, stop)
            out_ = np.repeat(a[None], stop - start, axis=0).reshape(stop - start, -1)
            pos = rows % size
            out_[np.arange(stop - start), pos] += np.where(rows < size, eps, -eps)
            return out_.reshape((stop - start,) + a.shape)

        y = runner.map_head(make, 2 * size, a.shape)[:, int(targets[i])].astype(np.float64)
        out[i] = ((y[:size] - y[size:]) / (2.0 * float(eps))).reshape(a.shape)
    return out

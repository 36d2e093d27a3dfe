"""Grad-CAM (Selvaraju et al., ICCV 2017, doi:10.1109/ICCV.2017.74) without autograd."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["GradCAM", "channel_gradient_sums", "REL_EPS"]

#: Channel perturbation relative to the activations' RMS (see channel_gradient_sums).
REL_EPS = 1e-2


def channel_gradient_sums(runner, activations: np.ndarray, targets: np.ndarray, *,
                          rel_eps: float = REL_EPS, refinements: int = 3) -> np.ndarray:
    r"""Sum over positions of the target logit's gradient, per channel: ``(N, C)``.

    For each image, the head runs once on :math:`2C + 1` maps: the map itself and each
    channel :math:`k` shifted by :math:`\pm\varepsilon` everywhere:

    .. math::

        \sum_{ij} \frac{\partial y_c}{\partial A_{kij}} \approx
        \frac{y_c(A + \varepsilon E_k) - y_c(A - \varepsilon E_k)}{2 \varepsilon}

    exact for heads of linear ops (pooling, flatten, Gemm/MatMul, Add, BatchNorm).  Heads
    with kinks (a hidden ReLU layer) are exact too unless a kink lies within
    :math:`\pm\varepsilon`: then the two one-sided differences
    :math:`(y_c(A \pm \varepsilon E_k) - y_c(A)) / (\pm\varepsilon)` disagree, and
    only those channels are run again with :math:`\varepsilon / 10`, up to
    ``refinements`` times; a refined value replaces the previous one only where it moves
    by more than float32 noise (a smooth but curved head, a Tanh say, also makes the
    one-sided differences disagree, yet gives the same value again, and the larger step
    is the less noisy one).  :math:`\varepsilon` starts at ``rel_eps`` times the root mean
    square of the image's activations, so that float32 cancellation stays near 1e-4
    relative.  Runs are chunked (``runner.map_head``) so memory stays bounded.
    """
    n, c = activations.shape[:2]
    sums = np.zeros((n, c), dtype=np.float64)
    for i in range(n):
        a = activations[i]
        rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
        if not np.isfinite(rms):
            sums[i] = np.nan
            continue
        eps = rel_eps * (rms if rms > 0 else 1.0)
        channels = np.arange(c)
        y0, d, bad, _ = _differences(runner, a, int(targets[i]), channels, eps,
                                     with_base=True)
        sums[i] = d
        for _ in range(refinements):
            if not bad.any():
                break
            eps /= 10.0
            channels = channels[bad]
            _, d, bad, noise = _differences(runner, a, int(targets[i]), channels, eps, base=y0)
            # A smooth head (curvature, no kink) gives the same value again: keep the
            # estimate of the larger step, whose float32 noise is 10 times smaller.
            moved = np.abs(d - sums[i, channels]) > noise
            sums[i, channels[moved]] = d[moved]
            bad &= moved
    return sums


def _differences(runner, a: np.ndarray, target: int, channels: np.ndarray, eps: float, *,
                 with_base: bool = False, base: float | None = None):
    """Central differences for ``channels`` of one map ``a`` (C, h, w), and which of them
    straddle a kink (one-sided differences disagree beyond float32 noise), and the bound
    on that float32 noise in the units of the differences."""
    k = len(channels)
    step = np.float32(eps)
    extra = 1 if with_base else 0

    def make(start: int, stop: int) -> np.ndarray:
        rows = np.arange(start, stop)
        out = np.repeat(a[None], stop - start, axis=0)
        pert = rows >= extra
        r = rows[pert] - extra
        sign = np.where(r < k, step, -step).astype(np.float32)
        out[np.nonzero(pert)[0], channels[r % k]] += sign[:, None, None]
        return out

    y = runner.map_head(make, 2 * k + extra, a.shape)[:, target].astype(np.float64)
    y0 = float(y[0]) if with_base else float(base)
    yp, ym = y[extra:extra + k], y[extra + k:]
    d = (yp - ym) / (2.0 * float(step))
    one_sided = np.abs((yp - y0) - (y0 - ym)) / float(step)
    noise = 16.0 * np.finfo(np.float32).eps * max(abs(y0), np.abs(y).max()) / float(step)
    scale = np.abs(d).max() if k else 0.0
    bad = one_sided > 1e-3 * scale + noise
    return y0, d, bad, noise


class GradCAM(BaseCAM):
    r"""Grad-CAM: channels weighted by the spatial mean of the target's gradient.

    .. math:: \alpha_k = \frac{1}{hw}\sum_{ij}\frac{\partial y_c}{\partial A_{kij}},
              \qquad R = \sum_k \alpha_k A_k

    :math:`y_c` is the logit (before any Softmax) of target class :math:`c`.  The
    gradients come from the head's backward graph (:mod:`onnx_sp2ps.backward`) where its
    ops allow, else from :func:`channel_gradient_sums` (finite differences on the head).
    """

    name = "gradcam"
    uses_gradients = True

    def get_cam_weights(self, activations, targets, inputs=None):
        if self.runner.has_exact_gradient:
            return self.gradients(activations, targets).mean(axis=(2, 3))
        h, w = activations.shape[2:]
        return channel_gradient_sums(self.runner, activations, targets) / (h * w)

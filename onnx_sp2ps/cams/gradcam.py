"""Grad-CAM (Selvaraju et al., ICCV 2017, doi:10.1109/ICCV.2017.74) without autograd."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["GradCAM", "channel_gradient_sums", "REL_EPS"]

#: Channel perturbation relative to the activations' RMS (see channel_gradient_sums).
REL_EPS = 1e-2


def channel_gradient_sums(runner, activations: np.ndarray, targets: np.ndarray, *,
                          rel_eps: float = REL_EPS) -> np.ndarray:
    r"""Sum over positions of the target logit's gradient, per channel: ``(N, C)``.

    For each image, the head runs once on :math:`2C` maps, each channel :math:`k` shifted
    by :math:`\pm\varepsilon` everywhere:

    .. math::

        \sum_{ij} \frac{\partial y_c}{\partial A_{kij}} \approx
        \frac{y_c(A + \varepsilon E_k) - y_c(A - \varepsilon E_k)}{2 \varepsilon}

    exact for heads of linear ops (pooling, flatten, Gemm/MatMul, Add, BatchNorm), first
    order otherwise.  :math:`\varepsilon` is ``rel_eps`` times the root mean square of the
    image's activations, so that float32 cancellation stays below about 1e-4 relative.
    The runs are chunked (``runner.map_head``) so memory stays bounded.
    """
    n, c = activations.shape[:2]
    sums = np.zeros((n, c), dtype=np.float64)
    for i in range(n):
        a = activations[i]
        rms = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
        if not np.isfinite(rms):
            sums[i] = np.nan
            continue
        eps = np.float32(rel_eps * (rms if rms > 0 else 1.0))

        def make(start: int, stop: int, a=a, eps=eps) -> np.ndarray:
            rows = np.arange(start, stop)
            out = np.repeat(a[None], stop - start, axis=0)
            channel = rows % c
            sign = np.where(rows < c, eps, -eps).astype(np.float32)
            out[np.arange(stop - start), channel] += sign[:, None, None]
            return out

        y = runner.map_head(make, 2 * c, a.shape)[:, int(targets[i])].astype(np.float64)
        # Divide by the perturbation actually applied (float32 rounding of A + eps).
        sums[i] = (y[:c] - y[c:]) / (2.0 * float(eps))
    return sums


class GradCAM(BaseCAM):
    r"""Grad-CAM: channels weighted by the spatial mean of the target's gradient.

    .. math:: \alpha_k = \frac{1}{hw}\sum_{ij}\frac{\partial y_c}{\partial A_{kij}},
              \qquad R = \sum_k \alpha_k A_k

    :math:`y_c` is the logit (before any Softmax) of target class :math:`c`.  The
    gradient sums come from :func:`channel_gradient_sums` (finite differences on the
    head subgraph; no autograd).
    """

    name = "gradcam"

    def get_cam_weights(self, activations, targets):
        h, w = activations.shape[2:]
        return channel_gradient_sums(self.runner, activations, targets) / (h * w)

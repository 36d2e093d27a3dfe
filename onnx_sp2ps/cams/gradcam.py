"""Grad-CAM (Selvaraju et al., ICCV 2017, doi:10.1109/ICCV.2017.74) without autograd."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import REL_EPS, BaseCAM, directional_slopes

__all__ = ["GradCAM", "channel_gradient_sums", "REL_EPS"]


def channel_gradient_sums(
    runner,
    activations: np.ndarray,
    targets: np.ndarray,
    *,
    rel_eps: float = REL_EPS,
    refinements: int = 3,
) -> np.ndarray:
    r"""Sum over positions of the target logit's gradient, per channel: ``(N, C)``.

    The slope along a whole channel :math:`E_k` (every position of channel :math:`k`
    shifted together) is that sum:

    .. math::

        \sum_{ij} \frac{\partial y_c}{\partial A_{kij}} =
        \frac{\mathrm{d}}{\mathrm{d}t} y_c(A + t E_k) \Big|_{t=0}

    estimated by :func:`onnx_sp2ps.cams.base.directional_slopes`: central differences
    with a step of ``rel_eps`` times the activations' RMS, exact for heads of linear ops
    (pooling, flatten, Gemm/MatMul, Add, BatchNorm) and for ReLU heads off their kinks;
    Richardson extrapolation on curved channels (Softplus, Atan); a channel with a kink
    within the step takes the slope of its straight side, or runs again with a 10 times
    smaller step, up to ``refinements`` times.  Head runs per image:
    :math:`2C + 5` for linear heads, :math:`4C + 5` for smooth curved ones, a few more
    per kink; chunked (``runner.map_head``) so memory stays bounded.
    """

    def move(maps, dirs, steps):
        maps[np.arange(len(maps)), dirs] += steps[:, None, None]

    sums = np.zeros(activations.shape[:2], dtype=np.float64)
    for i, a in enumerate(activations):
        sums[i] = directional_slopes(
            runner,
            a,
            int(targets[i]),
            len(a),
            move,
            rel_eps=rel_eps,
            refinements=refinements,
            row=i,
        )
    return sums


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

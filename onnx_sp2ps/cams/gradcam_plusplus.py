"""Grad-CAM++ (Chattopadhay et al., WACV 2018, doi:10.1109/WACV.2018.00097)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["GradCAMPlusPlus"]


class GradCAMPlusPlus(BaseCAM):
    r"""Grad-CAM++ with the closed form pytorch-grad-cam uses (first-order gradients
    standing in for the exponential's higher derivatives):

    .. math::

        a_{kij} = \frac{g_{kij}^2}{2 g_{kij}^2 + \sum_{ab} A_{kab}\, g_{kij}^3 + 10^{-6}}
        \quad (0 \text{ where } g_{kij} = 0), \qquad
        \alpha_k = \sum_{ij} a_{kij} \max(g_{kij}, 0)

    with :math:`g = \partial y_c / \partial A` exact (the head's backward graph).
    """

    name = "gradcam++"
    uses_gradients = True
    needs_exact_gradient = True

    def get_cam_weights(self, activations, targets, inputs=None):
        grads = self.gradients(activations, targets)
        g2 = grads**2
        g3 = g2 * grads
        sum_a = activations.astype(np.float64).sum(axis=(2, 3))[:, :, None, None]
        aij = g2 / (2 * g2 + sum_a * g3 + 1e-6)
        aij = np.where(grads != 0, aij, 0)
        return (np.maximum(grads, 0) * aij).sum(axis=(2, 3))

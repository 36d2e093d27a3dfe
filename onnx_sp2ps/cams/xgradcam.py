"""XGrad-CAM (Fu et al., BMVC 2020, arXiv:2008.02312)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["XGradCAM"]


class XGradCAM(BaseCAM):
    r"""XGrad-CAM: gradients weighted by the normalised activations.

    .. math:: \alpha_k = \sum_{ij} \frac{A_{kij}}{\sum_{ab} A_{kab} + 10^{-7}}
              \frac{\partial y_c}{\partial A_{kij}}

    (the :math:`10^{-7}` as in pytorch-grad-cam).
    """

    name = "xgradcam"
    uses_gradients = True
    needs_exact_gradient = True

    def get_cam_weights(self, activations, targets, inputs=None):
        grads = self.gradients(activations, targets)
        a = activations.astype(np.float64)
        sum_a = a.sum(axis=(2, 3))[:, :, None, None]
        return (grads * a / (sum_a + 1e-7)).sum(axis=(2, 3))

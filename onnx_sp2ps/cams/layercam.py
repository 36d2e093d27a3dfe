"""LayerCAM (Jiang et al., IEEE TIP 2021, doi:10.1109/TIP.2021.3089943)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["LayerCAM"]


class LayerCAM(BaseCAM):
    r"""LayerCAM: activations weighted position by position by the positive gradient:

    .. math:: R_{ij} = \sum_k \max\left(\frac{\partial y_c}{\partial A_{kij}}, 0\right) A_{kij}
    """

    name = "layercam"
    uses_gradients = True
    needs_exact_gradient = True

    def compute_raw(self, activations, targets, inputs=None):
        grads = self.gradients(activations, targets)
        return (np.maximum(grads, 0) * activations).sum(axis=1).astype(np.float32)

"""HiResCAM (Draelos & Carin, 2020, arXiv:2011.08891)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["HiResCAM"]


class HiResCAM(BaseCAM):
    r"""HiResCAM: the element-wise product of gradients and activations, summed over
    channels, so every position keeps its own gradient:

    .. math:: R_{ij} = \sum_k \frac{\partial y_c}{\partial A_{kij}} A_{kij}
    """

    name = "hirescam"
    uses_gradients = True
    needs_exact_gradient = True

    def compute_raw(self, activations, targets, inputs=None):
        grads = self.gradients(activations, targets)
        return (grads * activations).sum(axis=1).astype(np.float32)

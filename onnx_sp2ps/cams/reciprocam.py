"""ReciproCAM (Byun & Lee, 2022, arXiv:2209.14074)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM, softmax

__all__ = ["ReciproCAM"]


class ReciproCAM(BaseCAM):
    r"""ReciproCAM: the head's confidence in the target when it sees one cell only.

    For every position :math:`(i, j)` the head runs on the *mosaic* map that keeps
    :math:`A_{:,ij}` and zeroes every other position; the map is

    .. math:: R_{ij} = \mathrm{softmax}(\mathrm{head}(A \odot \delta_{ij}))_c

    (the single-cell mosaic of OpenVINO-XAI's CNN ReciproCAM, with the paper's softmax
    scores).  Gradient-free: :math:`hw` head runs per image, batched.
    """

    name = "reciprocam"

    def compute_raw(self, activations, targets, inputs=None):
        n, c, h, w = activations.shape
        out = np.zeros((n, h * w), dtype=np.float64)
        for i in range(n):
            a = activations[i]

            def make(start, stop, a=a):
                cells = np.arange(start, stop)
                mosaic = np.zeros((stop - start, c, h * w), dtype=np.float32)
                flat = a.reshape(c, h * w)
                mosaic[np.arange(stop - start), :, cells] = flat[:, cells].T
                return mosaic.reshape(stop - start, c, h, w)

            logits = self.runner.map_head(make, h * w, a.shape, i)
            out[i] = softmax(logits, axis=1)[:, int(targets[i])]
        return out.reshape(n, h, w).astype(np.float32)

"""Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, doi:10.1109/IJCNN48605.2020.9206626)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["EigenCAM"]


class EigenCAM(BaseCAM):
    r"""Eigen-CAM: the activations projected on their first principal component.

    With :math:`X \in \mathbb{R}^{hw \times C}` the activations of one image, each channel
    centred over the positions, and :math:`X = U \Sigma V^T`, the map is
    :math:`R = X v_1` reshaped to :math:`h \times w` (as pytorch-grad-cam's
    ``get_2d_projection``).  The sign of a singular vector is arbitrary; it is fixed so
    that :math:`R` correlates positively with the mean activation map
    :math:`\frac{1}{C}\sum_k A_k`.  Class independent: the target is not used.  The
    first component comes from the eigenvector of the smaller Gram matrix, which equals
    the SVD's and costs a fraction of it.
    """

    name = "eigencam"
    uses_target = False

    def compute_raw(self, activations, targets, inputs=None):
        n, c, h, w = activations.shape
        x = activations.reshape(n, c, h * w).transpose(0, 2, 1).astype(np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        out = np.full((n, h * w), np.nan)
        finite = np.isfinite(x).all(axis=(1, 2))
        if finite.any():
            xf = x[finite]
            proj = _first_component_projection(xf)
            mean_map = activations[finite].reshape(-1, c, h * w).mean(axis=1)
            mean_map = mean_map - mean_map.mean(axis=1, keepdims=True)
            sign = np.where(np.einsum("np,np->n", proj, mean_map) < 0, -1.0, 1.0)
            out[finite] = proj * sign[:, None]
        return out.reshape(n, h, w).astype(np.float32)


def _first_component_projection(x: np.ndarray) -> np.ndarray:
    """X v1 for each X (positions P x channels C), v1 its first right singular vector.

    Equal to the SVD's projection (up to sign), computed from the smaller Gram matrix:
    X X^T (P x P) gives X v1 = sqrt(lambda1) u1; X^T X (C x C) gives v1 directly.
    """
    p, c = x.shape[1:]
    if p <= c:
        gram = np.matmul(x, x.transpose(0, 2, 1))
        vals, vecs = np.linalg.eigh(gram)
        return vecs[:, :, -1] * np.sqrt(np.maximum(vals[:, -1], 0.0))[:, None]
    gram = np.matmul(x.transpose(0, 2, 1), x)
    _, vecs = np.linalg.eigh(gram)
    return np.einsum("npc,nc->np", x, vecs[:, :, -1])

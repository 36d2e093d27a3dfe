"""Score-CAM (Wang et al., CVPR Workshops 2020, doi:10.1109/CVPRW50498.2020.00020)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM, bilinear_matrix, softmax
from onnx_sp2ps.errors import UsageError

__all__ = ["ScoreCAM"]


class ScoreCAM(BaseCAM):
    r"""Score-CAM: each channel, upsampled and min-max scaled, masks the input; the
    model's target logits on the masked inputs, through a softmax over channels, are
    the weights:

    .. math::

        M_k = \frac{U(A_k) - \min U(A_k)}{\max U(A_k) - \min U(A_k) + 10^{-8}}, \qquad
        \alpha = \mathrm{softmax}_k\big(y_c(x \odot M_k)\big)

    As pytorch-grad-cam: :math:`U` is bilinear upsampling with aligned corners
    (``UpsamplingBilinear2d``) and the softmax runs over the raw target scores.
    Full-model runs on :math:`C` masked inputs per image, batched; ``channels`` keeps
    only the channels with the largest mean activation (others weigh 0).
    """

    name = "scorecam"
    needs_inputs = True

    def __init__(self, runner, *, channels: int | None = None, batch_size: int = 32):
        super().__init__(runner)
        if channels is not None and channels < 1:
            raise UsageError("--scorecam-channels must be 1 or more")
        self.channels = channels
        self.batch_size = batch_size

    def get_cam_weights(self, activations, targets, inputs=None):
        if inputs is None:
            raise UsageError("Score-CAM needs the model inputs")
        n, c, h, w = activations.shape
        nhwc = self.runner.layout == "NHWC"
        height, width = inputs.shape[1:3] if nhwc else inputs.shape[2:4]
        wy = _aligned_matrix(height, h)
        wx = _aligned_matrix(width, w)
        weights = np.zeros((n, c), dtype=np.float64)
        for i in range(n):
            a = activations[i].astype(np.float64)
            chosen = np.arange(c)
            if self.channels is not None and self.channels < c:
                chosen = np.sort(np.argsort(-a.mean(axis=(1, 2)), kind="stable")[: self.channels])
            scores = np.zeros(len(chosen))
            for s in range(0, len(chosen), self.batch_size):
                ks = chosen[s : s + self.batch_size]
                up = np.matmul(np.matmul(wy, a[ks]), wx.T)  # (B, H, W)
                lo = up.min(axis=(1, 2), keepdims=True)
                hi = up.max(axis=(1, 2), keepdims=True)
                masks = ((up - lo) / (hi - lo + 1e-8)).astype(np.float32)
                x = inputs[i][None]
                masked = x * (masks[:, :, :, None] if nhwc else masks[:, None, :, :])
                logits = self.runner.run_inputs(masked)
                scores[s : s + len(ks)] = logits[:, int(targets[i])]
            weights[i, chosen] = softmax(scores)
        return weights


def _aligned_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Linear resampling with aligned corners (``align_corners=True``)."""
    if in_size == 1 or out_size == 1:
        return bilinear_matrix(out_size, in_size)
    x = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), in_size - 2)
    frac = x - lo
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    m[rows, lo] = 1 - frac
    m[rows, lo + 1] += frac
    return m

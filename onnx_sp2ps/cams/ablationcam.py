"""Ablation-CAM (Desai & Ramaswamy, WACV 2020, doi:10.1109/WACV45572.2020.9093360)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM

__all__ = ["AblationCAM", "ABLATION_OFFSET"]

#: pytorch-grad-cam's ablation value below the minimum for maps with negative values.
ABLATION_OFFSET = 1e7


class AblationCAM(BaseCAM):
    r"""Ablation-CAM: how much the target logit drops when channel :math:`k` is removed.

    .. math:: \alpha_k = \frac{y_c - y_c^{(k)}}{y_c}

    where :math:`y_c^{(k)}` is the head's output with channel :math:`k` ablated: set to 0
    when the map's minimum is 0 (ReLU outputs; the paper's choice), else to the minimum
    minus :math:`10^7`, as pytorch-grad-cam does.  The weight's normalisation by
    :math:`y_c` is pytorch-grad-cam's.  Head runs only: :math:`C + 1` maps per image.
    """

    name = "ablationcam"

    def get_cam_weights(self, activations, targets, inputs=None):
        n, c = activations.shape[:2]
        weights = np.zeros((n, c), dtype=np.float64)
        for i in range(n):
            a = activations[i]
            low = float(a.min())
            value = np.float32(0.0 if low == 0.0 else low - ABLATION_OFFSET)

            def make(start, stop, a=a, value=value):
                rows = np.arange(start, stop)
                out = np.repeat(a[None], stop - start, axis=0)
                ablate = rows >= 1  # row 0: the map itself
                out[np.nonzero(ablate)[0], rows[ablate] - 1] = value
                return out

            y = self.runner.map_head(make, c + 1, a.shape, i)[:, int(targets[i])].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                weights[i] = (y[0] - y[1:]) / y[0]
        return weights

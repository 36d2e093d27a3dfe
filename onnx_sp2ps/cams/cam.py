"""Classic CAM (Zhou et al., CVPR 2016, doi:10.1109/CVPR.2016.319)."""

from __future__ import annotations

import numpy as np

from onnx_sp2ps.cams.base import BaseCAM
from onnx_sp2ps.errors import ModelError

__all__ = ["ClassicCAM"]


class ClassicCAM(BaseCAM):
    r"""CAM: channels weighted by the target's row of the linear layer that follows
    global average pooling, :math:`R = \sum_k W_{ck} A_k`.  For such heads it is
    Grad-CAM times :math:`hw`; other heads are refused."""

    name = "cam"

    def __init__(self, runner):
        super().__init__(runner)
        self.weights = runner.classifier_weights()

    def get_cam_weights(self, activations, targets, inputs=None):
        if self.weights.shape[1] != activations.shape[1]:
            raise ModelError("the linear layer's inputs do not match the feature map's channels")
        return self.weights[np.asarray(targets, dtype=np.int64)]

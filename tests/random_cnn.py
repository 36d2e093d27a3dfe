"""Random valid small CNN classifiers from a seed, each with an independent numpy twin.

``random_cnn(seed)`` draws a network and returns it as an ONNX model (in an
``onnx_builders.BuiltModel``, with the names detection should find) together with a
:class:`NumpyCNN` that computes the same network in float64 numpy from the weights it drew:
the feature map, the logits and the exact gradient of a logit with respect to the feature
map (analytic, per head form). Nothing here uses onnxruntime or onnx_sp2ps, so tests can
check onnx-sp2ps (detection, the runner, the backward graph, Grad-CAM) against it.

What is drawn
    * input: 1 or 3 channels, H and W in 6..14 (not necessarily square), batch symbolic;
    * trunk: 1-4 blocks of Conv (kernel 1 or 3, "same" padding, stride 1 or 2 while the
      map stays at least 2x2, widths 2..8) -> optional BatchNormalization -> activation
      Relu / LeakyRelu / HardSwish / Clip(0, 6) / Sigmoid-gated (x * Sigmoid(x));
    * head (:data:`HEADS`, ``HEADS[seed % 6]``): ``gap_gemm`` GlobalAveragePool ->
      Flatten -> Gemm; ``reducemean_matmul`` ReduceMean(keepdims 0) -> MatMul -> Add;
      ``flatten_mlp`` Flatten -> Gemm -> Relu -> Gemm; ``avgpool_gemm`` AveragePool
      (kernel h x w) -> Flatten -> Gemm; ``conv1x1_gap`` 1x1 Conv (classes out) -> [Relu]
      -> GlobalAveragePool -> Flatten (NHWC models: or -> Transpose back to NHWC -> [Relu]
      -> ReduceMean over H, W, as tf2onnx exports it); ``flatten_abs_mlp`` as
      ``flatten_mlp`` with Abs, an op with no backward rule in onnx_sp2ps.backward (the
      finite-difference fallback); not drawn, only asked for with ``random_cnn(seed,
      head=...)``: ``flatten_softplus_mlp`` and ``flatten_atan_mlp`` (:data:`SMOOTH_HEADS`),
      the same with Softplus or Atan, smooth curved ops that have no backward rule either;
    * final Softmax or none; layout NCHW or NHWC (tf2onnx style: the image is NHWC and
      every Conv sits between Transposes); exporter naming torch / tf / paddle
      (``onnx_builders._GraphWriter``); weights as initializers or Constant nodes;
      opset 13, 14, 17 or 18.

Expected detection (README, "Detection": the feature map is the last tensor with spatial extent > 1
on the path to the logits; the logits are the input of a final Softmax): the last trunk
activation, or for NHWC models with a head that needs NCHW (pooling and 1x1 conv heads)
the output of the Transpose in front of it; for ``conv1x1_gap`` the input of the
classifier conv. The class count never equals a trunk width, so no trunk conv looks like
a 1x1 classifier conv (which detection steps behind by design).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_builders import _TO_NCHW, _TO_NHWC, BuiltModel, _classifier_weight, _GraphWriter

HEADS = (
    "gap_gemm",
    "reducemean_matmul",
    "flatten_mlp",
    "avgpool_gemm",
    "conv1x1_gap",
    "flatten_abs_mlp",
)
#: Heads whose ops all have a backward rule in onnx_sp2ps.backward.
EXACT_HEADS = HEADS[:-1]
#: Smooth, curved heads without a backward rule (finite differences): only on request.
SMOOTH_HEADS = ("flatten_softplus_mlp", "flatten_atan_mlp")
#: The hidden activation of each Flatten -> Gemm -> act -> Gemm head, with its derivative.
MLP_ACTIVATIONS = {
    "flatten_mlp": ("Relu", lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float)),
    "flatten_abs_mlp": ("Abs", np.abs, np.sign),
    "flatten_softplus_mlp": (
        "Softplus",
        lambda z: np.logaddexp(0.0, z),
        lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)),
    ),
    "flatten_atan_mlp": ("Atan", np.arctan, lambda z: 1.0 / (1.0 + z * z)),
}
ACTIVATIONS = ("Relu", "LeakyRelu", "HardSwish", "Clip", "SigmoidGate")
STYLES = ("torch", "tf", "paddle")
LAYOUTS = ("NCHW", "NHWC")
WEIGHTS = ("initializer", "constant")
OPSETS = (13, 14, 17, 18)
BN_EPSILON = 1e-5


# --------------------------------------------------------------------------- numpy twin


@dataclass(frozen=True)
class Block:
    """One trunk block: Conv -> [BatchNormalization] -> activation."""

    weight: np.ndarray  # (C_out, C_in, k, k) float32
    bias: np.ndarray  # (C_out,)
    stride: int
    act: str
    alpha: float = 0.0  # LeakyRelu slope
    bn: tuple[np.ndarray, ...] | None = None  # scale, bias, mean, var


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """NCHW convolution with "same" padding, explicit patches (float64)."""
    k = weight.shape[2]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
    patches = patches[:, :, ::stride, ::stride]  # (N, C, h, w, k, k)
    return (
        np.einsum("ncyxij,ocij->noyx", patches, weight.astype(np.float64))
        + bias.astype(np.float64)[None, :, None, None]
    )


def _activation(x: np.ndarray, act: str, alpha: float) -> np.ndarray:
    if act == "Relu":
        return np.maximum(x, 0.0)
    if act == "LeakyRelu":
        return np.where(x > 0, x, alpha * x)
    if act == "HardSwish":
        return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if act == "Clip":
        return np.clip(x, 0.0, 6.0)
    if act == "SigmoidGate":
        return x / (1.0 + np.exp(-x))
    raise ValueError(act)


@dataclass(frozen=True)
class NumpyCNN:
    """The drawn network in float64 numpy. Feature maps are NCHW whatever the model's
    layout (as onnx_sp2ps.runtime.ModelRunner hands them out)."""

    layout: str
    blocks: tuple[Block, ...]
    head: str
    params: dict = field(default_factory=dict)
    flatten_nhwc: bool = False  # the Flatten head flattens an NHWC tensor

    def features(self, images: np.ndarray) -> np.ndarray:
        """Feature map (N, C, h, w) for images in the model's layout."""
        x = np.asarray(images, dtype=np.float64)
        if self.layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        for block in self.blocks:
            x = _conv(x, block.weight, block.bias, block.stride)
            if block.bn is not None:
                scale, shift, mean, var = (
                    np.asarray(v, np.float64)[None, :, None, None] for v in block.bn
                )
                x = scale * (x - mean) / np.sqrt(var + BN_EPSILON) + shift
            x = _activation(x, block.act, block.alpha)
        return x

    def _flat(self, a: np.ndarray) -> np.ndarray:
        return (a.transpose(0, 2, 3, 1) if self.flatten_nhwc else a).reshape(len(a), -1)

    def _hidden(self, a: np.ndarray) -> np.ndarray:
        p = self.params
        return self._flat(a) @ p["w1"].astype(np.float64) + p["b1"]

    def logits(self, a: np.ndarray) -> np.ndarray:
        """Logits (N, K) of the head for feature maps (N, C, h, w)."""
        a = np.asarray(a, dtype=np.float64)
        p = {k: np.asarray(v, np.float64) for k, v in self.params.items()}
        if self.head in ("gap_gemm", "reducemean_matmul", "avgpool_gemm"):
            return a.mean(axis=(2, 3)) @ p["w"] + p["b"]
        if self.head in MLP_ACTIVATIONS:
            hidden = MLP_ACTIVATIONS[self.head][1](self._hidden(a))
            return hidden @ p["w2"] + p["b2"]
        scores = np.einsum("ck,nchw->nkhw", p["w"], a) + p["b"][None, :, None, None]
        if self.params["relu"]:
            scores = np.maximum(scores, 0.0)
        return scores.mean(axis=(2, 3))

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(feature map (N, C, h, w), logits (N, K)), float64."""
        a = self.features(images)
        return a, self.logits(a)

    def head_gradient(self, a: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """d logits[n, targets[n]] / d a (N, C, h, w), analytic."""
        a = np.asarray(a, dtype=np.float64)
        targets = np.asarray(targets)
        n, c, h, w = a.shape
        p = {k: np.asarray(v, np.float64) for k, v in self.params.items()}
        if self.head in ("gap_gemm", "reducemean_matmul", "avgpool_gemm"):
            per_channel = p["w"][:, targets].T / (h * w)  # (N, C)
            return np.broadcast_to(per_channel[:, :, None, None], a.shape).copy()
        if self.head in MLP_ACTIVATIONS:
            slope = MLP_ACTIVATIONS[self.head][2](self._hidden(a))
            d_flat = (p["w2"][:, targets].T * slope) @ p["w1"].T  # (N, F)
            if self.flatten_nhwc:
                return d_flat.reshape(n, h, w, c).transpose(0, 3, 1, 2)
            return d_flat.reshape(n, c, h, w)
        weight = p["w"][:, targets].T  # (N, C)
        scores = np.einsum("nc,nchw->nhw", weight, a) + p["b"][targets][:, None, None]
        mask = (scores > 0) if self.params["relu"] else np.ones_like(scores, dtype=bool)
        return weight[:, :, None, None] * mask[:, None].astype(np.float64) / (h * w)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RandomCNN:
    """A drawn model with what detection should find in it (``built``), its numpy twin,
    and the draws (``config``: style, layout, weights, opset, act, final, blocks)."""

    seed: int
    built: BuiltModel
    reference: NumpyCNN
    config: dict
    description: str

    @property
    def exact_gradient(self) -> bool:
        """True when every head op has a backward rule (else finite differences)."""
        return self.built.head in EXACT_HEADS


def _scopes(style: str, i: int, act: str) -> tuple[str, str, str]:
    """(conv, batch norm, activation) scopes of block ``i`` in an exporter's style."""
    if style == "torch":
        return f"features.{i}.conv", f"features.{i}.bn", f"features.{i}.act"
    if style == "tf":
        return f"conv2d_{i}", f"batch_normalization_{i}", f"conv2d_{i}"
    return f"conv2d_{i}", f"batch_norm2d_{i}", f"{act.lower()}_{i}"


def random_cnn(seed: int, head: str | None = None) -> RandomCNN:
    """Draw one classifier from ``seed`` (see the module docstring); ``head`` replaces the
    drawn head form (every other draw stays the same)."""
    if head is not None and head not in HEADS + SMOOTH_HEADS:
        raise ValueError(f"head={head!r}: choose one of {HEADS + SMOOTH_HEADS}")
    rng = np.random.default_rng(seed)
    style = str(rng.choice(STYLES))
    layout = str(rng.choice(LAYOUTS))
    weights = str(rng.choice(WEIGHTS))
    head = head or HEADS[seed % len(HEADS)]  # every form in any run of len(HEADS) seeds
    act = str(rng.choice(ACTIVATIONS))
    opset = int(rng.choice(OPSETS))
    if act == "HardSwish":
        opset = max(opset, 14)
    final = "Softmax" if rng.random() < 0.5 else None
    channels = int(rng.choice([1, 3]))
    height, width = (int(v) for v in rng.integers(6, 15, size=2))
    num_classes = int(rng.integers(3, 7))
    depth = int(rng.integers(1, 5))
    alpha = float(np.float32(rng.uniform(0.05, 0.3)))
    nhwc = layout == "NHWC"
    g = _GraphWriter(style, weights, opset, rng)

    def pick(torch: str, tf: str, paddle: str) -> str:
        return {"torch": torch, "tf": tf, "paddle": paddle}[style]

    input_name = pick("input", "input_1", "x")
    dims = ["N", height, width, channels] if nhwc else ["N", channels, height, width]
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)]

    # ---- trunk ----------------------------------------------------------------------
    x, c_in, h, w = input_name, channels, height, width
    blocks = []
    for i in range(depth):
        c_out = int(rng.choice([v for v in range(2, 9) if v != num_classes]))
        k = int(rng.choice([1, 3]))
        stride = 2 if rng.random() < 0.5 and (h - 1) // 2 + 1 >= 2 and (w - 1) // 2 + 1 >= 2 else 1
        conv_scope, bn_scope, act_scope = _scopes(style, i, act)
        kernel = g.he((c_out, c_in, k, k), c_in * k * k)
        bias = g.small((c_out,))
        bn = None
        if rng.random() < 0.5:
            bn = (
                rng.uniform(0.5, 1.5, c_out).astype(np.float32),
                g.small((c_out,)),
                g.small((c_out,)),
                rng.uniform(0.5, 1.5, c_out).astype(np.float32),
            )
        if nhwc:
            x = g.op("Transpose", [x], conv_scope, perm=_TO_NCHW)
        x = g.op(
            "Conv",
            [x, g.param(conv_scope, "weight", kernel), g.param(conv_scope, "bias", bias)],
            conv_scope,
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            strides=[stride, stride],
        )
        if bn is not None:
            x = g.op(
                "BatchNormalization",
                [
                    x,
                    g.param(bn_scope, "weight", bn[0]),
                    g.param(bn_scope, "bias", bn[1]),
                    g.param(bn_scope, "const", bn[2]),
                    g.param(bn_scope, "const", bn[3]),
                ],
                bn_scope,
                epsilon=BN_EPSILON,
            )
        if nhwc:
            x = g.op("Transpose", [x], conv_scope, perm=_TO_NHWC)
        if act == "LeakyRelu":
            x = g.op("LeakyRelu", [x], act_scope, alpha=alpha)
        elif act == "Clip":
            x = g.op(
                "Clip",
                [
                    x,
                    g.param("Clip", "const", np.array(0.0, np.float32)),
                    g.param("Clip", "const", np.array(6.0, np.float32)),
                ],
                act_scope,
            )
        elif act == "SigmoidGate":
            x = g.op("Mul", [x, g.op("Sigmoid", [x], act_scope)], act_scope)
        else:
            x = g.op(act, [x], act_scope)
        blocks.append(Block(weight=kernel, bias=bias, stride=stride, act=act, alpha=alpha, bn=bn))
        c_in, h, w = c_out, (h - 1) // stride + 1, (w - 1) // stride + 1

    # ---- head -----------------------------------------------------------------------
    fc = pick("fc", "dense", "linear_0")
    params: dict = {}
    feature_layout = layout
    flatten_nhwc = False

    def to_nchw(t: str) -> str:
        nonlocal feature_layout
        feature_layout = "NCHW"
        if not nhwc:
            return t
        return g.op(
            "Transpose", [t], pick("", "global_average_pooling2d", "transpose_0"), perm=_TO_NCHW
        )

    def gemm(t: str, fan_in: int, fan_out: int, scope: str) -> tuple[str, np.ndarray, np.ndarray]:
        """Gemm(transB=1) as torch exports it, plain Gemm otherwise; weight (in, out)."""
        weight = _classifier_weight(rng, fan_in, fan_out)
        bias = g.small((fan_out,))
        if style == "torch":
            out = g.op(
                "Gemm",
                [t, g.param(scope, "weight", weight.T.copy()), g.param(scope, "bias", bias)],
                scope,
                transB=1,
            )
        else:
            out = g.op(
                "Gemm", [t, g.param(scope, "weight", weight), g.param(scope, "bias", bias)], scope
            )
        return out, weight, bias

    if head in ("gap_gemm", "avgpool_gemm"):
        x = feature_map = to_nchw(x)
        pool = pick("avgpool", "global_average_pooling2d", "pool2d_0")
        if head == "gap_gemm":
            x = g.op("GlobalAveragePool", [x], pool)
        else:
            x = g.op("AveragePool", [x], pool, kernel_shape=[h, w])
        x = g.op("Flatten", [x], pick("", "flatten", "flatten_0"), axis=1)
        x, params["w"], params["b"] = gemm(x, c_in, num_classes, fc)
    elif head == "reducemean_matmul":
        feature_map = x
        x = g.reduce_mean(
            x, [1, 2] if nhwc else [2, 3], 0, pick("", "global_average_pooling2d", "mean_0")
        )
        params["w"] = _classifier_weight(rng, c_in, num_classes)
        params["b"] = g.small((num_classes,))
        x = g.op("MatMul", [x, g.param(fc, "weight", params["w"])], fc)
        x = g.op("Add", [x, g.param(fc, "bias", params["b"])], fc)
    elif head in MLP_ACTIVATIONS:
        feature_map = x
        flatten_nhwc = nhwc
        hidden = int(rng.integers(4, 17))
        x = g.op("Flatten", [x], pick("", "flatten", "flatten_0"), axis=1)
        x, params["w1"], params["b1"] = gemm(
            x, c_in * h * w, hidden, pick("classifier.0", "dense", "linear_0")
        )
        hidden_act = MLP_ACTIVATIONS[head][0]
        x = g.op(hidden_act, [x], pick("classifier.1", "dense", f"{hidden_act.lower()}_0"))
        x, params["w2"], params["b2"] = gemm(
            x, hidden, num_classes, pick("classifier.2", "dense_1", "linear_1")
        )
    else:  # conv1x1_gap
        x = feature_map = to_nchw(x)
        scope = pick("classifier.1", "conv2d_out", "conv2d_out")
        params["w"] = _classifier_weight(rng, c_in, num_classes)
        params["b"] = (0.1 + g.small((num_classes,))).astype(np.float32)
        params["relu"] = bool(rng.random() < 0.5)
        kernel = params["w"].T.reshape(num_classes, c_in, 1, 1).copy()
        x = g.op(
            "Conv",
            [x, g.param(scope, "weight", kernel), g.param(scope, "bias", params["b"])],
            scope,
            kernel_shape=[1, 1],
        )
        back_to_nhwc = nhwc and bool(rng.random() < 0.5)  # as tf2onnx exports it
        if back_to_nhwc:
            x = g.op("Transpose", [x], scope, perm=_TO_NHWC)
        if params["relu"]:
            x = g.op("Relu", [x], pick("classifier.2", "conv2d_out", "relu_out"))
        if back_to_nhwc:
            x = g.reduce_mean(x, [1, 2], 0, pick("", "global_average_pooling2d", "mean_0"))
        else:
            x = g.op("GlobalAveragePool", [x], pick("classifier.3", "pool", "pool2d_0"))
            x = g.op("Flatten", [x], pick("", "flatten", "flatten_0"), axis=1)

    # ---- final activation and output -------------------------------------------------
    logits = x
    if final is not None:
        x = g.op(
            "Softmax", [x], pick("", "predictions", "softmax_0"), axis=1 if style == "torch" else -1
        )
    output_name = pick("output", "predictions", "save_infer_model/scale_0.tmp_0")
    g.nodes[-1].output[0] = output_name
    if logits == x:
        logits = output_name
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", num_classes])]
    graph = helper.make_graph(
        g.nodes,
        pick("main_graph", "tf2onnx", "paddle-onnx"),
        inputs,
        outputs,
        initializer=g.initializers,
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(
        graph,
        opset_imports=[opset_id],
        ir_version=helper.find_min_ir_version_for([opset_id]),
        producer_name=pick("pytorch", "tf2onnx", "PaddlePaddle"),
    )
    onnx.checker.check_model(model, full_check=True)

    config = dict(
        style=style,
        layout=layout,
        weights=weights,
        opset=opset,
        act=act,
        final=final,
        channels=channels,
        size=(height, width),
        depth=depth,
        kernels=tuple(b.weight.shape[2] for b in blocks),
        strides=tuple(b.stride for b in blocks),
        batch_norm=tuple(b.bn is not None for b in blocks),
    )
    reference = NumpyCNN(
        layout=layout, blocks=tuple(blocks), head=head, params=params, flatten_nhwc=flatten_nhwc
    )
    trunk = " ".join(
        f"{b.weight.shape[0]}k{b.weight.shape[2]}s{b.stride}{'+bn' if b.bn else ''}" for b in blocks
    )
    description = (
        f"seed {seed}: {style}/{layout}/{weights}/opset{opset} {channels}x{height}x"
        f"{width} [{trunk}] {act} -> {head} ({num_classes} classes, final {final})"
    )
    batch = 2
    built = BuiltModel(
        model=model,
        input_name=input_name,
        layout=layout,
        feature_map=feature_map,
        feature_layout=feature_layout,
        logits=logits,
        activation=final,
        num_classes=num_classes,
        input_shape=(batch, height, width, channels) if nhwc else (batch, channels, height, width),
        feature_shape=(batch, h, w, c_in) if feature_layout == "NHWC" else (batch, c_in, h, w),
        head=head,
    )
    return RandomCNN(
        seed=seed, built=built, reference=reference, config=config, description=description
    )

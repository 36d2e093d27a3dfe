"""Benchmark models built with ``onnx.helper`` (no torch).

:func:`build_resnet18` is ResNet-18 (He et al., CVPR 2016) with the real architecture
and tensor sizes, laid out as ``torch.onnx.export`` writes a torchvision ResNet-18 in
eval mode: BatchNorm folded into the convolutions' weights and biases, node names
``/layer1/layer1.0/conv1/Conv``, tensors ``<node>_output_0``, folded parameters
``onnx::Conv_<n>``, the classifier ``fc.weight`` / ``fc.bias`` in a ``Gemm`` with
``transB=1``, input ``input`` ``[N, 3, 224, 224]`` with a symbolic batch ``N`` and
output ``logits``.

The weights are random but not arbitrary: each convolution is He-initialised and then a
BatchNorm is folded into it whose running statistics are the real per-channel mean and
standard deviation of that convolution's output on a calibration batch (uniform noise
images), with random affine parameters (gamma around 1, smaller on the last conv of each
residual branch as in trained ResNets; beta around 0). So activations keep unit scale
through all 8 blocks, stay finite and are neither all zero nor exploding, and the
logits differ between images and classes.

Run ``python benchmarks/models.py`` to build, check (``onnx.checker``) and run it once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_resnet18", "prune_resnet18", "OPSET", "IR_VERSION"]

OPSET = 17
#: onnxruntime 1.31 cannot load onnx 1.23's default IR version (14).
IR_VERSION = 8
#: Stage widths and strides of ResNet-18 (2 BasicBlocks each).
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
BLOCKS_PER_STAGE = 2
CALIBRATION_IMAGES = 4


class _Builder:
    """Nodes and initialisers in topological order, named as the PyTorch exporter does."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.convs: list[dict] = []  # per conv: node index, weight/bias names, BN gammas
        self._param = 100

    def _param_name(self, op: str) -> str:
        self._param += 1
        return f"onnx::{op}_{self._param}"

    def node(self, op: str, scope: str, inputs: list[str], **attrs) -> str:
        name = f"{scope}/{op}"
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(
        self,
        scope: str,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        gamma: tuple[float, float],
    ) -> str:
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)
        w_name, b_name = self._param_name("Conv"), self._param_name("Conv")
        self.inits[w_name] = w.astype(np.float32)
        self.inits[b_name] = np.zeros(cout, np.float32)
        pad = k // 2
        out = self.node(
            "Conv",
            scope,
            [x, w_name, b_name],
            dilations=[1, 1],
            group=1,
            kernel_shape=[k, k],
            pads=[pad, pad, pad, pad],
            strides=[stride, stride],
        )
        self.convs.append(
            {
                "index": len(self.nodes) - 1,
                "output": out,
                "weight": w_name,
                "bias": b_name,
                "gamma": self.rng.uniform(*gamma, size=cout),
                "beta": self.rng.normal(0.0, 0.1, size=cout),
            }
        )
        return out


def _graph(
    b: _Builder, nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto], size: int
) -> onnx.GraphProto:
    used = {i for n in nodes for i in n.input}
    inits = [numpy_helper.from_array(v, k) for k, v in b.inits.items() if k in used]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    return helper.make_graph(nodes, "main_graph", [x], outputs, inits)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnx-sp2ps benchmarks",
    )
    model.doc_string = "ResNet-18 (random weights, BatchNorm folded), benchmarks/models.py"
    return model


def _calibrate(b: _Builder, size: int, seed: int) -> None:
    """Fold a BatchNorm into every conv, conv by conv in graph order, with the running
    statistics measured on a calibration batch through the already-folded layers."""
    import onnxruntime as ort

    x = (
        np.random.default_rng(seed + 1)
        .uniform(0, 1, (CALIBRATION_IMAGES, 3, size, size))
        .astype(np.float32)
    )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for conv in b.convs:
        prefix = b.nodes[: conv["index"] + 1]
        out = helper.make_tensor_value_info(conv["output"], TensorProto.FLOAT, None)
        data = _model(_graph(b, prefix, [out], size)).SerializeToString()
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"input": x})[0].astype(np.float64)
        mean = y.mean(axis=(0, 2, 3))
        std = np.sqrt(y.var(axis=(0, 2, 3)) + 1e-5)
        scale = conv["gamma"] / std
        w = b.inits[conv["weight"]].astype(np.float64)
        b.inits[conv["weight"]] = (w * scale[:, None, None, None]).astype(np.float32)
        b.inits[conv["bias"]] = (conv["beta"] - mean * scale).astype(np.float32)


def build_resnet18(num_classes: int = 1000, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 as an ONNX model (opset 17, IR 8), random He-initialised weights with
    BatchNorm folded in.

    Parameters
    ----------
    num_classes
        Outputs of the final ``Gemm`` (``fc``).
    size
        Height and width of the input ``[N, 3, size, size]`` (the feature map is
        ``size / 32``: 7 x 7 for 224).
    seed
        Seed of the weights (and of the calibration batch).
    """
    if size < 32 or num_classes < 1:
        raise ValueError("need size >= 32 and num_classes >= 1")
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    normal, last = (0.8, 1.2), (0.2, 0.5)

    x = b.conv("/conv1", "input", 3, 64, 7, 2, normal)
    x = b.node("Relu", "/relu", [x])
    x = b.node(
        "MaxPool",
        "/maxpool",
        [x],
        ceil_mode=0,
        dilations=[1, 1],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[2, 2],
    )
    cin = 64
    for s, (cout, stride) in enumerate(STAGES, start=1):
        for i in range(BLOCKS_PER_STAGE):
            scope = f"/layer{s}/layer{s}.{i}"
            st = stride if i == 0 else 1
            identity = x
            y = b.conv(f"{scope}/conv1", x, cin, cout, 3, st, normal)
            y = b.node("Relu", f"{scope}/relu", [y])
            y = b.conv(f"{scope}/conv2", y, cout, cout, 3, 1, last)
            if st != 1 or cin != cout:
                identity = b.conv(f"{scope}/downsample/downsample.0", x, cin, cout, 1, st, normal)
            y = b.node("Add", scope, [y, identity])
            x = b.node("Relu", f"{scope}/relu_1", [y])
            cin = cout
    x = b.node("GlobalAveragePool", "/avgpool", [x])
    x = b.node("Flatten", "", [x], axis=1)
    bound = 1.0 / np.sqrt(cin)  # torch.nn.Linear's default init, then scaled below
    b.inits["fc.weight"] = rng.uniform(-bound, bound, (num_classes, cin)).astype(np.float32)
    b.inits["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
    b.nodes.append(
        helper.make_node(
            "Gemm",
            [x, "fc.weight", "fc.bias"],
            ["logits"],
            name="/fc/Gemm",
            alpha=1.0,
            beta=1.0,
            transB=1,
        )
    )

    _calibrate(b, size, seed)
    # Scale the classifier so that the logits spread over a few units, as a trained
    # model's do (softmax neither uniform nor one-hot).
    feats = _pooled_features(b, size, seed)
    spread = float((feats @ b.inits["fc.weight"].T.astype(np.float64)).std())
    if spread > 0:
        b.inits["fc.weight"] = (b.inits["fc.weight"] * (3.0 / spread)).astype(np.float32)

    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])
    model = _model(_graph(b, b.nodes, [logits], size))
    onnx.checker.check_model(model, full_check=True)
    return model


def prune_resnet18(model: onnx.ModelProto, ratio: float = 0.5) -> onnx.ModelProto:
    """A structurally pruned copy of :func:`build_resnet18`'s model (L1 filter pruning).

    In every BasicBlock the ``ratio`` share of ``conv1``'s filters with the smallest L1
    norm is removed, with the matching input channels of ``conv2``: the block's output
    width (and so the feature map the CAMs use) is unchanged, the model is smaller and
    faster, and its function differs from the original's as a pruned model's does
    without fine-tuning.  The input is not modified.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError("ratio must be in [0, 1)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    for name, conv1 in convs.items():
        if not name.endswith("/conv1/Conv") or name == "/conv1/Conv":
            continue
        conv2 = convs[name.replace("/conv1/Conv", "/conv2/Conv")]
        w1 = numpy_helper.to_array(inits[conv1.input[1]])
        b1 = numpy_helper.to_array(inits[conv1.input[2]])
        w2 = numpy_helper.to_array(inits[conv2.input[1]])
        keep = np.sort(
            np.argsort(-np.abs(w1).sum(axis=(1, 2, 3)), kind="stable")[
                : max(1, round(len(w1) * (1.0 - ratio)))
            ]
        )
        for tensor, array in (
            (conv1.input[1], w1[keep]),
            (conv1.input[2], b1[keep]),
            (conv2.input[1], w2[:, keep]),
        ):
            inits[tensor].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor))
    out.doc_string = f"{model.doc_string}; conv1 of each block L1-pruned by {ratio:.0%}"
    onnx.checker.check_model(out, full_check=True)
    return out


def _pooled_features(b: _Builder, size: int, seed: int) -> np.ndarray:
    import onnxruntime as ort

    flat = b.nodes[-2].output[0]
    out = helper.make_tensor_value_info(flat, TensorProto.FLOAT, None)
    data = _model(_graph(b, b.nodes[:-1], [out], size)).SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = (
        np.random.default_rng(seed + 1)
        .uniform(0, 1, (CALIBRATION_IMAGES, 3, size, size))
        .astype(np.float32)
    )
    return sess.run(None, {"input": x})[0].astype(np.float64)


def _main() -> None:
    import time

    import onnxruntime as ort

    t0 = time.perf_counter()
    model = build_resnet18()
    t1 = time.perf_counter()
    onnx.checker.check_model(model, full_check=True)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    print(
        f"built in {t1 - t0:.1f} s: {len(model.graph.node)} nodes, {convs} Conv, "
        f"{params:,} parameters, {model.ByteSize() / 2**20:.1f} MiB"
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(123).uniform(0, 1, (4, 3, 224, 224)).astype(np.float32)
    probe = onnx.helper.make_tensor_value_info(
        "/layer4/layer4.1/relu_1/Relu_output_0", TensorProto.FLOAT, None
    )
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    m2.graph.output.append(probe)
    logits, feat = ort.InferenceSession(
        m2.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"input": x})
    print(
        f"feature map {feat.shape}: mean {feat.mean():.3f} std {feat.std():.3f} "
        f"zeros {np.mean(feat == 0):.2f}"
    )
    print(
        f"logits {logits.shape}: finite {np.isfinite(logits).all()}, std over classes "
        f"{logits.std(axis=1).mean():.3f}, std over images {logits.std(axis=0).mean():.3f}, "
        f"top-1 {logits.argmax(1).tolist()}"
    )
    assert sess.run(None, {"input": x})[0].shape == (4, 1000)


if __name__ == "__main__":
    _main()

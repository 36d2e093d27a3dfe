"""Graph shapes that real exporters produce and the synthetic builders do not.

Built with onnx.helper after what torch.onnx emits (scripts/explore_exports.py exports the
families these come from): ShuffleNetV2's channel shuffle ``x.view(n, g, c // g, h, w)``
with sizes computed at run time (TorchScript exporter, opset 13), and the dynamo
exporter's heads, which read the batch size from the image input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_sp2ps.model import analyse_model, prepare_model
from onnx_sp2ps.runtime import ModelRunner

RNG = np.random.default_rng(3)
K = 3


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _model(nodes, inits, size, opset=13):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])
    model = helper.make_model(
        helper.make_graph(nodes, "net", [x], [y], initializer=inits),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def shufflenet_style() -> onnx.ModelProto:
    """Conv -> Relu -> channel shuffle (sizes from Shape, Div, Cast) -> 1x1 Conv -> Relu
    ("feat", 12 x 8 x 8) -> ReduceMean(axes 2, 3) -> Gemm, as TorchScript opset 13 emits."""
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w1"], ["r0"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["r0"], ["r1"]),
        n("Shape", ["r1"], ["s"]),
    ]
    for i, dim in enumerate("nchw"):
        nodes.append(n("Gather", ["s", f"i{i}"], [dim]))
    nodes += [n("Div", ["c", "two"], ["cg0"]), n("Cast", ["cg0"], ["cg"], to=TensorProto.INT64)]
    for dim in ("n", "cg", "h", "w", "c"):
        nodes.append(n("Unsqueeze", [dim, "ax0"], [f"u_{dim}"]))
    nodes += [
        n("Concat", ["u_n", "g2", "u_cg", "u_h", "u_w"], ["shape5"], axis=0),
        n("Reshape", ["r1", "shape5"], ["grouped"]),
        n("Transpose", ["grouped"], ["swapped"], perm=[0, 2, 1, 3, 4]),
        n("Concat", ["u_n", "u_c", "u_h", "u_w"], ["shape4"], axis=0),
        n("Reshape", ["swapped", "shape4"], ["shuffled"]),
        n("Conv", ["shuffled", "w2"], ["c2"]),
        n("Relu", ["c2"], ["feat"]),
        n("ReduceMean", ["feat"], ["pooled"], axes=[2, 3], keepdims=0),
        n("Gemm", ["pooled", "fc"], ["logits"], transB=1),
    ]
    inits = [
        _init("w1", RNG.normal(size=(8, 3, 3, 3))),
        _init("w2", RNG.normal(size=(12, 8, 1, 1))),
        _init("fc", RNG.normal(size=(K, 12))),
        _init("two", 2, np.int64),
        _init("g2", [2], np.int64),
        _init("ax0", [0], np.int64),
    ]
    inits += [_init(f"i{i}", i, np.int64) for i in range(4)]
    return _model(nodes, inits, 16)


def test_feature_map_behind_a_channel_shuffle_of_computed_sizes():
    # ONNX shape inference does not propagate Div: the shapes after the shuffle are
    # unknown unless the probe evaluates the shape arithmetic.
    spec = analyse_model(shufflenet_style())
    assert spec.feature_map.name == "feat"
    assert spec.feature_map.shape[1:] == (12, 8, 8)
    assert spec.head_ops == ("ReduceMean", "Gemm")


def test_the_shuffled_model_runs_with_exact_gradients():
    prepared = prepare_model(shufflenet_style())
    runner = ModelRunner(prepared, provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    acts, logits = runner.run(RNG.normal(size=(2, 3, 16, 16)).astype(np.float32))
    assert acts.shape == (2, 12, 8, 8)
    _, grads = runner.head_gradients(acts, np.array([0, 2]))
    fc = numpy_helper.to_array(prepared.head_model.graph.initializer[0])
    for i, t in enumerate([0, 2]):
        np.testing.assert_allclose(
            grads[i], np.broadcast_to(fc[t][:, None, None] / 64, (12, 8, 8)), rtol=1e-5, atol=1e-7
        )


def dynamo_style() -> onnx.ModelProto:
    """Conv -> Relu ("feat") -> GlobalAveragePool -> Reshape to (batch, -1) with the batch
    read from the image input (Shape(input, start=0, end=1)) -> Gemm."""
    n = helper.make_node
    nodes = [
        n("Shape", ["input"], ["batch_size"], start=0, end=1),
        n("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        n("Relu", ["c1"], ["feat"]),
        n("GlobalAveragePool", ["feat"], ["gap"]),
        n("Concat", ["batch_size", "minus_one"], ["flat_shape"], axis=0),
        n("Reshape", ["gap", "flat_shape"], ["flat"]),
        n("Gemm", ["flat", "fc", "bias"], ["logits"], transB=1),
    ]
    inits = [
        _init("w1", RNG.normal(size=(4, 3, 3, 3))),
        _init("fc", RNG.normal(size=(K, 4))),
        _init("bias", RNG.normal(size=K)),
        _init("minus_one", [-1], np.int64),
    ]
    return _model(nodes, inits, 8, opset=18)


def test_head_reading_the_batch_size_of_the_image_input():
    prepared = prepare_model(dynamo_style())
    assert prepared.spec.feature_map.name == "feat"
    head_inputs = {i for node in prepared.head_model.graph.node for i in node.input}
    assert "input" not in head_inputs  # the batch size is read from the feature map
    runner = ModelRunner(prepared, provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    acts, logits = runner.run(RNG.normal(size=(2, 3, 8, 8)).astype(np.float32))
    # The head alone at another batch size than the image batch.
    maps = np.concatenate([acts, acts[:1]])
    np.testing.assert_allclose(
        runner.run_head(maps), np.concatenate([logits, logits[:1]]), rtol=1e-5, atol=1e-6
    )
    _, grads = runner.head_gradients(acts, np.array([1, 0]))
    fc = numpy_helper.to_array(
        next(t for t in prepared.head_model.graph.initializer if t.name == "fc")
    )
    for i, t in enumerate([1, 0]):
        np.testing.assert_allclose(
            grads[i], np.broadcast_to(fc[t][:, None, None] / 64, (4, 8, 8)), rtol=1e-5, atol=1e-7
        )

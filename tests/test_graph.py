"""Detection of input, feature map and logits; graph edits; head extraction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_sp2ps.errors import DetectionError, ModelError
from onnx_sp2ps.model import analyse_model, load_model, prepare_model
from onnx_sp2ps.runtime import ModelRunner

from onnx_builders import all_variants, build_cnn, run_model


def _image_model(
    name: str,
    nodes,
    inits,
    opset: int,
    *,
    size: int = 16,
    output: str = "logits",
    classes: int = 4,
) -> onnx.ModelProto:
    """A model from ``image`` (N, 3, size, size) to ``output`` (N, classes)."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


VARIANTS = [(vid, kw) for vid, kw in all_variants() if not kw.get("extra_input")]


def _size(built):
    shape = built.input_shape
    return tuple(shape[2:4]) if built.layout == "NCHW" else tuple(shape[1:3])


def _expected_logits(built, kw):
    # README "Detection" rule: the input of a final activation, else the graph output itself.
    return built.logits if built.activation else built.output_name


@pytest.mark.parametrize("vid,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_detects_input_feature_map_and_logits(vid, kw):
    built = build_cnn(**kw)
    spec = analyse_model(built.model, size=_size(built))
    assert spec.input.name == built.input_name
    assert spec.layout == built.layout
    assert spec.feature_map.name == built.feature_map
    assert spec.feature_layout == built.feature_layout
    assert spec.logits.name == _expected_logits(built, kw)
    assert spec.activation == built.activation
    assert spec.num_classes == built.num_classes


@pytest.mark.parametrize("vid,kw", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_prepared_model_outputs_match_the_original_graph(vid, kw):
    built = build_cnn(**kw)
    prepared = prepare_model(built.model, size=_size(built))
    x = built.random_input(seed=3)
    ref = run_model(built, x, outputs=(built.feature_map, _expected_logits(built, kw)))
    runner = ModelRunner(prepared, provider="cpu")
    acts, logits = runner.run(x)
    feature = ref[built.feature_map]
    if built.feature_layout == "NHWC":
        feature = feature.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(acts, feature, rtol=1e-6, atol=1e-6)
    expected = ref[_expected_logits(built, kw)].reshape(len(x), -1)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    # The head alone maps the feature map to the same logits.
    np.testing.assert_allclose(runner.run_head(acts), expected, rtol=1e-5, atol=1e-5)


def test_edits_work_on_copies_and_keep_declared_types():
    built = build_cnn(head="gap_gemm")
    before = built.model.SerializeToString()
    prepared = prepare_model(built.model)
    assert built.model.SerializeToString() == before
    outputs = {o.name: o for o in prepared.audit_model.graph.output}
    fm = outputs[built.feature_map].type.tensor_type
    assert fm.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in fm.shape.dim][1:] == [16, 8, 8]
    head_in = prepared.head_model.graph.input[0]
    assert head_in.name == built.feature_map
    assert head_in.type.tensor_type.shape.dim[0].dim_param == "N"
    assert prepared.head_model.ir_version == built.model.ir_version


def test_several_inputs_need_input_name():
    built = build_cnn(extra_input=True)
    with pytest.raises(DetectionError, match="--input-name"):
        analyse_model(built.model)
    spec = analyse_model(built.model, input_name=built.input_name)
    assert spec.feature_map.name == built.feature_map
    with pytest.raises(DetectionError, match="temperature"):
        analyse_model(built.model, input_name="nope")


def test_extra_required_input_is_refused_with_a_reason():
    built = build_cnn(extra_input=True)
    with pytest.raises(ModelError, match="temperature"):
        prepare_model(built.model, input_name=built.input_name)


def test_overrides_pick_the_named_tensors():
    built = build_cnn(head="gap_gemm")
    names = [n.output[0] for n in built.model.graph.node if n.op_type == "Relu"]
    earlier = names[-2]
    spec = analyse_model(built.model, feature_layer=earlier)
    assert spec.feature_map.name == earlier
    assert spec.detected["feature_map"] is False
    # A trunk op joins the head, which still computes the same logits.
    assert "Conv" in spec.head_ops


def test_sample_models_are_detected(samples):
    gap = analyse_model(load_model(samples / "gap_original.onnx"))
    assert gap.activation == "Softmax"
    assert gap.head_ops[0] in ("GlobalAveragePool", "ReduceMean")
    assert gap.feature_map.shape[2:] == (8, 8)
    fc = analyse_model(load_model(samples / "fc_original.onnx"))
    assert fc.activation is None
    assert fc.head_ops[0] in ("Flatten", "Reshape")
    assert "Relu" in fc.head_ops


@pytest.mark.parametrize(
    "extra, first", [("feature_map", True), ("embedding", True), ("embedding", False)]
)
def test_logits_are_found_among_several_outputs(extra, first):
    # Exports that also return the feature map or the pooled embedding, before or after
    # the logits, with no final activation to tell them apart.
    built = build_cnn()
    model = built.model
    if extra == "feature_map":
        vi = helper.make_tensor_value_info(built.feature_map, TensorProto.FLOAT, ["N", 16, 8, 8])
    else:
        pooled = next(n for n in model.graph.node if n.op_type == "Flatten").output[0]
        vi = helper.make_tensor_value_info(pooled, TensorProto.FLOAT, ["N", 16])
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend([vi] + outputs if first else outputs + [vi])
    onnx.checker.check_model(model)
    spec = analyse_model(model)
    assert spec.logits.name == built.logits
    assert spec.feature_map.name == built.feature_map


def test_an_mlp_on_flattened_pixels_has_no_feature_map():
    """A graph input is never the feature map: an MLP on the flattened image (a spatial
    input, nothing spatial computed) is refused with what is missing."""
    rng = np.random.default_rng(0)
    weights = onnx.numpy_helper.from_array(rng.standard_normal((3 * 32 * 32, 10), np.float32), "W")
    shape = onnx.numpy_helper.from_array(np.array([-1, 3 * 32 * 32], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["image", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["logits"]),
    ]
    model = _image_model("mlp", nodes, [weights, shape], 17, size=32, classes=10)
    with pytest.raises(DetectionError, match="no convolutional feature map or token grid"):
        analyse_model(model)
    spec = analyse_model(model, feature_layer="image")  # named by hand, it is taken
    assert spec.feature_map.name == "image"


def test_the_map_is_taken_before_local_pooling_that_ends_the_trunk():
    """PP-OCR's classifiers end Conv -> HardSwish -> MaxPool 2x2 -> GlobalAveragePool ->
    Reshape -> MatMul: the feature map is the HardSwish output (8x8, not the pooled 4x4),
    the MaxPool joins the head, and the head's gradient is exact: autograd's, which
    routes each window's gradient to its first maximum."""
    rng = np.random.default_rng(0)
    conv_w = onnx.numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3), np.float32), "cw")
    fc_w = onnx.numpy_helper.from_array(rng.standard_normal((6, 5), np.float32), "fw")
    shape = onnx.numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["image", "cw"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSwish", ["conv"], ["act"]),
        helper.make_node("MaxPool", ["act"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["pooled"], ["gap"]),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    model = _image_model("ppocr_like", nodes, [conv_w, fc_w, shape], 17, output="prob", classes=5)
    spec = analyse_model(model)
    assert spec.feature_map.name == "act" and list(spec.feature_map.shape[2:]) == [8, 8]
    assert spec.head_ops[0] == "MaxPool"
    runner = ModelRunner(prepare_model(model), provider="cpu")
    assert runner.gradient_path == "exact"
    acts, logits = runner.run(rng.random((2, 3, 16, 16), np.float32) - 0.5)
    targets = np.argmax(logits, axis=1)
    _, grads = runner.head_gradients(acts, targets)
    w = onnx.numpy_helper.to_array(fc_w)
    want = np.zeros_like(acts)
    for i, c in enumerate(targets):
        for k, y, x in np.ndindex(6, 4, 4):
            window = acts[i, k, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
            dy, dx = np.unravel_index(np.argmax(window), (2, 2))
            want[i, k, 2 * y + dy, 2 * x + dx] = w[k, c] / 16
    assert (acts == 0).any()  # HardSwish zeros: tied windows
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-7)


def test_a_reshape_to_a_computed_target_keeps_exact_gradients():
    """paddle2onnx writes the head's Reshape target at run time (Shape -> Slice -> Concat
    -> Reshape -> MatMul -> Add): the ranks after it are unknown before running, and the
    bias's broadcast is summed at run time; the gradient is exact and right."""
    rng = np.random.default_rng(0)
    fc_w = rng.standard_normal((6, 5)).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3), np.float32), "cw"),
        onnx.numpy_helper.from_array(fc_w, "fw"),
        onnx.numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fb"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "st"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "en"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "m1"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "cw"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"]),
        helper.make_node("Shape", ["gap"], ["shp"]),
        helper.make_node("Slice", ["shp", "st", "en"], ["n"]),
        helper.make_node("Concat", ["n", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["gap", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    model = _image_model("paddle_like", nodes, inits, 13, output="prob", classes=5)
    runner = ModelRunner(prepare_model(model), provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    acts, logits = runner.run(rng.random((3, 3, 16, 16), np.float32))
    targets = np.array([0, 4, 2])
    got_logits, grads = runner.head_gradients(acts, targets)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-6)
    want = np.broadcast_to(fc_w.T[targets][:, :, None, None] / 64, acts.shape)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-8)


def test_a_broadcast_after_a_computed_reshape_is_summed_at_run_time():
    """After a Reshape to a computed target no rank is known: a tensor broadcast against
    a constant ([N, 1, 6] * [1, 4, 6]) gets its gradient summed over the broadcast axis
    found at run time."""
    rng = np.random.default_rng(0)
    fc_w = rng.standard_normal((6, 5)).astype(np.float32)
    c = rng.standard_normal((1, 4, 6)).astype(np.float32)
    ints = {"st": [0], "en": [1], "m1": [-1], "ax": [1]}
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3), np.float32), "cw"),
        onnx.numpy_helper.from_array(fc_w, "fw"),
        onnx.numpy_helper.from_array(c, "c"),
    ] + [onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    nodes = [
        helper.make_node("Conv", ["image", "cw"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"]),
        helper.make_node("Shape", ["gap"], ["shp"]),
        helper.make_node("Slice", ["shp", "st", "en"], ["n"]),
        helper.make_node("Concat", ["n", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["gap", "target"], ["flat"]),
        helper.make_node("Unsqueeze", ["flat", "ax"], ["u"]),
        helper.make_node("Mul", ["u", "c"], ["b"]),
        helper.make_node("ReduceSum", ["b", "ax"], ["s"], keepdims=0),
        helper.make_node("MatMul", ["s", "fw"], ["logits"]),
    ]
    model = _image_model("computed_broadcast", nodes, inits, 13, classes=5)
    runner = ModelRunner(prepare_model(model), provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    acts, _ = runner.run(rng.random((3, 3, 16, 16), np.float32))
    targets = np.array([0, 4, 2])
    _, grads = runner.head_gradients(acts, targets)
    per_channel = c[0].sum(axis=0)[:, None] * fc_w  # d logit / d gap, (6, 5)
    want = np.broadcast_to(per_channel.T[targets][:, :, None, None] / 64, acts.shape)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-8)


def test_of_several_maps_feeding_the_head_the_one_the_others_come_from_is_taken():
    """A head that reads the last map and a 1x1 projection of it (LeViT's downsampling
    attention at small inputs): the map everything after depends on, not a refusal."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3), np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1), np.float32), "w2"),
        onnx.numpy_helper.from_array(rng.standard_normal((8, 4), np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["map"]),
        helper.make_node("Conv", ["map", "w2"], ["projected"]),
        helper.make_node("GlobalAveragePool", ["map"], ["a"]),
        helper.make_node("GlobalAveragePool", ["projected"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    assert analyse_model(_image_model("two_maps", nodes, inits, 13)).feature_map.name == "map"
    # Two maps neither of which comes from the other stay a refusal that names both.
    nodes[2] = helper.make_node("Conv", ["conv", "w2"], ["projected"])
    with pytest.raises(DetectionError, match="several tensors feed the head"):
        analyse_model(_image_model("two_maps", nodes, inits, 13))


def test_a_final_channel_norm_before_the_pooling_is_stepped_behind():
    """ConvNeXt's ``norm_pre`` (Transpose -> LayerNorm -> Transpose back) and Swin's
    NHWC final norm: the map is the last stage's output, before the norm."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3), np.float32), "w"),
        onnx.numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        onnx.numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
        onnx.numpy_helper.from_array(rng.standard_normal((8, 4), np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["stage"]),
        helper.make_node("Transpose", ["stage"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["nhwc", "gamma", "beta"], ["normed"], axis=-1),
        helper.make_node("Transpose", ["normed"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    model = _image_model("norm_pre", nodes, inits, 17)
    assert analyse_model(model).feature_map.name == "stage"
    runner = ModelRunner(prepare_model(model), provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note

"""The test-model library builds valid graphs whose stated feature map and logits are right."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from onnx_builders import (
    FINALS,
    HEADS,
    LAYOUTS,
    WEIGHTS,
    all_variants,
    build_cnn,
    run_model,
    with_outputs,
)

SPATIAL_HEAD_OPS = {"GlobalAveragePool", "AveragePool", "ReduceMean", "Flatten", "Conv"}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _check_built(built, batch: int | None = None) -> None:
    """Runs the model with the feature map and logits as extra outputs and checks both."""
    images = built.random_input(seed=1, batch=batch)
    out = run_model(built, images, outputs=(built.feature_map, built.logits))
    n = images.shape[0]
    features, logits, output = out[built.feature_map], out[built.logits], out[built.output_name]

    expected_feature_shape = (n, *built.feature_shape[1:])
    assert features.shape == expected_feature_shape
    spatial = features.shape[1:3] if built.feature_layout == "NHWC" else features.shape[2:4]
    assert min(spatial) > 1
    assert np.isfinite(features).all() and features.std() > 1e-3

    assert logits.shape == (n, built.num_classes)
    assert np.isfinite(logits).all()
    assert logits.std(axis=1).min() > 1e-4, "logits do not separate the classes"
    assert output.shape == (n, built.num_classes)
    if built.activation is None:
        np.testing.assert_allclose(output, logits, rtol=1e-6, atol=1e-6)
    elif built.activation == "Softmax":
        np.testing.assert_allclose(output, _softmax(logits), rtol=1e-5, atol=1e-6)
    elif built.activation == "LogSoftmax":
        np.testing.assert_allclose(output, np.log(_softmax(logits)), rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(output, 1.0 / (1.0 + np.exp(-logits)), rtol=1e-5, atol=1e-6)

    graph = built.model.graph
    consumers = [node.op_type for node in graph.node if built.feature_map in node.input]
    assert consumers and set(consumers) <= SPATIAL_HEAD_OPS
    image_inputs = [
        i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}
    ]
    assert image_inputs[0] == built.input_name
    assert image_inputs[1:] == [name for name, _ in built.extra_inputs]


MATRIX = list(itertools.product(HEADS, LAYOUTS, WEIGHTS, (False, True), FINALS))


@pytest.mark.parametrize(
    ("head", "layout", "weights", "symbolic", "final"),
    MATRIX,
    ids=[f"{h}-{lay}-{w[:5]}-{'sym' if s else 'fix'}-{f}" for h, lay, w, s, f in MATRIX],
)
def test_matrix_model_runs_and_names_feature_map_and_logits(head, layout, weights, symbolic, final):
    built = build_cnn(head=head, layout=layout, weights=weights, symbolic=symbolic, final=final)
    onnx.checker.check_model(built.model, full_check=True)
    assert built.layout == layout and built.activation == final and built.head == head
    _check_built(built)


@pytest.mark.parametrize(("ident", "kwargs"), all_variants(), ids=[v[0] for v in all_variants()])
def test_all_variants_build_and_run(ident, kwargs):
    built = build_cnn(**kwargs)
    _check_built(built)


def test_all_variants_cover_the_matrix():
    variants = all_variants()
    ids = [ident for ident, _ in variants]
    assert len(ids) == len(set(ids)) and 35 <= len(ids) <= 50
    kwargs = [kw for _, kw in variants]
    assert {(kw.get("head", "gap_gemm"), kw.get("layout", "NCHW")) for kw in kwargs} == set(
        itertools.product(HEADS, LAYOUTS)
    )
    for key, values in [
        ("weights", WEIGHTS[1:]),
        ("final", FINALS[1:]),
        ("opset", (13, 18)),
        ("channels", (1,)),
        ("fixed_batch", (1,)),
        ("extra_input", (True,)),
        ("symbolic", (True,)),
        ("act", ("hardswish",)),
    ]:
        assert set(values) <= {kw[key] for kw in kwargs if key in kw}, key
    assert {op for kw in kwargs for op in kw.get("tail", ())} == {
        "Identity",
        "Flatten",
        "Reshape",
        "Squeeze",
    }


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_symbolic_dims_and_other_batch_and_size(layout):
    built = build_cnn(layout=layout, symbolic=True, final="Softmax")
    expected = ["N", "H", "W", 3] if layout == "NHWC" else ["N", 3, "H", "W"]
    assert _dims(built.model.graph.input[0]) == expected
    assert _dims(built.model.graph.output[0]) == ["N", 5]
    _check_built(built, batch=3)
    # A GAP head is truly size-agnostic: 48x48 gives a 12x12 feature map.
    images = np.zeros((1, 48, 48, 3) if layout == "NHWC" else (1, 3, 48, 48), np.float32)
    features = run_model(built, images, outputs=(built.feature_map,))[built.feature_map]
    assert built.feature_layout == "NCHW" and features.shape == (1, 16, 12, 12)


def test_fixed_dims_by_default_and_fixed_batch():
    assert _dims(build_cnn().model.graph.input[0]) == ["N", 3, 32, 32]
    built = build_cnn(fixed_batch=1, layout="NHWC", channels=1)
    assert _dims(built.model.graph.input[0]) == [1, 32, 32, 1]
    assert _dims(built.model.graph.output[0]) == [1, 5]
    assert built.input_shape == (1, 32, 32, 1)


@pytest.mark.parametrize("head", HEADS)
def test_nhwc_trunk_wraps_every_conv_in_transposes(head):
    built = build_cnn(head=head, layout="NHWC")
    producers = {out: node for node in built.model.graph.node for out in node.output}
    convs = [node for node in built.model.graph.node if node.op_type == "Conv"]
    assert len(convs) == (4 if head == "conv1x1_gap" else 3)
    for conv in convs:
        before = producers[conv.input[0]]
        assert before.op_type == "Transpose" and list(before.attribute[0].ints) == [0, 3, 1, 2]
        after = [node for node in built.model.graph.node if conv.output[0] in node.input]
        assert [n.op_type for n in after] == ["Transpose"] and list(after[0].attribute[0].ints) == [
            0,
            2,
            3,
            1,
        ]
    expected_layout = (
        "NHWC" if head in ("reducemean_matmul", "reducemean_keepdims", "flatten_mlp") else "NCHW"
    )
    assert built.feature_layout == expected_layout
    assert producers[built.feature_map].op_type == (
        "Transpose" if expected_layout == "NCHW" else "Relu"
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv1x1_head_feature_map_is_classifier_conv_input(layout):
    built = build_cnn(head="conv1x1_gap", layout=layout, num_classes=5, width=8)
    classifier = [n for n in built.model.graph.node if n.op_type == "Conv"][-1]
    assert classifier.input[0] == built.feature_map
    assert built.feature_shape[1] == 16 != built.num_classes
    same = build_cnn(head="conv1x1_gap", layout=layout, num_classes=16, width=8)
    assert same.feature_shape[1] == same.num_classes == 16
    _check_built(same)


def test_constant_weights_have_no_initializers():
    for head in HEADS:
        graph = build_cnn(head=head, weights="constant", opset=18).model.graph
        assert len(graph.initializer) == 0
        assert any(node.op_type == "Constant" for node in graph.node)
        assert not any(node.op_type == "Constant" for node in build_cnn(head=head).model.graph.node)


@pytest.mark.parametrize(("opset", "as_input"), [(13, False), (17, False), (18, True)])
def test_reducemean_axes_follow_the_opset(opset, as_input):
    built = build_cnn(head="reducemean_matmul", layout="NHWC", opset=opset)
    (node,) = [n for n in built.model.graph.node if n.op_type == "ReduceMean"]
    assert (len(node.input) == 2) is as_input
    assert any(a.name == "axes" for a in node.attribute) is not as_input
    assert built.model.opset_import[0].version == opset
    assert built.model.ir_version == (7 if opset == 13 else 8)


@pytest.mark.parametrize(
    "tail",
    [
        ("Identity",),
        ("Flatten",),
        ("Reshape",),
        ("Reshape", "Squeeze"),
        ("Reshape", "Identity", "Squeeze"),
        ("Identity", "Reshape", "Squeeze", "Flatten"),
    ],
)
@pytest.mark.parametrize("final", [None, "Softmax"])
def test_tails_keep_output_and_logits(tail, final):
    built = build_cnn(tail=tail, final=final, weights="constant")
    ops = [n.op_type for n in built.model.graph.node if n.op_type != "Constant"]
    assert ops[-len(tail) :] == list(tail)
    assert built.logits != built.output_name
    _check_built(built)


@pytest.mark.parametrize(
    "tail", [("Squeeze",), ("Flatten", "Squeeze"), ("Reshape", "Flatten", "Squeeze"), ("Softmax",)]
)
def test_invalid_tails_are_refused(tail):
    with pytest.raises(ValueError, match="tail"):
        build_cnn(tail=tail)


def test_extra_input_makes_a_second_graph_input():
    built = build_cnn(extra_input=True, final="Softmax")
    names = [i.name for i in built.model.graph.input]
    assert names == [built.input_name, "temperature"]
    producer = [n for n in built.model.graph.node if built.logits in n.output][0]
    assert producer.op_type == "Mul" and "temperature" in producer.input
    _check_built(built)


def test_names_are_distinct_and_not_giveaways():
    for ident, kwargs in all_variants():
        built = build_cnn(**kwargs)
        graph = built.model.graph
        outputs = [o for node in graph.node for o in node.output]
        assert len(outputs) == len(set(outputs)), ident
        node_names = [node.name for node in graph.node]
        assert all(node_names) and len(node_names) == len(set(node_names)), ident
        for name in (built.feature_map, built.logits):
            assert "feature" not in name.lower() and "logit" not in name.lower(), ident
        assert built.feature_map != built.logits


def test_deterministic_by_seed():
    first = build_cnn(seed=3).model.SerializeToString()
    assert build_cnn(seed=3).model.SerializeToString() == first
    assert build_cnn(seed=4).model.SerializeToString() != first


@pytest.mark.parametrize(
    "kwargs",
    [
        {"head": "mlp"},
        {"layout": "CHW"},
        {"weights": "inline"},
        {"final": "Tanh"},
        {"channels": 4},
        {"size": 4},
        {"opset": 12},
        {"act": "hardswish", "opset": 13},
        {"fixed_batch": 0},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        build_cnn(**kwargs)


def test_with_outputs_copies_and_keeps_types():
    built = build_cnn(layout="NHWC", symbolic=True)
    edited = with_outputs(built.model, [built.feature_map, built.output_name])
    assert len(built.model.graph.output) == 1
    added = edited.graph.output[1]
    assert added.name == built.feature_map
    assert added.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(_dims(added)) == 4
    with pytest.raises(KeyError, match="nope"):
        with_outputs(built.model, ["nope"])


@pytest.mark.parametrize("head", [h for h in HEADS if h != "flatten_mlp"])
def test_same_seed_gives_the_same_network_in_both_layouts(head):
    # The NHWC graph is the NCHW one with layout transposes, so on the same images the
    # feature maps agree up to layout and the logits agree (Flatten order differs for MLPs).
    nchw, nhwc = build_cnn(head=head), build_cnn(head=head, layout="NHWC")
    images = nchw.random_input(seed=2)
    a = run_model(nchw, images, outputs=(nchw.feature_map, nchw.logits))
    b = run_model(
        nhwc, images.transpose(0, 2, 3, 1).copy(), outputs=(nhwc.feature_map, nhwc.logits)
    )
    feature_b = b[nhwc.feature_map]
    if nhwc.feature_layout == "NHWC":
        feature_b = feature_b.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(feature_b, a[nchw.feature_map], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[nhwc.logits], a[nchw.logits], rtol=1e-4, atol=1e-5)

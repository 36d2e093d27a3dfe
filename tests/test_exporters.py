"""End-to-end audits of graphs in the shapes real exporters produce.

Each suite entry is built with ``onnx.helper`` (tests/onnx_builders.py), detected, and
audited against itself and against a magnitude-pruned copy, from a folder of PNG images of
another size than the model's input.  No TensorFlow, Paddle or Caffe2 is needed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from onnx_sp2ps import Preprocess, audit
from onnx_sp2ps.errors import DataError
from onnx_sp2ps.model import analyse_model

from onnx_builders import build_caffe2_cnn, build_cnn, with_input_dtype

SUITES = {
    # PyTorch (torch.onnx): NCHW, GAP -> Flatten -> Gemm, and a Flatten -> MLP head.
    "torch-gap-gemm": lambda: build_cnn(head="gap_gemm"),
    "torch-flatten-mlp": lambda: build_cnn(head="flatten_mlp"),
    # tf2onnx: NHWC input, Transposes around each Conv, ReduceMean over [1, 2] with
    # keepdims 0 and 1, MatMul + Add, a final Softmax.
    "tf2onnx-reducemean": lambda: build_cnn(
        head="reducemean_matmul", layout="NHWC", final="Softmax"
    ),
    "tf2onnx-reducemean-keepdims": lambda: build_cnn(
        head="reducemean_keepdims", layout="NHWC", final="Softmax"
    ),
    # Keras GlobalAveragePooling2D -> Dense -> Softmax through tf2onnx's GAP form.
    "keras-gap-dense-softmax": lambda: build_cnn(head="gap_gemm", layout="NHWC", final="Softmax"),
    # paddle2onnx: weights in Constant nodes, dynamic H and W, HardSwish,
    # GlobalAveragePool -> Reshape -> MatMul.
    "paddle2onnx": lambda: build_cnn(
        head="gap_reshape_matmul",
        weights="constant",
        symbolic=True,
        act="hardswish",
        final="Softmax",
    ),
    # Caffe2-era model zoo, opsets 7 to 9: LRN, Sum, Dropout, Reshape with a shape
    # initializer, Softmax on (1, K, 1, 1).
    **{
        f"caffe2-{head}-opset{opset}": (
            lambda head=head, opset=opset: build_caffe2_cnn(head=head, opset=opset)
        )
        for head in ("squeezenet", "googlenet")
        for opset in (7, 8, 9)
    },
}
IMAGE_SIZE = (40, 36)  # (W, H) of the PNGs: every model resizes them to its 32 x 32 input


def magnitude_pruned(model: onnx.ModelProto, fraction: float = 0.5) -> onnx.ModelProto:
    """A copy with the smallest ``fraction`` of every convolution kernel set to zero
    (unstructured pruning), wherever the kernels are stored: initializers or Constant nodes."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    tensors = list(pruned.graph.initializer)
    tensors += [a.t for n in pruned.graph.node if n.op_type == "Constant" for a in n.attribute]
    for t in tensors:
        if len(t.dims) != 4:
            continue
        w = numpy_helper.to_array(t).copy()
        w[np.abs(w) < np.quantile(np.abs(w), fraction)] = 0
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    return pruned


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    for i in range(3):
        pixels = rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
    return root


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_exporter_graph_is_detected_and_audited_end_to_end(suite, images, tmp_path):
    built = SUITES[suite]()
    spec = analyse_model(built.model, size=(32, 32))
    assert (spec.input.name, spec.layout) == (built.input_name, built.layout)
    assert (spec.feature_map.name, spec.logits.name) == (built.feature_map, built.logits)

    original, pruned = tmp_path / "original.onnx", tmp_path / "pruned.onnx"
    onnx.save(built.model, original)
    onnx.save(magnitude_pruned(built.model), pruned)
    result = audit(original, [original, pruned], images, preprocess=Preprocess(size=(32, 32)))

    same, other = result.candidates
    assert len(result.indices) == 3
    np.testing.assert_allclose(same.scores.score, 1.0, atol=1e-6)
    assert np.all(np.isfinite(other.scores.score))
    assert np.all((other.scores.score >= 0) & (other.scores.score <= 1))
    assert other.summary.mean < 1.0
    # Exact head gradients need opset 11; the Caffe2-era models say they used differences.
    expected = "finite-difference" if suite.startswith("caffe2") else "exact"
    assert result.original.gradient == expected
    if expected == "finite-difference":
        assert "opset" in result.original.gradient_note


def test_uint8_input_takes_raw_pixels_and_refuses_fractions(images, tmp_path):
    built = build_cnn(head="reducemean_matmul", layout="NHWC", final="Softmax")
    as_uint8, as_float = tmp_path / "uint8.onnx", tmp_path / "float.onnx"
    onnx.save(with_input_dtype(built.model, onnx.TensorProto.UINT8), as_uint8)
    onnx.save(built.model, as_float)
    with pytest.raises(DataError, match="--preprocess raw"):
        audit(as_uint8, [as_uint8], images)  # the default preset gives values in [0, 1]
    raw = Preprocess(preset="raw")
    from_uint8 = audit(as_uint8, [as_float], images, preprocess=raw, keep_maps=True)
    from_float = audit(as_float, [as_float], images, preprocess=raw, keep_maps=True)
    np.testing.assert_array_equal(from_uint8.original_maps.maps, from_float.original_maps.maps)
    np.testing.assert_allclose(from_uint8.candidates[0].scores.score, 1.0, atol=1e-6)

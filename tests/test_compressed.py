"""Compressed candidates beyond pruning: fp16 models (made here with onnxruntime's own
float16 converter) and graphs whose nodes are not in topological order."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnxruntime.transformers.float16 import convert_float_to_float16

from onnx_sp2ps import audit
from onnx_sp2ps.model import load_model, prepare_model
from onnx_sp2ps.runtime import ModelRunner

from onnx_builders import build_cnn


@pytest.fixture(scope="module", params=[True, False], ids=["fp32-io", "fp16-io"])
def fp16_model(request, samples, tmp_path_factory):
    model = onnx.load(samples / "gap_l1_30_ft.onnx")
    converted = convert_float_to_float16(model, keep_io_types=request.param)
    path = tmp_path_factory.mktemp("fp16") / "gap16.onnx"
    onnx.save(converted, path)
    return path


def test_fp16_candidate_is_detected_with_exact_float32_gradients(fp16_model):
    prepared = prepare_model(fp16_model)
    assert prepared.spec.activation == "Softmax"  # also behind the output Cast
    assert prepared.spec.logits.name == "/head/head.2/Gemm_output_0"
    runner = ModelRunner(prepared, provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    assert prepared.head_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_candidate_keeps_the_attention_of_its_fp32_twin(samples, fp16_model):
    result = audit(samples / "gap_l1_30_ft.onnx", [fp16_model], samples / "images")
    cand = result.candidates[0]
    assert cand.summary.mean > 0.999
    assert cand.agreement == 1.0
    assert abs(cand.confidence_drop) < 1e-3
    assert cand.summary.non_finite == 0


def test_unsorted_graphs_are_sorted_in_memory(tmp_path):
    built = build_cnn(head="gap_gemm")
    model = built.model
    nodes = list(model.graph.node)
    random.Random(3).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = tmp_path / "shuffled.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    loaded = load_model(path)
    onnx.checker.check_model(loaded)
    assert path.read_bytes() == before  # the user's file is never rewritten
    assert prepare_model(loaded).spec.feature_map.name == built.feature_map
    runner = ModelRunner(prepare_model(loaded), provider="cpu")
    acts, logits = runner.run(built.random_input())
    assert np.isfinite(logits).all()

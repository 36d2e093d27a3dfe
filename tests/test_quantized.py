"""Compressed kinds beyond structured pruning, on the models of sample_models/compressed/
(made by scripts/make_compressed_models.py): int8 QDQ and QOperator models, unstructured
pruning (zeroed weights, same shapes) and sparse initializers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_sp2ps import audit, compute_cams
from onnx_sp2ps.backward import STRAIGHT_THROUGH
from onnx_sp2ps.model import count_parameters, prepare_model
from onnx_sp2ps.pipeline import AuditSettings
from onnx_sp2ps.runtime import ModelRunner

from conftest import run_cli, sha256

KINDS = ("gap", "fc")
COMPRESSED = ("qdq_int8", "qop_int8", "unstructured_50", "sparse_80")
QUANTIZED = ("qdq_int8", "qop_int8")


def _path(samples, kind, name):
    return samples / "compressed" / f"{kind}_{name}.onnx"


def _images(samples, n=None):
    from onnx_sp2ps.data import InputSpec, open_images

    images = open_images(samples / "images", spec=InputSpec("NCHW", 3, 64, 64))
    x = np.concatenate([b.inputs for b in images.iter_batches(16)])
    return x if n is None else x[:n]


def _random_weights(samples, kind, tmp_path):
    """The original with every float weight redrawn at random (same shapes and spread)."""
    model = onnx.load(samples / f"{kind}_original.onnx")
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        w = numpy_helper.to_array(t)
        t.CopyFrom(
            numpy_helper.from_array(
                (rng.standard_normal(w.shape) * w.std()).astype(np.float32), t.name
            )
        )
    path = tmp_path / f"{kind}_random.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_models_are_detected_with_float_maps(samples, kind, name):
    path = _path(samples, kind, name)
    before = sha256(path)
    prepared = prepare_model(path)
    spec = prepared.spec
    assert spec.feature_map.dtype == "float32" and spec.logits.dtype == "float32"
    assert spec.feature_map.shape[1:] == ((96 if kind == "gap" else 32), 8, 8)
    assert spec.num_classes == 4
    assert spec.activation == ("Softmax" if kind == "gap" else None)
    runner = ModelRunner(prepared, provider="cpu")
    acts, logits = runner.run(_images(samples, 4))
    assert acts.dtype == np.float32 and acts.shape[2:] == (8, 8) and logits.shape == (4, 4)
    assert np.isfinite(acts).all() and acts.std() > 0  # real values, not raw int8 codes
    assert runner.gradient_path == "exact"
    assert runner.gradient_note == (STRAIGHT_THROUGH if name in QUANTIZED else None)
    assert sha256(path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_activations_are_the_dequantized_int8_values(samples, kind):
    """The QOperator feature map is int8 inside the model: its float view is scale *
    (q - zero point), so the values lie on the quantization grid; QDQ and QOperator
    forms of one quantization give maps within a few grid steps, close logits and the
    same straight-through gradients (the QOperator head is differentiated in its QDQ form)."""
    x = _images(samples, 8)
    out = {}
    for name in QUANTIZED:
        runner = ModelRunner(prepare_model(_path(samples, kind, name)), provider="cpu")
        acts, logits = runner.run(x)
        _, grads = runner.head_gradients(acts, np.full(len(x), -1))
        out[name] = acts, logits, grads
    acts = out["qop_int8"][0]
    levels = np.unique(acts)
    step = np.diff(levels).min()
    assert len(levels) <= 256
    assert np.allclose(
        (levels - levels[0]) / step, np.round((levels - levels[0]) / step), atol=0.02
    )  # (step estimated from float32 values)
    # onnxruntime runs the two forms with different kernels (newer versions fuse the
    # QDQ form's requantisation in their own order), so a value may land a few grid
    # steps apart; most agree exactly and the straight-through gradients are equal.
    qdq, qop = out["qdq_int8"], out["qop_int8"]
    steps = np.abs(qdq[0] - qop[0]) / step
    assert steps.max() <= 3.01 and (steps > 0.5).mean() < 0.1
    np.testing.assert_allclose(qdq[1], qop[1], atol=0.02 * np.abs(qop[1]).max())
    np.testing.assert_allclose(qdq[2], qop[2], rtol=1e-4, atol=1e-5 * np.abs(qop[2]).max())
    assert np.abs(out["qop_int8"][2]).max() > 0


@pytest.fixture(scope="module", params=KINDS)
def audited(request, samples, tmp_path_factory):
    kind = request.param
    random = _random_weights(samples, kind, tmp_path_factory.mktemp("random"))
    candidates = [_path(samples, kind, n) for n in COMPRESSED]
    candidates += [samples / f"{kind}_l1_60.onnx", random]
    result = audit(
        samples / f"{kind}_original.onnx",
        candidates,
        samples / "images",
        settings=AuditSettings(provider="cpu"),
    )
    return kind, {c.model.name: c for c in result.candidates}


def test_audit_scores_each_compressed_kind(audited):
    kind, cands = audited
    for cand in cands.values():
        per_image = cand.scores.score
        assert np.isfinite(per_image).all() and (per_image >= 0).all() and (per_image <= 1).all()
        assert cand.summary.non_finite == 0
    random = cands[f"{kind}_random.onnx"].summary.mean
    l1_60 = cands[f"{kind}_l1_60.onnx"].summary.mean
    for name in QUANTIZED:
        cand = cands[f"{kind}_{name}.onnx"]
        assert cand.agreement == 1.0
        # Every map has content: the most confident image's logit sits at the top of the
        # calibration range, where a saturating straight-through rule gave a zero gradient.
        assert cand.summary.flat_candidate == 0 and cand.summary.minimum > 0.5
        # int8 keeps the attention of its original: far above a model of random weights
        # and the unfine-tuned 60 % pruned one (measured 0.99 vs 0.27-0.31 and less).
        assert cand.summary.mean > max(random, l1_60) + 0.4
        assert cand.model.gradient == "exact"
        assert cand.model.gradient_note == STRAIGHT_THROUGH
    assert cands[f"{kind}_unstructured_50.onnx"].summary.mean > l1_60


@pytest.mark.parametrize("kind", KINDS)
def test_unstructured_pruning_keeps_shapes(samples, kind):
    original = onnx.load(samples / f"{kind}_original.onnx")
    pruned = onnx.load(_path(samples, kind, "unstructured_50"))
    shapes = {t.name: list(t.dims) for t in original.graph.initializer}
    assert {t.name: list(t.dims) for t in pruned.graph.initializer} == shapes
    zeros = [
        np.mean(numpy_helper.to_array(t) == 0) for t in pruned.graph.initializer if len(t.dims) > 1
    ]
    assert sorted(zeros)[-1] >= 0.5 and sorted(zeros)[0] < 0.01  # first conv kept whole
    assert (
        prepare_model(_path(samples, kind, "unstructured_50")).spec.feature_map.shape
        == prepare_model(samples / f"{kind}_original.onnx").spec.feature_map.shape
    )


def _densified_copy(path, tmp_path):
    """The sparse model with its sparse initializers written out densely (numpy only)."""
    model = onnx.load(path)
    for sp in model.graph.sparse_initializer:
        dense = np.zeros(tuple(sp.dims), np.float32)
        np.put(dense, numpy_helper.to_array(sp.indices), numpy_helper.to_array(sp.values))
        model.graph.initializer.append(numpy_helper.from_array(dense, sp.values.name))
    del model.graph.sparse_initializer[:]
    out = tmp_path / "dense.onnx"
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_initializers_give_the_cams_of_their_dense_twin(samples, kind, tmp_path):
    sparse_path = _path(samples, kind, "sparse_80")
    sparse = onnx.load(sparse_path)
    assert len(sparse.graph.sparse_initializer) >= 4
    dense_path = _densified_copy(sparse_path, tmp_path)
    maps = {}
    for p in (sparse_path, dense_path):
        maps[p] = compute_cams(p, samples / "images", provider="cpu")[0]
    np.testing.assert_allclose(maps[sparse_path].raw, maps[dense_path].raw, atol=1e-5)
    np.testing.assert_allclose(maps[sparse_path].maps, maps[dense_path].maps, atol=1e-5)
    # Parameters count the dense size of sparse weights (README, "Compressed kinds"):
    # the same as the dense twin and the original, more than the stored values.
    nnz = sum(int(np.prod(t.values.dims)) for t in sparse.graph.sparse_initializer)
    dense_size = sum(int(np.prod(t.dims)) for t in sparse.graph.sparse_initializer)
    count = count_parameters(sparse)
    assert count == count_parameters(onnx.load(dense_path))
    assert count == count_parameters(onnx.load(samples / f"{kind}_original.onnx"))
    assert count - dense_size + nnz < count
    assert prepare_model(sparse_path).parameters == count


def test_cli_audits_a_qoperator_candidate(samples, capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        "audit",
        samples / "gap_original.onnx",
        _path(samples, "gap", "qop_int8"),
        "--images",
        samples / "images",
        "--out",
        tmp_path,
        "-q",
        "--provider",
        "cpu",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    gradient = report["candidates"][0]["model"]["gradient"]
    assert gradient == {"path": "exact", "reason": STRAIGHT_THROUGH}

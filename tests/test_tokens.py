"""Token models (vision transformers): detection of the token grid and the layer, head
runs with the prefix tokens and side inputs put back, every method, compressed
candidates and the CLI, on ViTs built with ``onnx.helper`` (tests/token_builders.py).

The comparison with pytorch-grad-cam on real timm exports is in
tests/test_tokens_reference.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16
from token_builders import build_vit

from onnx_sp2ps import audit
from onnx_sp2ps.cams import METHODS
from onnx_sp2ps.errors import DetectionError, ModelError, UsageError
from onnx_sp2ps.model import analyse_model, prepare_model
from onnx_sp2ps.runtime import ModelRunner

from conftest import run_cli

VARIANTS = {
    "cls": dict(prefix=1, pool="token"),
    "cls-decomposed": dict(prefix=1, pool="token", ln="decomposed"),
    "avg": dict(prefix=1, pool="avg"),
    "avg-no-prefix": dict(prefix=0, pool="avg", ln="decomposed"),
    "distilled": dict(prefix=2, pool="dist"),
    "registers": dict(prefix=5, pool="token"),
    # Attention pooling (timm's global_pool="map"): a pooling head.
    "attention-pool": dict(prefix=1, pool="map"),
    # The head reads a size of the residual stream (Shape -> Gather -> Reshape).
    "computed-shapes": dict(prefix=1, pool="token", computed_shapes=True),
    # One com.microsoft Attention per block, as onnxruntime's transformer optimizer
    # fuses it (no gradient rule: finite differences).
    "fused-attention": dict(prefix=1, pool="token", fused=True),
}
EXACT = sorted(n for n in VARIANTS if not VARIANTS[n].get("fused"))


def _images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_token_grid_and_the_layer_follow_the_cam_libraries_rule(name):
    kw = VARIANTS[name]
    vit = build_vit(**kw)
    spec = analyse_model(vit.model)
    pooled = kw["pool"] in ("avg", "map")
    # Class-token heads: the input of the last block's attention (its norm1 output);
    # pooling heads: the last block's output.
    assert spec.feature_map.name == (vit.block_out if pooled else vit.norm1)
    assert spec.feature_layout == "NTD"
    assert spec.tokens is not None
    assert (spec.tokens.prefix, spec.tokens.grid, spec.tokens.width) == (kw["prefix"], (4, 4), 32)
    if kw.get("fused"):
        runner = ModelRunner(prepare_model(vit.model), provider="cpu")
        assert runner.gradient_path == "finite-difference"
        acts, logits = runner.run(_images(2))
        maps = METHODS["gradcam"](runner)(acts, logits.argmax(axis=1))
        assert maps.shape == (2, 4, 4) and np.isfinite(maps).all()
    assert spec.feature_size == (4, 4)
    assert ("pooled" in spec.tokens.rule) == pooled
    dumped = spec.to_dict()["feature_map"]["tokens"]
    assert dumped["prefix"] == kw["prefix"] and dumped["grid"] == [4, 4]


def test_a_size_read_off_the_residual_stream_is_read_in_the_head():
    """PiT's export reads the token count off the block's input: the Shape stays in the
    head, on the side input, so it follows the head's own batch."""
    vit = build_vit(computed_shapes=True)
    prepared = prepare_model(vit.model)
    ops = [n.op_type for n in prepared.head_model.graph.node]
    assert "Shape" in ops
    assert len(prepared.spec.side_inputs) == 1  # the residual stream, no int64 sizes
    runner = ModelRunner(prepared, provider="cpu")
    acts, logits = runner.run(_images(3))
    many = np.repeat(acts[1:2], 5, axis=0)
    np.testing.assert_allclose(runner.run_head(many, 1), np.repeat(logits[1:2], 5, 0), atol=1e-5)


def test_the_residual_stream_around_the_last_block_is_a_side_input():
    vit = build_vit()
    prepared = prepare_model(vit.model)
    side = prepared.spec.side_inputs
    # The block's input x (x + attn(norm1(x))): made before norm1, read by the head.
    assert len(side) == 1 and "blocks.0/Add_1" in side[0]
    assert [i.name for i in prepared.head_model.graph.input] == [vit.norm1, side[0]]
    assert side[0] in {o.name for o in prepared.audit_model.graph.output}


def test_overrides_name_the_grid_and_are_checked():
    vit = build_vit(prefix=5)
    spec = analyse_model(vit.model, prefix_tokens=5, token_grid=(4, 4))
    assert spec.tokens is not None and (spec.tokens.prefix, spec.tokens.grid) == (5, (4, 4))
    with pytest.raises(DetectionError, match="not 5 prefix tokens and a 3x3 grid"):
        analyse_model(vit.model, token_grid=(3, 3), prefix_tokens=5)
    # A token tensor named with --feature-layer gets its grid found the same way.
    named = analyse_model(vit.model, feature_layer=vit.block_out)
    assert named.tokens is not None and (named.tokens.prefix, named.tokens.grid) == (5, (4, 4))
    assert named.tokens.rule == "--feature-layer"


def test_token_options_on_a_convolutional_map_are_refused(samples):
    with pytest.raises(DetectionError, match="is a spatial map, not tokens"):
        analyse_model(onnx.load(samples / "gap_original.onnx"), token_grid=(4, 4))


def test_attention_tensors_are_never_offered_as_feature_maps():
    vit = build_vit()
    with pytest.raises(DetectionError) as info:
        analyse_model(vit.model, feature_layer="nope")
    offered = str(info.value).split("last first: ")[1].split(", ")
    assert vit.block_out in offered
    inferred = onnx.shape_inference.infer_shapes(vit.model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    # Tokens (N, T, D) only: no attention tensor (N, heads, T, d) or (N, heads, T, T).
    assert offered and {ranks[t] for t in offered} == {3}


@pytest.mark.parametrize("name", ["cls", "distilled", "avg"])
def test_head_runs_put_back_each_images_prefix_tokens_and_side_inputs(name):
    runner = ModelRunner(prepare_model(build_vit(**VARIANTS[name]).model), provider="cpu")
    acts, logits = runner.run(_images(4))
    assert acts.shape == (4, 32, 4, 4)
    np.testing.assert_allclose(runner.run_head(acts), logits, rtol=1e-5, atol=1e-5)
    for i in range(4):
        np.testing.assert_allclose(
            runner.run_head(acts[i : i + 1], i), logits[i : i + 1], atol=1e-5
        )
        chunks = runner.map_head(
            lambda s, e, i=i: np.repeat(acts[i : i + 1], e - s, 0), 3, acts[i].shape, i
        )
        np.testing.assert_allclose(chunks, np.repeat(logits[i : i + 1], 3, 0), atol=1e-5)
    if name != "avg":  # with another image's prefix tokens and residual, other logits
        assert np.abs(runner.run_head(acts[:1], 1) - logits[:1]).max() > 1e-3
        with pytest.raises(UsageError, match="rows="):
            runner.run_head(acts[:2])
    # Masked-input runs (Score-CAM) leave the batch's head inputs alone.
    runner.run_inputs(_images(2, seed=5))
    np.testing.assert_allclose(runner.run_head(acts), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cls", "avg"])
def test_every_method_but_classic_cam_maps_token_models(name):
    runner = ModelRunner(prepare_model(build_vit(**VARIANTS[name]).model), provider="cpu")
    inputs = _images(2)
    acts, logits = runner.run(inputs)
    targets = logits.argmax(axis=1)
    for method, cls in METHODS.items():
        if method == "cam":
            with pytest.raises(ModelError, match="token grid"):
                cls(runner)(acts, targets, inputs)
            continue
        maps = cls(runner)(acts, targets, inputs)
        assert maps.shape == (2, 4, 4), method
        assert np.isfinite(maps).all() and (maps >= 0).all(), method


def _pruned_mlp(model: onnx.ModelProto, remove: bool) -> onnx.ModelProto:
    """Half the MLP hidden units of every block (the smallest by L1 norm) zeroed, or
    removed (fc1 columns and bias, fc2 rows dropped: shapes change)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    blocks = sorted({n.split("/")[0] for n in inits if n.endswith("mlp/fc1.weight")})
    for block in blocks:
        fc1, b1, fc2 = (inits[f"{block}/mlp/{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight"))
        w1, bias, w2 = (numpy_helper.to_array(t).copy() for t in (fc1, b1, fc2))
        keep = np.sort(np.argsort(-np.abs(w1).sum(axis=0))[: w1.shape[1] // 2])
        if remove:
            w1, bias, w2 = w1[:, keep], bias[keep], w2[keep]
        else:
            drop = np.setdiff1d(np.arange(w1.shape[1]), keep)
            w1[:, drop], bias[drop], w2[drop] = 0, 0, 0
        for t, value in ((fc1, w1), (b1, bias), (fc2, w2)):
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), t.name))
    onnx.checker.check_model(out)
    return out


class _Reader:
    """Calibration images for onnxruntime's quantize_static."""

    def __init__(self, images: np.ndarray):
        self.rows = iter(images[i : i + 1] for i in range(len(images)))

    def get_next(self):
        row = next(self.rows, None)
        return None if row is None else {"input": row}


def _candidates(original: onnx.ModelProto, folder) -> dict[str, str]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    paths = {}
    src = folder / "vit.onnx"
    onnx.save(original, src)
    for kind in ("zeroed", "removed"):
        paths[kind] = str(folder / f"vit_{kind}.onnx")
        onnx.save(_pruned_mlp(original, kind == "removed"), paths[kind])
    paths["fp16"] = str(folder / "vit_fp16.onnx")
    onnx.save(convert_float_to_float16(original, keep_io_types=True), paths["fp16"])
    for fmt in ("QDQ", "QOperator"):
        paths[fmt] = str(folder / f"vit_{fmt}.onnx")
        quantize_static(
            str(src),
            paths[fmt],
            _Reader(_images(8, size=64, seed=3)),
            quant_format=getattr(QuantFormat, fmt),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return paths


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    vit = build_vit(size=(64, 64), patch=16)
    folder = tmp_path_factory.mktemp("vit")
    return vit, str(folder / "vit.onnx"), _candidates(vit.model, folder)


def test_compressed_token_candidates_are_detected_at_the_same_grid(compressed):
    vit, _, paths = compressed
    for kind, path in paths.items():
        prepared = prepare_model(path)
        spec = prepared.spec
        assert spec.tokens is not None, kind
        assert (spec.tokens.prefix, spec.tokens.grid) == (1, (4, 4)), kind
        runner = ModelRunner(prepared, provider="cpu")
        acts, logits = runner.run(_images(2, size=64))
        assert acts.shape == (2, 32, 4, 4), kind
        np.testing.assert_allclose(runner.run_head(acts), logits, rtol=1e-3, atol=1e-3)


def test_compressed_token_candidates_audit_end_to_end(compressed, samples):
    _, original, paths = compressed
    result = audit(original, list(paths.values()), samples / "images")
    score = {c.model.path: c.summary.mean for c in result.candidates}
    for kind, path in paths.items():
        assert np.isfinite(score[path]), kind
    # Zeroing and removing the same units is the same model: the same maps.
    assert score[paths["zeroed"]] == pytest.approx(score[paths["removed"]], abs=1e-4)
    assert score[paths["fp16"]] > 0.9


def test_cli_inspects_and_audits_a_token_model(compressed, samples, tmp_path, capsys):
    _, original, paths = compressed
    code, out, err = run_cli(capsys, "inspect", original)
    assert code == 0, err
    assert "token grid   1 prefix tokens + 4x4 patch tokens" in out
    assert "side inputs" in out
    code, out, err = run_cli(capsys, "inspect", original, "--format", "json")
    assert json.loads(out)["feature_map"]["tokens"]["grid"] == [4, 4]
    code, out, err = run_cli(
        capsys,
        "audit",
        original,
        paths["zeroed"],
        "--images",
        samples / "images",
        "--out",
        tmp_path / "out",
        "-q",
        "--token-grid",
        "4x4",
        "--prefix-tokens",
        "1",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert np.isfinite(report["candidates"][0]["sp2ps"]["mean"])
    code, out, err = run_cli(capsys, "inspect", original, "--token-grid", "4by4")
    assert code == 2
    assert "Invalid value for '--token-grid'" in err and "'4by4'" in err


@pytest.mark.parametrize("name", EXACT)
def test_token_heads_get_exact_gradients_with_side_inputs_held_constant(name):
    runner = ModelRunner(prepare_model(build_vit(**VARIANTS[name]).model), provider="cpu")
    assert runner.gradient_path == "exact", runner.gradient_note
    inputs = _images(3)
    acts, logits = runner.run(inputs, targets=np.full(3, -1))  # fused with the forward run
    targets = logits.argmax(axis=1)
    _, fused = runner.head_gradients(acts, targets)
    runner.run(inputs)  # the separate head-gradient graph, fed the side inputs
    _, separate = runner.head_gradients(acts, targets)
    np.testing.assert_allclose(fused, separate, rtol=1e-5, atol=1e-7)
    # Central differences of the head with the side inputs of image 1 held as they are
    # (float32: within 2 % of the largest slope; tests/test_backward_transformer.py
    # checks the rules themselves against float64 differences to 1e-4).
    a, eps = acts[1], np.float32(1e-2)
    steps = np.eye(a.size, dtype=np.float32).reshape((a.size,) + a.shape) * eps
    up = runner.run_head(a[None] + steps, 1)[:, targets[1]]
    down = runner.run_head(a[None] - steps, 1)[:, targets[1]]
    numeric = ((up.astype(np.float64) - down) / (2 * eps)).reshape(a.shape)
    scale = np.abs(numeric).max()
    np.testing.assert_allclose(fused[1], numeric, atol=2e-2 * scale)


def test_vits_fused_by_onnxruntimes_optimizer_are_detected_and_audited(samples):
    from conftest import FIXTURES

    # scripts/make_ort_optimized.py: onnxruntime.transformers.optimizer, then fp16.
    source = FIXTURES / "tokens" / "vit_cls.onnx"
    original = prepare_model(source)
    fused = FIXTURES / "tokens" / "vit_cls_ort.onnx"
    half = FIXTURES / "tokens" / "vit_cls_ort16.onnx"
    ops = {n.op_type for n in onnx.load(fused).graph.node if n.domain == "com.microsoft"}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ops
    for path in (fused, half):
        spec = prepare_model(path).spec
        # The same layer (the optimizer keeps the norm1 output's name) and grid.
        assert spec.feature_map.name == original.spec.feature_map.name, path.name
        assert spec.tokens == original.spec.tokens
        assert len(spec.side_inputs) == 1  # the residual stream, SkipLayerNormalization's sum
        runner = ModelRunner(prepare_model(path), provider="cpu")
        assert runner.gradient_path == "exact", runner.gradient_note
    result = audit(source, [fused, half], samples / "images")
    scores = [c.summary.mean for c in result.candidates]
    assert scores[0] > 0.999 and scores[1] > 0.95, scores

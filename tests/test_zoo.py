"""The zoo: real exports of small classifiers, detected, audited and compared end to end.

``tests/fixtures/zoo`` holds ONNX files exported by torch.onnx (TorchScript exporter at
opsets 13 and 17, dynamo at 18) and by tf2onnx from Keras (opsets 13 and 17) with seeded
random weights, each with the tensor onnx-sp2ps should detect and reference Grad-CAM maps
from pytorch-grad-cam or tf.GradientTape (``zoo.json``, made by ``scripts/make_zoo.py``;
``tests/fixtures/zoo/README.md``).  No torch or TensorFlow is needed here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onnx_sp2ps import Preprocess, audit
from onnx_sp2ps.cams import GradCAM
from onnx_sp2ps.data import InputSpec, open_images
from onnx_sp2ps.model import prepare_model
from onnx_sp2ps.pipeline import AuditSettings
from onnx_sp2ps.runtime import ModelRunner

from conftest import FIXTURES, SAMPLES, pearson

ZOO = FIXTURES / "zoo"
MANIFEST = json.loads((ZOO / "zoo.json").read_text())
ENTRIES = {e["name"]: e for e in MANIFEST["entries"]}
NAMES = sorted(ENTRIES)
TOKEN_NAMES = [n for n in NAMES if ENTRIES[n]["tokens"]]
MAX_MODEL_BYTES = 2 * 1024 * 1024
MAX_ZOO_BYTES = 20 * 1024 * 1024


_PREPARED: dict = {}


def _prepared(name: str):
    """prepare_model once per entry (detection is the slow part of the module)."""
    if name not in _PREPARED:
        try:
            _PREPARED[name] = prepare_model(ZOO / f"{name}.onnx")
        except Exception as exc:  # noqa: BLE001 - every test of the entry reports it
            _PREPARED[name] = exc
    if isinstance(_PREPARED[name], Exception):
        raise _PREPARED[name]
    return _PREPARED[name]


def _preprocess(entry: dict) -> Preprocess:
    return Preprocess(preset=entry["preprocess"]["preset"])


@pytest.fixture(scope="module")
def reference_images(tmp_path_factory):
    """The reference images of every entry, with their class folders."""
    root = tmp_path_factory.mktemp("zoo-images")
    for rel in MANIFEST["images"]:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / "images" / rel, dest)
    return root


@pytest.fixture(scope="module")
def audit_images(tmp_path_factory):
    """Four of them (one per class) for the audits."""
    root = tmp_path_factory.mktemp("zoo-audit-images")
    for rel in MANIFEST["images"][::2]:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / "images" / rel, dest)
    return root


def test_zoo_covers_families_and_exporters_within_its_size():
    entries = MANIFEST["entries"]
    assert len({e["family"] for e in entries}) >= 12
    torch_exporters = {e["exporter"] for e in entries if e["exporter"].startswith("torch")}
    assert torch_exporters == {"torch.onnx TorchScript", "torch.onnx dynamo"}
    assert {e["opset"] for e in entries if e["exporter"].startswith("tf2onnx")} >= {13, 17}
    assert {e["opset"] for e in entries if "TorchScript" in e["exporter"]} >= {13, 17}
    assert TOKEN_NAMES, "token models"
    total = 0
    for e in entries:
        size = (ZOO / f"{e['name']}.onnx").stat().st_size
        assert size <= MAX_MODEL_BYTES, e["name"]
        total += size + (ZOO / f"{e['name']}.npz").stat().st_size
    assert total <= MAX_ZOO_BYTES
    for rel in MANIFEST["images"]:
        assert (SAMPLES / "images" / rel).is_file(), rel


@pytest.mark.parametrize("name", NAMES)
def test_detects_the_expected_tensor(name):
    entry = ENTRIES[name]
    feature = entry["feature"]
    spec = _prepared(name).spec
    assert spec.layout == entry["preprocess"]["layout"]
    assert spec.feature_map.name == feature["name"], (
        f"{name}: detected {spec.feature_map.name} {spec.feature_map.shape}, expected "
        f"{feature['name']} {feature['shape']} ({entry['source']})"
    )
    shape = spec.feature_map.shape
    if shape is not None and all(isinstance(d, int) for d in shape[1:]):
        assert list(shape[1:]) == feature["shape"]
    if entry["tokens"]:
        assert spec.tokens is not None
        assert spec.tokens.prefix == entry["tokens"]["prefix"]
        assert tuple(spec.tokens.grid) == tuple(entry["tokens"]["grid"])
    else:
        assert spec.feature_layout == feature["layout"]


@pytest.mark.parametrize("name", NAMES)
def test_gradcam_matches_the_framework_reference(name, reference_images):
    entry = ENTRIES[name]
    ref = np.load(ZOO / f"{name}.npz")
    runner = ModelRunner(_prepared(name), provider="cpu")
    images = open_images(
        reference_images,
        spec=InputSpec(entry["preprocess"]["layout"], 3, *MANIFEST["input_size"]),
        preprocess=_preprocess(entry),
    )
    assert list(images.paths) == [str(p) for p in ref["paths"]]
    inputs = np.concatenate([b.inputs for b in images.iter_batches(8)])
    acts, logits = runner.run(inputs)
    scale = float(np.abs(ref["logits"]).max())
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-3, atol=1e-3 * scale)
    assert (np.argmax(logits, axis=1) == ref["targets"]).all()
    raw = GradCAM(runner)(acts, ref["targets"])
    assert raw.shape == ref["raw"].shape
    for i in range(len(raw)):
        if ref["raw"][i].max() <= 1e-6 * max(1.0, np.abs(ref["raw"]).max()):
            assert raw[i].max() <= 1e-3 * np.abs(raw).max(), f"{name} image {i}"
            continue
        r = pearson(raw[i], ref["raw"][i])
        assert r >= 0.99, f"{name} image {i} ({ref['paths'][i]}): Pearson {r:.4f}"


@pytest.mark.parametrize("name", NAMES)
def test_audit_against_itself_scores_one(name, audit_images):
    entry = ENTRIES[name]
    path = ZOO / f"{name}.onnx"
    prepared = _prepared(name)
    result = audit(
        prepared,
        [prepared],
        audit_images,
        preprocess=_preprocess(entry),
        settings=AuditSettings(batch_size=2, provider="cpu"),
    )
    assert result.original.path == str(path)
    (same,) = result.candidates
    assert len(result.indices) == len(MANIFEST["images"][::2])
    np.testing.assert_allclose(same.scores.score, 1.0, atol=1e-6)
    recorded = entry.get("measured", {}).get("gradient")  # when the zoo was made
    if recorded is not None:
        assert result.original.gradient == recorded, result.original.gradient_note

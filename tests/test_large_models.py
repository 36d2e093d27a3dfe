"""Models whose weights live in external data files, and models over protobuf's 2 GB limit.

A real 2 GB model is too big for the test suite; the over-limit path is exercised by
lowering ``model.load.PROTOBUF_LIMIT`` so that the sample models take it.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest

from onnx_sp2ps import audit, runtime
from onnx_sp2ps.errors import ModelError
from onnx_sp2ps.model import load

from conftest import point_external_data, run_cli, save_with_external_data, sha256

IMAGES_PER_CLASS = 2


@pytest.fixture(scope="module")
def images(samples, tmp_path_factory):
    """A small labelled copy of the sample images (two per class)."""
    root = tmp_path_factory.mktemp("images")
    for folder in sorted(p for p in (samples / "images").iterdir() if p.is_dir()):
        (root / folder.name).mkdir()
        for image in sorted(folder.iterdir())[:IMAGES_PER_CLASS]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def _scores(result):
    return np.array([(r.spatial, r.spectral, r.score) for r in result.records()])


def test_external_weights_are_loaded_from_the_models_folder(samples, images, tmp_path):
    path = save_with_external_data(samples / "gap_l1_30.onnx", tmp_path / "exported")
    stored = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    before = {p.name: sha256(p) for p in path.parent.iterdir()}
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # locations resolve against the model's folder, not the cwd
        external = audit(samples / "gap_original.onnx", [path], images)
    finally:
        os.chdir(cwd)
    embedded = audit(samples / "gap_original.onnx", [samples / "gap_l1_30.onnx"], images)
    np.testing.assert_array_equal(_scores(external), _scores(embedded))
    assert {p.name: sha256(p) for p in path.parent.iterdir()} == before


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_models_folder_is_refused(samples, tmp_path, where):
    path = save_with_external_data(samples / "gap_original.onnx", tmp_path / "exported")
    outside = tmp_path / "outside.bin"
    shutil.copy(path.parent / "weights.bin", outside)
    if where == "parent":
        location = "../outside.bin"
    elif where == "absolute":
        location = str(outside)
    else:
        (path.parent / "link.bin").symlink_to(outside)
        location = "link.bin"
    point_external_data(path, location)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load.load_model(path)


def test_missing_external_data_file_is_named(samples, tmp_path):
    path = save_with_external_data(samples / "gap_original.onnx", tmp_path / "exported")
    (path.parent / "weights.bin").unlink()
    with pytest.raises(ModelError, match="weights.bin.*not found"):
        load.load_model(path)


def test_cli_refuses_external_data_outside_the_folder_with_exit_3(
    capsys, samples, images, tmp_path
):
    path = save_with_external_data(samples / "gap_original.onnx", tmp_path / "exported")
    shutil.copy(path.parent / "weights.bin", tmp_path / "outside.bin")
    point_external_data(path, "../outside.bin")
    out = tmp_path / "report"
    code, _, err = run_cli(
        capsys, "audit", samples / "gap_original.onnx", path, "--images", images, "--out", out, "-q"
    )
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "outside the model's folder" in lines[0]
    assert "Traceback" not in err
    assert not (out / "report.json").exists()


@pytest.fixture
def over_the_limit(monkeypatch):
    """Treat every model as over the 2 GB limit and every weight above 1 KB as large;
    records the weights that were held outside the serialized models."""
    monkeypatch.setattr(load, "PROTOBUF_LIMIT", 1)
    monkeypatch.setattr(load, "LARGE_TENSOR_BYTES", 1024)
    held: list[str] = []
    split = load.split_large_weights

    def spy(model):
        light, weights = split(model)
        held.extend(weights)
        return light, weights

    monkeypatch.setattr(runtime, "split_large_weights", spy)
    return held


def test_models_over_the_protobuf_limit_give_the_same_audit(samples, images, over_the_limit):
    large = audit(samples / "fc_original.onnx", [samples / "fc_l1_60_ft.onnx"], images)
    assert "head.1.weight" in over_the_limit  # the 512 KB classifier weight was held aside
    over_the_limit.clear()
    load.PROTOBUF_LIMIT = 2**31 - 1  # restored by monkeypatch after the test
    normal = audit(samples / "fc_original.onnx", [samples / "fc_l1_60_ft.onnx"], images)
    assert not over_the_limit
    np.testing.assert_allclose(_scores(large), _scores(normal), rtol=0, atol=1e-6)


def test_the_checker_still_refuses_a_broken_model_over_the_limit(samples, over_the_limit):
    model = onnx.load(str(samples / "gap_original.onnx"))
    model.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(Exception, match="no_such_tensor"):
        load.check_model(model)

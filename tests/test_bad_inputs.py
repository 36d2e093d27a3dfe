"""The catalogue of bad inputs (issue 5): what onnx-sp2ps refuses, and how.

Every row of ``CASES`` is one bad input, run through the command line in-process. Each must
end with its exit code (3: input not usable; 2: command-line misuse), exactly one non-empty
line on stderr that names the problem and says what to do (no traceback), and nothing
written under ``--out``. The tests after the table cover the bad inputs that are not refused
outright (skipped images, non-finite scores, image modes), Ctrl-C, and the two guarantees:
inputs are never modified, and the same run gives the same reports, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from token_builders import build_vit

from conftest import ROOT, point_external_data, run_cli, save_with_external_data, sha256
from onnx_builders import build_cnn, with_input_dtype

SIZE, CLASSES = 32, 4


# --------------------------------------------------------------------------- inputs


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _nan_below(model: onnx.ModelProto, threshold: float) -> onnx.ModelProto:
    """``model`` whose feature map (hence logits and maps) is NaN for every image whose mean
    input value is below ``threshold``: feature + 0 * Log(mean(image) - threshold)."""
    out = _copy(model)
    g = out.graph
    pool = next(n for n in g.node if n.op_type == "GlobalAveragePool")
    feature = pool.input[0]
    image = g.input[0].name
    g.initializer.append(onnx.numpy_helper.from_array(np.float32(threshold), "nan_threshold"))
    g.initializer.append(onnx.numpy_helper.from_array(np.float32(0.0), "nan_zero"))
    g.node.extend(
        [
            helper.make_node("ReduceMean", [image], ["nan_mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Sub", ["nan_mean", "nan_threshold"], ["nan_shift"]),
            helper.make_node("Log", ["nan_shift"], ["nan_log"]),
            helper.make_node("Mul", ["nan_log", "nan_zero"], ["nan_term"]),
            helper.make_node("Add", [feature, "nan_term"], ["feature_or_nan"]),
        ]
    )
    pool.input[0] = "feature_or_nan"
    # Keep the nodes topologically sorted: move the pooling node (and all after it) last.
    nodes = list(g.node)
    start = nodes.index(pool)
    reordered = nodes[:start] + nodes[-5:] + nodes[start:-5]
    del g.node[:]
    g.node.extend(reordered)
    onnx.checker.check_model(out, full_check=True)
    return out


def _dense_only_model() -> onnx.ModelProto:
    """An image model without any spatial tensor before its logits."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "dense", [x], [y], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _bomb_png(path: Path, side: int = 30_000) -> Path:
    """A valid PNG header claiming side x side pixels, with no pixel data at all: only a
    check of the size before decoding can give the decompression-bomb reason for it."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    return path


def _write_image(path: Path, seed: int, bright: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    low, high = (128, 256) if bright else (0, 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(low, high, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


@dataclass(frozen=True)
class Base:
    """Shared, valid inputs: a model, a folder of 6 images in 2 classes, a model whose maps
    are NaN for dark images, and that folder with 2 dark images added."""

    root: Path
    model: Path
    images: Path
    nan_model: Path
    mixed: Path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("base")
    model = _save(build_cnn(size=SIZE, num_classes=CLASSES).model, root / "model.onnx")
    images = root / "images"
    mixed = root / "mixed"
    for k in range(6):
        for folder in (images, mixed):
            _write_image(folder / str(k % 2) / f"img{k}.png", seed=k)
    for k in range(2):
        _write_image(mixed / str(k) / f"dark{k}.png", seed=10 + k, bright=False)
    nan_model = _save(
        _nan_below(build_cnn(size=SIZE, num_classes=CLASSES).model, 0.4), root / "nan_model.onnx"
    )
    return Base(root, model, images, nan_model, mixed)


# --------------------------------------------------------------------------- the table

#: name -> (make(base, tmp) -> args, exit code, phrase naming the problem, phrase saying
#: what to do); the phrases are matched case-sensitively within the one stderr line.
CASES: dict = {}


def case(code: int, problem: str, remedy: str):
    def register(make):
        CASES[make.__name__] = (make, code, problem, remedy)
        return make

    return register


def _audit(b: Base, candidate, *extra, images=None):
    return ["audit", b.model, candidate, "--images", images or b.images, *extra]


# -- command-line misuse (exit 2)


@case(2, "Invalid value for '--fail-under': must be between 0 and 1", "see onnx-sp2ps audit --help")
def threshold_out_of_range(b, tmp):
    return _audit(b, b.model, "--fail-under", "1.5")


@case(2, "--save-maps needs --out", "see onnx-sp2ps audit --help")
def save_maps_without_out(b, tmp):
    return _audit(b, b.model, "--save-maps")


@case(2, "No such option '--no-such-option'", "see onnx-sp2ps audit --help")
def unknown_option(b, tmp):
    return _audit(b, b.model, "--no-such-option")


@case(2, "Missing argument 'CANDIDATES...'", "see onnx-sp2ps audit --help")
def no_candidate(b, tmp):
    return ["audit", b.model, "--images", b.images]


@case(2, "--target must be one of own, label or a class index", "see onnx-sp2ps cam --help")
def cam_target_not_a_class(b, tmp):
    return ["cam", b.model, "--images", b.images, "--out", tmp / "out", "--target", "banana"]


@case(2, "Invalid value for '--size'", "see onnx-sp2ps audit --help")
def size_not_hxw(b, tmp):
    return _audit(b, b.model, "--size", "axb")


# -- model files


@case(3, "model file not found", "check the path")
def model_missing(b, tmp):
    return _audit(b, tmp / "missing.onnx")


@case(3, "is a folder", "name the .onnx file")
def model_is_a_directory(b, tmp):
    return ["inspect", tmp]


@case(3, "cannot read model", "check the file's permissions")
def model_unreadable(b, tmp):
    path = tmp / "locked.onnx"
    path.write_bytes(b.model.read_bytes())
    path.chmod(0)
    return _audit(b, path)


model_unreadable.locked = "locked.onnx"  # root reads it anyway: see _lock_for_root


@case(3, "is empty", "export the model again")
def model_empty(b, tmp):
    (tmp / "empty.onnx").write_bytes(b"")
    return _audit(b, tmp / "empty.onnx")


@case(3, "not a readable ONNX model", "export the model again")
def model_truncated(b, tmp):
    data = b.model.read_bytes()
    (tmp / "cut.onnx").write_bytes(data[: len(data) // 2])
    return _audit(b, tmp / "cut.onnx")


@case(3, "not a readable ONNX model", "export the model again")
def model_not_onnx(b, tmp):
    (tmp / "notes.onnx").write_text("these are not the weights you are looking for\n")
    return _audit(b, tmp / "notes.onnx")


@case(3, "no nodes found", "export the model again")
def model_without_a_graph(b, tmp):
    (tmp / "bare.onnx").write_bytes(b"\x08\x08")  # a valid ModelProto: ir_version 8, no graph
    return _audit(b, tmp / "bare.onnx")


@case(3, "fails the ONNX checker", "export the model again")
def model_fails_the_checker(b, tmp):
    model = onnx.load(b.model)
    model.graph.node[0].input[0] = "no_such_tensor"
    return _audit(b, _save(model, tmp / "broken.onnx"))


@case(3, "opset 99", "export the model again with opset")
def model_opset_too_new(b, tmp):
    model = onnx.load(b.model)
    model.opset_import[0].version = 99
    return _audit(b, _save(model, tmp / "future.onnx"))


@case(3, "com.example.unknown", "standard ONNX ops")
def model_op_of_an_unknown_domain(b, tmp):
    model = onnx.load(b.model)
    model.opset_import.append(helper.make_opsetid("com.example.unknown", 1))
    model.graph.node[0].domain = "com.example.unknown"
    return _audit(b, _save(model, tmp / "custom.onnx"))


@case(3, "IR version is 14", "save the model with ir_version")
def model_ir_version_too_new(b, tmp):
    model = onnx.load(b.model)
    model.ir_version = 14  # onnx 1.23's helper.make_model default
    return _audit(b, _save(model, tmp / "ir14.onnx"))


# -- detection


@case(3, "no feature map", "--feature-layer")
def no_feature_map(b, tmp):
    return ["inspect", _save(_dense_only_model(), tmp / "dense.onnx")]


@case(3, "feature map 'nope' not found", "/layer2/layer2.0/act/Relu_output_0")
def feature_layer_override_not_found(b, tmp):
    return _audit(b, b.model, "--feature-layer", "nope")


@case(3, "logits tensor 'nope' not found", "output")
def logits_override_not_found(b, tmp):
    return _audit(b, b.model, "--logits", "nope")


@case(3, "input 'nope' not found", "input")
def input_name_override_not_found(b, tmp):
    return _audit(b, b.model, "--input-name", "nope")


@case(3, "several inputs", "--input-name")
def several_inputs_without_input_name(b, tmp):
    return _audit(
        b,
        _save(
            build_cnn(size=SIZE, num_classes=CLASSES, extra_input=True).model,
            tmp / "two_inputs.onnx",
        ),
    )


# -- original and candidate


@case(3, "4 vs 5 classes", "same input size, layout and classes")
def candidate_with_other_class_count(b, tmp):
    return _audit(b, _save(build_cnn(size=SIZE, num_classes=5).model, tmp / "five.onnx"))


@case(3, "input layout NCHW vs NHWC", "same input size, layout and classes")
def candidate_with_other_layout(b, tmp):
    return _audit(
        b, _save(build_cnn(size=SIZE, num_classes=CLASSES, layout="NHWC").model, tmp / "nhwc.onnx")
    )


@case(3, "input shape ['N', 3, 32, 32] vs ['N', 3, 48, 48]", "same input size, layout and classes")
def candidate_with_other_input_size(b, tmp):
    return _audit(b, _save(build_cnn(size=48, num_classes=CLASSES).model, tmp / "big.onnx"))


# -- images


@case(3, "takes 32x32 inputs but the size asked is 48x48", "drop --size")
def fixed_input_size_the_images_cannot_be_brought_to(b, tmp):
    return _audit(b, b.model, "--size", "48x48")


@case(
    3,
    "flat_head.onnx on these inputs: GEMM: Dimension mismatch",
    "check --size and the preprocessing",
)
def size_a_dynamic_model_cannot_run_at(b, tmp):
    # Symbolic H and W in the input, but the Flatten head's weights fix 32x32.
    flat = build_cnn(size=SIZE, num_classes=CLASSES, head="flatten_mlp", symbolic=True).model
    path = _save(flat, tmp / "flat_head.onnx")
    return ["audit", path, path, "--images", b.images, "--size", "48x48"]


@case(3, "model input 'input' is uint8", "--preprocess raw")
def fractional_values_for_a_uint8_input(b, tmp):
    model = with_input_dtype(
        build_cnn(size=SIZE, num_classes=CLASSES).model, onnx.TensorProto.UINT8
    )
    path = _save(model, tmp / "uint8.onnx")
    return ["audit", path, path, "--images", b.images]


@case(3, "point outside the model's folder", "keep external data files next to the model")
def external_data_outside_the_models_folder(b, tmp):
    path = save_with_external_data(b.model, tmp / "exported")
    (path.parent / "weights.bin").rename(tmp / "weights.bin")
    point_external_data(path, "../weights.bin")
    return _audit(b, path)


@case(3, "does not exist", "pass a folder of images")
def image_folder_missing(b, tmp):
    return _audit(b, b.model, images=tmp / "nowhere")


@case(3, "no images", "pass a folder that holds images")
def image_folder_empty(b, tmp):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no pictures here")
    return _audit(b, b.model, images=tmp / "empty")


@case(3, "none of the 2 images could be read, e.g. a/letter.png", "replace the files")
def every_image_unreadable(b, tmp):
    for name in ("a/letter.png", "b/note.jpg"):
        _mkparent(tmp / "imgs" / name).write_text("Dear reader,\n")
    return _audit(b, b.model, images=tmp / "imgs")


def _folder_with(tmp: Path, name: str, write) -> Path:
    folder = tmp / "imgs"
    _write_image(folder / "0" / "good.png", seed=1)
    write(folder / "1" / name)
    return folder


def _strict(b, tmp, name, write):
    return _audit(b, b.model, "--strict", images=_folder_with(tmp, name, write))


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@case(3, "cannot use image 1/corrupt.png", "drop --strict")
def corrupt_image_with_strict(b, tmp):
    return _strict(
        b,
        tmp,
        "corrupt.png",
        lambda p: _mkparent(p).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
    )


@case(3, "cannot use image 1/cut.png", "drop --strict")
def truncated_image_with_strict(b, tmp):
    data = _write_image(tmp / "whole.png", seed=3).read_bytes()
    return _strict(b, tmp, "cut.png", lambda p: _mkparent(p).write_bytes(data[: len(data) // 2]))


@case(3, "cannot use image 1/letter.png", "drop --strict")
def not_an_image_with_strict(b, tmp):
    return _strict(b, tmp, "letter.png", lambda p: _mkparent(p).write_text("Dear reader,\n"))


@case(3, "refused before decoding (decompression-bomb guard)", "drop --strict")
def decompression_bomb_with_strict(b, tmp):
    return _strict(b, tmp, "bomb.png", lambda p: _bomb_png(_mkparent(p)))


# -- arrays


@case(3, "holds inputs of CxHxW 3x16x16", "save inputs of 3x32x32")
def array_of_the_wrong_size(b, tmp):
    np.save(tmp / "small.npy", np.zeros((2, 3, 16, 16), np.float32))
    return _audit(b, b.model, images=tmp / "small.npy")


@case(3, "holds a 2-D array", "inputs must be (N, C, H, W)")
def array_of_the_wrong_rank(b, tmp):
    np.save(tmp / "flat.npy", np.zeros((2, 3 * SIZE * SIZE), np.float32))
    return _audit(b, b.model, images=tmp / "flat.npy")


@case(3, "holds uint8 values", "save float32 inputs")
def array_of_the_wrong_dtype(b, tmp):
    np.save(tmp / "bytes.npy", np.zeros((2, 3, SIZE, SIZE), np.uint8))
    return _audit(b, b.model, images=tmp / "bytes.npy")


@case(3, "labels have shape (3,) but there are 2 inputs", "save (N,) labels")
def npz_labels_of_the_wrong_shape(b, tmp):
    np.savez(
        tmp / "val.npz",
        images=np.zeros((2, 3, SIZE, SIZE), np.float32),
        labels=np.zeros(3, np.int64),
    )
    return _audit(b, b.model, images=tmp / "val.npz")


class _Trap:
    """Unpickling this creates the folder ``path``: proof that the file was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@case(3, "arrays with Python objects are refused", "save plain float arrays")
def npy_with_objects(b, tmp):
    np.save(
        tmp / "objects.npy",
        np.array([_Trap(tmp / "unpickled"), 1], dtype=object),
        allow_pickle=True,
    )
    return _audit(b, b.model, images=tmp / "objects.npy")


@case(3, "arrays with Python objects are refused", "save plain float arrays")
def npz_with_objects(b, tmp):
    np.savez(tmp / "objects.npz", images=np.array([_Trap(tmp / "unpickled"), 1], dtype=object))
    return _audit(b, b.model, images=tmp / "objects.npz")


# -- scores


@case(3, "every image gave non-finite logits or maps", "check the models and the preprocessing")
def non_finite_for_every_image(b, tmp):
    dark = tmp / "dark"
    for k in range(3):
        _write_image(dark / f"dark{k}.png", seed=k, bright=False)
    return _audit(b, b.nan_model, images=dark)


# -- token grids and side inputs


@case(3, "is not 9 prefix tokens and a 3x3 grid", "check --token-grid and --prefix-tokens")
def token_grid_that_does_not_fit(b, tmp):
    vit = _save(build_vit(size=(SIZE, SIZE)).model, tmp / "vit.onnx")
    return ["audit", vit, vit, "--images", b.images, "--token-grid", "3x3", "--prefix-tokens", "9"]


def _head_reading_a_batch_of_rows(size: int) -> onnx.ModelProto:
    """A CNN whose head, from the Relu named ``feature``, also reads ``side``: a
    per-channel mean of the Conv's output with one row per channel of every image."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((CLASSES, 3, 3, 3), np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([-1, size * size], np.int64), "rows"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        onnx.numpy_helper.from_array(np.array([-1, CLASSES], np.int64), "per_image"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["feature"]),
        helper.make_node("GlobalAveragePool", ["feature"], ["gap"]),
        helper.make_node("Reshape", ["gap", "flat"], ["pooled"]),
        helper.make_node("Reshape", ["conv", "rows"], ["by_channel"]),
        helper.make_node("ReduceMean", ["by_channel"], ["side"], axes=[1], keepdims=0),
        helper.make_node("Add", ["pooled", "side"], ["sum"]),
        helper.make_node("Reshape", ["sum", "per_image"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "side",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@case(3, "which is not one row per image", "choose another layer with --feature-layer")
def head_reading_an_activation_that_is_not_per_image(b, tmp):
    model = _save(_head_reading_a_batch_of_rows(SIZE), tmp / "side.onnx")
    return ["audit", model, model, "--images", b.images, "--feature-layer", "feature"]


# -- outputs


def _a_file(tmp: Path) -> Path:
    path = tmp / "taken"
    path.write_text("x")
    return path


@case(3, "is a file, not a folder", "choose a folder path")
def out_is_a_file(b, tmp):
    return _audit(b, b.model, "--out", _a_file(tmp))


@case(3, "cannot write to --out", "choose a folder you can write to")
def out_under_a_file(b, tmp):
    return _audit(b, b.model, "--out", _a_file(tmp) / "report")


@case(3, "cannot write to --out", "choose a folder you can write to")
def out_unwritable(b, tmp):
    if os.geteuid() == 0:
        return _audit(b, b.model, "--out", "/proc/onnx-sp2ps-out")  # even root cannot
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return _audit(b, b.model, "--out", locked)


@case(3, "is a file, not a folder", "choose a folder path")
def cam_out_is_a_file(b, tmp):
    return ["cam", b.model, "--images", b.images, "--out", _a_file(tmp)]


@case(3, "--junit folder", "choose a folder path")
def junit_under_a_file(b, tmp):
    return _audit(b, b.model, "--junit", _a_file(tmp) / "junit.xml")


# -- saved reports


@case(3, "report not found", "check the path")
def gate_report_missing(b, tmp):
    return ["gate", tmp / "missing.json", "--fail-under", "0.5"]


@case(3, "is not an onnx-sp2ps report.json", "audit --out")
def gate_report_of_another_tool(b, tmp):
    (tmp / "other.json").write_text('{"hello": 1}')
    return ["gate", tmp / "other.json", "--fail-under", "0.5"]


@case(3, "cannot read report", "audit --out")
def gate_report_not_json(b, tmp):
    (tmp / "report.json").write_text("<html>not json</html>")
    return ["gate", tmp / "report.json", "--fail-under", "0.5"]


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the models are run: problems must be found before the long run."""
    import onnx_sp2ps.pipeline as pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started before the bad input was found")

    monkeypatch.setattr(pipeline, "_Explainer", must_not_run)


def _lock_for_root(monkeypatch, name: str) -> None:
    """Root can read a file of mode 000: make reading ``name`` fail as it would for
    anyone else."""
    import onnx_sp2ps.model.load as load

    real, real_open = Path.read_bytes, load.open_regular

    def read_bytes(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    def open_regular(path):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(load, "open_regular", open_regular)


_CHECKED_BEFORE_THE_RUN = {
    "out_is_a_file",
    "out_under_a_file",
    "out_unwritable",
    "cam_out_is_a_file",
    "junit_under_a_file",
}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_line(name, base, tmp_path, capsys, request, monkeypatch):
    make, code, problem, remedy = CASES[name]
    if name in _CHECKED_BEFORE_THE_RUN:
        request.getfixturevalue("no_run")
    if hasattr(make, "locked") and os.geteuid() == 0:
        _lock_for_root(monkeypatch, make.locked)
    args = [str(a) for a in make(base, tmp_path)]
    out = tmp_path / "out"
    if code == 3 and args[0] in ("audit", "cam") and "--out" not in args:
        args += ["--out", str(out)]
    try:
        got, stdout, err = run_cli(capsys, *args, "-q")
    finally:
        for p in tmp_path.rglob("*"):  # let pytest clean up what the case locked
            p.chmod(0o755)
    lines = err.splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].strip(), err
    assert got == code, err
    assert lines[0].startswith("error: " if code == 3 else "usage error: ")
    assert problem in lines[0] and remedy in lines[0], lines[0]
    assert stdout == ""
    assert _files(out) == []
    assert not (tmp_path / "unpickled").exists()  # the .npy/.npz rows: never unpickled


# --------------------------------------------------------------------------- not refused


def test_unreadable_images_are_skipped_counted_and_named(base, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for k in range(3):
        _write_image(folder / str(k % 2) / f"good{k}.png", seed=k)
    bad = {
        "1/corrupt.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)),
        "0/letter.jpg": lambda p: p.write_text("Dear reader,\n"),
        "1/bomb.png": _bomb_png,
        "0/cut.png": lambda p: p.write_bytes(
            _write_image(tmp_path / "whole.png", seed=9).read_bytes()[:300]
        ),
    }
    for name, write in bad.items():
        write(folder / name)
    code, _, err = run_cli(
        capsys, "audit", base.model, base.model, "--images", folder, "--out", tmp_path / "out", "-q"
    )
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("skipped 4 unreadable image(s)"), err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = {row["path"]: row["reason"] for row in report["images"]["skipped"]}
    assert sorted(skipped) == sorted(bad)
    assert "decompression-bomb guard" in skipped["1/bomb.png"]
    assert report["images"]["scored"] == 3
    assert len(report["candidates"][0]["images"]) == 3


def test_some_non_finite_images_score_zero_and_are_named(base, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "audit", base.model, base.nan_model, "--images", base.mixed, "--out", tmp_path, "-q"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    cand = report["candidates"][0]
    assert sorted(cand["non_finite_images"]) == ["0/dark0.png", "1/dark1.png"]
    assert cand["sp2ps"]["non_finite"] == 2 and cand["sp2ps"]["n"] == 8
    rows = {row["path"]: row for row in cand["images"]}
    for path, row in rows.items():
        assert row["finite"] is (not path.endswith(("dark0.png", "dark1.png")))
        if not row["finite"]:
            assert row["score"] == 0.0
    finite_scores = [r["score"] for r in rows.values() if r["finite"]]
    assert cand["sp2ps"]["mean"] == pytest.approx(sum(finite_scores) / 8)


def test_image_modes_are_converted_like_their_rgb_equivalent(base, tmp_path, capsys):
    """16-bit grey, palette, CMYK, alpha and grey files give the logits of the RGB image
    they stand for (built here from the definitions, not by Pillow's conversions)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    index = rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)
    cmyk_colour = np.array([40, 200, 90], np.uint8)  # flat: JPEG keeps it within a level
    pairs = {
        "grey16.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.stack([grey] * 3, -1)),
        "grey.png": (Image.fromarray(grey), np.stack([grey] * 3, -1)),
        "alpha.png": (
            Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)])),
            rgb,
        ),
        "cmyk.jpg": (
            Image.new("CMYK", (SIZE, SIZE), tuple(int(v) for v in 255 - cmyk_colour) + (0,)),
            np.broadcast_to(cmyk_colour, (SIZE, SIZE, 3)),
        ),
    }
    p_image = Image.fromarray(index, mode="P")
    p_image.putpalette(palette.ravel().tolist() + [0] * (768 - 12))
    pairs["palette.png"] = (p_image, palette[index])
    (tmp_path / "modes").mkdir()
    (tmp_path / "rgb").mkdir()
    for name, (image, expected) in pairs.items():
        kwargs = {"quality": 100, "subsampling": 0} if name.endswith(".jpg") else {}
        image.save(tmp_path / "modes" / name, **kwargs)
        Image.fromarray(np.ascontiguousarray(expected)).save(tmp_path / "rgb" / f"{name}.png")
    logits = {}
    for folder in ("modes", "rgb"):
        code, _, err = run_cli(
            capsys,
            "cam",
            base.model,
            "--images",
            tmp_path / folder,
            "--out",
            tmp_path / f"out_{folder}",
            "-q",
        )
        assert code == 0 and err == "", err
        with np.load(tmp_path / f"out_{folder}" / "cams.npz", allow_pickle=False) as cams:
            logits[folder] = dict(
                zip((Path(p).stem.split(".")[0] for p in cams["paths"]), cams["logits"])
            )
    assert sorted(logits["modes"]) == sorted(Path(n).stem for n in pairs)
    for name in logits["modes"]:
        tolerance = 0.05 if name == "cmyk" else 1e-6  # lossy JPEG
        np.testing.assert_allclose(
            logits["modes"][name], logits["rgb"][name], atol=tolerance, err_msg=name
        )


# --------------------------------------------------------------------------- Ctrl-C


def _interrupt_on_second_batch(monkeypatch):
    import onnx_sp2ps.pipeline as pipeline

    real = pipeline.score_pairs
    calls = []

    def score_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # a real SIGINT, to this process: the CLI's handler acts
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "score_pairs", score_then_interrupt)
    return calls


@pytest.mark.parametrize("overlays", ["worst", "all"])
def test_ctrl_c_mid_run_is_exit_130_with_no_report(base, tmp_path, capsys, monkeypatch, overlays):
    calls = _interrupt_on_second_batch(monkeypatch)
    code, stdout, err = run_cli(
        capsys,
        "audit",
        base.model,
        base.model,
        "--images",
        base.images,
        "--out",
        tmp_path,
        "--batch-size",
        "2",
        "--overlays",
        overlays,
        "-q",
    )
    assert len(calls) == 2  # interrupted mid-run, after one complete batch
    assert code == 130
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert "run the command again" in lines[0]
    assert stdout == ""
    # The report set is replaced as a whole: nothing of the interrupted run is left,
    # not even the overlays of the batches it finished (they were staged).
    assert _files(tmp_path) == []


@pytest.mark.parametrize("step", ["samples_csv", "html_report", "write_json"])
def test_ctrl_c_while_making_the_reports_leaves_no_report(
    base, tmp_path, capsys, monkeypatch, step
):
    import onnx_sp2ps.report as report

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return ""

    monkeypatch.setattr(report, step, interrupted)
    code, _, err = run_cli(
        capsys,
        "audit",
        base.model,
        base.model,
        "--images",
        base.images,
        "--out",
        tmp_path,
        "--overlays",
        "none",
        "-q",
    )
    assert code == 130 and len(err.splitlines()) == 1
    names = [p.name for p in _files(tmp_path)]
    assert "report.json" not in names and not [n for n in names if n.endswith(".tmp")]
    if step != "write_json":
        assert names == []


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    from onnx_sp2ps.report import write_atomic

    def half_then_interrupted(handle):
        handle.write(b'{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "report.json", half_then_interrupted)
    assert list(tmp_path.iterdir()) == []


_CHILD = """
import sys
import onnx_sp2ps.pipeline as pipeline
real = pipeline.score_pairs
def wait_for_the_signal(*args, **kwargs):
    print("batch", flush=True)
    sys.stdin.readline()  # blocks until the parent has sent SIGINT
    return real(*args, **kwargs)
pipeline.score_pairs = wait_for_the_signal
from onnx_sp2ps.cli import main
main(sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_to_a_real_process_is_exit_130_with_no_report(base, tmp_path):
    """A real SIGINT while the child is inside a batch (it tells us, then waits)."""
    import signal

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            "audit",
            str(base.model),
            str(base.model),
            "--images",
            str(base.images),
            "--out",
            str(tmp_path),
            "-q",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "batch\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- guarantees


def test_inputs_are_byte_identical_after_every_command(base, tmp_path, capsys):
    inputs = [base.model, base.nan_model, *sorted(base.mixed.rglob("*.png"))]
    before = {p: sha256(p) for p in inputs}
    out = tmp_path / "audit"
    runs = [
        ("inspect", base.model),
        ("cam", base.model, "--images", base.mixed, "--out", tmp_path / "cam", "--overlays"),
        (
            "audit",
            base.model,
            base.nan_model,
            "--images",
            base.mixed,
            "--out",
            out,
            "--save-maps",
            "--overlays",
            "all",
        ),
        ("gate", out / "report.json", "--fail-under", "0.5"),
    ]
    for args in runs:
        code, _, err = run_cli(capsys, *args, "-q")
        assert code in (0, 1), (args, err)
    assert (out / "report.json").exists() and (tmp_path / "cam" / "cams.npz").exists()
    for path, digest in before.items():
        assert sha256(path) == digest, path


def test_same_inputs_and_settings_give_the_same_reports_bit_for_bit(base, tmp_path, capsys):
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        code, _, err = run_cli(
            capsys,
            "audit",
            base.model,
            base.nan_model,
            "--images",
            base.mixed,
            "--out",
            out,
            "--method",
            "gradcam++",
            "--worst",
            "3",
            "--batch-size",
            "3",
            "-q",
        )
        assert code == 0, err
    for name in ("report.json", "samples.csv", "report.html"):
        first, second = ((out / name).read_bytes() for out in outs)
        assert first == second, name
    pngs = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.png"))
    for rel in pngs:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel

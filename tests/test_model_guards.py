"""Hostile models and oversized inputs (issue 10, the model side): refused before memory
is spent.

A model file is data to judge: a few hundred bytes can declare a tensor of any size. Every
row of ``MODELS`` is a hostile model built from ``sample_models/gap_original.onnx``; each
must be refused by ``inspect`` and by ``audit`` with exit 3 and exactly one stderr line
that names the problem (no traceback), and, in a process whose address space is limited to
1 GB, within 10 s and by the same exit 3 (not a MemoryError crash, not a kill). Every row of
``INPUTS`` is a model whose one batch of inputs cannot fit the memory budget: ``audit``
refuses it before the run starts. The default budget (half the available memory) is pinned
in-process (``pinned_budget``) so that the rows do not depend on the machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, SAMPLES, point_external_data, run_cli, save_with_external_data

GAP = SAMPLES / "gap_original.onnx"
CANDIDATE = SAMPLES / "gap_l1_30.onnx"
IMAGES = SAMPLES / "images"
#: Available memory the in-process tests pretend to have (budget: half of it).
PINNED_AVAILABLE = 16 << 30
#: The address-space limit of the subprocess tests.
RLIMIT_BYTES = 1 << 30


@pytest.fixture(autouse=True)
def pinned_budget(monkeypatch):
    import onnx_sp2ps.files as files

    monkeypatch.setattr(files, "available_memory", lambda: PINNED_AVAILABLE)


def _gap() -> onnx.ModelProto:
    return onnx.load(str(GAP))


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # (onnx.save would check nothing either)
    return path


def _sparse(name: str, shape, index: int = 0) -> onnx.SparseTensorProto:
    values = helper.make_tensor(name, TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor(name + "_indices", TensorProto.INT64, [1], [index])
    return helper.make_sparse_tensor(values, indices, list(shape))


def _set_external(path: Path, key: str, value: str) -> Path:
    """Set ``key`` of the first external tensor's entry (added when missing)."""
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    entry = next((e for e in tensor.external_data if e.key == key), None)
    if entry is None:
        entry = tensor.external_data.add()
        entry.key = key
    entry.value = value
    path.write_bytes(model.SerializeToString())
    return path


# --------------------------------------------------------------------------- the table

#: name -> (make(tmp) -> model path, phrase naming the problem, phrase saying what to do)
MODELS: dict = {}
#: The rows that declare more than any machine holds: also run under RLIMIT_AS.
BOMBS = (
    "sparse_initializer_declaring_a_huge_dense_shape",
    "constant_sparse_value_declaring_a_huge_dense_shape",
    "constant_of_shape_of_a_huge_constant_shape",
    "expand_to_a_huge_constant_shape",
    "constant_value_declaring_more_than_it_holds",
    "external_data_length_beyond_the_file",
)


def model(problem: str, remedy: str):
    def register(make):
        MODELS[make.__name__] = (make, problem, remedy)
        return make

    return register


@model(
    "sparse initializer 'bomb' declares a dense 30000x30000 float (3.4 GiB) for 1 stored values",
    "refused before densifying",
)
def sparse_initializer_declaring_a_huge_dense_shape(tmp):
    m = _gap()
    m.graph.sparse_initializer.append(_sparse("bomb", [30000, 30000]))
    return _save(m, tmp / "sparse_bomb.onnx")


@model(
    "Constant node 'bomb' (sparse_value) declares a dense 30000x30000 float",
    "refused before densifying",
)
def constant_sparse_value_declaring_a_huge_dense_shape(tmp):
    m = _gap()
    m.graph.node.insert(
        0,
        helper.make_node(
            "Constant",
            [],
            ["bomb"],
            name="bomb",
            sparse_value=_sparse("bomb_values", [30000, 30000]),
        ),
    )
    return _save(m, tmp / "constant_sparse.onnx")


@model(
    "Sparse tensor (stray_indices) index value at position [0] out of range [0, 99]",
    "export the model again",
)
def sparse_initializer_with_an_index_outside_its_shape(tmp):
    m = _gap()
    m.graph.sparse_initializer.append(_sparse("stray", [10, 10], index=500))
    return _save(m, tmp / "stray_index.onnx")


@model("ConstantOfShape node 'bomb' (1000000000x1000000000)", "over the memory budget of 8.0 GiB")
def constant_of_shape_of_a_huge_constant_shape(tmp):
    m = _gap()
    m.graph.initializer.append(
        numpy_helper.from_array(np.array([10**9, 10**9], np.int64), "bomb_shape")
    )
    m.graph.node.insert(
        0, helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], name="bomb")
    )
    return _save(m, tmp / "constant_of_shape.onnx")


@model("Expand node 'bomb' (1000000000x1000000000)", "over the memory budget of 8.0 GiB")
def expand_to_a_huge_constant_shape(tmp):
    m = _gap()
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([10**9, 10**9], np.int64), "bomb_shape"),
            numpy_helper.from_array(np.ones(1, np.float32), "bomb_one"),
        ]
    )
    m.graph.node.insert(
        0, helper.make_node("Expand", ["bomb_one", "bomb_shape"], ["bomb"], name="bomb")
    )
    return _save(m, tmp / "expand.onnx")


@model("Range node 'bomb' (1000000000000 values)", "over the memory budget of 8.0 GiB")
def range_of_a_huge_constant_length(tmp):
    m = _gap()
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(v, np.int64), name)
            for v, name in ((0, "bomb_start"), (10**12, "bomb_limit"), (1, "bomb_delta"))
        ]
    )
    m.graph.node.insert(
        0,
        helper.make_node(
            "Range", ["bomb_start", "bomb_limit", "bomb_delta"], ["bomb"], name="bomb"
        ),
    )
    return _save(m, tmp / "range.onnx")


@model(
    "Constant node 'bomb' (value) declares 30000x30000 float (900000000 values of "
    "float_data) but holds 1",
    "export the model again",
)
def constant_value_declaring_more_than_it_holds(tmp):
    m = _gap()
    node = helper.make_node(
        "Constant",
        [],
        ["bomb"],
        name="bomb",
        value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
    )
    node.attribute[0].t.dims[:] = [30000, 30000]
    m.graph.node.insert(0, node)
    return _save(m, tmp / "constant_value.onnx")


@model(
    "initializer 'onnx::Conv_55' declares 96x64x3x3 float (221184 bytes of raw_data) but "
    "holds 221180",
    "export the model again",
)
def raw_data_shorter_than_its_shape(tmp):
    m = _gap()
    t = _init(m, "onnx::Conv_55")
    t.raw_data = t.raw_data[:-4]
    return _save(m, tmp / "short_raw.onnx")


@model(
    "initializer 'head.2.weight' declares 4x96000 float (1536000 bytes of raw_data) but holds 1536",
    "export the model again",
)
def shape_grown_past_its_raw_data(tmp):
    m = _gap()
    _init(m, "head.2.weight").dims[1] = 96000
    return _save(m, tmp / "grown.onnx")


@model(
    "initializer 'head.2.bias' declares 4 float (4 values of float_data) but holds 3",
    "export the model again",
)
def float_data_count_disagreeing_with_the_shape(tmp):
    m = _gap()
    t = _init(m, "head.2.bias")
    t.ClearField("raw_data")
    t.float_data.extend([1.0, 2.0, 3.0])
    return _save(m, tmp / "float_data.onnx")


@model(
    "initializer 'head.2.bias' declares 4 int64 (4 values of int64_data) but holds 0",
    "export the model again",
)
def data_type_changed_to_another_typed_field(tmp):
    m = _gap()
    t = _init(m, "head.2.bias")
    t.ClearField("raw_data")
    t.float_data.extend([1.0, 2.0, 3.0, 4.0])
    t.data_type = TensorProto.INT64
    return _save(m, tmp / "int64.onnx")


@model("initializer 'head.2.bias' has an unknown element type (0)", "export the model again")
def data_type_undefined(tmp):
    m = _gap()
    _init(m, "head.2.bias").data_type = TensorProto.UNDEFINED
    return _save(m, tmp / "undefined.onnx")


@model("initializer 'head.2.bias' has an unknown element type (99)", "export the model again")
def data_type_unknown(tmp):
    m = _gap()
    _init(m, "head.2.bias").data_type = 99
    return _save(m, tmp / "unknown.onnx")


@model(
    "initializer 'head.2.bias' declares 4 string (0 bytes of raw_data) but holds 16",
    "export the model again",
)
def data_type_changed_to_string(tmp):
    m = _gap()
    _init(m, "head.2.bias").data_type = TensorProto.STRING
    return _save(m, tmp / "string.onnx")


@model(
    "initializer 'head.2.weight' declares a negative dimension [-4, 96]", "export the model again"
)
def negative_dimension(tmp):
    m = _gap()
    _init(m, "head.2.weight").dims[0] = -4
    return _save(m, tmp / "negative.onnx")


def _external(tmp: Path) -> Path:
    return save_with_external_data(GAP, tmp / "exported")


@model(
    "weights of 'head.2.weight' lie beyond the end of 'weights.bin' (offset 0, length 1000000000",
    "export the model again",
)
def external_data_length_beyond_the_file(tmp):
    return _set_external(_external(tmp), "length", str(10**9))


@model(
    "weights of 'head.2.weight' lie beyond the end of 'weights.bin' (offset 1000000000",
    "export the model again",
)
def external_data_offset_beyond_the_file(tmp):
    return _set_external(_external(tmp), "offset", str(10**9))


@model(
    "weights of 'head.2.weight' take 8 bytes of 'weights.bin' but its type and shape "
    "[4, 96] need 1536",
    "export the model again",
)
def external_data_length_disagreeing_with_the_shape(tmp):
    return _set_external(_external(tmp), "length", "8")


@model(
    "weights of 'head.2.weight' name a location too long to be a file",
    "keep external data files next to the model",
)
def external_data_name_too_long(tmp):
    path = _external(tmp)
    point_external_data(path, "w" * 300 + ".bin")
    return path


@model(
    "weights of 'head.2.weight' name a location with a NUL byte",
    "keep external data files next to the model",
)
def external_data_name_with_a_nul_byte(tmp):
    path = _external(tmp)
    point_external_data(path, "weights\0.bin")
    return path


@model(
    "weights of 'head.2.weight' name a location that cannot be resolved ('a.bin'",
    "remove the looping links",
)
def external_data_through_a_symlink_loop(tmp):
    path = _external(tmp)
    os.symlink("b.bin", path.parent / "a.bin")
    os.symlink("a.bin", path.parent / "b.bin")
    point_external_data(path, "a.bin")
    return path


@model(
    "weights of 'head.2.weight' point to 'weights.bin', which is not a regular file",
    "keep the weights in a regular file next to the model",
)
def external_data_file_is_a_fifo(tmp):
    path = _external(tmp)
    (path.parent / "weights.bin").unlink()
    os.mkfifo(path.parent / "weights.bin")
    return path


@model(
    "is not a regular file (a device, pipe or socket): refused before reading",
    "name the .onnx file itself",
)
def model_file_is_a_fifo(tmp):
    os.mkfifo(tmp / "fifo.onnx")
    return tmp / "fifo.onnx"


@model(
    "is not a regular file (a device, pipe or socket): refused before reading",
    "name the .onnx file itself",
)
def model_file_is_a_link_to_dev_zero(tmp):
    os.symlink("/dev/zero", tmp / "zero.onnx")
    return tmp / "zero.onnx"


def _commands(path: Path) -> dict[str, list]:
    return {"inspect": ["inspect", path], "audit": ["audit", path, CANDIDATE, "--images", IMAGES]}


@pytest.mark.parametrize("command", ["inspect", "audit"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hostile_model_is_refused_with_one_line(name, command, tmp_path, capsys):
    make, problem, remedy = MODELS[name]
    args = _commands(make(tmp_path))[command]
    code, out, err = run_cli(capsys, *args, "-q")
    lines = err.splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == 3, err
    assert problem in lines[0] and remedy in lines[0], lines[0]
    assert out == ""


def test_model_file_over_the_budget_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    import onnx_sp2ps.files as files

    monkeypatch.setattr(files, "available_memory", lambda: 400_000)  # budget 200000 bytes
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or b"")
    code, _, err = run_cli(capsys, "inspect", GAP)
    assert code == 3 and len(err.splitlines()) == 1, err
    assert "over the memory budget of 195.3 KiB: refused before reading" in err
    assert read == []


# --------------------------------------------------------------------------- input batches


def _with_input_dims(dims: dict[int, int | str]) -> onnx.ModelProto:
    m = _gap()
    shape = m.graph.input[0].type.tensor_type.shape.dim
    for i, value in dims.items():
        shape[i].Clear()
        if isinstance(value, int):
            shape[i].dim_value = value
        else:
            shape[i].dim_param = value
    if 0 in dims:  # (the output's batch follows the input's)
        out = m.graph.output[0].type.tensor_type.shape.dim[0]
        out.Clear()
        out.dim_value = dims[0]
    return m


#: name -> (make(tmp) -> audit arguments after the model pair, phrase naming the problem,
#: phrase saying what to do)
INPUTS = {
    "input_declared_100000x100000": (
        lambda tmp: (_save(_with_input_dims({2: 100000, 3: 100000}), tmp / "huge.onnx"), []),
        # (the image pixel guard of data.sources.open_images refuses this size first)
        "images cannot be prepared at 100000x100000",
        "use a smaller input size",
    ),
    "fixed_batch_of_a_million": (
        lambda tmp: (_save(_with_input_dims({0: 1_000_000}), tmp / "million.onnx"), []),
        "the model's fixed batch of 1000000 inputs of 3x64x64",
        "export the model with a dynamic (or smaller) batch dimension",
    ),
    "size_asked_too_large": (
        lambda tmp: (
            _save(_with_input_dims({2: "H", 3: "W"}), tmp / "dynamic.onnx"),
            ["--size", "100000x100000"],
        ),
        "images cannot be prepared at 100000x100000",
        "use a smaller input size",
    ),
    "batch_too_large_for_the_size": (
        lambda tmp: (
            _save(_with_input_dims({2: "H", 3: "W"}), tmp / "dynamic.onnx"),
            ["--size", "4000x4000", "--batch-size", "64"],
        ),
        "one batch of 64 inputs of 3x4000x4000",
        "lower --batch-size to",
    ),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_batch_that_cannot_fit_is_refused_before_the_run(name, tmp_path, capsys, monkeypatch):
    import onnx_sp2ps.pipeline as pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started before the batch was found too large")

    monkeypatch.setattr(pipeline, "_Explainer", must_not_run)
    make, problem, remedy = INPUTS[name]
    path, extra = make(tmp_path)
    code, out, err = run_cli(capsys, "audit", path, path, "--images", IMAGES, *extra, "-q")
    lines = err.splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == 3, err
    assert problem in lines[0] and remedy in lines[0], lines[0]
    if "pixels" not in lines[0]:
        assert (
            "over the memory budget of 8.0 GiB (--max-memory): refused before allocating"
            in lines[0]
        )


def test_max_memory_setting_bounds_the_model_and_the_batch():
    from onnx_sp2ps.errors import InputError, ModelError
    from onnx_sp2ps.model import prepare_model
    from onnx_sp2ps.pipeline import AuditSettings, audit

    with pytest.raises(
        ModelError,
        match=r"is 315.6 KiB, over the memory budget of 97.7 KiB: "
        "refused before reading",
    ):
        audit(GAP, [CANDIDATE], IMAGES, settings=AuditSettings(max_memory=100_000))
    with pytest.raises(
        ModelError,
        match=r"model: its tensors declare 31[0-9.]+ KiB \(the "
        r"largest, initializer 'onnx::Conv_55', 216.0 KiB\), "
        "over the memory budget of 97.7 KiB",
    ):
        prepare_model(_gap(), max_memory=100_000)
    with pytest.raises(
        InputError,
        match="one batch of 16 inputs of 3x64x64 .* over the "
        "memory budget of 1.9 MiB.* lower --batch-size to 4",
    ):
        audit(GAP, [CANDIDATE], IMAGES, settings=AuditSettings(max_memory=2_000_000))


def test_memory_budget_is_half_the_available_memory_unless_given(monkeypatch):
    import onnx_sp2ps.files as files

    assert files.memory_budget(123_456) == 123_456
    monkeypatch.setattr(files, "available_memory", lambda: 1000)
    assert files.memory_budget() == 500
    monkeypatch.setattr(files, "available_memory", lambda: None)
    assert files.memory_budget() == 4 << 30
    monkeypatch.undo()
    available = files._read_meminfo("MemAvailable")
    if available is None:
        pytest.skip("no /proc/meminfo on this system")
    assert 0 < files.memory_budget() <= available // 2


# --------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize(
    "where",
    [
        "onnx.load_model_from_string",
        "onnx_sp2ps.model.shapes._infer",
        "onnxruntime.InferenceSession",
    ],
)
def test_memory_error_while_loading_or_preparing_is_a_model_error(where, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(where, exhausted)
    code, _, err = run_cli(capsys, "inspect", GAP)
    assert code == 3, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{GAP}: out of memory while" in err and "free memory" in err


def test_shape_folding_never_builds_a_large_constant_of_shape():
    """Shape(image)[2:4] * 125 -> ConstantOfShape: 8000x8000 float32 (256 MB) if evaluated.
    Shape folding (detection only) skips it: the peak of traced allocations stays small."""
    from onnx_sp2ps.model import prepare_model

    m = _gap()
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2], np.int64), "fold_start"),
            numpy_helper.from_array(np.array([4], np.int64), "fold_end"),
            numpy_helper.from_array(np.array([125], np.int64), "fold_scale"),
        ]
    )
    m.graph.node.extend(
        [
            helper.make_node("Shape", ["image"], ["fold_shape"]),
            helper.make_node("Slice", ["fold_shape", "fold_start", "fold_end"], ["fold_hw"]),
            helper.make_node("Mul", ["fold_hw", "fold_scale"], ["fold_big"]),
            helper.make_node("ConstantOfShape", ["fold_big"], ["fold_filled"]),
        ]
    )
    tracemalloc.start()
    try:
        prepared = prepare_model(m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.spec.feature_map.shape[1] == 96
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- limits


_DRIVER = """
import contextlib, io, json, sys
from onnx_sp2ps.cli import main
results = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
        except SystemExit as exc:
            results[name] = [exc.code, err.getvalue()]
print(json.dumps(results))
"""


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (RLIMIT_BYTES, RLIMIT_BYTES))


def _run_limited(args: list, timeout: float = 10) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limited,
        env=env,
        cwd=ROOT,
    )


def test_bombs_are_refused_under_a_1_gb_address_space(tmp_path):
    """Every bomb row, and the input-batch rows, in one process limited to 1 GB of address
    space (one process: Python with onnxruntime takes seconds to start): each exits 3 with
    its one line, within the 10 s; then one bomb in a process of its own, exit code and all."""
    calls = {}
    for name in BOMBS:
        folder = tmp_path / name
        folder.mkdir()
        calls[name] = [str(a) for a in _commands(MODELS[name][0](folder))["audit"]] + ["-q"]
    for name, (make, _, _) in INPUTS.items():
        folder = tmp_path / name
        folder.mkdir()
        path, extra = make(folder)
        calls[name] = [str(a) for a in ["audit", path, path, "--images", IMAGES, *extra, "-q"]]
    done = _run_limited(["-c", _DRIVER, json.dumps(calls)])
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert sorted(results) == sorted(calls)
    for name, (code, err) in results.items():
        # (the budget is the limit's: the input rows may blame another of batch and size)
        problem = MODELS[name][1] if name in MODELS else "refused before allocating"
        assert code == 3 and len(err.splitlines()) == 1, (name, err)
        assert problem in err or "over the limit of 89478485" in err, (name, err)
        assert "MemoryError" not in err, (name, err)

    alone = _run_limited(["-m", "onnx_sp2ps", *calls[BOMBS[0]]])
    assert alone.returncode == 3, alone.stderr
    assert alone.stderr.count("\n") == 1 and "refused before densifying" in alone.stderr


# --------------------------------------------------------------------------- permissions


def test_unreadable_model_exits_3_for_another_user(open_tmp):
    """A model of mode 000 (root reads it anyway: the run drops to another user)."""
    from conftest import run_as_nobody

    path = open_tmp / "locked.onnx"
    path.write_bytes(GAP.read_bytes())
    path.chmod(0)
    code, _, err = run_as_nobody(open_tmp, "inspect", path)
    assert code == 3, err
    assert (
        err.startswith(
            f"error: cannot read model {path}: Permission denied: check the file's permissions"
        )
        and err.count("\n") == 1
    )


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    """The model file is checked (a regular file of some size), then opened: a FIFO put
    in its place between the two must not hang the read (nobody writes to it)."""
    import onnx_sp2ps.model.load as load
    from onnx_sp2ps.errors import ModelError

    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    size = (SAMPLES / "gap_original.onnx").stat()
    monkeypatch.setattr(load, "_regular_file", lambda p: size)  # the check saw a file
    with pytest.raises(ModelError, match="changed into a FIFO"):
        load.load_model(fifo)


def test_a_model_file_that_grows_while_being_read_is_refused(tmp_path, monkeypatch):
    import onnx_sp2ps.model.load as load
    from onnx_sp2ps.errors import ModelError

    model = tmp_path / "model.onnx"
    model.write_bytes((SAMPLES / "gap_original.onnx").read_bytes())
    seen = model.stat()
    with open(model, "ab") as f:
        f.write(b"\0" * 100)  # written on after the size was checked
    monkeypatch.setattr(load, "_regular_file", lambda p: seen)
    with pytest.raises(ModelError, match="grew while being read"):
        load.load_model(model)

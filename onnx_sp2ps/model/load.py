"""Reading a model file: refusing what is not a regular, readable ONNX file, checking
every tensor's declared size against its data and the memory budget before anything is
allocated, reading external weights only from the model's folder, the ONNX checker, and
the path for models over protobuf's 2 GB limit (weights held outside the serialized
copy).  Everything works on in-memory copies; the user's file is only ever read.
"""

from __future__ import annotations

import copy
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_sp2ps.errors import ModelError
from onnx_sp2ps.files import NotRegularFile, human_bytes, memory_budget, open_regular, show
from onnx_sp2ps.model.index import _numel, _outer_names, _walk_graphs

__all__ = [
    "PROTOBUF_LIMIT",
    "LARGE_TENSOR_BYTES",
    "load_model",
    "check_tensor_sizes",
    "check_model",
    "count_parameters",
    "is_too_large",
    "split_large_weights",
]

#: Largest model protobuf can serialize (2 GiB - 1).  Bigger models (weights in external
#: data files) are checked, shape-inferred and handed to onnxruntime without serializing
#: their large weights: see :func:`split_large_weights`.
PROTOBUF_LIMIT = 2**31 - 1
#: Initializers at least this large are the ones held aside for models over the limit.
LARGE_TENSOR_BYTES = 1 << 20


def model_digest(path: str | os.PathLike[str] | None, model: onnx.ModelProto) -> str:
    """A sha256 (hex) of a model as it runs: its file's bytes (when it has one) and every
    initializer with its data, so weights in external data files count too; a model
    without a file adds its nodes.  Names a model in shard identities and in the
    original cache's key.

    Raises
    ------
    ModelError
        The file cannot be read again.
    """
    digest = hashlib.sha256()
    if path is not None:
        try:
            with open_regular(path) as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        except (OSError, NotRegularFile) as exc:
            raise ModelError(f"cannot read model {show(path)} again: {exc}") from None
    for tensor in model.graph.initializer:
        digest.update(hashlib.sha256(tensor.SerializeToString()).digest())
    if path is None:
        for node in model.graph.node:
            digest.update(node.SerializeToString())
    return digest.hexdigest()


def load_model(path: str | Path, *, max_memory: int | None = None) -> onnx.ModelProto:
    """Read and check an ONNX model file without ever writing to it.

    ``max_memory`` is the memory budget in bytes (:func:`memory_budget`; None: half the
    memory available).  The file and the sizes its tensors declare are checked against
    the budget and against the data really present (:func:`check_tensor_sizes`) before
    external weights are read, anything is made dense or the ONNX checker runs.

    Raises
    ------
    ModelError
        When the path is missing, a folder, not a regular file, unreadable, empty, over
        the budget, not ONNX, declares tensors it does not hold, or fails the ONNX
        checker.  The message says which, and what to do.
    """
    p = Path(path)
    try:
        return _load_model(p, memory_budget(max_memory))
    except MemoryError as exc:
        raise _out_of_memory(p, "loading") from exc


def _out_of_memory(where: str | Path, doing: str) -> ModelError:
    return ModelError(
        f"{where}: out of memory while {doing} the model: free memory, use "
        "a machine with more, or check that the model is what it claims to be"
    )


def _load_model(p: Path, budget: int) -> onnx.ModelProto:
    st = _regular_file(p)
    if st.st_size > budget:
        raise ModelError(
            f"model file {p} is {human_bytes(st.st_size)}, over the memory budget "
            f"of {human_bytes(budget)}: refused before reading; raise --max-memory "
            "if the machine has the memory, or use one that has"
        )
    try:
        # Opened without blocking and checked again once open (a FIFO swapped in after
        # the check cannot hang the read); at most the size seen at the check is read.
        with open_regular(p) as handle:
            data = handle.read(st.st_size + 1)
    except NotRegularFile as exc:
        raise ModelError(f"model file {p} changed into {exc} while being opened: refused") from None
    except OSError as exc:
        raise ModelError(
            f"cannot read model {p}: {exc.strerror or exc}: check the file's "
            "permissions (read access is all onnx-sp2ps needs)"
        ) from exc
    if len(data) > st.st_size:
        raise ModelError(
            f"model file {p} grew while being read: refused; wait until it is written whole"
        )
    if not data:
        raise ModelError(f"model file {p} is empty: export the model again")
    try:
        model = onnx.load_model_from_string(data)
    except MemoryError:
        raise
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelError(
            f"{p} is not a readable ONNX model ({type(exc).__name__}): it may be truncated "
            "or in another format; export the model again"
        ) from exc
    del data
    if not model.graph.node:
        raise ModelError(
            f"{p} is not an ONNX model with a graph (no nodes found): export the model again"
        )
    check_tensor_sizes(model, p, budget)
    _load_external_data(model, p)
    try:
        check_model(model)
    except MemoryError:
        raise
    except Exception as exc:
        first = " ".join(str(exc).split()) or type(exc).__name__
        if "topologically sorted" in first:
            # Some converters (e.g. onnxruntime's float16 tool) emit nodes out of order;
            # onnxruntime runs such graphs, so sort them (in memory) rather than refuse.
            sorted_model = _toposorted(model)
            if sorted_model is not None:
                try:
                    check_model(sorted_model)
                    return sorted_model
                except Exception:
                    pass
        reason = first[:300].rstrip(".")
        raise ModelError(
            f"{p} fails the ONNX checker: {reason}: export the model again, "
            "or repair it until onnx.checker.check_model accepts it"
        ) from exc
    return model


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Tensors of the model (initializers, sparse initializers' parts, attribute values;
    in subgraphs and functions too, as onnx's loader reads them) whose data lives in an
    external file."""
    tensors = []
    for t, _ in _all_tensors(model):
        tensors += [t.values, t.indices] if isinstance(t, onnx.SparseTensorProto) else [t]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read external weights into ``model``, only from regular files inside the model's
    folder, and only the bytes each tensor's type and shape call for.

    Raises
    ------
    ModelError
        When a location is empty, absolute, too long, holds a NUL byte, loops through
        symbolic links or leads outside the model's folder (also through a link); when
        the file is missing or not a regular file; or when its offset and length do not
        give exactly the tensor's bytes within the file.
    """
    tensors = _external_tensors(model)
    if not tensors:
        return
    folder = path.resolve().parent
    for t in tensors:
        _check_external(t, path, folder)
    try:
        onnx.load_external_data_for_model(model, str(folder))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the external weights of {path}: {first}") from exc


def _check_external(t: onnx.TensorProto, path: Path, folder: Path) -> None:
    """Refuse an external tensor whose location or byte range cannot be what it says
    (see :func:`_load_external_data`), before a byte of it is read."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    name = t.name

    def refuse(
        problem: str, remedy: str = "keep external data files next to the model"
    ) -> NoReturn:
        raise ModelError(f"{path}: weights of {name!r} {problem}; refused: {remedy}")

    if "\0" in location:
        refuse("name a location with a NUL byte")
    if len(location.encode("utf-8", "surrogateescape")) > _MAX_LOCATION or any(
        len(part.encode("utf-8", "surrogateescape")) > _MAX_NAME for part in location.split("/")
    ):
        refuse(f"name a location too long to be a file ({len(location)} characters)")
    try:
        target = (folder / location).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # (3.11: RuntimeError on a loop)
        refuse(
            f"name a location that cannot be resolved ({location!r}: "
            f"{getattr(exc, 'strerror', None) or exc})",
            "remove the looping links",
        )
    if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
        refuse(f"point outside the model's folder ({location!r})")
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        raise ModelError(
            f"{path}: external weights file {location!r} of {name!r} not "
            f"found in {folder}: copy it next to the model"
        ) from None
    except (OSError, ValueError) as exc:
        refuse(
            f"cannot be read from {location!r} ({getattr(exc, 'strerror', None) or exc})",
            "check the file and its permissions",
        )
    if not stat.S_ISREG(st.st_mode):
        refuse(
            f"point to {location!r}, which is not a regular file (a device, pipe or socket)",
            "keep the weights in a regular file next to the model",
        )
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        refuse("have an offset or length that is not a number", "export the model again")
    _, need = _declared(t, path, f"external tensor {name!r}")
    bits = _PACKED.get(t.data_type, (0, 1))[0]
    if bits:
        need = -(-_numel(t.dims) * bits // 8)
    reads = (st.st_size - offset) if length is None else length
    if offset < 0 or (length is not None and length < 0) or offset + max(reads, 0) > st.st_size:
        refuse(
            f"lie beyond the end of {location!r} (offset {offset}, length "
            f"{reads}, file {st.st_size} bytes)",
            "export the model again",
        )
    if reads != need:
        refuse(
            f"take {reads} bytes of {location!r} but its type and shape {list(t.dims)} need {need}",
            "export the model again",
        )


# --------------------------------------------------------------------------- guards
#
# A model file is data to judge, not to trust: a few hundred bytes can declare a tensor
# of any size (a sparse initializer's dense shape, a raw_data of the wrong length, an
# external file's offset, a Constant's dims).  Every declared size is compared with the
# data really present and with a memory budget *before* anything is allocated from it
# (densifying, numpy_helper.to_array, the ONNX checker, reading external files).

#: Longest external-data location accepted (bytes), and longest part of it.
_MAX_LOCATION, _MAX_NAME = 4096, 255
_T = onnx.TensorProto
#: Element types stored with fewer than 8 bits: bits per element in raw_data, and
#: elements per entry of int32_data.
_PACKED: dict[int, tuple[int, int]] = {_T.UINT4: (4, 2), _T.INT4: (4, 2), _T.FLOAT4E2M1: (4, 2)}
for _name, _bits, _per in (
    ("UINT2", 2, 4),
    ("INT2", 2, 4),
    ("FLOAT6E2M3", 6, 1),
    ("FLOAT6E3M2", 6, 1),
):
    if hasattr(_T, _name):
        _PACKED[getattr(_T, _name)] = (_bits, _per)
#: Typed-field entries per element (complex numbers take two).
_ENTRIES: dict[int, int] = {_T.COMPLEX64: 2, _T.COMPLEX128: 2}


def _regular_file(p: Path) -> os.stat_result:
    """The model file's stat, refusing what is not a regular file (FIFO, socket, device,
    or a link to one such as /dev/zero: reading those can hang or never end) before it
    is opened."""
    try:
        st = os.stat(p)  # (follows links: a link is judged by what it points to)
    except (FileNotFoundError, NotADirectoryError):
        raise ModelError(f"model file not found: {p} (check the path)") from None
    except ValueError:
        raise ModelError(f"model path {p!r} contains a NUL byte: check the path") from None
    except OSError as exc:
        raise ModelError(
            f"cannot read model {p}: {exc.strerror or exc}: check the path and "
            "the file's permissions"
        ) from exc
    if stat.S_ISDIR(st.st_mode):
        raise ModelError(f"{p} is a folder, not an ONNX model file: name the .onnx file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(
            f"{p} is not a regular file (a device, pipe or socket): refused "
            "before reading; name the .onnx file itself"
        )
    return st


def _all_tensors(
    model: onnx.ModelProto,
) -> Iterator[tuple[onnx.TensorProto | onnx.SparseTensorProto, str]]:
    """(tensor, label) for every dense and every sparse tensor of the model: initializers
    and node attributes (Constant values and others), in subgraphs and functions too."""
    for g in _walk_graphs(model):
        for t in getattr(g, "initializer", ()):
            yield t, f"initializer {t.name!r}"
        for s in getattr(g, "sparse_initializer", ()):
            yield s, f"sparse initializer {s.values.name!r}"
        for node in g.node:
            for a in node.attribute:
                label = node.name or (node.output[0] if node.output else "")
                what = f"{node.op_type} node {label!r} ({a.name})"
                if a.HasField("t"):
                    yield a.t, what
                for t in a.tensors:
                    yield t, what
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor, what
                for t in a.sparse_tensors:
                    yield t, what


def _type_name(data_type: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(data_type)).lower()
    except ValueError:
        return f"type {data_type}"


def _shape_text(dims: Iterable[int]) -> str:
    return "x".join(str(d) for d in dims) or "scalar"


def _declared(t: onnx.TensorProto, where: str | Path, what: str) -> tuple[int, int]:
    """(elements, bytes in memory) that ``t`` declares, with Python integers (no
    overflow); refuses an unknown element type or a negative dimension."""
    if any(d < 0 for d in t.dims):
        raise ModelError(
            f"{where}: {what} declares a negative dimension {list(t.dims)}: "
            "the file is corrupt; export the model again"
        )
    try:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        raise ModelError(
            f"{where}: {what} has an unknown element type ({t.data_type}): the "
            "file is corrupt or from a newer ONNX; export the model again"
        ) from None
    n = _numel(t.dims)
    return n, n * item


def _stored(t: onnx.TensorProto, n: int) -> tuple[str, int, int]:
    """(field, entries present, entries ``n`` elements need) of a tensor held in the
    file: raw_data in bytes, or the typed field its element type uses, in entries."""
    bits, per = _PACKED.get(t.data_type, (0, 1))
    if t.HasField("raw_data"):
        if t.data_type == _T.STRING:
            return "raw_data", len(t.raw_data), 0  # strings are never raw
        need = (
            -(-n * bits // 8)
            if bits
            else n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        )
        return "raw_data", len(t.raw_data), need
    field_name = helper.tensor_dtype_to_field(t.data_type)
    return field_name, len(getattr(t, field_name)), -(-n // per) * _ENTRIES.get(t.data_type, 1)


def _check_dense(t: onnx.TensorProto, where: str | Path, what: str) -> int:
    """Bytes ``t`` declares, once its data is known to match its type and shape."""
    n, nbytes = _declared(t, where, what)
    if t.data_location == _T.EXTERNAL:
        return nbytes  # (checked against its file in _check_external)
    field_name, have, need = _stored(t, n)
    if have != need:
        unit = "bytes" if field_name == "raw_data" else "values"
        raise ModelError(
            f"{where}: {what} declares {_shape_text(t.dims)} {_type_name(t.data_type)} "
            f"({need} {unit} of {field_name}) but holds {have}: its data does not match "
            "its shape or type; the file is corrupt or hostile, export the model again"
        )
    return nbytes


def _check_sparse(s: onnx.SparseTensorProto, where: str | Path, what: str) -> int:
    """Bytes the dense form of ``s`` takes, once its values and indices are consistent
    and that form is within what onnxruntime accepts (``PROTOBUF_LIMIT``)."""
    _check_dense(s.values, where, what + " values")
    _check_dense(s.indices, where, what + " indices")
    n, dense = _declared(onnx.TensorProto(data_type=s.values.data_type, dims=s.dims), where, what)
    nnz = _numel(s.values.dims)
    idims = list(s.indices.dims)
    if (
        len(s.values.dims) != 1
        or not idims
        or idims[0] != nnz
        or len(idims) > 2
        or (len(idims) == 2 and idims[1] != len(s.dims))
        or nnz > n
        or s.indices.data_type not in (_T.INT64, _T.INT32)
    ):
        raise ModelError(
            f"{where}: {what} has values {list(s.values.dims)} and indices "
            f"{idims} that do not fit its shape {list(s.dims)}: the file is "
            "corrupt; export the model again"
        )
    if dense > PROTOBUF_LIMIT:
        raise ModelError(
            f"{where}: {what} declares a dense {_shape_text(s.dims)} "
            f"{_type_name(s.values.data_type)} ({human_bytes(dense)}) for {nnz} stored values, "
            "over the 2 GiB onnxruntime takes for one tensor: refused before densifying; "
            "the file is hostile or corrupt, export the model again"
        )
    return dense


def check_tensor_sizes(model: onnx.ModelProto, where: str | Path, budget: int) -> int:
    """Check every tensor's declared size against its data and the memory budget, before
    any of them is made dense, converted or checked.  Returns the bytes declared.

    The rule: a tensor held in the file must hold exactly the data its type and shape
    call for (raw_data length, or the number of float_data/int32_data/... entries); an
    external one is checked against its file by :func:`_check_external`; a sparse one's
    dense form must be within 2 GiB (onnxruntime's limit); and the dense size of every
    tensor (sparse ones at their dense shape) and of the outputs of ConstantOfShape,
    Expand and Range of constant inputs (:func:`_constant_output_sizes`) added up must
    fit ``budget``.

    Raises
    ------
    ModelError
        Naming the first tensor whose data does not match, or the largest one when the
        total is over the budget.
    """
    total, largest = 0, (0, "")
    for t, what in _all_tensors(model):
        if isinstance(t, onnx.SparseTensorProto):
            nbytes = _check_sparse(t, where, what)
            label = f"{what} (dense {_shape_text(t.dims)})"
        else:
            nbytes = _check_dense(t, where, what)
            label = what
        total += nbytes
        largest = max(largest, (nbytes, label))
    for nbytes, label in _constant_output_sizes(model):
        total += nbytes
        largest = max(largest, (nbytes, label))
    if total > budget:
        raise ModelError(
            f"{where}: its tensors declare {human_bytes(total)} (the largest, {largest[1]}, "
            f"{human_bytes(largest[0])}), over the memory budget of {human_bytes(budget)}: refused "
            "before allocating; check the model, or raise --max-memory if the machine has "
            "the memory"
        )
    return total


def _constant_output_sizes(model: onnx.ModelProto) -> Iterator[tuple[int, str]]:
    """(bytes, label) of the outputs a few constant numbers ask for: ConstantOfShape and
    Expand of a constant shape, Range of constant bounds (the constants: initializers or
    Constant values, checked first).  Shape folding or onnxruntime would make them."""
    for g in _walk_graphs(model):
        consts = {t.name: t for t in getattr(g, "initializer", ())}
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.HasField("t"):
                        consts[node.output[0]] = a.t

        def small(name: str) -> np.ndarray | None:
            t = consts.get(name)
            if t is None or t.data_location == _T.EXTERNAL or _numel(t.dims) > 16:
                return None
            try:
                return numpy_helper.to_array(t).reshape(-1)
            except Exception:
                return None

        for node in g.node:
            label = f"{node.op_type} node {node.name or (node.output or [''])[0]!r}"
            if node.op_type in ("ConstantOfShape", "Expand") and node.input:
                shape = small(node.input[-1])
                if shape is None or not shape.size or shape.dtype.kind not in "iu":
                    continue
                item = 4
                source = (
                    node.attribute[0].t
                    if node.op_type == "ConstantOfShape"
                    and node.attribute
                    and node.attribute[0].HasField("t")
                    else consts.get(node.input[0])
                    if node.op_type == "Expand"
                    else None
                )
                if source is not None:
                    try:
                        item = np.dtype(helper.tensor_dtype_to_np_dtype(source.data_type)).itemsize
                    except Exception:
                        pass
                dims = [max(int(d), 0) for d in shape]
                yield _numel(dims) * item, f"{label} ({_shape_text(dims)})"
            elif node.op_type == "Range" and len(node.input) == 3:
                bounds = [
                    b for b in (small(n) for n in node.input) if b is not None and b.size == 1
                ]
                if len(bounds) != 3:
                    continue
                start, limit, delta = (float(b[0]) for b in bounds)
                if delta == 0 or not np.isfinite([start, limit, delta]).all():
                    continue
                count = max(int(np.ceil((limit - start) / delta)), 0)
                yield count * bounds[0].dtype.itemsize, f"{label} ({count} values)"


def _nbytes(t: onnx.TensorProto) -> int:
    """Size of a tensor's values from its type and shape (no access to the data)."""
    try:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        item = 8
    return int(np.prod(t.dims, dtype=np.int64)) * item if len(t.dims) else item


#: Room left for the graph's structure when the weights' size decides the 2 GB question.
_STRUCTURE_BYTES = 1 << 28


def is_too_large(model: onnx.ModelProto) -> bool:
    """True when ``model`` is over protobuf's 2 GB serialization limit.  The weights' sizes
    decide without serializing (``ByteSize`` costs as much as serializing); only a model
    within ``_STRUCTURE_BYTES`` of the limit is measured exactly."""
    weights = sum(_nbytes(t) for t in model.graph.initializer)
    if weights + _STRUCTURE_BYTES < PROTOBUF_LIMIT:
        return False
    return int(model.ByteSize()) > PROTOBUF_LIMIT


def _has_data(t: onnx.TensorProto) -> bool:
    """True when the tensor holds its values (raw or typed fields), not only its shape."""
    return t.data_location != onnx.TensorProto.EXTERNAL and any(
        t.HasField(f) if f == "raw_data" else len(getattr(t, f)) > 0
        for f in (
            "raw_data",
            "float_data",
            "int32_data",
            "int64_data",
            "double_data",
            "uint64_data",
            "string_data",
        )
    )


def _copy_fields(
    src: onnx.ModelProto | onnx.GraphProto, dst: onnx.ModelProto | onnx.GraphProto, skip: str
) -> None:
    """Copy every set field of message ``src`` into ``dst`` except ``skip``."""
    for descriptor, value in src.ListFields():
        if descriptor.name == skip:
            continue
        target = getattr(dst, descriptor.name)
        if hasattr(value, "extend") or isinstance(value, (list, tuple)):
            target.extend(value)
        elif hasattr(value, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(dst, descriptor.name, value)


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers keep their name, type and shape but
    not their data, made without copying that data: enough for shape inference and for
    the checker (see :func:`_as_inputs`), at a fraction of the cost for big models."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for t in model.graph.initializer:
        if _nbytes(t) < LARGE_TENSOR_BYTES or t.data_location == onnx.TensorProto.EXTERNAL:
            light.graph.initializer.append(t)  # (an external tensor holds no data here)
        else:
            light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return light


def split_large_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` without the data of its large initializers, and that data.

    The copy (:func:`_weightless`, so the data is never copied into it) marks them as
    external; onnxruntime takes their values with
    ``SessionOptions.add_external_initializers``.  Used for models over the 2 GB limit.
    """
    light = _weightless(model)
    large = {t.name for t in light.graph.initializer if not _has_data(t)}
    held = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name in large and _has_data(t)
    }
    for t in light.graph.initializer:
        if t.name in held:
            t.data_location = onnx.TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", "held-in-memory-by-onnx-sp2ps"
    return light, held


def _as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy for the checker: the large initializers of :func:`_weightless` become
    graph inputs of the same type and shape (IR 3 models list them there already)."""
    light = _weightless(model)
    listed = {i.name for i in light.graph.input}
    kept = []
    for t in light.graph.initializer:
        if _has_data(t) or _nbytes(t) < LARGE_TENSOR_BYTES:
            kept.append(t)
        elif t.name not in listed:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    return light


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on a light copy (:func:`_as_inputs`): the weights'
    values are onnxruntime's to check, and serializing them costs as much as the check;
    this also works for models over the 2 GB limit."""
    onnx.checker.check_model(_as_inputs(model))


def _toposorted(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy whose nodes are in topological order; None when the graph has a cycle."""
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    available |= {t.values.name for t in g.sparse_initializer}
    pending = list(g.node)
    ordered = []
    while pending:
        progress = []
        rest = []
        for node in pending:
            needs = set(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    needs.update(_outer_names(attr.g))
            if needs <= available:
                progress.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if not progress:
            return None
        ordered.extend(progress)
        pending = rest
    out = copy.deepcopy(model)
    del out.graph.node[:]
    out.graph.node.extend(copy.deepcopy(n) for n in ordered)
    return out


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of weight values: elements of initializers and of Constant tensors.

    A sparse initializer counts its dense size (the elements of its shape, zeros
    included), as the same weights stored densely would: two encodings of one pruned
    model have one count; the file size tells them apart."""
    total = 0
    for t in model.graph.initializer:
        total += int(np.prod(t.dims)) if len(t.dims) else 1
    for t in model.graph.sparse_initializer:
        total += int(np.prod(t.dims)) if len(t.dims) else 1
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims)) if len(a.t.dims) else 1
    return total

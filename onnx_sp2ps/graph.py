"""Load an ONNX classifier, find its image input, feature map and logits, and edit it.

Everything here works on in-memory copies of :class:`onnx.ModelProto`; the user's file
is only ever read.  No onnxruntime import: running the edited models is
:mod:`onnx_sp2ps.runtime`'s job.

Detection (DESIGN.md, "Load and inspect"):

* **image input**: the single graph input that is not an initializer (or the one named);
* **logits**: walking back from the graph output through Identity / Reshape / Flatten /
  Squeeze / Unsqueeze / Cast (fp16 models with fp32 outputs) / QuantizeLinear /
  DequantizeLinear (int8 QDQ models), the input of a final Softmax / LogSoftmax / Sigmoid
  (or QLinearSoftmax / QLinearSigmoid) when there is one, else the graph output itself;
  int8 feature maps and logits of QOperator models are read through DequantizeLinear
  nodes added to the in-memory copy (:func:`_float_views`); sparse initializers are
  made dense in that copy;
* **feature map**: walking back from the logits along the data path (never into weights),
  the first tensor met whose spatial extent is greater than 1, i.e. the last one on the
  way forward: the input of the GlobalAveragePool / ReduceMean / AveragePool / Flatten /
  Reshape that starts the head.  When that tensor is the output of a 1x1 Conv classifier
  (as many output channels as classes, SqueezeNet style), the feature map is that Conv's
  input instead, so that the map explains the trunk and not the class scores.

Layouts of 4-D tensors are propagated forward from the input: ONNX Conv and pooling
produce NCHW; Transposes with the NHWC<->NCHW permutations switch; other ops keep the
layout of their data input.  This is how tf2onnx graphs (NHWC, Transposes around every
Conv, ReduceMean over axes [1, 2]) are read correctly.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from onnx_sp2ps.errors import DetectionError, ModelError
from onnx_sp2ps.files import human_bytes, memory_budget

__all__ = [
    "TensorInfo",
    "ModelSpec",
    "PreparedModel",
    "load_model",
    "check_tensor_sizes",
    "analyse_model",
    "prepare_model",
    "extract_head",
    "constant_value",
    "check_model",
    "split_large_weights",
    "FINAL_ACTIVATIONS",
]

#: Ops read through when looking for the logits behind the graph output.
PASS_THROUGH_OPS = (
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Dropout",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
)
#: Ops whose input is taken as the logits when a model ends in one.
FINAL_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")
#: Quantized (QOperator, com.microsoft) final activations and the float op each stands for.
_QUANTIZED_ACTIVATIONS = {"QLinearSoftmax": "Softmax", "QLinearSigmoid": "Sigmoid"}
#: Where a quantized op's output scale and zero point are: (scale input, zero-point input).
_OUTPUT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearSoftmax": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
}
#: Ops that keep the quantization of their (first) int8 input.
_QPARAMS_KEPT = (
    "MaxPool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Dropout",
)
#: Suffixes of the tensors added for the float view of an int8 feature map or logits.
FLOAT_VIEW = "/sp2ps_float"
_REQUANTIZED = "/sp2ps_requantized"
#: Element-wise ops skipped when looking behind the feature map for a 1x1 Conv classifier.
_ELEMENTWISE_OPS = (
    "Relu",
    "LeakyRelu",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Sigmoid",
    "Identity",
    "Dropout",
    "BatchNormalization",
    "Transpose",
)
#: Ops whose output is NCHW whatever the layout of their input (ONNX semantics).
_NCHW_PRODUCERS = (
    "Conv",
    "ConvTranspose",
    "ConvInteger",
    "QLinearConv",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "QLinearGlobalAveragePool",
    "InstanceNormalization",
    "LRN",
)
_TO_NCHW = [0, 3, 1, 2]
_TO_NHWC = [0, 2, 3, 1]
#: Size used for symbolic height and width while shapes are inferred for detection.
PROBE_SIZE = 224
#: Largest model protobuf can serialize (2 GiB - 1).  Bigger models (weights in external
#: data files) are checked, shape-inferred and handed to onnxruntime without serializing
#: their large weights: see :func:`split_large_weights`.
PROTOBUF_LIMIT = 2**31 - 1
#: Initializers at least this large are the ones held aside for models over the limit.
LARGE_TENSOR_BYTES = 1 << 20

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the graph: its name, element type and shape as the graph declares it.

    ``shape`` holds ints for static dimensions, strings for symbolic ones and None for
    unknown ones; it is None when the rank itself is unknown.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }


@dataclass(frozen=True)
class ModelSpec:
    """What was found in a model: input, layouts, feature map, logits and head."""

    input: TensorInfo
    layout: str
    feature_map: TensorInfo
    feature_layout: str
    logits: TensorInfo
    activation: str | None
    num_classes: int | None
    head_ops: tuple[str, ...]
    opset: int
    ir_version: int
    producer: str
    detected: dict = field(default_factory=dict)
    #: Bytes per input image of the largest tensor shape inference found at the size
    #: detection probed (None when none has a static shape): for memory estimates
    #: (:func:`onnx_sp2ps.pipeline.check_batch_memory`); not reported.
    largest_activation: int | None = None

    @property
    def input_size(self) -> tuple[int | None, int | None]:
        """(H, W) of the image input, None where symbolic."""
        return _spatial(self.input.shape, self.layout)

    @property
    def input_channels(self) -> int | None:
        shape = self.input.shape
        if shape is None or len(shape) != 4:
            return None
        dim = shape[1] if self.layout == "NCHW" else shape[3]
        return dim if isinstance(dim, int) else None

    @property
    def fixed_batch(self) -> int | None:
        shape = self.input.shape
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return shape[0]
        return None

    def to_dict(self) -> dict:
        return {
            "input": {**self.input.to_dict(), "layout": self.layout},
            "feature_map": {**self.feature_map.to_dict(), "layout": self.feature_layout},
            "logits": {
                **self.logits.to_dict(),
                "activation": self.activation,
                "num_classes": self.num_classes,
            },
            "head": {"ops": list(self.head_ops)},
            "opset": self.opset,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "detected": dict(self.detected),
        }


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to run: the spec, the model with the feature map and logits as
    outputs, and the head (feature map -> logits) as a model of its own."""

    path: str | None
    spec: ModelSpec
    audit_model: onnx.ModelProto
    head_model: onnx.ModelProto
    size_bytes: int | None
    parameters: int


# --------------------------------------------------------------------------- loading


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


def _out_of_memory(where, doing: str) -> ModelError:
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
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"cannot read model {p}: {exc.strerror or exc}: check the file's "
            "permissions (read access is all onnx-sp2ps needs)"
        ) from exc
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

    def refuse(problem: str, remedy: str = "keep external data files next to the model"):
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

#: Budget (bytes) when the available memory cannot be read.
#: Longest external-data location accepted (bytes), and longest part of it.
_MAX_LOCATION, _MAX_NAME = 4096, 255
_T = onnx.TensorProto
#: Element types stored with fewer than 8 bits: bits per element in raw_data, and
#: elements per entry of int32_data.
_PACKED = {_T.UINT4: (4, 2), _T.INT4: (4, 2), _T.FLOAT4E2M1: (4, 2)}
for _name, _bits, _per in (
    ("UINT2", 2, 4),
    ("INT2", 2, 4),
    ("FLOAT6E2M3", 6, 1),
    ("FLOAT6E3M2", 6, 1),
):
    if hasattr(_T, _name):
        _PACKED[getattr(_T, _name)] = (_bits, _per)
#: Typed-field entries per element (complex numbers take two).
_ENTRIES = {_T.COMPLEX64: 2, _T.COMPLEX128: 2}


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


def _walk_graphs(model: onnx.ModelProto):
    """The main graph, every subgraph (If/Loop/Scan bodies) and every function."""
    stack: list = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def _all_tensors(model: onnx.ModelProto):
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


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _type_name(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type {data_type}"


def _shape_text(dims) -> str:
    return "x".join(str(d) for d in dims) or "scalar"


def _declared(t: onnx.TensorProto, where, what: str) -> tuple[int, int]:
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


def _check_dense(t: onnx.TensorProto, where, what: str) -> int:
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


def _check_sparse(s: onnx.SparseTensorProto, where, what: str) -> int:
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


def check_tensor_sizes(model: onnx.ModelProto, where, budget: int) -> int:
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


def _constant_output_sizes(model: onnx.ModelProto):
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
                bounds = [small(n) for n in node.input]
                if any(b is None or b.size != 1 for b in bounds):
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
    return model.ByteSize() > PROTOBUF_LIMIT


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


def _copy_fields(src, dst, skip: str) -> None:
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


# --------------------------------------------------------------------------- helpers


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return "undefined"


def _shape_of(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param and not d.dim_param.startswith("unk__"):
            dims.append(d.dim_param)  # (unk__N names are made up by shape inference)
        else:
            dims.append(None)
    return tuple(dims)


def _spatial(shape: tuple[Dim, ...] | None, layout: str) -> tuple[Dim, Dim]:
    if shape is None or len(shape) != 4:
        return (None, None)
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    return (h if isinstance(h, int) else None, w if isinstance(w, int) else None)


class _Graph:
    """Index of a graph: producers, consumers, constants, value infos."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.initializers = {t.name for t in g.initializer}
        self.initializers |= {t.values.name for t in g.sparse_initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.infos: dict[str, onnx.ValueInfoProto] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            self.infos[vi.name] = vi
        self.inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.outputs = [o.name for o in g.output]
        self._const_cache: dict[str, bool] = {}

    def is_constant(self, name: str) -> bool:
        """True for initializers, Constant outputs and anything computed from them only."""
        if name in self._const_cache:
            return self._const_cache[name]
        result = False
        if name == "" or name in self.initializers:
            result = True
        elif name in self.producer:
            node = self.producer[name]
            if node.op_type == "Constant":
                result = True
            elif node.op_type in ("Shape", "Size"):
                result = False
            else:
                self._const_cache[name] = False  # cycle guard
                result = all(self.is_constant(i) for i in node.input if i)
        self._const_cache[name] = result
        return result

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The inputs of ``node`` that carry data (not weights, shapes or constants)."""
        if node.op_type in (
            "Reshape",
            "Squeeze",
            "Unsqueeze",
            "Expand",
            "Tile",
            "Slice",
            "Pad",
            "Resize",
            "Upsample",
            "Gather",
        ):
            return [node.input[0]] if node.input and not self.is_constant(node.input[0]) else []
        return [i for i in node.input if i and not self.is_constant(i)]

    def info(self, name: str) -> TensorInfo:
        vi = self.infos.get(name)
        if vi is None:
            return TensorInfo(name=name, dtype="undefined", shape=None)
        return TensorInfo(
            name=name,
            dtype=_dtype_name(vi.type.tensor_type.elem_type),
            shape=_shape_of(vi.type),
        )

    def tensor_names(self) -> set[str]:
        names = set(self.initializers) | set(self.inputs)
        for node in self.model.graph.node:
            names.update(o for o in node.output if o)
        return names


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never raises: on failure the model is returned as it is.
    Inferred on a copy without the large weights' data (:func:`_weightless`), which is
    also how models over the 2 GB limit are inferred."""
    try:
        inferred = shape_inference.infer_shapes(
            _weightless(model), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def _with_static_input(
    model: onnx.ModelProto, input_name: str, layout: str, size: tuple[int, int] | None
) -> onnx.ModelProto:
    """A copy whose image input has concrete dims (batch 1, probe H/W) for inference;
    without the data of its large weights (:func:`_weightless`), which shapes never need."""
    probe = _weightless(model)
    del probe.graph.value_info[:]
    h, w = size if size else (PROBE_SIZE, PROBE_SIZE)
    for inp in probe.graph.input:
        if inp.name != input_name:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != 4:
            break
        spatial = (2, 3) if layout == "NCHW" else (1, 2)
        chan = 1 if layout == "NCHW" else 3
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            value = 1 if i == 0 else 3 if i == chan else (h if i == spatial[0] else w)
            d.Clear()
            d.dim_value = value
    return _fold_shapes(_infer(probe))  # (_infer returns a copy, edited in place there)


#: Ops of shape arithmetic (x.view(n, g, c // g, h, w) and the like) that the probe
#: evaluates where ONNX shape inference stops (it does not propagate Div, for one).
_SHAPE_OPS = (
    "Shape",
    "Size",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Slice",
    "Floor",
    "Ceil",
    "Identity",
    "Reshape",
    "Equal",
    "Where",
    "Max",
    "Min",
    "Neg",
    "Abs",
    "Range",
    "Expand",
    "ConstantOfShape",
)
#: Largest tensor (elements) taken for a shape value.
_SHAPE_VALUE_SIZE = 64


def _fold_shapes(probe: onnx.ModelProto, rounds: int = 64) -> onnx.ModelProto:
    """The shape-inferred ``probe`` (static input) with its shape arithmetic evaluated
    into Constant nodes and shapes inferred again, until nothing more folds: shapes that
    ``x.view(...)`` of computed sizes hide from ONNX shape inference (ShuffleNet's channel
    shuffle) become known.  Only for detection; the model that runs is never changed."""
    from onnx.reference import ReferenceEvaluator

    opset = [o for o in probe.opset_import if o.domain in ("", "ai.onnx")]
    for _ in range(rounds):
        g = _Graph(probe)
        values: dict[str, np.ndarray] = {}

        def value(name: str) -> np.ndarray | None:
            if name not in values:
                v = None
                if name in g.initializers or (
                    name in g.producer and g.producer[name].op_type == "Constant"
                ):
                    try:  # (the probe's large weights have no data: never shape values)
                        v = constant_value(probe.graph, name, g.producer)
                    except Exception:
                        v = None
                values[name] = v if v is not None and v.size <= _SHAPE_VALUE_SIZE else None
            return values[name]

        folded: dict[int, list[np.ndarray]] = {}
        for i, node in enumerate(probe.graph.node):
            if (
                node.op_type not in _SHAPE_OPS
                or node.domain not in ("", "ai.onnx")
                or len(node.output) != 1
            ):
                continue
            if node.op_type == "Shape":
                shape = g.info(node.input[0]).shape
                if shape is None or not all(isinstance(d, int) for d in shape):
                    continue
                start, end = _attr(node, "start", 0), _attr(node, "end", None)
                outs = [np.asarray(shape, np.int64)[start:end]]
            else:
                ins = [value(n) if n else None for n in node.input]
                if any(n and v is None for n, v in zip(node.input, ins)):
                    continue
                if _folds_too_large(node.op_type, ins):
                    continue
                try:
                    one = helper.make_model(
                        helper.make_graph(
                            [node],
                            "fold",
                            [
                                helper.make_tensor_value_info(
                                    n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape
                                )
                                for n, v in zip(node.input, ins)
                                if n
                            ],
                            [
                                helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                                for o in node.output
                            ],
                        ),
                        opset_imports=opset,
                    )
                    outs = ReferenceEvaluator(one).run(
                        None, {n: v for n, v in zip(node.input, ins) if n}
                    )
                except Exception:
                    continue
                outs = [np.asarray(o) for o in outs]
                if any(o.size > _SHAPE_VALUE_SIZE for o in outs):
                    continue
            folded[i] = outs
            for o, v in zip(node.output, outs):
                values[o] = v
        if not any(probe.graph.node[i].op_type in ("Shape", "Size") for i in folded):
            return probe  # (constants alone: shape inference already propagates those)
        for i, (v,) in folded.items():
            node = probe.graph.node[i]
            node.CopyFrom(
                helper.make_node(
                    "Constant",
                    [],
                    [node.output[0]],
                    value=numpy_helper.from_array(v, node.output[0]),
                )
            )
        del probe.graph.value_info[:]
        probe = _infer(probe)
    return probe


def _folds_too_large(op_type: str, ins: list[np.ndarray | None]) -> bool:
    """True when a shape op's output would be over ``_SHAPE_VALUE_SIZE`` elements, told
    from its (small) inputs before it is evaluated: ConstantOfShape, Expand and Range
    make outputs of any size from a few numbers (a hostile model's [100000, 100000])."""
    try:
        if op_type == "ConstantOfShape":
            size = _numel(max(int(d), 0) for d in ins[0].reshape(-1))
        elif op_type == "Expand":
            size = _numel(max(int(d), 0) for d in ins[1].reshape(-1)) * max(ins[0].size, 1)
        elif op_type == "Range":
            start, limit, delta = (float(v.reshape(-1)[0]) for v in ins[:3])
            size = 0 if delta == 0 else max(int(np.ceil((limit - start) / delta)), 0)
        else:
            return False
    except Exception:
        return True  # (not understood: not folded)
    return size > _SHAPE_VALUE_SIZE


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_value(
    graph: onnx.GraphProto, name: str, producer: dict[str, onnx.NodeProto] | None = None
) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a Constant node's output (the
    two ways exporters store weights), else None.  ``producer`` (output name -> node) saves
    a scan of the nodes when the caller has one."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for t in graph.sparse_initializer:
        if t.values.name == name:
            return _dense(t)
    if producer is None:
        node = next((n for n in graph.node if name in n.output), None)
    else:
        node = producer.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                return np.asarray(helper.get_attribute_value(a))
    return None


# --------------------------------------------------------------------------- detection


def _find_input(g: _Graph, input_name: str | None) -> str:
    if input_name is not None:
        if input_name not in g.inputs:
            raise DetectionError(
                f"input {input_name!r} not found; the model's inputs are: " + ", ".join(g.inputs)
            )
        return input_name
    if not g.inputs:
        raise DetectionError("the model has no input that is not a weight")
    if len(g.inputs) > 1:
        raise DetectionError(
            "the model has several inputs ("
            + ", ".join(g.inputs)
            + "): name the image input with --input-name"
        )
    return g.inputs[0]


def _input_layout(g: _Graph, name: str, shape: tuple[Dim, ...] | None) -> str:
    if shape is None or len(shape) != 4:
        rank = "unknown" if shape is None else len(shape)
        raise DetectionError(
            f"input {name!r} has rank {rank}; an image input (N,C,H,W) or (N,H,W,C) "
            "is needed (use --input-name to choose another input)"
        )
    first = [n.op_type for n in g.consumers.get(name, [])]
    for node in g.consumers.get(name, []):
        if node.op_type == "Transpose" and list(_attr(node, "perm", [])) == _TO_NCHW:
            return "NHWC"
    if any(op in ("Conv", "ConvInteger", "MaxPool", "AveragePool") for op in first):
        return "NCHW"

    def chan(d):
        return isinstance(d, int) and d in (1, 3, 4)

    if chan(shape[3]) and not chan(shape[1]):
        return "NHWC"
    return "NCHW"


def _propagate_layouts(g: _Graph, input_name: str, layout: str) -> dict[str, str]:
    """Layout ('NCHW'/'NHWC') of every 4-D activation reachable from the input."""
    layouts = {input_name: layout}
    for node in g.model.graph.node:  # graph nodes are topologically sorted
        data = [i for i in node.input if i in layouts]
        if not data:
            continue
        src = layouts[data[0]]
        if node.op_type in _NCHW_PRODUCERS:
            out = "NCHW"
        elif node.op_type == "Transpose":
            perm = list(_attr(node, "perm", []))
            if perm == _TO_NCHW:
                out = "NCHW"
            elif perm == _TO_NHWC:
                out = "NHWC"
            else:
                out = src
        else:
            out = src
        for o in node.output:
            if o:
                layouts[o] = out
    return layouts


def _find_logits(g: _Graph, logits_name: str | None) -> tuple[str, str | None]:
    if logits_name is not None:
        if logits_name not in g.tensor_names():
            raise DetectionError(
                f"logits tensor {logits_name!r} not found in the model; graph outputs: "
                + ", ".join(g.outputs)
            )
        consumers = g.consumers.get(logits_name, [])
        act = next((c.op_type for c in consumers if c.op_type in FINAL_ACTIVATIONS), None)
        act = act or next(
            (
                _QUANTIZED_ACTIVATIONS[c.op_type]
                for c in consumers
                if c.op_type in _QUANTIZED_ACTIVATIONS
            ),
            None,
        )
        return logits_name, act
    if not g.outputs:
        raise DetectionError("the model has no outputs")
    out = g.outputs[0]
    if len(g.outputs) > 1:
        # Prefer the first output whose chain ends in a classifier activation.
        for cand in g.outputs:
            name, act = _walk_to_logits(g, cand)
            if act is not None:
                return name, act
        out = _classifier_outputs(g)[0]
    return _walk_to_logits(g, out)


def _classifier_outputs(g: _Graph) -> list[str]:
    """Outputs that can be logits, best first: one vector per image (not a feature map)
    and computed from no other output (models that also return their features or
    embeddings, before or after the logits); else all outputs in graph order."""

    def vector(name: str) -> bool:
        shape = g.info(name).shape
        return shape is None or len([d for d in shape[1:] if d != 1]) <= 1

    upstream: set[str] = set()
    for o in g.outputs:
        upstream |= _ancestors(g, o, stop="") - {o}
    vectors = [o for o in g.outputs if vector(o)]
    return [o for o in vectors if o not in upstream] or vectors or list(g.outputs)


def _walk_to_logits(g: _Graph, name: str) -> tuple[str, str | None]:
    current = name
    seen = set()
    while current not in seen:
        seen.add(current)
        node = g.producer.get(current)
        if node is None:
            break
        if node.op_type in FINAL_ACTIVATIONS:
            return node.input[0], node.op_type
        if node.op_type in _QUANTIZED_ACTIVATIONS:
            return node.input[0], _QUANTIZED_ACTIVATIONS[node.op_type]
        if node.op_type in PASS_THROUGH_OPS:
            current = node.input[0]
            continue
        break
    return name, None


def _is_spatial(shape: tuple[Dim, ...] | None, layout: str) -> bool:
    if shape is None or len(shape) != 4:
        return False
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    hv = h if isinstance(h, int) else 2  # unknown spatial dims count as > 1
    wv = w if isinstance(w, int) else 2
    return hv * wv > 1


def _find_feature_map(
    g: _Graph, probe: _Graph, logits: str, layouts: dict[str, str], num_classes: int | None
) -> str:
    found: list[str] = []
    queue = deque([logits])
    visited = set()
    while queue:
        name = queue.popleft()
        if name in visited:
            continue
        visited.add(name)
        layout = layouts.get(name)
        if layout is not None and name != logits and _is_spatial(probe.info(name).shape, layout):
            found.append(name)
            continue
        node = g.producer.get(name)
        if node is None:
            continue
        queue.extend(g.data_inputs(node))
    if not found:
        raise DetectionError(
            f"no feature map found: no tensor with spatial extent > 1 feeds the logits "
            f"{logits!r}; name one with --feature-layer"
        )
    if len(set(found)) > 1:
        raise DetectionError(
            "several tensors feed the head ("
            + ", ".join(sorted(set(found)))
            + "): choose one with --feature-layer"
        )
    feature = found[0]
    return _behind_classifier_conv(g, feature, num_classes)


def _behind_classifier_conv(g: _Graph, feature: str, num_classes: int | None) -> str:
    """Step behind a 1x1 Conv classifier (out channels == classes) ending the trunk."""
    if not num_classes:
        return feature
    current = feature
    for _ in range(8):
        node = g.producer.get(current)
        if node is None:
            return feature
        if node.op_type in _ELEMENTWISE_OPS:
            data = g.data_inputs(node)
            if len(data) != 1:
                return feature
            current = data[0]
            continue
        if node.op_type == "Conv" and len(node.input) >= 2:
            weight = constant_value(g.model.graph, node.input[1], g.producer)
            group = _attr(node, "group", 1)
            if (
                weight is not None
                and weight.ndim == 4
                and weight.shape[2:] == (1, 1)
                and weight.shape[0] == num_classes
                and group == 1
            ):
                return node.input[0]
        return feature
    return feature


def _head_nodes(
    g: _Graph, feature: str, logits: str, image_input: str | None = None
) -> list[onnx.NodeProto]:
    """Nodes computing ``logits`` from ``feature``, in graph order; raises if the head
    needs any other activation of the model (a skip connection around the feature map).
    Graph inputs other than ``image_input`` are allowed (the caller decides)."""
    needed: set[int] = set()
    index = {id(n): i for i, n in enumerate(g.model.graph.node)}
    stack = [logits]
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen or name == feature or name == "":
            continue
        seen.add(name)
        if name in g.initializers:
            continue
        node = g.producer.get(name)
        if node is None and name in g.inputs and name != image_input:
            continue
        if node is None:
            raise DetectionError(
                f"the head from {feature!r} to {logits!r} also reads the model input "
                f"{name!r}; choose a feature map that everything after it depends on "
                "(--feature-layer)"
            )
        outside = not g.is_constant(name) and feature not in _ancestors(g, name, feature)
        if outside and not _batch_size_only(g, name):
            raise DetectionError(
                f"the head from {feature!r} to {logits!r} also reads {name!r}, which "
                "does not come from the feature map; choose a later --feature-layer"
            )
        needed.add(index[id(node)])
        if outside and node.op_type == "Shape":
            continue  # the batch size: read from the feature map in the head (_extract_head)
        stack.extend(i for i in node.input if i)
        for attr in node.attribute:  # names used inside subgraphs (If/Loop)
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_outer_names(attr.g))
    return [g.model.graph.node[i] for i in sorted(needed)]


def _batch_size_only(g: _Graph, name: str) -> bool:
    """True when ``name`` is computed from constants and the batch size of activations
    only (``Shape(x, start=0, end=1)`` or ``Gather(Shape(x), 0)``), as the dynamo exporter's
    heads read it from the image input: the feature map has the same batch size."""
    node = g.producer.get(name)
    if g.is_constant(name):
        return True
    if node is None:
        return False
    if node.op_type == "Shape":
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        if start == 0 and end == 1:
            return True
        users = g.consumers.get(name, [])
        return bool(users) and all(
            u.op_type == "Gather"
            and u.input[0] == name
            and _attr(u, "axis", 0) == 0
            and (lambda v: v is not None and v.size == 1 and int(v.reshape(-1)[0]) == 0)(
                constant_value(g.model.graph, u.input[1], g.producer)
            )
            for u in users
        )
    return all(_batch_size_only(g, i) for i in node.input if i)


def _ancestors(g: _Graph, name: str, stop: str) -> set[str]:
    """Tensors ``name`` depends on, stopping at ``stop`` (included when reached)."""
    cache = getattr(g, "_anc_cache", None)
    if cache is None:
        cache = g._anc_cache = {}
    key = (name, stop)
    if key in cache:
        return cache[key]
    out: set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if t in out:
            continue
        out.add(t)
        if t == stop:
            continue
        node = g.producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    cache[key] = out
    return out


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names = []
    for node in graph.node:
        local.update(node.output)
        names.extend(i for i in node.input if i and i not in local)
    return names


def analyse_model(
    model: onnx.ModelProto,
    *,
    input_name: str | None = None,
    feature_layer: str | None = None,
    logits: str | None = None,
    size: tuple[int, int] | None = None,
) -> ModelSpec:
    """Find the image input, its layout, the feature map and the logits of ``model``.

    Parameters
    ----------
    model
        The classifier; it is not modified.
    input_name, feature_layer, logits
        Tensor names overriding detection.
    size
        (H, W) used to infer intermediate shapes when the input size is symbolic.

    Raises
    ------
    DetectionError
        When something cannot be determined; the message lists the choices.
    """
    return _analyse(
        model,
        _Graph(_infer(model)),
        input_name=input_name,
        feature_layer=feature_layer,
        logits=logits,
        size=size,
    )


def _analyse(
    model: onnx.ModelProto,
    g: _Graph,
    *,
    input_name: str | None,
    feature_layer: str | None,
    logits: str | None,
    size: tuple[int, int] | None,
) -> ModelSpec:
    """:func:`analyse_model` on the index ``g`` of the shape-inferred ``model``."""
    name = _find_input(g, input_name)
    in_info = g.info(name)
    layout = _input_layout(g, name, in_info.shape)
    probe = _Graph(_with_static_input(model, name, layout, size))
    probe.real_size = None not in _spatial(in_info.shape, layout)
    layouts = _propagate_layouts(g, name, layout)

    logits_name, activation = _find_logits(g, logits)
    logits_info = _best_info(g, probe, logits_name)
    if logits_info.shape is None:  # e.g. made by a com.microsoft op shape inference skips
        logits_info = _shape_from_output(g, logits_info)
    num_classes = _num_classes(logits_info.shape)
    if (
        logits_name in layouts
        and _is_spatial(probe.info(logits_name).shape, layouts[logits_name])
        and logits is None
    ):
        raise DetectionError(
            f"the output {logits_name!r} has spatial extent (shape "
            f"{list(probe.info(logits_name).shape)}): this is not an image classifier; "
            "name the logits with --logits"
        )

    if feature_layer is not None:
        if feature_layer not in g.tensor_names():
            spatial = _spatial_candidates(g, probe, layouts, logits_name)
            raise DetectionError(
                f"feature map {feature_layer!r} not found; tensors with spatial extent "
                "on the way to the logits, last first: " + ", ".join(spatial[:12])
            )
        feature = feature_layer
    else:
        feature = _find_feature_map(g, probe, logits_name, layouts, num_classes)
    if feature not in layouts:
        raise DetectionError(f"feature map {feature!r} does not depend on the input {name!r}")
    if logits_name not in _descendants(g, feature):
        raise DetectionError(
            f"the logits {logits_name!r} do not depend on the feature map {feature!r}"
        )
    f_info = _best_info(g, probe, feature)
    f_layout = layouts[feature]
    if f_info.shape is not None and len(f_info.shape) != 4:
        raise DetectionError(
            f"feature map {feature!r} has shape {list(f_info.shape)}; a 4-D "
            "(N,C,H,W) or (N,H,W,C) tensor is needed"
        )
    head = _head_nodes(g, feature, logits_name, name)
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x)
    return ModelSpec(
        input=in_info,
        layout=layout,
        feature_map=f_info,
        feature_layout=f_layout,
        logits=logits_info,
        activation=activation,
        num_classes=num_classes,
        head_ops=tuple(n.op_type for n in head if n.op_type != "Constant"),
        opset=_opset(model),
        ir_version=int(model.ir_version),
        producer=producer,
        detected={
            "input": input_name is None,
            "feature_map": feature_layer is None,
            "logits": logits is None,
        },
        largest_activation=_largest_activation(probe),
    )


def _largest_activation(probe: _Graph) -> int | None:
    """Bytes per batch row of the largest tensor with a static shape in the probe's
    inference (computed tensors only: weights are counted by :func:`check_tensor_sizes`)."""
    largest = None
    for name, vi in probe.infos.items():
        if name in probe.initializers:
            continue
        shape = _shape_of(vi.type)
        if not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            continue
        try:
            item = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).itemsize
        except Exception:
            item = 4
        nbytes = _numel(shape[1:]) * item
        largest = nbytes if largest is None else max(largest, nbytes)
    return largest


def _shape_from_output(g: _Graph, info: TensorInfo) -> TensorInfo:
    """``info`` with the shape of the graph output it leads to through ops that keep
    shapes (a final activation, Quantize/DequantizeLinear, Identity, Cast)."""
    keep = (
        FINAL_ACTIVATIONS
        + tuple(_QUANTIZED_ACTIVATIONS)
        + ("QuantizeLinear", "DequantizeLinear", "Identity", "Cast")
    )
    current = info.name
    for _ in range(8):
        if current in g.outputs:
            out = g.info(current)
            return TensorInfo(info.name, info.dtype, out.shape)
        nxt = [n for n in g.consumers.get(current, []) if n.op_type in keep]
        if len(nxt) != 1:
            break
        current = nxt[0].output[0]
    return info


def _num_classes(shape: tuple[Dim, ...] | None) -> int | None:
    if not shape:
        return None
    rest = [d for d in shape[1:]]
    if all(isinstance(d, int) for d in rest):
        return int(np.prod(rest)) if rest else 1
    return None


def _best_info(g: _Graph, probe: _Graph, name: str) -> TensorInfo:
    """Declared info, with dims the symbolic-input inference left unknown filled from the
    probe inference where they do not depend on the input size (channels, classes)."""
    info = g.info(name)
    pinfo = probe.info(name)
    if info.shape is None and pinfo.shape is not None:
        # Keep only what does not depend on the probe: batch and spatial become None.
        info = TensorInfo(name, pinfo.dtype, tuple([None] + list(pinfo.shape[1:])))
    elif (
        info.shape is not None
        and pinfo.shape is not None
        and getattr(probe, "real_size", False)
        and len(info.shape) == len(pinfo.shape)
        and None in info.shape[1:]
    ):
        # The model's own input size (not a probe size): the probe's dims are the real ones.
        info = TensorInfo(
            name,
            info.dtype,
            info.shape[:1]
            + tuple(p if d is None else d for d, p in zip(info.shape[1:], pinfo.shape[1:])),
        )
    if info.dtype == "undefined" and pinfo.dtype != "undefined":
        info = TensorInfo(name, pinfo.dtype, info.shape)
    return info


def _descendants(g: _Graph, name: str) -> set[str]:
    out: set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if t in out:
            continue
        out.add(t)
        for node in g.consumers.get(t, []):
            stack.extend(o for o in node.output if o)
    return out


def _spatial_candidates(
    g: _Graph, probe: _Graph, layouts: dict[str, str], logits: str
) -> list[str]:
    ancestors = _ancestors(g, logits, "")
    names = []
    for node in reversed(g.model.graph.node):
        for o in node.output:
            if o in ancestors and o in layouts and _is_spatial(probe.info(o).shape, layouts[o]):
                names.append(o)
    return names


# --------------------------------------------------------------------------- editing


def _value_info(
    g: _Graph,
    probe: _Graph,
    name: str,
    *,
    batch: str | None = None,
    shape: tuple[Dim, ...] | None = None,
) -> onnx.ValueInfoProto:
    info = _best_info(g, probe, name)
    if shape is not None:
        info = TensorInfo(name, info.dtype, shape)
    vi = g.infos.get(name) or probe.infos.get(name)
    elem = vi.type.tensor_type.elem_type if vi is not None else onnx.TensorProto.FLOAT
    if elem == onnx.TensorProto.UNDEFINED:
        elem = onnx.TensorProto.FLOAT
    shape = info.shape
    if shape is not None and batch is not None:
        shape = (batch,) + tuple(shape[1:])
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def _add_outputs(model: onnx.ModelProto, inferred: _Graph, names: Iterable[str]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name in existing:
            continue
        out.graph.output.append(_value_info(inferred, inferred, name))
        existing.add(name)
    return out


def extract_head(model: onnx.ModelProto, feature: str, logits: str) -> onnx.ModelProto:
    """The subgraph computing ``logits`` from ``feature`` as a model of its own.

    Initializers and Constant nodes it needs are copied; the batch dimension of the
    feature input and the logits output is symbolic (``N``) so that perturbed maps can be
    run in batches.
    """
    return _extract_head(model, _Graph(_infer(model)), feature, logits)


def _extract_head(model: onnx.ModelProto, g: _Graph, feature: str, logits: str) -> onnx.ModelProto:
    nodes = [copy.deepcopy(n) for n in _head_nodes(g, feature, logits)]
    made = {feature} | {o for n in nodes for o in n.output}
    for n in nodes:  # the batch size of another activation (_batch_size_only)
        if n.op_type == "Shape" and n.input[0] not in made:
            n.input[0] = feature
    used = {i for n in nodes for i in n.input if i}
    for n in nodes:
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used.update(_outer_names(attr.g))
    inits = [copy.deepcopy(t) for t in model.graph.initializer if t.name in used]
    sparse = [copy.deepcopy(t) for t in model.graph.sparse_initializer if t.values.name in used]
    f_vi = _value_info(g, g, feature, batch="N")
    l_vi = _value_info(g, g, logits, batch="N")
    head_graph = helper.make_graph(
        nodes,
        "head",
        [f_vi],
        [l_vi],
        initializer=inits,
        sparse_initializer=sparse,
    )
    head = helper.make_model(
        head_graph,
        opset_imports=[copy.deepcopy(o) for o in model.opset_import],
        producer_name="onnx-sp2ps",
        # IR 3 (Caffe2-era models) lists initializers among the graph inputs; from IR 4 on
        # they need not be, so the head (whose only input is the feature map) uses 4 or later.
        ir_version=max(int(model.ir_version), 4),
    )
    for f in model.functions:
        head.functions.append(copy.deepcopy(f))
    return head


def float32_head(head: onnx.ModelProto) -> onnx.ModelProto:
    """The head with float16/bfloat16 weights, casts and tensors turned into float32, so
    that gradients and perturbations of fp16 models are computed in float32."""
    low = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    out = copy.deepcopy(head)
    g = out.graph

    def convert(t: onnx.TensorProto) -> None:
        if t.data_type in low:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    for t in g.initializer:
        convert(t)
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                convert(a.t)
            if node.op_type in ("Cast", "CastLike") and a.name == "to" and a.i in low:
                a.i = onnx.TensorProto.FLOAT
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in low:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return out


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DetectionError(f"the {what} is not a valid ONNX model: {first}") from exc


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


def prepare_model(
    source: str | Path | onnx.ModelProto,
    *,
    input_name: str | None = None,
    feature_layer: str | None = None,
    logits: str | None = None,
    size: tuple[int, int] | None = None,
    max_memory: int | None = None,
) -> PreparedModel:
    """Load (if a path), analyse and edit a model: everything needed to run it.

    ``max_memory``: the memory budget in bytes (None: :func:`memory_budget`'s default);
    a model whose tensors declare more is refused before anything is allocated.  Running
    out of memory anyway is a :class:`ModelError`, never a crash."""
    where = "model" if isinstance(source, onnx.ModelProto) else str(source)
    try:
        return _prepare_model(
            source,
            input_name=input_name,
            feature_layer=feature_layer,
            logits=logits,
            size=size,
            budget=memory_budget(max_memory),
        )
    except MemoryError as exc:
        raise _out_of_memory(where, "preparing") from exc


def _prepare_model(
    source: str | Path | onnx.ModelProto,
    *,
    input_name: str | None,
    feature_layer: str | None,
    logits: str | None,
    size: tuple[int, int] | None,
    budget: int,
) -> PreparedModel:
    path = None
    size_bytes = None
    if isinstance(source, onnx.ModelProto):
        model = source
        check_tensor_sizes(model, "model", budget)
    else:
        path = str(source)
        model = load_model(source, max_memory=budget)
        size_bytes = Path(source).stat().st_size
    parameters = count_parameters(model)
    model = _densified(model)
    g = _Graph(_infer(model))  # shape inference once, for detection and both edits
    spec = _analyse(
        model, g, input_name=input_name, feature_layer=feature_layer, logits=logits, size=size
    )
    if _is_quantized(g, spec.feature_map) or _is_quantized(g, spec.logits):
        model, spec = _float_views(model, g, spec)
        g = _Graph(_infer(model))
    others = [i for i in g.inputs if i != spec.input.name]
    if others:
        raise ModelError(
            f"the model needs inputs besides the image ({', '.join(others)}) that onnx-sp2ps "
            "cannot fill: export it with the image as its only input, or give those "
            "inputs default values as initializers"
        )
    for info in (spec.feature_map, spec.logits):  # shapes found by the probe only
        if g.info(info.name).shape is None and info.shape is not None:
            g.infos[info.name] = _value_info(g, g, info.name, shape=info.shape)
    audit_model = _add_outputs(model, g, [spec.feature_map.name, spec.logits.name])
    head = float32_head(_extract_head(model, g, spec.feature_map.name, spec.logits.name))
    _check(audit_model, "model with added outputs")
    _check(head, "head subgraph")
    return PreparedModel(
        path=path,
        spec=spec,
        audit_model=audit_model,
        head_model=head,
        size_bytes=size_bytes,
        parameters=parameters,
    )


# --------------------------------------------------------------------------- compressed kinds

_QUANTIZED_DTYPES = {"int8", "uint8"}


def _dense(t: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor (linear [NNZ] or coordinate [NNZ, rank] indices)."""
    values = numpy_helper.to_array(t.values)
    indices = numpy_helper.to_array(t.indices).astype(np.int64)
    shape = tuple(int(d) for d in t.dims)
    bounds = np.asarray(shape if indices.ndim == 2 else [_numel(shape)], np.int64)
    if indices.size and ((indices < 0).any() or (indices >= bounds).any()):
        raise ModelError(
            f"sparse initializer {t.values.name!r} has indices outside its shape "
            f"{list(shape)}: the file is corrupt; export the model again"
        )
    out = np.zeros(shape, dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices[:, 0]
    out.reshape(-1)[indices] = values
    return out


def _densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy with its sparse initializers turned into dense ones (as
    onnxruntime does when it loads them), so that shape inference, weight lookups, the
    head and its backward graph see ordinary weights."""
    if not model.graph.sparse_initializer:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    g.initializer.extend(
        numpy_helper.from_array(_dense(t), t.values.name) for t in g.sparse_initializer
    )
    del g.sparse_initializer[:]
    return out


def _is_quantized(g: _Graph, info: TensorInfo) -> bool:
    """True for an int8/uint8 tensor, or one of unknown type made by a quantized op."""
    if info.dtype in _QUANTIZED_DTYPES:
        return True
    node = g.producer.get(info.name)
    return info.dtype == "undefined" and node is not None and node.op_type in _OUTPUT_QPARAMS


def _quant_params(g: _Graph, name: str) -> tuple[str, str] | None:
    """(scale, zero point) tensor names of the int8/uint8 tensor ``name``, read from the
    op that makes it (QLinear*, QuantizeLinear, or MaxPool/Flatten/... of such a tensor)
    or from a DequantizeLinear / QLinear* op that reads it; None when not found."""
    current = name
    for _ in range(16):
        node = g.producer.get(current)
        if node is None:
            break
        where = _OUTPUT_QPARAMS.get(node.op_type)
        if where is not None and len(node.input) > where[1] and node.input[where[1]]:
            return node.input[where[0]], node.input[where[1]]
        if node.op_type not in _QPARAMS_KEPT:
            break
        current = node.input[0]
    for node in g.consumers.get(name, []):
        if (
            (
                node.op_type == "DequantizeLinear"
                or node.op_type.startswith("QLinear")
                or node.op_type == "QGemm"
            )
            and node.input[0] == name
            and len(node.input) > 2
        ):
            return node.input[1], node.input[2]
    return None


def _float_views(
    model: onnx.ModelProto, g: _Graph, spec: ModelSpec
) -> tuple[onnx.ModelProto, ModelSpec]:
    """For a QOperator model whose feature map or logits are int8/uint8: a copy with
    ``DequantizeLinear`` nodes giving their float values (``<name>/sp2ps_float``), and
    the spec naming those.  The int8 feature map is quantized back from its float view
    (``QuantizeLinear``, exact: the values are on the grid) for the nodes after it, so
    that the head starts from the float map.

    Raises
    ------
    DetectionError
        When the scale and zero point of such a tensor cannot be found.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    infos = {}
    for info in (spec.feature_map, spec.logits):
        if not _is_quantized(g, info) or info.name in infos:
            continue
        params = _quant_params(g, info.name)
        if params is None:
            raise DetectionError(
                f"{info.name!r} is quantized but its scale and zero point were not "
                "found; name a float tensor with --feature-layer / --logits"
            )
        view = info.name + FLOAT_VIEW
        nodes.append(helper.make_node("DequantizeLinear", [info.name, *params], [view]))
        infos[info.name] = TensorInfo(view, "float32", info.shape)
        if info.shape is not None:  # (shape inference stops at com.microsoft ops)
            out.graph.value_info.append(
                helper.make_tensor_value_info(view, onnx.TensorProto.FLOAT, list(info.shape))
            )
        if info is spec.feature_map:
            requantized = info.name + _REQUANTIZED
            for node in out.graph.node:
                for i, name in enumerate(node.input):
                    if name == info.name:
                        node.input[i] = requantized
            nodes.append(helper.make_node("QuantizeLinear", [view, *params], [requantized]))
    # Insert right after the producers (graph order stays topological).
    order = list(out.graph.node)
    for node in nodes:
        source = node.input[0]
        at = next((i + 1 for i, n in enumerate(order) if source in n.output), 0)
        order.insert(at, node)
    del out.graph.node[:]
    out.graph.node.extend(order)
    feature = infos.get(spec.feature_map.name, spec.feature_map)
    logits = infos.get(spec.logits.name, spec.logits)
    return out, dataclasses.replace(spec, feature_map=feature, logits=logits)

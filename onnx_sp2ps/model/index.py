"""The graph index: who makes and who reads each tensor of a model, what each tensor is
(:class:`TensorInfo`), which tensors are constants and what their values are, node
attributes, and the walks over tensors (ancestors, descendants) and over a model's
subgraphs that detection, editing and the gradient rules share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_sp2ps.errors import ModelError

__all__ = ["Dim", "TensorInfo", "GraphIndex", "constant_value"]

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }


#: Ops whose inputs after the first are shapes, indices or sizes, never data.
_SHAPED_BY_LATER_INPUTS = (
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
)


@dataclass(eq=False)
class GraphIndex:
    """Index of a graph: producers, consumers, constants, value infos.

    ``real_size`` is True for the index of a detection probe made at the model's own
    input size (``shapes._with_static_input``), whose dims are then the real ones
    rather than the probe's."""

    model: onnx.ModelProto = field(repr=False)
    real_size: bool = False
    initializers: set[str] = field(init=False)
    producer: dict[str, onnx.NodeProto] = field(init=False)
    consumers: dict[str, list[onnx.NodeProto]] = field(init=False)
    infos: dict[str, onnx.ValueInfoProto] = field(init=False)
    inputs: list[str] = field(init=False)
    outputs: list[str] = field(init=False)
    _const_cache: dict[str, bool] = field(init=False, repr=False)
    _walk_cache: dict[tuple[bool, str, str], set[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = self.model.graph
        self.initializers = {t.name for t in g.initializer}
        self.initializers |= {t.values.name for t in g.sparse_initializer}
        self.producer = {}
        self.consumers = {}
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.infos = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            self.infos[vi.name] = vi
        self.inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.outputs = [o.name for o in g.output]
        self._const_cache = {}
        self._walk_cache = {}

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
        if node.op_type in _SHAPED_BY_LATER_INPUTS:
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

    def ancestors(self, name: str, stop: str = "") -> set[str]:
        """Tensors ``name`` depends on, and ``name`` itself, stopping at ``stop``
        (included when reached)."""
        return self._walk(name, True, stop)

    def descendants(self, name: str) -> set[str]:
        """Tensors that depend on ``name``, and ``name`` itself."""
        return self._walk(name, False, "")

    def _walk(self, name: str, upward: bool, stop: str) -> set[str]:
        """The tensors reached from ``name`` through producers' inputs (``upward``) or
        consumers' outputs, not going on from ``stop``; kept for the next ask."""
        key = (upward, name, stop)
        if key in self._walk_cache:
            return self._walk_cache[key]
        out: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in out:
                continue
            out.add(t)
            if t == stop:
                continue
            if upward:
                node = self.producer.get(t)
                if node is not None:
                    stack.extend(i for i in node.input if i)
            else:
                for node in self.consumers.get(t, []):
                    stack.extend(o for o in node.output if o)
        self._walk_cache[key] = out
        return out


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _dtype_name(elem_type: int) -> str:
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name)
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


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of the attribute ``name`` of ``node``, else ``default``."""
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
    for s in graph.sparse_initializer:
        if s.values.name == name:
            return _dense(s)
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


def _dense(t: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor (linear [NNZ] or coordinate [NNZ, rank] indices).
    Here, not with the sparse rewrite (:mod:`onnx_sp2ps.model.compressed`), because
    :func:`constant_value` reads sparse initializers through it."""
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


def _walk_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto | onnx.FunctionProto]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and every function."""
    stack: list[onnx.GraphProto | onnx.FunctionProto] = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from the graph around it (not its own inputs, weights or
    node outputs)."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names: list[str] = []
    for node in graph.node:
        local.update(node.output)
        names.extend(i for i in node.input if i and i not in local)
    return names


def _only_input(g: GraphIndex, name: str, ops: tuple[str, ...]) -> str | None:
    """The one data input of the node making ``name`` when its op is one of ``ops``;
    None otherwise (a graph input, another op, several data inputs)."""
    node = g.producer.get(name)
    if node is None or node.op_type not in ops:
        return None
    data = g.data_inputs(node)
    return data[0] if len(data) == 1 else None


def _node_order(g: GraphIndex) -> dict[str, int]:
    """Position in the graph of the node making each tensor."""
    return {o: i for i, n in enumerate(g.model.graph.node) for o in n.output}

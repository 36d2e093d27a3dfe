"""Edits that make a model ready to run: the feature map and logits added as outputs,
the head (feature map -> logits) cut out as a model of its own and turned into float32,
the three put together as a :class:`PreparedModel`, and the head's gradient graph fused
into the model with added outputs.  Every edit works on a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_sp2ps.errors import DetectionError, ModelError
from onnx_sp2ps.files import memory_budget
from onnx_sp2ps.model.compressed import _densified, _float_views, _is_quantized
from onnx_sp2ps.model.detect import ModelSpec, _analyse, _best_info, _head_nodes
from onnx_sp2ps.model.index import Dim, GraphIndex, TensorInfo, _outer_names
from onnx_sp2ps.model.load import (
    _out_of_memory,
    check_model,
    check_tensor_sizes,
    count_parameters,
    load_model,
)
from onnx_sp2ps.model.shapes import _infer

if TYPE_CHECKING:
    from onnx_sp2ps.backward import HeadGradient

__all__ = ["PreparedModel", "prepare_model", "extract_head", "float32_head", "fuse_gradient"]


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


def _value_info(
    g: GraphIndex,
    probe: GraphIndex,
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


def _add_outputs(
    model: onnx.ModelProto, inferred: GraphIndex, names: Iterable[str]
) -> onnx.ModelProto:
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
    run in batches.  The head's first input is the feature map; activations it also reads
    (side inputs, see :func:`onnx_sp2ps.model.detect._head_nodes`) follow as inputs.
    """
    return _extract_head(model, GraphIndex(_infer(model)), feature, logits)


def _extract_head(
    model: onnx.ModelProto,
    g: GraphIndex,
    feature: str,
    logits: str,
) -> onnx.ModelProto:
    found, side = _head_nodes(g, feature, logits)
    nodes = [copy.deepcopy(n) for n in found]
    made = {feature, *side} | {o for n in nodes for o in n.output}
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
    side_vi = [_value_info(g, g, name, batch="N") for name in side]
    head_graph = helper.make_graph(
        nodes,
        "head",
        [f_vi, *side_vi],
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


def prepare_model(
    source: str | Path | onnx.ModelProto,
    *,
    input_name: str | None = None,
    feature_layer: str | None = None,
    logits: str | None = None,
    size: tuple[int, int] | None = None,
    max_memory: int | None = None,
    prefix_tokens: int | None = None,
    token_grid: tuple[int, int] | None = None,
) -> PreparedModel:
    """Load (if a path), analyse and edit a model: everything needed to run it.

    ``prefix_tokens``, ``token_grid``: token-grid overrides for transformers (see
    :func:`onnx_sp2ps.model.analyse_model`).  ``max_memory``: the memory budget in bytes
    (None: :func:`memory_budget`'s default); a model whose tensors declare more is refused
    before anything is allocated.  Running out of memory anyway is a
    :class:`ModelError`, never a crash."""
    where = "model" if isinstance(source, onnx.ModelProto) else str(source)
    try:
        return _prepare_model(
            source,
            input_name=input_name,
            feature_layer=feature_layer,
            logits=logits,
            size=size,
            budget=memory_budget(max_memory),
            prefix_tokens=prefix_tokens,
            token_grid=token_grid,
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
    prefix_tokens: int | None = None,
    token_grid: tuple[int, int] | None = None,
) -> PreparedModel:
    model, path, size_bytes = _read(source, budget)
    parameters = count_parameters(model)
    model = _densified(model)
    g = GraphIndex(_infer(model))  # shape inference once, for detection and both edits
    spec = _analyse(
        model,
        g,
        input_name=input_name,
        feature_layer=feature_layer,
        logits=logits,
        size=size,
        prefix_tokens=prefix_tokens,
        token_grid=token_grid,
    )
    if _is_quantized(g, spec.feature_map) or _is_quantized(g, spec.logits):
        model, spec = _float_views(model, g, spec)
        g = GraphIndex(_infer(model))
    _check_only_image_input(g, spec)
    for info in (spec.feature_map, spec.logits):  # shapes found by the probe only
        if g.info(info.name).shape is None and info.shape is not None:
            g.infos[info.name] = _value_info(g, g, info.name, shape=info.shape)
    head = float32_head(_extract_head(model, g, spec.feature_map.name, spec.logits.name))
    # The side inputs of the head as cut (after _float_views, on the float tensors).
    spec = replace(spec, side_inputs=tuple(i.name for i in head.graph.input[1:]))
    audit_model = _add_outputs(
        model, g, [spec.feature_map.name, spec.logits.name, *spec.side_inputs]
    )
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


def _read(
    source: str | Path | onnx.ModelProto, budget: int
) -> tuple[onnx.ModelProto, str | None, int | None]:
    """The model ``source`` is or names (read and checked by :func:`load_model` when a
    path), with its path and file size (None for an in-memory model)."""
    if isinstance(source, onnx.ModelProto):
        check_tensor_sizes(source, "model", budget)
        return source, None, None
    model = load_model(source, max_memory=budget)
    return model, str(source), Path(source).stat().st_size


def _check_only_image_input(g: GraphIndex, spec: ModelSpec) -> None:
    """Refuse a model that needs inputs other than the image (nothing could fill them)."""
    others = [i for i in g.inputs if i != spec.input.name]
    if others:
        raise ModelError(
            f"the model needs inputs besides the image ({', '.join(others)}) that onnx-sp2ps "
            "cannot fill: export it with the image as its only input, or give those "
            "inputs default values as initializers"
        )


def fuse_gradient(model: onnx.ModelProto, grad: HeadGradient) -> onnx.ModelProto:
    """``model`` (with the feature map and logits as outputs) plus the backward graph of
    its head: one run gives activations, logits and gradients.  The head's forward nodes
    are already in ``model`` under the same names, so only the backward part is added,
    with the ``target`` input and the gradient outputs."""
    fused = copy.deepcopy(model)
    g = fused.graph
    existing = {o for n in g.node for o in n.output}
    names = {i.name for i in g.initializer}
    g.node.extend(
        copy.deepcopy(n) for n in grad.model.graph.node if not any(o in existing for o in n.output)
    )
    g.initializer.extend(
        copy.deepcopy(t) for t in grad.model.graph.initializer if t.name not in names
    )
    g.input.append(copy.deepcopy(next(i for i in grad.model.graph.input if i.name == grad.target)))
    outputs = {o.name: o for o in grad.model.graph.output}
    for name in (grad.gradient, grad.target_used):
        g.output.append(copy.deepcopy(outputs[name]))
    check_model(fused)
    return fused

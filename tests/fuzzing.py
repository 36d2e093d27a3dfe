"""Seeded mutation fuzzing of the ``onnx-sp2ps`` command line (issue 10, section 8).

Every mutant is one input (a model, a report.json, or a folder of images) made from a
valid one by a few seeded mutations, run through the CLI in its own subprocess under a
memory limit and a timeout.  What must hold for every mutant (``problems``): no exit 4
(an internal error), no death by a signal, no hang, an exit code the command documents,
and exactly one line on stderr when the exit code is 2 or 3.

A mutant is named by its family and seed (``Mutant.key``, e.g. ``model-field:17``): the
same key builds the same bytes on every machine, and ``python tests/test_fuzz.py --replay
KEY --keep DIR`` rebuilds it, prints the command and runs it again.

Families:

- ``model-bytes``: byte-level mutations of a sample model, through ``inspect``;
- ``model-field``: protobuf field mutations of a sample model, through ``inspect``;
- ``model-audit``: protobuf field mutations of a candidate, through ``audit`` (the
  mutant is run by onnxruntime, not only parsed);
- ``report``: JSON-structure and byte mutations of a report.json, through ``gate``;
- ``image``: byte and chunk mutations of the images of a small folder, through ``audit``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of every mutant's process: 1 GiB
TIMEOUT = 30.0  # seconds before a mutant counts as a hang
ALLOWED = {"inspect": {0, 3}, "gate": {0, 1, 2, 3}, "audit": {0, 1, 3}}
FAMILIES = (
    "model-field",
    "model-bytes",
    "report",
    "image",
    "model-field",
    "model-audit",
    "report",
    "model-bytes",
    "image",
    "model-field",
)

ORIGINALS = {"gap": SAMPLES / "gap_original.onnx", "fc": SAMPLES / "fc_original.onnx"}


def model_sources() -> list[Path]:
    return [ORIGINALS["gap"], ORIGINALS["fc"], *sorted((SAMPLES / "compressed").glob("*.onnx"))]


def original_of(model: Path) -> Path:
    return ORIGINALS["fc" if model.name.startswith("fc_") else "gap"]


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    hung: bool = False

    @property
    def category(self) -> str:
        if self.hung:
            return "hang"
        if self.returncode < 0:
            return "signal"
        return str(self.returncode) if self.returncode <= 4 else "other"

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def last_line(self) -> str:
        lines = self.stderr_lines()
        return lines[-1] if lines else ""


def _limit_memory(limit: int | None):
    def apply():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_cli(
    args, *, timeout: float = TIMEOUT, memory: int | None = MEMORY_LIMIT, cwd: Path = ROOT
) -> Outcome:
    """``python -m onnx_sp2ps ARGS`` in a new process group, under RLIMIT_AS ``memory``;
    killed (with its whole group) after ``timeout`` seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnx_sp2ps", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_limit_memory(memory),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        hung = True
    return Outcome(
        proc.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        time.monotonic() - start,
        hung,
    )


def problems(command: str, outcome: Outcome, allowed=None) -> list[str]:
    """What is wrong with how a command ended (empty: nothing)."""
    found = []
    if outcome.hung:
        found.append(f"hang: still running after {outcome.seconds:.0f} s")
    elif outcome.returncode < 0:
        found.append(f"killed by signal {signal.Signals(-outcome.returncode).name}")
    else:
        if outcome.returncode == 4:
            found.append("exit 4 (internal error)")
        elif outcome.returncode not in (allowed or ALLOWED[command]):
            found.append(f"exit {outcome.returncode}, not one {command} documents")
        if outcome.returncode in (2, 3) and len(outcome.stderr_lines()) != 1:
            found.append(
                f"exit {outcome.returncode} with {len(outcome.stderr_lines())} "
                "lines on stderr (must be exactly one)"
            )
    return found


# --------------------------------------------------------------------------- bases


@dataclass(frozen=True)
class Base:
    """Valid inputs the mutants are made from: a folder of 4 labelled images (2 PNG,
    2 JPEG, one per class) and a report.json written by ``audit --out`` on them."""

    root: Path
    images: Path
    report: Path


def make_base(root: Path) -> Base:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    for k, folder in enumerate(sorted((SAMPLES / "images").iterdir(), key=lambda p: p.name)):
        source = sorted(folder.glob("*.png"))[0]
        (images / folder.name).mkdir(parents=True, exist_ok=True)
        if k % 2:
            Image.open(source).convert("RGB").save(
                images / folder.name / (source.stem + ".jpg"), quality=90
            )
        else:
            shutil.copyfile(source, images / folder.name / source.name)
    out = root / "audit"
    result = run_cli(
        [
            "audit",
            ORIGINALS["gap"],
            SAMPLES / "compressed" / "gap_qdq_int8.onnx",
            ORIGINALS["gap"],
            "--images",
            images,
            "--batch-size",
            "4",
            "-q",
            "--out",
            out,
        ],
        memory=None,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the base audit failed (exit {result.returncode}): {result.stderr}")
    return Base(root, images, out / "report.json")


# --------------------------------------------------------------------------- byte mutations


def mutate_bytes(
    rng: random.Random, data: bytes, ops: list[str], rounds: int | None = None
) -> bytes:
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        n = len(buf)
        kind = rng.choice(
            [
                "flip",
                "flip",
                "truncate",
                "duplicate",
                "delete",
                "overwrite",
                "insert",
                "overwrite-ff",
            ]
        )
        if n == 0:
            kind = "insert"
        if kind == "flip":
            count = rng.randint(1, 16)
            for _ in range(count):
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
            ops.append(f"bytes.flip({count} bits)")
        elif kind == "truncate":
            cut = rng.randrange(n)
            del buf[cut:]
            ops.append(f"bytes.truncate(at {cut} of {n})")
        elif kind == "duplicate":
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 4096))
            at = rng.randrange(n + 1)
            buf[at:at] = buf[i:j]
            ops.append(f"bytes.duplicate([{i}:{j}] at {at})")
        elif kind == "delete":
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 4096))
            del buf[i:j]
            ops.append(f"bytes.delete([{i}:{j}])")
        elif kind in ("overwrite", "overwrite-ff"):
            i = rng.randrange(n)
            length = min(n - i, rng.randint(1, 64))
            fill = (
                bytes([0xFF]) * length
                if kind == "overwrite-ff"
                else bytes(rng.randrange(256) for _ in range(length))
            )
            buf[i : i + length] = fill
            ops.append(f"bytes.{kind}([{i}:{i + length}])")
        else:
            at = rng.randrange(n + 1)
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            buf[at:at] = chunk
            ops.append(f"bytes.insert({len(chunk)} at {at})")
    return bytes(buf)


# --------------------------------------------------------------------------- model fields

HUGE = [2**31 - 1, 2**31, 2**32 + 1, 10**10, 2**62, 2**63 - 1]
NEGATIVE = [-1, -2, -(2**31), -(2**63)]
OP_TYPES = [
    "Foo",
    "",
    "Conv",
    "Gemm",
    "Relu",
    "Softmax",
    "Reshape",
    "Loop",
    "If",
    "Scan",
    "GlobalAveragePool",
    "Flatten",
    "MatMul",
    "Constant",
    "QLinearConv",
    "Identity",
    "Split",
    "Resize",
    "Einsum",
    "NonZero",
    "ConstantOfShape",
    "Expand",
    "Tile",
]
DOMAINS = ["com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training", "x.y", "ai.onnx"]
LOCATIONS = [
    "",
    "missing.bin",
    "../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "/dev/urandom",
    ".",
    "..",
    "model.onnx",
    "a/../../b.bin",
    "~/x.bin",
    "con",
    "x" * 5000,
    "\u00e9\u00e9.bin",
    "file:///etc/passwd",
    "./././w.bin",
    "sub/",
    "nul\u0001.bin",
]


def _dim_value(rng: random.Random) -> int:
    return rng.choice([*HUGE, *NEGATIVE, 0, 0, 1, 3, 100000])


def _tensors(model):
    """Every TensorProto in the model's main graph (initializers, sparse parts, Constant
    values)."""
    g = model.graph
    out = list(g.initializer)
    for s in g.sparse_initializer:
        out += [s.values, s.indices]
    for node in g.node:
        for a in node.attribute:
            if a.HasField("t"):
                out.append(a.t)
    return out


def _m_dims(rng, model, ops):
    ts = [t for t in _tensors(model) if len(t.dims)] or _tensors(model)
    t = rng.choice(ts)
    kind = rng.choice(["set", "set", "add", "drop", "all-zero"])
    if kind == "set" and len(t.dims):
        i = rng.randrange(len(t.dims))
        t.dims[i] = _dim_value(rng)
    elif kind == "add":
        t.dims.append(_dim_value(rng))
    elif kind == "drop" and len(t.dims):
        del t.dims[rng.randrange(len(t.dims))]
    else:
        for i in range(len(t.dims)):
            t.dims[i] = 0
    ops.append(f"field.dims.{kind}({t.name!r} -> {list(t.dims)})")


def _m_data_type(rng, model, ops):
    t = rng.choice(_tensors(model))
    t.data_type = rng.choice([*range(0, 27), 99, 2**31 - 1, -1])
    ops.append(f"field.data_type({t.name!r} -> {t.data_type})")


def _m_raw_data(rng, model, ops):
    ts = [t for t in _tensors(model) if t.raw_data] or _tensors(model)
    t = rng.choice(ts)
    n = len(t.raw_data)
    kind = rng.choice(["truncate", "extend", "empty", "odd"])
    if kind == "truncate":
        t.raw_data = t.raw_data[: rng.randrange(max(n, 1))]
    elif kind == "extend":
        t.raw_data = t.raw_data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    elif kind == "empty":
        t.raw_data = b""
    else:
        t.raw_data = t.raw_data[: max(n - 1, 0)] + b"\x01\x02\x03"
    ops.append(f"field.raw_data.{kind}({t.name!r}: {n} -> {len(t.raw_data)} bytes)")


def _m_node_op(rng, model, ops):
    g = model.graph
    node = rng.choice(g.node)
    kind = rng.choice(["op_type", "op_type", "domain", "drop-node", "duplicate-node", "swap"])
    if kind == "op_type":
        old, node.op_type = node.op_type, rng.choice(OP_TYPES + [n.op_type for n in g.node])
        ops.append(f"field.node.op_type({node.name or old}: {old} -> {node.op_type})")
    elif kind == "domain":
        node.domain = rng.choice(DOMAINS)
        ops.append(f"field.node.domain({node.name or node.op_type} -> {node.domain})")
    elif kind == "drop-node":
        i = rng.randrange(len(g.node))
        ops.append(f"field.node.drop({g.node[i].op_type} #{i})")
        del g.node[i]
    elif kind == "duplicate-node":
        i = rng.randrange(len(g.node))
        g.node.insert(rng.randrange(len(g.node) + 1), copy.deepcopy(g.node[i]))
        ops.append(f"field.node.duplicate({g.node[i].op_type} #{i})")
    else:
        i, j = rng.randrange(len(g.node)), rng.randrange(len(g.node))
        a, b = copy.deepcopy(g.node[i]), copy.deepcopy(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
        ops.append(f"field.node.swap(#{i}, #{j})")


def _names(model) -> list[str]:
    g = model.graph
    names = [i.name for i in g.input] + [o.name for o in g.output]
    for n in g.node:
        names += list(n.input) + list(n.output)
    return [n for n in names if n] or ["x"]


def _m_node_io(rng, model, ops):
    g = model.graph
    node = rng.choice(g.node)
    side = rng.choice(["input", "output"])
    seq = node.input if side == "input" else node.output
    kind = rng.choice(["rename", "rename-existing", "drop", "add", "empty", "self-loop"])
    label = node.name or node.op_type
    if kind == "rename" and len(seq):
        i = rng.randrange(len(seq))
        seq[i] = seq[i] + rng.choice(["_x", "'", " ", "\u00e9", "/"])
    elif kind == "rename-existing" and len(seq):
        seq[rng.randrange(len(seq))] = rng.choice(_names(model))
    elif kind == "drop" and len(seq):
        del seq[rng.randrange(len(seq))]
    elif kind == "empty" and len(seq):
        seq[rng.randrange(len(seq))] = ""
    elif kind == "self-loop" and len(node.output) and len(node.input):
        node.input[0] = node.output[0]
    else:
        seq.append(rng.choice(_names(model) + ["nowhere"]))
    ops.append(f"field.node.{side}.{kind}({label}: {list(seq)})")


def _m_attribute(rng, model, ops):
    from onnx import AttributeProto, helper

    g = model.graph
    nodes = [n for n in g.node if len(n.attribute)] or list(g.node)
    node = rng.choice(nodes)
    label = node.name or node.op_type
    kind = rng.choice(["value", "value", "drop", "add", "type"])
    if kind in ("value", "type", "drop") and len(node.attribute):
        a = node.attribute[rng.randrange(len(node.attribute))]
        if kind == "drop":
            node.attribute.remove(a)
        elif kind == "type":
            a.type = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 99])
        elif a.type == AttributeProto.INTS or len(a.ints):
            values = [
                rng.choice([0, -1, 1, 2, 1000, 2**40, -(2**40)])
                for _ in range(rng.choice([0, 1, len(a.ints), len(a.ints) + 3]))
            ]
            del a.ints[:]
            a.ints.extend(values)
        elif a.type == AttributeProto.INT:
            a.i = rng.choice([0, -1, 1, 5, 1000, 2**40, -(2**63)])
        elif a.type == AttributeProto.FLOAT:
            a.f = rng.choice([0.0, -1.0, math.inf, math.nan, 1e38])
        elif a.type == AttributeProto.STRING:
            a.s = rng.choice([b"", b"NOTSET", b"\xff\xfe", b"SAME_UPPER", b"x" * 1000])
        elif a.type == AttributeProto.TENSOR:
            a.t.dims[:] = [rng.choice(HUGE)] * max(1, len(a.t.dims))
        else:
            a.type = AttributeProto.INT
        ops.append(f"field.attribute.{kind}({label}.{a.name})")
    else:
        name = rng.choice(
            [
                "axis",
                "kernel_shape",
                "strides",
                "pads",
                "group",
                "alpha",
                "transA",
                "transB",
                "perm",
                "keepdims",
                "mode",
                "zzz",
            ]
        )
        value = rng.choice([0, -1, 3, 2**40, [0, 0], [2**40, 1], [-5, -5, -5, -5], 1.5, "NOTSET"])
        node.attribute.append(helper.make_attribute(name, value))
        ops.append(f"field.attribute.add({label}.{name}={value!r})")


def _m_sparse(rng, model, ops):
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    if not len(g.sparse_initializer):
        # make one: a sparse copy of an initializer, then inflate it
        inits = [t for t in g.initializer if len(t.dims) >= 2] or list(g.initializer)
        t = rng.choice(inits)
        dense = numpy_helper.to_array(t).ravel()
        idx = np.flatnonzero(dense)[:64].astype(np.int64)
        values = numpy_helper.from_array(dense[idx].astype(np.float32), t.name)
        indices = numpy_helper.from_array(idx, t.name + "_indices")
        sparse = g.sparse_initializer.add()
        sparse.values.CopyFrom(values)
        sparse.indices.CopyFrom(indices)
        sparse.dims.extend(t.dims)
        g.initializer.remove(t)
        ops.append(f"field.sparse.make({t.name!r})")
    s = rng.choice(g.sparse_initializer)
    kind = rng.choice(
        [
            "inflate",
            "inflate",
            "index-out-of-range",
            "negative-index",
            "values-short",
            "indices-2d",
            "dims-negative",
            "unsorted",
        ]
    )
    if kind == "inflate":
        s.dims[:] = rng.choice([[30000, 30000], [2**31, 2**31], [10**6, 10**6, 3, 3], [2**62, 4]])
    elif kind in ("index-out-of-range", "negative-index", "unsorted"):
        idx = numpy_helper.to_array(s.indices).copy()
        if idx.size:
            if kind == "unsorted":
                idx = idx[::-1].copy()
            else:
                idx.flat[rng.randrange(idx.size)] = -5 if kind == "negative-index" else 2**40
            s.indices.CopyFrom(numpy_helper.from_array(idx, s.indices.name))
    elif kind == "values-short":
        s.values.dims[0] = max(int(s.values.dims[0]) // 2, 0) if len(s.values.dims) else 0
        s.values.raw_data = s.values.raw_data[: len(s.values.raw_data) // 2]
    elif kind == "indices-2d":
        s.indices.dims[:] = [1, *s.indices.dims, 7]
    else:
        s.dims[0] = -int(s.dims[0]) if len(s.dims) else -1
    ops.append(f"field.sparse.{kind}({s.values.name!r} dims {list(s.dims)})")


def _m_external(rng, model, ops):
    from onnx import TensorProto

    t = rng.choice(list(model.graph.initializer) or _tensors(model))
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    entries = {"location": rng.choice(LOCATIONS)}
    if rng.random() < 0.6:
        entries["offset"] = rng.choice(["0", "-1", "abc", "99999999999999999999", "4096", ""])
    if rng.random() < 0.6:
        entries["length"] = rng.choice(["0", "-1", "1e9", str(2**40), "16", ""])
    if rng.random() < 0.2:
        entries["checksum"] = "x"
    if rng.random() < 0.2:
        entries["weird"] = "1"
    if rng.random() < 0.5:
        t.raw_data = b""
    for k, v in entries.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    ops.append(f"field.external_data({t.name!r}: {entries})")


def _m_opset(rng, model, ops):
    kind = rng.choice(["version", "version", "domain", "drop", "add", "ir_version"])
    if kind == "ir_version":
        model.ir_version = rng.choice([0, 1, 2, 3, 99, 2**40, -1])
        ops.append(f"field.ir_version({model.ir_version})")
        return
    if kind == "drop" and len(model.opset_import):
        del model.opset_import[:]
    elif kind == "add":
        o = model.opset_import.add()
        o.domain, o.version = rng.choice(DOMAINS + [""]), rng.choice([1, 17, 1000])
    elif len(model.opset_import):
        o = rng.choice(model.opset_import)
        if kind == "domain":
            o.domain = rng.choice(DOMAINS)
        else:
            o.version = rng.choice([0, 1, 6, 7, 9, 10, 11, 13, 21, 25, 26, 100, 2**40, -1])
    ops.append(f"field.opset.{kind}({[(o.domain, o.version) for o in model.opset_import]})")


def _m_value_info(rng, model, ops):
    from onnx import helper

    g = model.graph
    kind = rng.choice(
        [
            "input-dim",
            "input-dim",
            "input-rank",
            "input-type",
            "output-dim",
            "add-value-info",
            "second-input",
            "drop-output",
            "input-dim-param",
        ]
    )
    if kind.startswith("input") and len(g.input):
        vi = g.input[0]
        tt = vi.type.tensor_type
        if kind == "input-dim" and len(tt.shape.dim):
            d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
            d.dim_value = _dim_value(rng)
        elif kind == "input-dim-param" and len(tt.shape.dim):
            d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
            d.dim_param = rng.choice(["", "?", "batch", "h", "N" * 300, "-1"])
        elif kind == "input-rank":
            if len(tt.shape.dim) and rng.random() < 0.5:
                del tt.shape.dim[rng.randrange(len(tt.shape.dim))]
            else:
                tt.shape.dim.add().dim_value = _dim_value(rng)
        else:
            tt.elem_type = rng.choice([0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 16, 21, 99])
        ops.append(
            f"field.value_info.{kind}({vi.name}: "
            f"{[d.dim_value or d.dim_param for d in tt.shape.dim]}, type {tt.elem_type})"
        )
    elif kind == "output-dim" and len(g.output):
        tt = g.output[0].type.tensor_type
        if len(tt.shape.dim):
            tt.shape.dim[rng.randrange(len(tt.shape.dim))].dim_value = _dim_value(rng)
        ops.append("field.value_info.output-dim")
    elif kind == "add-value-info":
        name = rng.choice([n for n in _names(model)])
        shape = [rng.choice([1, 3, 7, 0, 10**9, -1]) for _ in range(rng.randint(0, 5))]
        g.value_info.append(helper.make_tensor_value_info(name, rng.choice([1, 7, 10, 3]), shape))
        ops.append(f"field.value_info.add({name}: {shape})")
    elif kind == "second-input":
        g.input.append(helper.make_tensor_value_info("extra", 1, [1, 3, 64, 64]))
        ops.append("field.value_info.second-input")
    else:
        if len(g.output):
            del g.output[rng.randrange(len(g.output))]
        ops.append("field.value_info.drop-output")


def _m_constant(rng, model, ops):
    """Replace an initializer by a Constant node that may declare far more elements than
    it holds."""
    from onnx import helper

    g = model.graph
    if not len(g.initializer):
        return _m_dims(rng, model, ops)
    t = rng.choice(g.initializer)
    value = copy.deepcopy(t)
    kind = rng.choice(["plain", "inflated", "inflated", "sparse-attr", "value_float"])
    if kind == "inflated":
        value.dims[:] = rng.choice([[10**5, 10**5], [10**10], [2**31, 2]])
    g.initializer.remove(t)
    if kind == "value_float":
        node = helper.make_node("Constant", [], [t.name], value_floats=[1.0] * 3)
    elif kind == "sparse-attr":
        node = helper.make_node("Constant", [], [t.name], value_float=1.0, value_int=2)
    else:
        node = helper.make_node("Constant", [], [t.name], value=value)
    g.node.insert(0, node)
    ops.append(f"field.constant.{kind}({t.name!r}: {list(value.dims)})")


FIELD_MUTATIONS = [
    _m_dims,
    _m_dims,
    _m_data_type,
    _m_raw_data,
    _m_raw_data,
    _m_node_op,
    _m_node_io,
    _m_node_io,
    _m_attribute,
    _m_attribute,
    _m_sparse,
    _m_external,
    _m_opset,
    _m_value_info,
    _m_value_info,
    _m_constant,
]


def mutate_model_fields(rng: random.Random, data: bytes, ops: list[str]) -> bytes:
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        mutation = rng.choice(FIELD_MUTATIONS)
        try:
            mutation(rng, model, ops)
        except (IndexError, ValueError, TypeError) as exc:  # not applicable to this model
            ops.append(f"({mutation.__name__} not applied: {type(exc).__name__})")
    return model.SerializeToString()


# --------------------------------------------------------------------------- report.json

ODD_VALUES = [
    None,
    True,
    False,
    "0.9",
    "",
    "NaN",
    [],
    {},
    [0.9],
    {"mean": 0.9},
    1e308,
    -1,
    2**70,
    -0.0,
    "\u0000",
    0,
]


def _paths(obj, prefix=()):
    """Every (path, value) of a JSON document, depth first."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return doc


def _important(doc):
    """Paths the gate reads, so that most mutations hit what matters."""
    picks = [
        ("schema_version",),
        ("tool",),
        ("candidates",),
        ("passed",),
        ("original",),
        ("original", "accuracy"),
        ("gate_criteria",),
    ]
    cands = doc.get("candidates")
    for i, _c in enumerate(cands if isinstance(cands, list) else []):
        picks += [
            ("candidates", i),
            ("candidates", i, "sp2ps"),
            ("candidates", i, "sp2ps", "mean"),
            ("candidates", i, "sp2ps", "p5"),
            ("candidates", i, "agreement"),
            ("candidates", i, "accuracy"),
            ("candidates", i, "model"),
            ("candidates", i, "model", "name"),
            ("candidates", i, "gate"),
        ]
    return picks


def mutate_report(rng: random.Random, text: str, ops: list[str]) -> bytes:
    doc = json.loads(text)
    final = None  # a mutation that makes the document huge is applied last
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = [p for p, _ in _paths(doc)]
        known = set(paths)
        important = [p for p in _important(doc) if p in known] if isinstance(doc, dict) else []
        path = rng.choice(important) if important and rng.random() < 0.7 else rng.choice(paths)
        where = "/".join(map(str, path))
        kind = rng.choice(
            [
                "swap-type",
                "swap-type",
                "bool-for-number",
                "string-for-score",
                "nan",
                "delete-key",
                "schema-version",
                "deep",
                "huge-array",
                "top-level",
                "many-candidates",
            ]
        )
        if kind in ("deep", "huge-array", "many-candidates"):
            final = (kind, path, where)
            break
        if kind == "swap-type":
            value = copy.deepcopy(rng.choice(ODD_VALUES))
            doc = _set(doc, path, value)
            ops.append(f"report.swap-type({where} = {value!r})")
        elif kind == "bool-for-number":
            nums = [p for p, v in _paths(doc) if _is_number(v)]
            for p in rng.sample(nums, min(len(nums), rng.randint(1, 20))):
                doc = _set(doc, p, rng.choice([True, False]))
            ops.append("report.bool-for-number")
        elif kind == "string-for-score":
            nums = [p for p, v in _paths(doc) if isinstance(v, float)]
            for p in rng.sample(nums, min(len(nums), rng.randint(1, 20))):
                doc = _set(doc, p, rng.choice(["0.99", "1", "high", "1e999", ""]))
            ops.append("report.string-for-score")
        elif kind == "nan":
            nums = [p for p, v in _paths(doc) if _is_number(v)]
            value = rng.choice([math.nan, math.inf, -math.inf])
            for p in rng.sample(nums, min(len(nums), rng.randint(1, 20))):
                doc = _set(doc, p, value)
            ops.append(f"report.non-finite-literal({value})")
        elif kind == "delete-key":
            keyed = [p for p in paths if p and isinstance(p[-1], str)]
            if keyed:
                p = rng.choice(keyed)
                parent = doc
                for q in p[:-1]:
                    parent = parent[q]
                del parent[p[-1]]
                ops.append(f"report.delete-key({'/'.join(map(str, p))})")
        elif kind == "schema-version" and isinstance(doc, dict):
            doc["schema_version"] = rng.choice([2, 0, "1", 1.0, True, None, -1, 10**30, 999])
            ops.append(f"report.schema-version({doc['schema_version']!r})")
        else:
            doc = copy.deepcopy(rng.choice([[], "report", 1, None, [doc]]))
            ops.append(f"report.top-level({type(doc).__name__})")
    deep = None
    if final:
        kind, path, where = final
        if kind == "deep":
            deep = rng.choice(["list", "dict"])
            doc = _set(doc, path, "__FUZZ_DEEP__")
            ops.append(f"report.deep-{deep}(100000 levels at {where})")
        elif kind == "huge-array":
            doc = _set(doc, path, [0.5] * rng.choice([10**5, 10**6]))
            ops.append(f"report.huge-array(at {where})")
        elif (
            isinstance(doc, dict) and isinstance(doc.get("candidates"), list) and doc["candidates"]
        ):
            cand = copy.deepcopy(doc["candidates"][0])
            if isinstance(cand, dict):
                cand["images"] = []
            doc["candidates"] = [cand] * rng.choice([1000, 5000])
            ops.append(f"report.many-candidates({len(doc['candidates'])})")
    text = json.dumps(doc)
    if deep:
        nest = (
            "[" * 100000 + "]" * 100000 if deep == "list" else '{"a":' * 100000 + "1" + "}" * 100000
        )
        text = text.replace('"__FUZZ_DEEP__"', nest)
    data = text.encode("utf-8")
    if rng.random() < 0.15:
        data = mutate_bytes(rng, data, ops, rounds=1)
    if rng.random() < 0.05:
        data = rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b""]) + data
        ops.append("report.prefix-bytes")
    return data


# --------------------------------------------------------------------------- images


def _png_chunks(data: bytes):
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks.append([kind, data[pos + 8 : pos + 8 + length]])
        pos += 12 + length
    return chunks


def _png_join(chunks) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )
    return out


def mutate_png(rng: random.Random, data: bytes, ops: list[str]) -> bytes:
    """Chunk-level mutations with valid CRCs, so the decoder gets past the checksums."""
    chunks = _png_chunks(data)
    kind = rng.choice(
        [
            "ihdr-size",
            "ihdr-size",
            "ihdr-fields",
            "idat-bytes",
            "idat-zlib-bomb",
            "drop-chunk",
            "duplicate-chunk",
            "bad-plte",
            "text-chunk",
        ]
    )
    ihdr = next(c for c in chunks if c[0] == b"IHDR")
    if kind == "ihdr-size":
        w, h = rng.choice(
            [
                (0, 64),
                (64, 0),
                (1, 10**6),
                (10**6, 1),
                (2**31 - 1, 2**31 - 1),
                (65535, 65535),
                (9459, 9459),
                (64, 65),
                (2**32 - 1, 1),
            ]
        )
        ihdr[1] = struct.pack(">II", w, h) + ihdr[1][8:]
        ops.append(f"png.ihdr-size({w}x{h})")
    elif kind == "ihdr-fields":
        body = bytearray(ihdr[1])
        i = rng.choice([8, 9, 10, 11, 12])
        body[i] = rng.choice([0, 1, 2, 3, 4, 6, 7, 16, 255])
        ihdr[1] = bytes(body)
        ops.append(f"png.ihdr-byte({i} = {body[i]})")
    elif kind == "idat-bytes":
        for c in chunks:
            if c[0] == b"IDAT":
                c[1] = mutate_bytes(rng, c[1], ops, rounds=1)
        ops.append("png.idat-bytes")
    elif kind == "idat-zlib-bomb":
        # valid zlib stream of far more pixel bytes than the header's image holds
        body = zlib.compress(b"\x00" * (64 * 1024 * 1024), 9)
        for c in chunks:
            if c[0] == b"IDAT":
                c[1] = body
                break
        chunks = [c for i, c in enumerate(chunks) if c[0] != b"IDAT" or c[1] is body]
        ops.append("png.idat-zlib-bomb(64 MiB)")
    elif kind == "drop-chunk":
        i = rng.randrange(len(chunks))
        ops.append(f"png.drop-chunk({chunks[i][0]!r})")
        del chunks[i]
    elif kind == "duplicate-chunk":
        i = rng.randrange(len(chunks))
        chunks.insert(rng.randrange(len(chunks) + 1), list(chunks[i]))
        ops.append(f"png.duplicate-chunk({chunks[i][0]!r})")
    elif kind == "bad-plte":
        body = bytearray(ihdr[1])
        body[9] = 3
        ihdr[1] = bytes(body)
        if rng.random() < 0.5:
            chunks.insert(1, [b"PLTE", b"\x00" * rng.choice([0, 3, 5, 768, 771])])
        ops.append("png.palette-without-valid-PLTE")
    else:
        chunks.insert(
            1,
            [
                rng.choice([b"tEXt", b"zTXt", b"iCCP", b"eXIf"]),
                bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))),
            ],
        )
        ops.append(f"png.ancillary-chunk({chunks[1][0]!r})")
    return _png_join(chunks)


def mutate_jpeg(rng: random.Random, data: bytes, ops: list[str]) -> bytes:
    buf = bytearray(data)
    kind = rng.choice(
        ["sof-size", "sof-size", "cut-after-sos", "exif-orientation", "components", "huffman"]
    )
    sof = next(
        (i for i in range(2, len(buf) - 9) if buf[i] == 0xFF and buf[i + 1] in (0xC0, 0xC1, 0xC2)),
        None,
    )
    if kind == "sof-size" and sof is not None:
        h, w = rng.choice([(0, 64), (64, 0), (65535, 65535), (1, 65535), (65535, 1), (64, 65)])
        buf[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
        ops.append(f"jpeg.sof-size({w}x{h})")
    elif kind == "components" and sof is not None:
        buf[sof + 9] = rng.choice([0, 2, 4, 255])
        ops.append(f"jpeg.components({buf[sof + 9]})")
    elif kind == "cut-after-sos":
        sos = buf.find(b"\xff\xda")
        del buf[sos + rng.randint(2, 40) :]
        ops.append("jpeg.cut-after-sos")
    elif kind == "exif-orientation":
        # an APP1 Exif segment whose orientation tag is out of range or whose IFD loops
        ifd = (
            struct.pack("<2sHI", b"II", 42, 8)
            + struct.pack("<H", 1)
            + struct.pack("<HHII", 0x0112, 3, 1, rng.choice([0, 9, 65535, 6]))
            + struct.pack("<I", rng.choice([0, 8, 2**31]))
        )
        body = b"Exif\x00\x00" + ifd
        buf[2:2] = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
        ops.append("jpeg.exif-orientation")
    else:
        dht = buf.find(b"\xff\xc4")
        if dht > 0:
            for _ in range(8):
                i = dht + 4 + rng.randrange(30)
                buf[i] = rng.randrange(256)
        ops.append("jpeg.huffman-table-bytes")
    return bytes(buf)


def reencode_image(rng: random.Random, path: Path, ops: list[str]) -> Path:
    """Replace an image by a valid but unusual one: odd mode, extreme aspect ratio or
    size, another format (the suffix kept or changed), EXIF orientation, animation."""
    import numpy as np
    from PIL import Image

    size = rng.choice(
        [
            (1, 1),
            (2, 1),
            (1, 100_000),
            (100_000, 1),
            (3, 5000),
            (64, 64),
            (5000, 3),
            (1, 2_000_000),
            (4000, 4000),
        ]
    )
    mode = rng.choice(
        [
            "1",
            "L",
            "LA",
            "P",
            "PA",
            "I;16",
            "I",
            "F",
            "RGB",
            "RGBA",
            "CMYK",
            "YCbCr",
            "HSV",
            "LAB",
            "RGBX",
        ]
    )
    fmt, suffix = rng.choice(
        [
            ("PNG", ".png"),
            ("JPEG", ".jpg"),
            ("TIFF", ".tif"),
            ("WEBP", ".webp"),
            ("BMP", ".bmp"),
            ("GIF", ".gif"),
            ("PNG", ".jpg"),
            ("TIFF", ".png"),
        ]
    )
    data = np.random.default_rng(rng.randrange(2**32)).integers(
        0, 256, (min(size[1], 64), min(size[0], 64), 3), dtype=np.uint8
    )
    image = Image.fromarray(data).resize(size, Image.Resampling.NEAREST)
    try:
        image = image.convert(mode)
    except (ValueError, OSError):
        mode = "RGB"
    target = path.with_suffix(suffix)
    kwargs = {}
    if rng.random() < 0.3 and fmt in ("JPEG", "PNG", "TIFF", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = rng.choice([0, 1, 3, 5, 6, 8, 9, 65535])
        kwargs["exif"] = exif.tobytes()
    if fmt == "GIF" and rng.random() < 0.5:
        kwargs.update(save_all=True, append_images=[image.copy()], duration=10)
    try:
        image.save(target, format=fmt, **kwargs)
    except Exception:  # noqa: BLE001 - a combination Pillow cannot write: plain PNG
        kwargs = {}
        image.convert("RGB").save(target, format="PNG")
        fmt, mode = "PNG", "RGB"
    if target != path:
        path.unlink()
    ops.append(
        f"image.reencode({size[0]}x{size[1]} {mode} as {fmt} -> {target.name}"
        + (", exif" if "exif" in kwargs else "")
        + ")"
    )
    return target


# --------------------------------------------------------------------------- mutants


@dataclass
class Mutant:
    family: str
    seed: int
    ops: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    command: str = ""
    site: str = ""

    @property
    def key(self) -> str:
        return f"{self.family}:{self.seed}"


def schedule(count: int, base_seed: int = 0, start: int = 0) -> list[tuple[str, int]]:
    """The (family, seed) of mutants ``start .. start + count - 1``: families in a fixed
    rotation, so that a few mutants already cover every family."""
    return [
        (FAMILIES[i % len(FAMILIES)], base_seed * 1_000_003 + i)
        for i in range(start, start + count)
    ]


def build(family: str, seed: int, base: Base, work: Path) -> Mutant:
    """Write mutant ``family:seed`` under ``work`` and return it with its CLI arguments."""
    rng = random.Random(f"{family}:{seed}")
    m = Mutant(family, seed)
    work.mkdir(parents=True, exist_ok=True)
    if family in ("model-bytes", "model-field", "model-audit"):
        source = rng.choice(model_sources())
        m.ops.append(f"source {source.relative_to(ROOT)}")
        data = source.read_bytes()
        if family == "model-bytes":
            data = mutate_bytes(rng, data, m.ops)
        else:
            data = mutate_model_fields(rng, data, m.ops)
        target = work / source.name
        target.write_bytes(data)
        if family == "model-audit":
            m.command = "audit"
            m.args = [
                "audit",
                str(original_of(source).relative_to(ROOT)),
                str(target),
                "--images",
                str(base.images),
                "--batch-size",
                "4",
                "-q",
            ]
        else:
            m.command = "inspect"
            m.args = ["inspect", str(target)]
            if rng.random() < 0.25:
                m.args += ["--format", "json"]
    elif family == "report":
        target = work / "report.json"
        target.write_bytes(mutate_report(rng, base.report.read_text(encoding="utf-8"), m.ops))
        m.command = "gate"
        m.args = ["gate", str(target), "--fail-under", "0.5"]
        extra = [
            ("--fail-under-p5", "0.1"),
            ("--min-agreement", "0.5"),
            ("--max-accuracy-drop", "0.2"),
        ]
        for opt, val in rng.sample(extra, rng.randint(0, 3)):
            m.args += [opt, val]
    elif family == "image":
        images = work / "images"
        shutil.copytree(base.images, images)
        files = sorted(p for p in images.rglob("*") if p.is_file())
        for path in rng.sample(files, rng.randint(1, len(files))):
            data, draw = path.read_bytes(), rng.random()
            if draw < 0.3:
                reencode_image(rng, path, m.ops)
                continue
            if draw < 0.65:
                data = mutate_bytes(rng, data, m.ops)
            elif path.suffix == ".png":
                data = mutate_png(rng, data, m.ops)
            else:
                data = mutate_jpeg(rng, data, m.ops)
            m.ops.append(f"  -> {path.relative_to(work)}")
            path.write_bytes(data)
        m.command = "audit"
        m.args = [
            "audit",
            str(ORIGINALS["gap"].relative_to(ROOT)),
            str(ORIGINALS["gap"].relative_to(ROOT)),
            "--images",
            str(images),
            "--batch-size",
            "4",
            "-q",
        ]
        if rng.random() < 0.5:
            m.args.append("--strict")
        if rng.random() < 0.3:
            m.args.append("--center-crop")
        if rng.random() < 0.25:
            m.args += ["--out", str(work / "out")]
    else:
        raise ValueError(f"unknown family {family!r}")
    return m


def traceback_site(args, timeout: float = TIMEOUT) -> str:
    """Rerun with ``--debug`` and name the innermost onnx_sp2ps frame of the traceback
    (``file:line in function``), or '' when there is none."""
    outcome = run_cli([*args, "--debug"], timeout=timeout)
    site = ""
    lines = outcome.stderr.splitlines()
    for _i, line in enumerate(lines):
        text = line.strip()
        if text.startswith('File "') and "onnx_sp2ps" in text and "/tests/" not in text:
            path, rest = text[6:].split('", line ', 1)
            number, _, func = rest.partition(", in ")
            site = (
                f"{Path(path).relative_to(ROOT) if path.startswith(str(ROOT)) else path}"
                f":{number} in {func}"
            )
    return site


def describe(m: Mutant, outcome: Outcome) -> str:
    """What a failure message says: the key to replay, the mutations, the command, stderr
    (and for exit 4, where the traceback of a ``--debug`` rerun ends in onnx_sp2ps)."""
    return (
        f"mutant {m.key}: {'; '.join(problems(m.command, outcome))}\n"
        + (f"  raised at: {m.site}\n" if m.site else "")
        + f"  replay: python tests/test_fuzz.py --replay {m.key} --keep /tmp/replay\n"
        f"  mutations: {' | '.join(m.ops)}\n"
        f"  command: PYTHONPATH=. python -m onnx_sp2ps {' '.join(m.args)}\n"
        f"  exit {outcome.returncode}, {outcome.seconds:.1f} s, stderr:\n"
        + "\n".join("    " + line for line in outcome.stderr[-3000:].splitlines())
    )


def run_mutant(
    family: str, seed: int, base: Base, work: Path, timeout: float = TIMEOUT, keep: bool = False
) -> tuple[Mutant, Outcome]:
    m = build(family, seed, base, work)
    outcome = run_cli(m.args, timeout=timeout)
    if outcome.returncode == 4:
        m.site = traceback_site(m.args, timeout)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return m, outcome

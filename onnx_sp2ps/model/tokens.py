"""Token models (vision transformers): whether a tensor is tokens (N, T, D), the attention
tensors that are never feature maps, the layer the CAM libraries explain (the input of the
last block's attention for class-token heads, the last block's output for pooling heads),
and the patch grid with its prefix tokens (README, "Detection").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from onnx_sp2ps.errors import DetectionError
from onnx_sp2ps.model.index import (
    Dim,
    GraphIndex,
    _attr,
    _node_order,
    _only_input,
    constant_value,
)

__all__ = ["TokenGrid", "MAX_PREFIX_TOKENS"]


#: Most prefix tokens (class, distillation, register tokens) a token grid is taken to have.
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class TokenGrid:
    """The feature map of a token model: tokens (N, T, D) whose first ``prefix`` are class,
    distillation or register tokens and whose other T - ``prefix`` are the patch tokens of
    an ``grid`` = (h, w) grid, row-major.  ``rule`` says how the layer was chosen."""

    prefix: int
    grid: tuple[int, int]
    width: int
    rule: str

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "grid": list(self.grid),
            "width": self.width,
            "rule": self.rule,
        }


#: Ops that only move values: a rank-3 tensor reached from a spatial map through them alone
#: is that map flattened (a CNN head), not tokens.
_VIEW_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast")


def _is_token_tensor(g: GraphIndex, probe: GraphIndex, name: str) -> bool:
    """Tokens (N, T, D), T > 1 and D > 1 static, that are not a spatial map flattened and
    hold the patch tokens of a grid found before them (:func:`_grid_before`)."""
    shape = probe.info(name).shape
    if shape is None or len(shape) != 3:
        return False
    t, d = shape[1], shape[2]
    if not (isinstance(t, int) and isinstance(d, int) and t > 1 and d > 1):
        return False
    if _grid_before(g, probe, name, t, None) is None:
        return False
    current: str | None = name
    for _ in range(8):
        node = g.producer.get(current) if current else None
        if node is not None and node.op_type == "Transpose":
            if list(_attr(node, "perm", [])) == [0, 2, 1]:
                return False  # tokens turned (N, D, T): keys of an attention, a CNN's view
        current = _only_input(g, current, _VIEW_OPS) if current else None
        if current is None:
            return True
        prev = probe.info(current).shape
        if prev is not None and len(prev) == 4:
            return False
    return True


#: Ops that keep an attention tensor an attention tensor (scores, weights, heads).
_ATTENTION_OPS = (
    "Reshape",
    "Transpose",
    "Split",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "MatMul",
    "Softmax",
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Where",
    "Cast",
    "Sqrt",
    "Identity",
    "DequantizeLinear",
    "QuantizeLinear",
)


#: The last attention analysis: (probe, its attention tensors).
_ATTENTION_CACHE: list[tuple[GraphIndex, frozenset[str]]] = []


def _rank(probe: GraphIndex, name: str) -> int | None:
    shape = probe.info(name).shape
    return None if shape is None else len(shape)


def _attention_tensors(g: GraphIndex, probe: GraphIndex) -> frozenset[str]:
    """The attention tensors of the graph (rank >= 4, never feature maps): the scores
    and weights of each attention — a MatMul of two computed rank-4 tensors or a Softmax
    over one, and what is made from them until the tokens are rank 3 again — and the
    queries, keys and values that go into it, back to the Reshape that split the heads
    off the tokens (a grid view of the tokens before that Reshape, as LeViT's downsampling
    makes, is a map, not attention)."""
    if _ATTENTION_CACHE and _ATTENTION_CACHE[0][0] is probe:
        return _ATTENTION_CACHE[0][1]
    core = []
    for node in g.model.graph.node:
        data = g.data_inputs(node)
        ranks = [_rank(probe, i) for i in data]
        if node.op_type in ("MatMul", "QLinearMatMul") and len(data) == 2:
            if all(r is not None and r >= 4 for r in ranks):
                core.append(node)
        elif node.op_type in ("Softmax", "QLinearSoftmax") and ranks and (ranks[0] or 0) >= 4:
            core.append(node)
    found: set[str] = set()
    stack = [i for n in core for i in g.data_inputs(n) if n.op_type != "Softmax"]
    while stack:  # back to the heads split
        name = stack.pop()
        if name in found or (_rank(probe, name) or 0) < 4:
            continue
        found.add(name)
        node = g.producer.get(name)
        if node is None or node.op_type not in _ATTENTION_OPS:
            continue
        if node.op_type == "Reshape":
            continue  # the heads were split here: its input is tokens or a map
        stack.extend(g.data_inputs(node))
    for n in core:
        found.update(o for o in n.output if o)
    for node in g.model.graph.node:  # forward, until the tokens are rank 3 again
        if node.op_type not in _ATTENTION_OPS or node.op_type == "Reshape":
            continue  # (a Reshape folds the heads back: tokens, or a map as LeViT's convs)
        if any(i in found for i in g.data_inputs(node)):
            found.update(o for o in node.output if o and (_rank(probe, o) or 0) >= 4)
    result = frozenset(found)
    _ATTENTION_CACHE[:] = [(probe, result)]
    return result


def _attention_shaped(g: GraphIndex, probe: GraphIndex, name: str) -> bool:
    """True for an attention tensor (:func:`_attention_tensors`)."""
    return name in _attention_tensors(g, probe)


def _token_dims(probe: GraphIndex, name: str) -> tuple[int, int] | None:
    shape = probe.info(name).shape
    if shape is None or len(shape) != 3:
        return None
    t, d = shape[1], shape[2]
    return (t, d) if isinstance(t, int) and isinstance(d, int) else None


def _pools_tokens(g: GraphIndex, probe: GraphIndex, tokens: str, logits: str) -> bool:
    """True when the head reduces over the token axis (mean pooling) or attends over the
    tokens (attention pooling, timm's ``global_pool="map"``), False when it reads single
    tokens (the class token)."""
    between = g.descendants(tokens) & (g.ancestors(logits) | {logits})
    for node in g.model.graph.node:
        if not node.output or node.output[0] not in between:
            continue
        if node.op_type in ("Softmax", "QLinearSoftmax") or (
            node.domain == "com.microsoft" and node.op_type in _FUSED_ATTENTION
        ):
            return True
        if node.op_type in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2"):
            shape = probe.info(node.input[0]).shape
            axes = _attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                value = constant_value(g.model.graph, node.input[1], g.producer)
                axes = None if value is None else [int(v) for v in value.reshape(-1)]
            if shape is not None and len(shape) == 3 and axes is not None:
                if any(int(a) % 3 == 1 for a in axes):
                    return True
        if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            # Over the tokens only when they were turned into (N, D, T) first; on (N, T, D)
            # it averages the channels (tf2onnx's layer-norm moments).
            before = g.producer.get(node.input[0])
            if before is not None and before.op_type == "Transpose":
                if list(_attr(before, "perm", [])) == [0, 2, 1]:
                    return True
    return False


def _before_token_slice(g: GraphIndex, probe: GraphIndex, name: str) -> str:
    """The full tokens when ``name`` is a Slice of them along the token axis (the patch
    tokens ``x[:, P:]`` a pooled head averages)."""
    node = g.producer.get(name)
    dims = _token_dims(probe, name)
    if node is None or node.op_type != "Slice" or dims is None:
        return name
    source: str = node.input[0]
    before = _token_dims(probe, source)
    if before is None or before[1] != dims[1] or before[0] < dims[0]:
        return name
    if g.is_constant(source) or not _is_token_tensor(g, probe, source):
        return name
    return source


#: Ops a decomposed layer norm is written with (torch.onnx before opset 17: ReduceMean,
#: Sub, Pow, Add, Sqrt, Div, Mul, Add; tf2onnx: GlobalAveragePool over the channels of
#: (N, T, D) for the moments, ..., Sqrt, Reciprocal, Mul, Sub, Mul, Add).
_NORM_OPS = (
    "ReduceMean",
    "GlobalAveragePool",
    "Sub",
    "Pow",
    "Mul",
    "Add",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Cast",
)


def _layer_norm_input(g: GraphIndex, name: str) -> str | None:
    """The input x of the LayerNormalization, or of a decomposition of one, that makes
    ``name``: a subgraph of at most 16 :data:`_NORM_OPS` nodes that takes ReduceMean of x
    and reads nothing computed but x.  None when no layer norm makes it."""
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "LayerNormalization":
        first: str = node.input[0]
        return first

    def walk(stop: str | None) -> tuple[set[str], set[str]]:
        """(computed tensors read from outside, inputs of ReduceMeans), not going on
        from ``stop``."""
        made: set[str] = set()
        reads: set[str] = set()
        means: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            n = g.producer.get(t)
            if t == stop or n is None or n.op_type not in _NORM_OPS or len(made) >= 16:
                reads.add(t)
                continue
            if t in made:
                continue
            made.add(t)
            if n.op_type in ("ReduceMean", "GlobalAveragePool"):
                means.add(n.input[0])
            stack.extend(g.data_inputs(n))
        return reads - made, means

    for x in sorted(walk(None)[1]):
        if walk(x)[0] == {x}:
            return x
    return None


#: Fused attention ops (onnxruntime's transformer optimizer): their first input is the
#: tokens the queries (and, without other inputs, the keys and values) are made from.
_FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "PackedAttention")


def _last_attention_input(g: GraphIndex, probe: GraphIndex, tokens: str) -> str | None:
    """The input of the last attention before ``tokens``: the latest tensor shaped like
    ``tokens`` from which both the queries and the keys of the last Softmax are made (the
    last block's norm1 output in a pre-norm ViT; the block input where there is no norm),
    or the input of a fused com.microsoft Attention."""
    dims = _token_dims(probe, tokens)
    order = _node_order(g)
    ancestors = g.ancestors(tokens)
    attention = [
        n
        for n in g.model.graph.node
        if n.output
        and n.output[0] in ancestors
        and (
            n.op_type in ("Softmax", "QLinearSoftmax")
            or (n.domain == "com.microsoft" and n.op_type in _FUSED_ATTENTION)
        )
    ]
    if dims is None or not attention:
        return None
    last = attention[-1]
    if last.op_type in _FUSED_ATTENTION:
        first: str = last.input[0]
        return first if _token_dims(probe, first) == dims else None
    queue, seen = deque(g.data_inputs(last)), set()
    while queue:
        name = queue.popleft()
        if name in seen:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            continue
        data = g.data_inputs(node)
        if node.op_type in ("MatMul", "QLinearMatMul", "MatMulInteger") and len(data) == 2:
            common = g.ancestors(data[0]) & g.ancestors(data[1])
            shaped = [t for t in common if t in order and _token_dims(probe, t) == dims]
            return max(shaped, key=order.__getitem__) if shaped else None
        queue.extend(data)
    return None


#: Per-token ops a pooling head applies before it pools: the linear projections of an
#: attention pool (its keys and values), a norm, an activation.
_PER_TOKEN_OPS = ("MatMul", "Add", "Mul", "Sub", "Div", "Identity", "Cast")


def _block_output(g: GraphIndex, probe: GraphIndex, tokens: str) -> str:
    """The last block's output that a pooling head's ``tokens`` are made from: behind the
    ``x[:, P:]`` slice, a final layer norm, and the per-token projections of an attention
    pool, as long as the token count stays (a residual Add of two computed tensors is
    the block's output and ends the walk)."""
    current = tokens
    count = (_token_dims(probe, current) or (None, None))[0]
    for _ in range(8):
        whole = _before_token_slice(g, probe, current)
        if whole != current:  # all the tokens, the prefix ones too
            current = whole
            count = (_token_dims(probe, current) or (None, None))[0]
            continue
        before = _layer_norm_input(g, current)
        if before is None:
            node = g.producer.get(current)
            data = g.data_inputs(node) if node is not None else []
            if node is None or node.op_type not in _PER_TOKEN_OPS or len(data) != 1:
                break
            before = data[0]
        dims = _token_dims(probe, before)
        if dims is None or dims[0] != count:
            break
        current = before
    return current


def _token_feature(g: GraphIndex, probe: GraphIndex, tokens: str, logits: str) -> tuple[str, str]:
    """The default layer of a token model whose head reads ``tokens`` (the README's rule,
    "Detection"), and the rule's name."""
    if _pools_tokens(g, probe, tokens, logits):
        return _block_output(g, probe, tokens), "pooled head: the last block's output"
    layer = _last_attention_input(g, probe, tokens)
    if layer is None:
        raise DetectionError(
            f"the head reads single tokens of {tokens!r} (a class token), but no attention "
            "before it was found to take the map at its input: name the layer with "
            "--feature-layer"
        )
    return layer, "class-token head: the input of the last block's attention"


def _grid_before(
    g: GraphIndex, probe: GraphIndex, name: str, tokens: int, prefix: int | None
) -> tuple[int, int] | None:
    """The (h, w) of the latest 4-D map before ``name`` (the patch embedding's output, or
    a downsampled view of the tokens) whose h * w patch tokens leave ``prefix`` tokens
    (when given), else at most :data:`MAX_PREFIX_TOKENS`, of the ``tokens``."""

    def fits(h: Dim, w: Dim) -> bool:
        if not (isinstance(h, int) and isinstance(w, int) and h > 1 and w > 1):
            return False
        rest = tokens - h * w
        return rest == prefix if prefix is not None else 0 <= rest <= MAX_PREFIX_TOKENS

    order = _node_order(g)
    for cand in sorted(g.ancestors(name) & set(order), key=order.__getitem__, reverse=True):
        shape = probe.info(cand).shape
        if shape is None or len(shape) != 4 or _attention_shaped(g, probe, cand):
            continue
        for h, w in ((shape[2], shape[3]), (shape[1], shape[2])):
            if fits(h, w):
                return (int(h), int(w))  # type: ignore[arg-type]
    return None


def _token_grid(
    g: GraphIndex,
    probe: GraphIndex,
    name: str,
    rule: str,
    prefix: int | None,
    grid: tuple[int, int] | None,
) -> TokenGrid:
    """The token grid of ``name`` (N, T, D): ``grid`` and ``prefix`` when given, else the
    grid of the latest 4-D map before it (the patch embedding's output, or a downsampled
    view) that leaves at most :data:`MAX_PREFIX_TOKENS` tokens, else a square grid."""
    dims = _token_dims(probe, name)
    if dims is None:
        raise DetectionError(
            f"the token count of {name!r} is unknown: give the grid with --token-grid HxW "
            "and --prefix-tokens N"
        )
    t, d = dims

    if grid is None:
        grid = _grid_before(g, probe, name, t, prefix)
    if grid is None:
        starts = [prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)
        side = [(p, int(round((t - p) ** 0.5))) for p in starts if t - p > 1]
        square = [(p, s) for p, s in side if s * s == t - p and s > 1]
        if not square:
            raise DetectionError(
                f"no patch grid found for the {t} tokens of {name!r}: give it with "
                "--token-grid HxW (and --prefix-tokens N)"
            )
        grid = (square[0][1], square[0][1])
    h, w = grid
    p = t - h * w if prefix is None else prefix
    if p < 0 or p + h * w != t:
        raise DetectionError(
            f"{name!r} has {t} tokens, which is not {p} prefix tokens and a {h}x{w} grid: "
            "check --token-grid and --prefix-tokens"
        )
    return TokenGrid(prefix=p, grid=(h, w), width=d, rule=rule)

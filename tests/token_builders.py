"""Small vision transformers built with ``onnx.helper`` in the shape torch.onnx writes them.

``build_vit`` makes a ViT classifier: a patch-embedding Conv (patch ``patch``), Flatten and
Transpose to tokens (N, h*w, D), ``prefix`` learned prefix tokens (class, distillation,
registers) concatenated in front, a position embedding, ``depth`` pre-norm blocks

    x = x + proj(softmax(q k^T / sqrt(d)) v)   with q, k, v from Linear(norm1(x))
    x = x + fc2(gelu(fc1(norm2(x))))

a final LayerNorm and a head that reads the class token (``pool="token"``), the mean of
the patch tokens (``pool="avg"``) or the average of two heads on tokens 0 and 1
(``pool="dist"``, DeiT distilled), or a learned query attending over the patch tokens
(``pool="map"``, timm's attention pooling).  With ``computed_shapes``, each block reads
its token count off its input (``Shape``) for a Reshape, as PiT's export does.  With
``fused``, each attention is one com.microsoft ``Attention`` node, as onnxruntime's
transformer optimizer writes it.  LayerNorm is the opset-17 op (``ln="op"``) or the
decomposition older exporters write (``ln="decomposed"``: ReduceMean, Sub, Pow, Add,
Sqrt, Div, Mul, Add; opset 13); Gelu is Erf-based, as torch.onnx writes it.  Random
weights are seeded and drawn so that logits vary clearly across images.

``VitModel.norm1`` is the last block's norm1 output (the layer CAM libraries explain for
class-token heads), ``VitModel.block_out`` the last block's output (for pooled heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class VitModel:
    model: onnx.ModelProto
    norm1: str
    block_out: str
    prefix: int
    grid: tuple[int, int]
    size: tuple[int, int]


class _G:
    def __init__(self, seed: int, opset: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.opset = opset

    def name(self, hint: str) -> str:
        self.count += 1
        return f"/{hint}_{self.count}_output_0"

    def param(self, hint: str, value: np.ndarray) -> str:
        taken = {t.name for t in self.inits}
        name = hint if hint not in taken else f"{hint}.{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def ints(self, values) -> str:
        name = f"const_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, n_out: int = 1, **attrs):
        outs = [self.name(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, d_in: int, d_out: int, hint: str) -> str:
        w = self.rng.normal(0, 1 / np.sqrt(d_in), (d_in, d_out))
        b = self.rng.normal(0, 0.2, d_out)
        y = self.op("MatMul", [x, self.param(f"{hint}.weight", w)], f"{hint}/MatMul")
        return self.op("Add", [y, self.param(f"{hint}.bias", b)], f"{hint}/Add")

    def layer_norm(self, x: str, d: int, hint: str, ln: str) -> str:
        gamma = self.param(f"{hint}.weight", 1.0 + self.rng.normal(0, 0.3, d))
        beta = self.param(f"{hint}.bias", self.rng.normal(0, 0.3, d))
        if ln == "op":
            return self.op(
                "LayerNormalization", [x, gamma, beta], f"{hint}/LayerNormalization", axis=-1
            )
        mean = self.op("ReduceMean", [x], f"{hint}/ReduceMean", axes=[-1], keepdims=1)
        centred = self.op("Sub", [x, mean], f"{hint}/Sub")
        var = self.op(
            "ReduceMean",
            [self.op("Pow", [centred, self.param("two", np.array(2.0))], f"{hint}/Pow")],
            f"{hint}/ReduceMean_1",
            axes=[-1],
            keepdims=1,
        )
        std = self.op(
            "Sqrt", [self.op("Add", [var, self.param("eps", np.array(1e-6))], f"{hint}/Add")]
        )
        normed = self.op("Div", [centred, std], f"{hint}/Div")
        scaled = self.op("Mul", [normed, gamma], f"{hint}/Mul")
        return self.op("Add", [scaled, beta], f"{hint}/Add_1")

    def gelu(self, x: str, hint: str) -> str:
        inner = self.op("Erf", [self.op("Div", [x, self.param("sqrt2", np.array(np.sqrt(2.0)))])])
        one = self.op("Add", [inner, self.param("one", np.array(1.0))])
        return self.op("Mul", [self.op("Mul", [x, one]), self.param("half", np.array(0.5))], hint)


def build_vit(
    *,
    prefix: int = 1,
    pool: str = "token",
    depth: int = 2,
    dim: int = 32,
    heads: int = 2,
    patch: int = 8,
    size: tuple[int, int] = (32, 32),
    classes: int = 4,
    ln: str = "op",
    seed: int = 0,
    fused: bool = False,
    computed_shapes: bool = False,
) -> VitModel:
    """A ViT classifier (see the module docstring)."""
    opset = 17 if ln == "op" else 13
    g = _G(seed, opset)
    h, w = size[0] // patch, size[1] // patch
    n_patch = h * w
    tokens = prefix + n_patch
    d_head = dim // heads
    image = "input"
    conv_w = g.param("patch_embed.proj.weight", g.rng.normal(0, 0.3, (dim, 3, patch, patch)))
    conv_b = g.param("patch_embed.proj.bias", g.rng.normal(0, 0.3, dim))
    x = g.op(
        "Conv",
        [image, conv_w, conv_b],
        "patch_embed/proj/Conv",
        kernel_shape=[patch, patch],
        strides=[patch, patch],
    )
    x = g.op("Reshape", [x, g.ints([0, dim, -1])], "patch_embed/Reshape")
    x = g.op("Transpose", [x], "patch_embed/Transpose", perm=[0, 2, 1])
    if prefix:
        cls = g.param("cls_token", g.rng.normal(0, 1.0, (1, prefix, dim)))
        batch = g.op("Gather", [g.op("Shape", [image]), g.ints(0)], "Gather", axis=0)
        shape = g.op(
            "Concat",
            [g.op("Unsqueeze", [batch, g.ints([0])]), g.ints([prefix, dim])],
            "Concat",
            axis=0,
        )
        cls = g.op("Expand", [cls, shape], "Expand")
        x = g.op("Concat", [cls, x], "Concat_1", axis=1)
    x = g.op("Add", [x, g.param("pos_embed", g.rng.normal(0, 0.5, (1, tokens, dim)))], "Add")
    norm1 = block_out = x
    for b in range(depth):
        s = f"blocks.{b}"
        norm1 = g.layer_norm(x, dim, f"{s}/norm1", ln)
        if fused:
            w = g.param(f"{s}/attn/qkv.weight", g.rng.normal(0, 1 / np.sqrt(dim), (dim, 3 * dim)))
            bias = g.param(f"{s}/attn/qkv.bias", g.rng.normal(0, 0.2, 3 * dim))
            node = helper.make_node(
                "Attention",
                [norm1, w, bias],
                [g.name(f"{s}/attn/Attention")],
                domain="com.microsoft",
                num_heads=heads,
            )
            g.nodes.append(node)
            o = g.linear(node.output[0], dim, dim, f"{s}/attn/proj")
            x = g.op("Add", [x, o], f"{s}/Add")
            m = g.layer_norm(x, dim, f"{s}/norm2", ln)
            m = g.gelu(g.linear(m, dim, 2 * dim, f"{s}/mlp/fc1"), f"{s}/mlp/act/Mul_1")
            m = g.linear(m, 2 * dim, dim, f"{s}/mlp/fc2")
            x = block_out = g.op("Add", [x, m], f"{s}/Add_1")
            continue
        qkv = g.linear(norm1, dim, 3 * dim, f"{s}/attn/qkv")
        qkv = g.op("Reshape", [qkv, g.ints([0, tokens, 3, heads, d_head])], f"{s}/attn/Reshape")
        qkv = g.op("Transpose", [qkv], f"{s}/attn/Transpose", perm=[2, 0, 3, 1, 4])
        if opset >= 18:
            q, k, v = g.op("Split", [qkv], f"{s}/attn/Split", n_out=3, axis=0, num_outputs=3)
        else:
            q, k, v = g.op("Split", [qkv, g.ints([1, 1, 1])], f"{s}/attn/Split", n_out=3, axis=0)
        q, k, v = (g.op("Squeeze", [t, g.ints([0])], f"{s}/attn/Squeeze") for t in (q, k, v))
        kt = g.op("Transpose", [k], f"{s}/attn/Transpose_1", perm=[0, 1, 3, 2])
        att = g.op("MatMul", [q, kt], f"{s}/attn/MatMul")
        att = g.op("Mul", [att, g.param("scale", np.array(d_head**-0.5))], f"{s}/attn/Mul")
        att = g.op("Softmax", [att], f"{s}/attn/Softmax", axis=-1)
        o = g.op("MatMul", [att, v], f"{s}/attn/MatMul_1")
        o = g.op("Transpose", [o], f"{s}/attn/Transpose_2", perm=[0, 2, 1, 3])
        target = g.ints([0, tokens, dim])
        if computed_shapes:  # the token count read off the residual stream (as PiT does)
            count = g.op("Gather", [g.op("Shape", [x]), g.ints([1])], f"{s}/Gather", axis=0)
            target = g.op("Concat", [g.ints([0]), count, g.ints([dim])], f"{s}/Concat", axis=0)
        o = g.op("Reshape", [o, target], f"{s}/attn/Reshape_1")
        o = g.linear(o, dim, dim, f"{s}/attn/proj")
        x = g.op("Add", [x, o], f"{s}/Add")
        m = g.layer_norm(x, dim, f"{s}/norm2", ln)
        m = g.gelu(g.linear(m, dim, 2 * dim, f"{s}/mlp/fc1"), f"{s}/mlp/act/Mul_1")
        m = g.linear(m, 2 * dim, dim, f"{s}/mlp/fc2")
        x = block_out = g.op("Add", [x, m], f"{s}/Add_1")
    if pool == "map":  # attention pooling: a learned query attends over the tokens
        x = g.layer_norm(x, dim, "norm", ln)
        patches = g.op("Slice", [x, g.ints([prefix]), g.ints([tokens]), g.ints([1])], "Slice")
        k = g.linear(patches, dim, dim, "attn_pool/k")
        v = g.linear(patches, dim, dim, "attn_pool/v")
        batch = g.op("Gather", [g.op("Shape", [image]), g.ints(0)], "attn_pool/Gather", axis=0)
        shape = g.op(
            "Concat",
            [g.op("Unsqueeze", [batch, g.ints([0])]), g.ints([1, dim])],
            "attn_pool/Concat",
            axis=0,
        )
        latent = g.param("attn_pool.latent", g.rng.normal(0, 1.0, (1, 1, dim)))
        q = g.op("Expand", [latent, shape], "attn_pool/Expand")
        kt = g.op("Transpose", [k], "attn_pool/Transpose", perm=[0, 2, 1])
        att = g.op("Softmax", [g.op("MatMul", [q, kt], "attn_pool/MatMul")], axis=-1)
        pooled = g.op("MatMul", [att, v], "attn_pool/MatMul_1")
        first = g.op("Gather", [pooled, g.ints(0)], "attn_pool/Gather_1", axis=1)
        logits = g.linear(first, dim, classes, "head")
    elif pool == "avg":
        patches = g.op("Slice", [x, g.ints([prefix]), g.ints([tokens]), g.ints([1])], "Slice")
        pooled = g.op("ReduceMean", [patches], "ReduceMean", axes=[1], keepdims=0)
        pooled = g.layer_norm(pooled, dim, "fc_norm", ln)
        logits = g.linear(pooled, dim, classes, "head")
    else:
        x = g.layer_norm(x, dim, "norm", ln)
        first = g.op("Gather", [x, g.ints(0)], "Gather_1", axis=1)
        logits = g.linear(first, dim, classes, "head")
        if pool == "dist":
            second = g.op("Gather", [x, g.ints(1)], "Gather_2", axis=1)
            other = g.linear(second, dim, classes, "head_dist")
            logits = g.op(
                "Div", [g.op("Add", [logits, other]), g.param("two_heads", np.array(2.0))]
            )
    graph = helper.make_graph(
        g.nodes,
        "vit",
        [helper.make_tensor_value_info(image, TensorProto.FLOAT, ["N", 3, size[0], size[1]])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes])],
        initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    if fused:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return VitModel(model, norm1, block_out, prefix, (h, w), size)

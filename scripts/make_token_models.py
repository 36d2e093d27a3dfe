#!/usr/bin/env python
"""Small vision-transformer (token) models, pruned copies and pytorch-grad-cam references.

Dev-only (needs torch, timm, onnxscript and grad-cam, see scripts/requirements-dev.txt; no
torchvision: the stand-in in ``scripts/_stubs`` is put first on ``sys.path`` by this script
only, as in make_reference_cams.py).  Deterministic (fixed seeds, 2 CPU threads).

Models (64x64 RGB input, 4 classes, random weights made non-degenerate, see
:func:`redraw`), built with timm and exported with ``torch.onnx.export``:

- ``vit_cls``: VisionTransformer, patch 8 (8x8 grid), class token, ``global_pool='token'``;
- ``vit_avg``: VisionTransformer without class token, ``global_pool='avg'``,
  ``fc_norm=False`` (timm's ``vit_*_gap_*`` form: final LayerNorm on every token, then the
  mean of the patch tokens);
- ``deit_dist``: VisionTransformerDistilled (class + distillation token, the two heads
  averaged at eval);
- ``vit_reg``: VisionTransformer with a class token and ``reg_tokens=4``,
  ``no_embed_class=True`` (the DINOv2-with-registers form): 5 prefix tokens;
- ``levit``: timm ``Levit`` (``use_conv=False``: tokens (N, T, D)), stride-8 stem
  (``stem_type='s8'``) so that 64x64 gives an 8x8 grid in stage 0 and 4x4 in stage 1.

``<name>_pruned``: the 50 % MLP hidden units with the smallest L1 norm (rows of fc1, for
LeViT of ``mlp.ln1`` with its BatchNorm folded in) zeroed in every MLP (fc1 row + bias,
fc2 column; LeViT: the ``ln1`` linear row, its BatchNorm weight and bias, the ``ln2``
linear column), shapes unchanged.

Every model is exported with the TorchScript exporter (``dynamo=False``, opset 17); vit_cls
also with ``dynamo=True`` (opset 18) as ``vit_cls_dynamo``; input ``input`` with a dynamic
batch axis, output ``logits``.  ONNX Runtime (CPU) logits are checked against torch float32
(atol 1e-4).

References (float64 torch, pytorch-grad-cam 1.5.7, ``ClassifierOutputTarget`` of the
ORIGINAL model's top-1 for the original and its pruned copy alike):

- target layer ``blocks[-1].norm1`` (ViTs); LeViT: ``stages[-1].blocks[-2]``, whose
  output is the input of the last attention of the last stage
  (``stages[-1].blocks[-1].attn``, LeViT has no norm before its attention);
- ``reshape_transform``: drop the prefix tokens, reshape (N, h, w, D), transpose to
  (N, D, h, w);
- ``raw_gradcam`` / ``raw_eigencam``: ``max(get_cam_image(...), 0)`` at grid resolution
  (what compute_cam_per_layer gets before scaling), ``eigen_projection`` before the clip;
- mean-pooled models (vit_avg, levit): also at the last block's output
  (``blocks[-1]``, LeViT ``stages[-1].blocks[-1]``): ``raw_gradcam_block``,
  ``raw_eigencam_block``, ``eigen_projection_block``;
- ``grads`` / ``acts``: the first 8 images, d logit_target / d(layer output) by autograd
  and the layer output, (8, T, D) tokens, prefix included.

Output under ``tests/fixtures/tokens/``: ``<name>.onnx``, ``ref_<name>.npz`` for every
original and pruned model (``ref_vit_cls_dynamo.npz`` too: same values as ref_vit_cls,
its own tensor names) and README.md.

Usage (from the repository root)::

    python scripts/make_token_models.py [--models vit_cls levit ...]
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "sample_models" / "images"
OUT = REPO / "tests" / "fixtures" / "tokens"
STUBS = Path(__file__).resolve().parent / "_stubs"
N_GRADS = 8
CHUNK = 10
NUM_CLASSES = 4
PRUNE_RATIO = 0.5

# timm and pytorch-grad-cam import torchvision (no build for the pinned torch): the stand-in.
sys.path.insert(0, str(STUBS))
sys.path.insert(1, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

from importlib.metadata import version as _dist_version  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytorch_grad_cam as pgc  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.levit import Levit, LevitMlp  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

GRADCAM_VERSION = _dist_version("grad-cam")
VIT_COMMON = dict(
    img_size=64,
    patch_size=8,
    in_chans=3,
    num_classes=NUM_CLASSES,
    embed_dim=48,
    depth=2,
    num_heads=3,
    mlp_ratio=4.0,
)
#: name -> (class, kwargs, seed)
MODELS = {
    "vit_cls": (VisionTransformer, dict(VIT_COMMON, class_token=True, global_pool="token"), 11),
    "vit_avg": (
        VisionTransformer,
        dict(VIT_COMMON, class_token=False, global_pool="avg", fc_norm=False),
        12,
    ),
    "deit_dist": (VisionTransformerDistilled, dict(VIT_COMMON), 13),
    "vit_reg": (
        VisionTransformer,
        dict(VIT_COMMON, class_token=True, reg_tokens=4, no_embed_class=True, global_pool="token"),
        14,
    ),
    "levit": (
        Levit,
        dict(
            img_size=64,
            in_chans=3,
            num_classes=NUM_CLASSES,
            embed_dim=(32, 48),
            key_dim=16,
            num_heads=(2, 3),
            depth=(1, 2),
            attn_ratio=2.0,
            mlp_ratio=2.0,
            stem_type="s8",
            use_conv=False,
            global_pool="avg",
        ),
        15,
    ),
}
POOLED = {"vit_avg", "levit"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------


def is_levit(model: nn.Module) -> bool:
    return isinstance(model, Levit)


def prefix_tokens(model: nn.Module) -> int:
    return 0 if is_levit(model) else int(model.num_prefix_tokens)


def grid_of(model: nn.Module, layer: str) -> tuple[int, int]:
    if is_levit(model):
        res = model.stages[-1].blocks[-1].attn.resolution
        return int(res[0]), int(res[1])
    return tuple(int(g) for g in model.patch_embed.grid_size)


def target_layer_names(name: str, model: nn.Module) -> dict[str, str]:
    """Fixture key suffix -> module path of the pytorch-grad-cam target layer."""
    if is_levit(model):
        s, b = len(model.stages) - 1, len(model.stages[-1].blocks)
        assert b >= 2, "the last stage needs 2 blocks (the target is blocks[-2]'s output)"
        layers = {"": f"stages.{s}.blocks.{b - 2}", "_block": f"stages.{s}.blocks.{b - 1}"}
    else:
        d = len(model.blocks)
        layers = {"": f"blocks.{d - 1}.norm1", "_block": f"blocks.{d - 1}"}
    if name not in POOLED:
        del layers["_block"]
    return layers


@torch.no_grad()
def redraw(model: nn.Module, gen: torch.Generator, calib: torch.Tensor) -> None:
    """Replace timm's initialisation (near-zero heads, zero biases, unit norms, zero LeViT
    residual BatchNorms and attention biases) by draws at scales that make logits vary
    clearly across images."""

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            normal(mod.weight, 1.0 / fan_in**0.5)
            if mod.bias is not None:
                normal(mod.bias, 0.1)
        elif isinstance(mod, nn.LayerNorm):
            normal(mod.weight, 0.25, 1.0)
            normal(mod.bias, 0.1)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            normal(mod.weight, 0.25, 1.0)
            normal(mod.bias, 0.1)
        if hasattr(mod, "gamma") and isinstance(mod.gamma, nn.Parameter):  # layer scale
            normal(mod.gamma, 0.1, 0.5)
        if hasattr(mod, "attention_biases"):  # LeViT
            normal(mod.attention_biases, 0.5)
    for key in ("cls_token", "dist_token", "reg_token"):
        p = getattr(model, key, None)
        if p is not None:
            normal(p, 0.5)
    if getattr(model, "pos_embed", None) is not None:
        normal(model.pos_embed, 0.2)
    if is_levit(model):
        # BatchNorm statistics from the images (one batch, cumulative average), so that
        # eval-mode normalisation keeps activations at unit scale.
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.reset_running_stats()
                mod.momentum = None
        model.train()
        model(calib)
        model.eval()
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.momentum = 0.1
    model.eval()


@torch.no_grad()
def calibrate_head(model: nn.Module, x: torch.Tensor, std: float = 1.5) -> None:
    """Random trunks map these (statistically alike) images to similar pooled features, so
    a random head gives nearly the same class for every image.  Centre the logits over the
    images and scale them to ``std``: head weight *= a, bias = a * (bias - mean logit)
    (the same for DeiT's two heads, whose logits are averaged)."""
    logits = model(x)
    mu = logits.mean(0)
    a = std / float(logits.std(0).mean())
    heads = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
    for head in heads:
        lin = head.linear if hasattr(head, "linear") else head
        lin.weight.mul_(a)
        lin.bias.copy_(a * (lin.bias - mu))
    log(f"  head calibration: logit std over images {std / a:.3g} -> {std} (x{a:.3g})")


def mlp_pairs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if is_levit(model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LevitMlp)]
    return [(f"blocks.{i}.mlp", b.mlp) for i, b in enumerate(model.blocks)]


@torch.no_grad()
def prune(model: nn.Module, ratio: float = PRUNE_RATIO) -> nn.Module:
    """A copy with the ``ratio`` smallest-L1 hidden units of every MLP zeroed."""
    pruned = copy.deepcopy(model)
    for _, mlp in mlp_pairs(pruned):
        if isinstance(mlp, LevitMlp):
            lin, bn, out = mlp.ln1.linear, mlp.ln1.bn, mlp.ln2.linear
            scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs()
            norms = lin.weight.abs().sum(1) * scale
        else:
            lin, bn, out = mlp.fc1, None, mlp.fc2
            norms = lin.weight.abs().sum(1)
        k = int(round(ratio * len(norms)))
        idx = torch.argsort(norms, stable=True)[:k]
        lin.weight[idx] = 0
        if lin.bias is not None:
            lin.bias[idx] = 0
        if bn is not None:
            bn.weight[idx] = 0
            bn.bias[idx] = 0
        out.weight[:, idx] = 0
    return pruned


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# export and ONNX checks
# ----------------------------------------------------------------------------------------


def export(model: nn.Module, path: Path, dynamo: bool) -> None:
    x = torch.zeros(2, 3, 64, 64)
    if dynamo:
        prog = torch.onnx.export(
            model,
            (x,),
            None,
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
        prog.save(str(path), external_data=False)
    else:
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(onnx.load(str(path)))
    return sess.run(["logits"], {"input": x})[0]


def find_tensor(path: Path, x: np.ndarray, want: np.ndarray, scope: str) -> tuple[str, list]:
    """The graph tensor whose value equals ``want`` (float32 torch, (N, T, D)): every node
    output of that shape is exposed and compared; among equal ones, the first whose node
    name holds the module scope, else the first in graph order.  Also returns the list of
    (name, op_type, node name) that matched."""
    model = onnx.load(str(path))
    g = model.graph
    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in list(model.graph.value_info) + list(g.output)}
    names = [o for n in g.node for o in n.output if o and o in known]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(m)
    outs = sess.run(names, {"input": x})
    producer = {o: n for n in g.node for o in n.output}
    matched = []
    tol = 1e-5 * max(1.0, float(np.abs(want).max()))
    for name, val in zip(names, outs):
        if val.shape == want.shape and np.allclose(val, want, rtol=0, atol=tol):
            matched.append((name, producer[name].op_type, producer[name].name))
    if not matched:
        close = [
            (n, float(np.abs(v - want).max())) for n, v in zip(names, outs) if v.shape == want.shape
        ]
        raise RuntimeError(
            f"{path.name}: no graph tensor equals the target layer's output (max |value| "
            f"{np.abs(want).max():.3g}); same shape: {sorted(close, key=lambda t: t[1])[:3]}"
        )
    dotted = scope.replace(".", "/")
    scoped = [t for t in matched if scope in t[2] or dotted in t[2]]
    return (scoped or matched)[0][0], matched


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """Module paths (``blocks.1.norm1``) a node was exported from, outermost first: the
    dynamo exporter's ``pkg.torch.onnx.name_scopes``, else parsed from the TorchScript
    exporter's node name (``/stages/stages.1/blocks/blocks.0/attn/MatMul``)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return [s for s in ast.literal_eval(prop.value) if s]
    parts: list[str] = []
    prev = None
    for seg in node.name.split("/")[1:-1]:
        if prev is not None and seg.startswith(prev + "."):  # "blocks" then "blocks.1"
            parts[-1] += seg[len(prev) :]
        else:
            parts.append(f"{parts[-1]}.{seg}" if parts else seg)
        prev = seg
    return parts


def graph_summary(path: Path, block: str) -> tuple[list[str], list[str]]:
    """Op types of the last block's nodes, and of the nodes after it (the head), in graph
    order (both exporters write nodes in topological order)."""
    nodes = list(onnx.load(str(path)).graph.node)
    inside = [i for i, n in enumerate(nodes) if block in node_scopes(n)]
    ops = [nodes[i].op_type for i in inside if nodes[i].op_type != "Constant"]
    head = [n.op_type for n in nodes[inside[-1] + 1 :] if n.op_type != "Constant"]
    return ops, head


# ----------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------


def load_images() -> tuple[list[str], np.ndarray]:
    """PNGs sorted by relative posix path (as onnx_sp2ps' ImageSet); uint8 RGB / 255.0."""
    files = sorted(IMAGES.rglob("*.png"), key=lambda p: p.relative_to(IMAGES).as_posix())
    paths = [p.relative_to(IMAGES).as_posix() for p in files]
    x = np.stack(
        [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1) for p in files]
    ).astype(np.float32) / np.float32(255.0)
    return paths, x


def make_reshape(prefix: int, grid: tuple[int, int]):
    h, w = grid

    def reshape_transform(t: torch.Tensor) -> torch.Tensor:
        t = t[:, prefix:, :]
        return t.reshape(t.size(0), h, w, t.size(2)).transpose(2, 3).transpose(1, 2)

    return reshape_transform


def library_raw(model, cls, layer, reshape, x, targets) -> np.ndarray:
    """What ``get_cam_image`` returns inside ``compute_cam_per_layer`` (unclipped)."""
    out = []
    for s in range(0, len(x), CHUNK):
        cam = cls(model=model, target_layers=[layer], reshape_transform=reshape)
        captured = []
        original = cam.get_cam_image

        def capture(*args, _orig=original, **kwargs):
            value = _orig(*args, **kwargs)
            captured.append(np.array(value, dtype=np.float64))
            return value

        cam.get_cam_image = capture
        tg = [ClassifierOutputTarget(int(c)) for c in targets[s : s + CHUNK]]
        cam(input_tensor=x[s : s + CHUNK], targets=tg, aug_smooth=False, eigen_smooth=False)
        cam.activations_and_grads.release()
        assert len(captured) == 1
        out.append(captured[0])
    return np.concatenate(out)


def autograd_tokens(model, layer, x, targets) -> tuple[np.ndarray, np.ndarray]:
    """(d logit_target / d layer output, layer output), both (N, T, D)."""
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(hook)
    try:
        model.zero_grad()
        y = model(x)
        y[torch.arange(len(x)), torch.from_numpy(targets)].sum().backward()
    finally:
        handle.remove()
    a = store["a"]
    return a.grad.detach().numpy(), a.detach().numpy()


def references(model32, name, x_np, targets) -> dict:
    """The fixture arrays of one model (float64 copy of ``model32``)."""
    model = copy.deepcopy(model32).double().eval()
    x = torch.from_numpy(x_np).double()
    prefix = prefix_tokens(model)
    layers = target_layer_names(name.removesuffix("_pruned"), model)
    grid = grid_of(model, layers[""])
    reshape = make_reshape(prefix, grid)
    data = {}
    for suffix, lname in layers.items():
        layer = model.get_submodule(lname)
        raw = library_raw(model, pgc.GradCAM, layer, reshape, x, targets)
        data[f"raw_gradcam{suffix}"] = np.maximum(raw, 0).astype(np.float32)
        proj = library_raw(model, pgc.EigenCAM, layer, reshape, x, targets)
        data[f"eigen_projection{suffix}"] = proj.astype(np.float32)
        data[f"raw_eigencam{suffix}"] = np.maximum(proj, 0).astype(np.float32)
    layer = model.get_submodule(layers[""])
    grads, acts = autograd_tokens(model, layer, x[:N_GRADS], targets[:N_GRADS])
    data["grads"] = grads.astype(np.float32)
    data["acts"] = acts.astype(np.float32)
    # sanity: Grad-CAM from the autograd tokens equals the library's
    g = reshape(torch.from_numpy(grads)).numpy()
    a = reshape(torch.from_numpy(acts)).numpy()
    mine = np.maximum(np.einsum("nc,nchw->nhw", g.mean(axis=(2, 3)), a), 0)
    lib = data["raw_gradcam"][:N_GRADS]
    assert np.allclose(mine, lib, rtol=1e-5, atol=1e-6 * max(1e-12, np.abs(lib).max())), name
    with torch.no_grad():
        data["logits64"] = model(x).numpy()
    data.update(
        layer=np.str_(layers[""]),
        layer_block=np.str_(layers.get("_block", "")),
        prefix_tokens=np.int64(prefix),
        grid=np.array(grid, dtype=np.int64),
    )
    return data


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def spread(logits: np.ndarray) -> str:
    top = logits.argmax(1)
    counts = np.bincount(top, minlength=logits.shape[1])
    sorted_ = np.sort(logits, axis=1)
    margin = sorted_[:, -1] - sorted_[:, -2]
    return (
        f"logit std over images {logits.std(axis=0).mean():.3f} (range {np.ptp(logits):.2f}), "
        f"top-1 counts {counts.tolist()}, top-1 margin min {margin.min():.3f} "
        f"median {np.median(margin):.3f}"
    )


def last_block(model: nn.Module) -> str:
    if is_levit(model):
        return f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}"
    return f"blocks.{len(model.blocks) - 1}"


def build_one(name: str, paths: list[str], x_np: np.ndarray, out: Path) -> list[dict]:
    cls, kwargs, seed = MODELS[name]
    torch.manual_seed(seed)
    model = cls(**kwargs).eval()
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.from_numpy(x_np)
    redraw(model, gen, x)
    calibrate_head(model, x)
    pruned = prune(model)
    layers = target_layer_names(name, model)
    rows, fixtures = [], {}
    targets = None
    variants = [(name, model, False), (f"{name}_pruned", pruned, False)]
    if name == "vit_cls":
        variants.append((f"{name}_dynamo", model, True))
    for vname, m, dynamo in variants:
        t0 = time.time()
        path = out / f"{vname}.onnx"
        export(m, path, dynamo)
        with torch.no_grad():
            logits32 = m(x).numpy()
        ort_y = ort_logits(path, x_np)
        err = float(np.abs(ort_y - logits32).max())
        assert err <= 1e-4, f"{vname}: |ORT - torch| = {err:.2e}"
        if targets is None:  # the original's own top-1, for its pruned copy too
            targets = logits32.argmax(1).astype(np.int64)
        # the ONNX tensors of the target layer(s): matched by value on 2 images
        feature, matched = find_tensor(
            path, x_np[:2], hook_output(m, layers[""], x[:2]), layers[""]
        )
        block = ""
        if "_block" in layers:
            block, _ = find_tensor(
                path, x_np[:2], hook_output(m, layers["_block"], x[:2]), layers["_block"]
            )
        if dynamo:  # same torch model as vit_cls: only its tensor names are recorded
            fixtures[name].update(
                dynamo_feature_tensor=np.str_(feature), dynamo_block_tensor=np.str_(block)
            )
            data = fixtures[name]
        else:
            data = references(m, vname, x_np, targets)
            logits64 = data.pop("logits64")
            if vname == name:
                assert np.array_equal(logits64.argmax(1), targets), f"{vname}: float64 top-1"
                assert np.array_equal(ort_y.argmax(1), targets), f"{vname}: ORT top-1"
            data.update(
                paths=np.array(paths, dtype=np.str_),
                targets=targets,
                logits=logits32.astype(np.float32),
                grad_paths=np.array(paths[:N_GRADS], dtype=np.str_),
                feature_tensor=np.str_(feature),
                block_tensor=np.str_(block),
                model=np.str_(vname),
                torch_version=np.str_(torch.__version__),
                timm_version=np.str_(timm.__version__),
                gradcam_version=np.str_(GRADCAM_VERSION),
            )
            fixtures[vname] = data
        ops, head_ops = graph_summary(path, last_block(m))
        rows.append(
            dict(
                name=vname,
                cls=cls.__name__,
                kwargs=kwargs,
                params=count_params(m),
                onnx_kb=path.stat().st_size / 1024,
                prefix=int(data["prefix_tokens"]),
                grid=tuple(int(g) for g in data["grid"]),
                layer=str(data["layer"]),
                layer_block=str(data["layer_block"]),
                feature=feature,
                matched=matched,
                block=block,
                spread=spread(logits32),
                agreement=float((logits32.argmax(1) == targets).mean()),
                err=err,
                ops=ops,
                head_ops=head_ops,
                exporter="dynamo, opset 18" if dynamo else "TorchScript, opset 17",
            )
        )
        log(
            f"{vname}: {rows[-1]['params']:,} params, {rows[-1]['onnx_kb']:.0f} KB onnx, "
            f"|ORT - torch| {err:.1e}, P={rows[-1]['prefix']} grid {rows[-1]['grid']}, "
            f"feature {feature!r} (matches: {matched}), block {block!r}; "
            f"{rows[-1]['spread']}; top-1 = original's {rows[-1]['agreement']:.0%}; "
            f"{time.time() - t0:.0f}s"
        )
    for vname, data in fixtures.items():
        npz = out / f"ref_{vname}.npz"
        np.savez_compressed(npz, **data)
        for r in rows:
            if r["name"] == vname:
                r["npz_kb"] = npz.stat().st_size / 1024
    return rows


def hook_output(model: nn.Module, lname: str, x: torch.Tensor) -> np.ndarray:
    store = {}

    def hook(_m, _i, out):  # returns None: the output is not replaced
        store["a"] = out.detach().numpy()

    handle = model.get_submodule(lname).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return store["a"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    log(
        f"torch {torch.__version__}, timm {timm.__version__}, grad-cam {GRADCAM_VERSION}, "
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}"
    )
    paths, x_np = load_images()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows += build_one(name, paths, x_np, args.out)
    for r in rows:
        log(
            f"| {r['name']} | {r['exporter']} | P={r['prefix']} grid={r['grid']} | "
            f"{r['params']:,} | {r['onnx_kb']:.0f} KB | {r['feature']} | {r['block']} | "
            f"{r['spread']} | ops {r['ops']} | head {r['head_ops']}"
        )
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    log(f"total under {args.out}: {total / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The test zoo (tests/fixtures/zoo): small real exports with reference Grad-CAM maps.

Dev-only; the successor of scripts/explore_exports.py, whose compact torch
re-implementations of CNN families, exporters (``export``) and randomisation it imports.
Needs torch, timm, onnxscript and pytorch-grad-cam in this Python (no torchvision: the
stand-in in scripts/_stubs, which explore_exports puts first on ``sys.path``), and, with
``--keras``, a second Python with TensorFlow / tf_keras / tf2onnx that runs
scripts/make_zoo_keras.py (``--tf-python``, default /tmp/tfvenv/bin/python).

Every entry is one family at one exporter (TorchScript ``torch.onnx.export`` at opsets
13 or 17, dynamo at 18; tf2onnx at 13 or 17), 64x64 RGB input, 4 classes, seeded random
weights made non-degenerate (BN statistics, norm affines, biases, layer scales, class and
position tokens re-drawn; the seed is the first one whose top-1 classes differ across the
reference images and whose maps are not all zero).  For each, in ``tests/fixtures/zoo``:

- ``<name>.onnx``: the export (dynamic batch);
- ``<name>.npz``: ``paths`` (reference images, relative to sample_models/images),
  ``targets`` (the model's own top-1), ``logits`` (the framework's, before any softmax),
  ``raw`` (N, h, w): Grad-CAM at feature resolution, ReLU'd, from pytorch-grad-cam's
  GradCAM (``get_cam_image`` inside its ``__call__``; token models through the standard
  ``reshape_transform``) or, for Keras, tf.GradientTape;
- ``zoo.json``: the manifest read by tests/test_zoo.py: per entry the family, exporter,
  opset, the tensor onnx-sp2ps should detect (found by value: the ONNX tensor equal to the
  framework module's / layer's output on the reference images), its shape and layout,
  prefix tokens and grid for token models, the preprocessing fed, and what was measured
  here with onnx-sp2ps at the time (detected tensor, gradient path, Pearson, seconds).

The expected tensor: the last conv stage's activated output for CNNs and hybrids (the
module a Grad-CAM user targets: ``features`` of explore_exports' nets, timm's last stage,
``final_conv`` or the head's 1x1 conv where the head starts with one; VGG's last ReLU,
before the MaxPool); for Swin the last stage's output (NHWC); for ViT / DeiT the input of
the last block's attention (timm ``blocks[-1].norm1``'s output: prefix tokens + grid).

Usage (from the repository root)::

    python scripts/make_zoo.py [--only NAME ...] [--keras] [--no-measure | --measure-only]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import explore_exports as ex  # noqa: E402  (puts scripts/_stubs and the repo on sys.path)
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytorch_grad_cam as pgc  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from onnx_sp2ps.cams import GradCAM  # noqa: E402
from onnx_sp2ps.data import InputSpec, Preprocess, open_images  # noqa: E402
from onnx_sp2ps.model import prepare_model  # noqa: E402
from onnx_sp2ps.runtime import ModelRunner  # noqa: E402

REPO = ex.REPO
IMAGES = ex.IMAGES
ZOO = REPO / "tests" / "fixtures" / "zoo"
K = ex.K
N_REF = 8  # reference images per entry
SEEDS = 20
MAX_BYTES = 2 * 1024 * 1024


def reference_images() -> list[Path]:
    """Every 6th sample image in sorted order: 8 images over the 4 classes."""
    paths = sorted(p for p in IMAGES.rglob("*.png"))
    return paths[::6][:N_REF]


def image_folder(paths: list[Path], root: Path) -> Path:
    """The images copied under ``root`` with their class folders (tests do the same)."""
    for p in paths:
        dest = root / p.relative_to(IMAGES)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    return root


def load_inputs(folder: Path, layout: str, preset: str) -> np.ndarray:
    """The inputs onnx-sp2ps feeds (its own image pipeline), as tests/test_zoo.py does."""
    images = open_images(
        folder, spec=InputSpec(layout, 3, 64, 64), preprocess=Preprocess(preset=preset)
    )
    return np.concatenate([b.inputs for b in images.iter_batches(64)])


# -- torch families (explore_exports' compact ones, and timm with tiny configs) --------------


def vgg64() -> nn.Module:
    """VGG at 64x64 (explore_exports' VGG, narrower): 4x4 after the last MaxPool."""
    return ex.vgg(plan=(16, "M", 32, "M", 48, 48, "M", 64, 64, "M"), pool=2, hidden=64)


def convnext_timm() -> nn.Module:
    """timm's ConvNeXt (LayerNorm in NHWC, layer scale), four stages of one block; a
    1x1 stem (patch 1 instead of 4) so that the last stage is 8x8 at 64x64."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), patch_size=1, num_classes=K)


def poolformer_timm() -> nn.Module:
    from timm.layers import GroupNorm1
    from timm.models.metaformer import MetaFormer, Pooling

    return MetaFormer(
        depths=(1, 1, 1),
        dims=(16, 32, 48),
        token_mixers=Pooling,
        mlp_act=nn.GELU,
        mlp_bias=True,
        norm_layers=GroupNorm1,
        layer_scale_init_values=1e-5,
        res_scale_init_values=None,
        use_mlp_head=False,
        num_classes=K,
    )


def efficientvit_timm() -> nn.Module:
    from timm.models.efficientvit_mit import EfficientVit

    return EfficientVit(
        widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), head_dim=8, head_widths=(64, 64), num_classes=K
    )


def fastvit_timm() -> nn.Module:
    from timm.models.fastvit import FastVit

    return FastVit(
        layers=(1, 1, 1),
        embed_dims=(16, 32, 64),
        mlp_ratios=(3, 3, 3),
        downsamples=(False, True, True),
        token_mixers=("repmixer", "repmixer", "attention"),
        pos_embs=(None, None, None),
        se_downsamples=(False, False, False),
        num_classes=K,
    )


def swin_timm() -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=K,
        img_size=64,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 2),
        num_heads=(1, 2, 4),
    )


def vit_timm() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=K,
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )


def deit_timm() -> nn.Module:
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        num_classes=K,
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )


TOKENS_VIT = {"prefix": 1, "grid": [8, 8]}
TOKENS_DEIT = {"prefix": 2, "grid": [8, 8]}

# name: (family, builder, target module, exporter, kind); kind: "conv" (NCHW map),
# "nhwc" (NHWC map, Swin) or a token dict (prefix, grid).
TORCH_ENTRIES = {
    "resnet_ts13": ("ResNet", ex.resnet, "features", "ts13", "conv"),
    "resnet_dynamo18": ("ResNet", ex.resnet, "features", "dynamo18", "conv"),
    "mobilenetv3_ts17": ("MobileNetV3", ex.mobilenet_v3, "features", "ts17", "conv"),
    "efficientnet_dynamo18": ("EfficientNet", ex.efficientnet, "features", "dynamo18", "conv"),
    "densenet_ts13": ("DenseNet", ex.densenet, "features", "ts13", "conv"),
    "vgg_ts17": ("VGG", vgg64, "features.14", "ts17", "conv"),
    "squeezenet_ts13": ("SqueezeNet", ex.squeezenet, "features", "ts13", "conv"),
    "regnet_dynamo18": ("RegNet", ex.regnet, "features", "dynamo18", "conv"),
    "convnext_ts17": ("ConvNeXt (timm)", convnext_timm, "stages.3", "ts17", "conv"),
    "convnext_dynamo18": ("ConvNeXt (timm)", convnext_timm, "stages.3", "dynamo18", "conv"),
    "efficientvit_ts17": ("EfficientViT (timm)", efficientvit_timm, "head.in_conv", "ts17", "conv"),
    "fastvit_dynamo18": ("FastViT (timm)", fastvit_timm, "final_conv", "dynamo18", "conv"),
    "poolformer_ts13": ("PoolFormer (timm)", poolformer_timm, "stages.2", "ts13", "conv"),
    "swin_ts17": ("Swin (timm)", swin_timm, "layers.2", "ts17", "nhwc"),
    "swin_dynamo18": ("Swin (timm)", swin_timm, "layers.2", "dynamo18", "nhwc"),
    "vit_ts17": ("ViT (timm)", vit_timm, "blocks.1.norm1", "ts17", TOKENS_VIT),
    "vit_dynamo18": ("ViT (timm)", vit_timm, "blocks.1.norm1", "dynamo18", TOKENS_VIT),
    "deit_ts17": ("DeiT distilled (timm)", deit_timm, "blocks.1.norm1", "ts17", TOKENS_DEIT),
}
EXPORTER_NAMES = {"ts": "torch.onnx TorchScript", "dynamo": "torch.onnx dynamo"}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights that make every part of the model matter: He-normal convs,
    1/sqrt(fan_in) linears, biases, BN statistics and affines, LayerNorm / GroupNorm
    affines, layer scales and class / position tokens re-drawn (timm initialises many of
    these to 0, 1 or 1e-5, which leaves logits nearly equal across images)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "scale") or "layer_scale" in name:
                p.uniform_(0.3, 1.0)
            elif leaf in ("cls_token", "dist_token", "pos_embed", "relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model.eval()


def reshape_for(kind):
    """pytorch-grad-cam's reshape_transform for token and NHWC outputs."""
    if kind == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if isinstance(kind, dict):
        p, (h, w) = kind["prefix"], kind["grid"]
        return lambda t: t[:, p:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return None


def torch_reference(model: nn.Module, module: str, kind, x: np.ndarray):
    """(logits, targets, raw Grad-CAM, the module's output) from pytorch-grad-cam."""
    target_layer = model.get_submodule(module)
    seen = []
    hook = target_layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().numpy()))
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    hook.remove()
    targets = logits.argmax(1)
    cam = pgc.GradCAM(
        model=model, target_layers=[target_layer], reshape_transform=reshape_for(kind)
    )
    captured = []
    original = cam.get_cam_image

    def capture(*args, **kwargs):
        value = original(*args, **kwargs)
        captured.append(np.array(value, dtype=np.float64))
        return value

    cam.get_cam_image = capture
    cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    cam.activations_and_grads.release()
    raw = np.maximum(captured[0], 0).astype(np.float32)
    return logits, targets, raw, seen[0]


def healthy(logits: np.ndarray, targets: np.ndarray, raw: np.ndarray) -> bool:
    """Non-degenerate: top-1 varies across images, logits vary, no all-zero map."""
    spread = logits.std(axis=0).max() / (np.abs(logits).max() + 1e-12)
    return (
        len(set(targets.tolist())) >= 2
        and spread > 1e-3
        and bool((raw.reshape(len(raw), -1).max(axis=1) > 0).all())
    )


# -- matching the framework's tensor to the ONNX graph's ---------------------------------------


def find_tensor(path: Path, x: np.ndarray, value: np.ndarray) -> list[tuple[str, str]]:
    """ONNX tensors equal to ``value`` on input ``x``: (name, "same"|"transposed"), in
    node order; "transposed" is an NHWC value found as NCHW or the reverse."""
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    outputs = {o.name for o in model.graph.output}
    order = []
    for node in model.graph.node:
        for name in node.output:
            if name and name in known and name not in outputs:
                if known[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                    model.graph.output.append(known[name])
                    order.append(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
    tol = 1e-4 * float(np.abs(value).max()) + 1e-6
    found = []
    for name in order:
        a = got[name]
        if a.shape == value.shape and np.allclose(a, value, rtol=1e-3, atol=tol):
            found.append((name, "same"))
        elif a.ndim == 4 == value.ndim:
            for perm in ((0, 3, 1, 2), (0, 2, 3, 1)):
                t = value.transpose(perm)
                if a.shape == t.shape and np.allclose(a, t, rtol=1e-3, atol=tol):
                    found.append((name, "transposed"))
    return found


# -- building ------------------------------------------------------------------------------------


def build_torch(name: str, x: np.ndarray, paths: list[str], out: Path) -> dict:
    family, build, module, exporter, kind = TORCH_ENTRIES[name]
    for seed in range(SEEDS):
        model = randomize(build(), seed)
        logits, targets, raw, feature = torch_reference(model, module, kind, x)
        if healthy(logits, targets, raw):
            break
    else:
        raise RuntimeError(f"{name}: no healthy seed in {SEEDS}")
    onnx_path = out / f"{name}.onnx"
    err = ex.export(model, 64, exporter, onnx_path)
    if err:
        return {"name": name, "family": family, "export_error": err}
    side = onnx_path.with_name(onnx_path.name + ".data")
    if side.exists():  # the dynamo exporter writes the weights beside: keep one file
        onnx.save(onnx.load(str(onnx_path)), str(onnx_path))
        side.unlink()
    np.savez_compressed(
        out / f"{name}.npz", paths=np.array(paths), targets=targets, logits=logits, raw=raw
    )
    matches = find_tensor(onnx_path, x, feature)
    tag = "ts" if exporter.startswith("ts") else "dynamo"
    if isinstance(kind, dict):
        layout, shape = "tokens", list(feature.shape[1:])
    elif kind == "nhwc":
        layout, shape = "NHWC", list(feature.shape[1:])
    else:
        layout, shape = "NCHW", list(feature.shape[1:])
    return {
        "name": name,
        "family": family,
        "exporter": EXPORTER_NAMES[tag],
        "exporter_version": f"torch {torch.__version__.split('+')[0]}",
        "opset": int(exporter[2:] if tag == "ts" else exporter[6:]),
        "source": f"torch module {module!r}",
        "seed": seed,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "preprocess": {"preset": "unit", "layout": "NCHW"},
        "feature": _feature(matches, shape, layout, name),
        "tokens": kind if isinstance(kind, dict) else None,
        "reference": "pytorch-grad-cam GradCAM"
        + (" + reshape_transform" if kind != "conv" else ""),
    }


def _feature(matches, shape, layout, name) -> dict:
    if not matches:
        print(f"!! {name}: no ONNX tensor equals the expected output", flush=True)
        return {"name": None, "shape": shape, "layout": layout, "matches": []}
    first, how = matches[0]
    if how == "transposed":  # (only for 4-D maps) the graph holds it in the other layout
        layout = "NCHW" if layout == "NHWC" else "NHWC"
        shape = [shape[2], shape[0], shape[1]] if layout == "NCHW" else [*shape[1:], shape[0]]
    return {"name": first, "shape": shape, "layout": layout, "matches": [m[0] for m in matches]}


def build_keras(args, folder: Path, paths: list[str], out: Path) -> list[dict]:
    """Run make_zoo_keras.py under the TensorFlow Python; match its tensors here."""
    tmp = Path(tempfile.mkdtemp(prefix="zoo-keras-"))
    unit = load_inputs(folder, "NHWC", "unit")
    raw_inputs = load_inputs(folder, "NHWC", "raw")
    np.savez(tmp / "inputs.npz", nhwc_unit=unit, nhwc_raw=raw_inputs)
    cmd = [args.tf_python, str(Path(__file__).with_name("make_zoo_keras.py"))]
    cmd += ["--inputs", str(tmp / "inputs.npz"), "--out", str(tmp)]
    if args.only:
        cmd += ["--only", *args.only]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(cmd, check=True, env={**env, "TF_USE_LEGACY_KERAS": "1"})
    rows = []
    for e in json.loads((tmp / "keras_entries.json").read_text()):
        name = e["name"]
        ref = np.load(tmp / f"{name}.keras.npz")
        shutil.copyfile(tmp / f"{name}.onnx", out / f"{name}.onnx")
        np.savez_compressed(
            out / f"{name}.npz",
            paths=np.array(paths),
            targets=ref["targets"],
            logits=ref["logits"],
            raw=ref["raw"],
        )
        x = raw_inputs if e["preprocess"] == "raw" else unit
        feature = ref["feature"]
        matches = find_tensor(out / f"{name}.onnx", x, feature)
        layout = "tokens" if e["tokens"] else "NHWC"
        rows.append(
            {
                "name": name,
                "family": e["family"],
                "exporter": "tf2onnx (Keras 2, tf_keras)",
                "exporter_version": f"tf2onnx {e['versions']['tf2onnx']}, "
                f"tensorflow {e['versions']['tensorflow']}",
                "opset": e["opset"],
                "source": f"Keras layer {e['layer']!r}",
                "seed": e["seed"],
                "parameters": e["parameters"],
                "preprocess": {"preset": e["preprocess"], "layout": "NHWC"},
                "feature": _feature(matches, list(feature.shape[1:]), layout, name),
                "tokens": e["tokens"],
                "reference": "tf.GradientTape Grad-CAM",
            }
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# -- measuring with onnx-sp2ps ------------------------------------------------------------------


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel().astype(np.float64) - a.mean()
    b = b.ravel().astype(np.float64) - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def measure(row: dict, folder: Path, out: Path) -> dict:
    """What onnx-sp2ps does with the entry today: detection, gradient path, Pearson of
    its Grad-CAM against the reference, seconds per image over all sample images."""
    path = out / f"{row['name']}.onnx"
    m: dict = {}
    p = subprocess.run(
        ["onnx-sp2ps", "inspect", str(path), "--format", "json"], capture_output=True, text=True
    )
    if p.returncode == 0:
        info = json.loads(p.stdout)
        m["detected"] = info["feature_map"]["name"]
        m["detected_shape"] = info["feature_map"]["shape"]
        m["gradient"] = info["head"]["gradient"]
        m["gradient_reason"] = info["head"]["gradient_reason"]
    else:
        m["inspect_error"] = (p.stderr.strip().splitlines() or [""])[-1][:300]
        return m
    try:
        prepared = prepare_model(path)
        runner = ModelRunner(prepared, provider="cpu")
        pre = row["preprocess"]
        ref = np.load(out / f"{row['name']}.npz")
        x = load_inputs(folder, pre["layout"], pre["preset"])
        acts, logits = runner.run(x)
        raw = GradCAM(runner)(acts, ref["targets"])
        m["pearson_min"] = round(min(pearson(r, s) for r, s in zip(raw, ref["raw"])), 5)
        all_x = load_inputs(IMAGES, pre["layout"], pre["preset"])
        t0 = time.perf_counter()
        for i in range(0, len(all_x), 16):
            a, y = runner.run(all_x[i : i + 16])
            GradCAM(runner)(a, y.argmax(1))
        m["seconds_per_image"] = round((time.perf_counter() - t0) / len(all_x), 5)
    except Exception as exc:  # noqa: BLE001 - recorded
        m["cam_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    return m


README_HEAD = """# The test zoo

Small real exports of image classifiers with seeded random weights, each with the tensor
onnx-sp2ps should detect and reference Grad-CAM maps; read by `tests/test_zoo.py`
(detection, an end-to-end audit against itself, Grad-CAM against the reference with
per-image Pearson >= 0.99). Made by `scripts/make_zoo.py` (torch part) and
`scripts/make_zoo_keras.py` (Keras part, run by `make_zoo.py --keras` under a separate
Python with TensorFlow); see their docstrings. No torch or TensorFlow is needed to test.

- Input: 64x64 RGB, 4 classes, dynamic batch. Reference images: every 6th of
  `sample_models/images` in sorted order (8 images, `zoo.json` `images`), preprocessed by
  onnx-sp2ps' own pipeline (`--preprocess unit`: x/255, or `raw`: 0..255 for the Keras
  EfficientNet, which rescales and normalises inside the model) and fed to both the
  framework and ONNX Runtime.
- Weights: seeded, re-drawn so that nothing is degenerate (He-normal convs,
  1/sqrt(fan_in) linears, biases, BN statistics, norm affines, layer scales, class and
  position tokens); the seed is the first whose top-1 classes differ across the images.
- Expected tensor: the ONNX tensor equal, on the reference images, to the output of the
  module / layer a Grad-CAM user targets (column "from"): the last conv stage's activated
  output (VGG: the last ReLU, before the MaxPool; EfficientViT: the head's 1x1 conv), the
  last stage's output for Swin (NHWC), the input of the last block's attention for token
  models (timm `blocks[-1].norm1`; prefix tokens then the patch grid).
- Reference: pytorch-grad-cam `GradCAM` (`get_cam_image` inside `__call__`, with the
  usual `reshape_transform` for NHWC and token outputs) or tf.GradientTape (weights = the
  spatial mean of d logit / dA, map = ReLU of the weighted sum), target = the model's own
  top-1 (before any softmax), raw maps at feature resolution, ReLU'd.
- Files: one `.onnx` per entry, weights inside (the dynamo exporter writes them to a
  side `.onnx.data` file; make_zoo.py folds them back into the model).
- `<name>.npz`: `paths`, `targets`, `logits`, `raw`. `zoo.json`: one entry per model
  (family, exporter and version, opset, source module or layer, seed, parameters,
  preprocessing, expected `feature` name / shape / layout and every tensor equal to it,
  `tokens` prefix and grid, and `measured`: what onnx-sp2ps did with it when made).

"""


def write_readme(manifest: dict, out: Path, versions: dict) -> None:
    lines = [
        README_HEAD,
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Measured when made (`measured` in zoo.json): gradient path from `onnx-sp2ps "
        "inspect --format json`; Pearson: the worst image of 8 against the reference; "
        "s/image: forward + Grad-CAM of the 50 sample images in batches of 16 on one CPU "
        "thread of a shared 2-core machine (`ModelRunner(provider='cpu')`).",
        "",
        "| entry | family | exporter | opset | from | expected tensor (shape, layout) "
        "| detected today | gradient | Pearson | s/image | KB |",
        "|---|---|---|---:|---|---|---|---|---:|---:|---:|",
    ]
    for e in manifest["entries"]:
        f, m = e["feature"], e.get("measured", {})
        tok = f", prefix {e['tokens']['prefix']}, grid {e['tokens']['grid']}" if e["tokens"] else ""
        if "inspect_error" in m:
            det = f"no: {m['inspect_error']}"
        elif m.get("detected") == f["name"]:
            det = "yes"
        else:
            det = f"no: `{m.get('detected')}` {m.get('detected_shape')}"
        grad = m.get("gradient", "-")
        if m.get("gradient_reason"):
            grad += f" ({m['gradient_reason']})"
        pr = m.get("pearson_min", m.get("cam_error", "-"))
        lines.append(
            f"| {e['name']} | {e['family']} | {e['exporter']} | {e['opset']} | {e['source']} "
            f"| `{f['name']}` {f['shape']} {f['layout']}{tok} | {det} | {grad} | {pr} "
            f"| {m.get('seconds_per_image', '-')} | {e.get('bytes', 0) // 1024} |"
        )
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ZOO)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--keras", action="store_true", help="also the Keras entries")
    parser.add_argument("--tf-python", default="/tmp/tfvenv/bin/python")
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="re-measure the entries already in zoo.json (no export) and rewrite the README",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    manifest_path = args.out / "zoo.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {e["name"]: e for e in manifest.get("entries", [])}
    ref_paths = reference_images()
    rel = [p.relative_to(IMAGES).as_posix() for p in ref_paths]
    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(ref_paths, Path(tmp))
        x = load_inputs(folder, "NCHW", "unit")
        rows = []
        if args.measure_only:
            for name, row in entries.items():
                if not args.only or name in args.only:
                    row["measured"] = measure(row, folder, args.out)
                    print(json.dumps({name: row["measured"]}), flush=True)
        for name in [] if args.measure_only else TORCH_ENTRIES:
            if args.only and name not in args.only:
                continue
            rows.append(build_torch(name, x, rel, args.out))
            print(json.dumps(rows[-1]), flush=True)
        if args.keras and not args.measure_only:
            rows += build_keras(args, folder, rel, args.out)
        for row in rows:
            if "export_error" in row:
                print(f"!! {row['name']}: {row['export_error']}", flush=True)
                continue
            onnx_file = args.out / f"{row['name']}.onnx"
            row["bytes"] = onnx_file.stat().st_size
            if row["bytes"] > MAX_BYTES:
                raise SystemExit(f"{onnx_file}: {row['bytes']} bytes, over {MAX_BYTES}")
            if not args.no_measure:
                row["measured"] = measure(row, folder, args.out)
                print(json.dumps({row["name"]: row["measured"]}), flush=True)
            entries[row["name"]] = row
    manifest = {
        "images": rel,
        "image_root": "sample_models/images",
        "input_size": [64, 64],
        "classes": K,
        "entries": sorted(entries.values(), key=lambda e: e["name"]),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    versions = {
        "torch": torch.__version__.split("+")[0],
        "timm": timm.__version__,
        "grad-cam": importlib.metadata.version("grad-cam"),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    keras_rows = [e for e in manifest["entries"] if e["exporter"].startswith("tf2onnx")]
    if keras_rows:
        versions["tf2onnx / tensorflow"] = keras_rows[0]["exporter_version"]
    write_readme(manifest, args.out, versions)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{len(entries)} entries, {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Robustness exploration: onnx-sp2ps on tiny timm exports of transformer families.

Dev-only (torch and timm, see scripts/requirements-dev.txt; torchvision stand-in in
scripts/_stubs). Each family is built with random weights at 64x64 and a tiny depth and
width, exported with the TorchScript exporter at opset 17 (dynamic batch), then
``onnx-sp2ps inspect --format json`` (the map, the token grid and rule, the gradient
path) and ``onnx-sp2ps audit M M --images sample_models/images -q`` run on it.  Prints
one line per family; an export the exporter itself refuses is said so.

Usage (from the repository root)::

    python scripts/explore_transformers.py [--out /tmp/explore] [NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent / "_stubs"))  # stand-in torchvision
warnings.filterwarnings("ignore")

import timm  # noqa: E402
import torch  # noqa: E402

IMAGES = REPO / "sample_models" / "images"
#: name: (timm architecture, tiny kwargs)
CFGS = {
    "vit_map": (
        "vit_tiny_patch16_224",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, global_pool="map"),
    ),
    "deit3": (
        "deit3_small_patch16_224",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    ),
    "beit": (
        "beit_base_patch16_224",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    ),
    "eva02": (
        "eva02_tiny_patch14_224",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    ),
    "cait": (
        "cait_xxs24_224",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, depth_token_only=1),
    ),
    "xcit": (
        "xcit_nano_12_p16_224",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, cls_attn_layers=1),
    ),
    "pit": ("pit_ti_224", dict(img_size=64)),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    "twins": (
        "twins_svt_small",
        dict(
            img_size=64,
            depths=(1, 1, 1, 1),
            embed_dims=(16, 32, 48, 64),
            num_heads=(1, 2, 3, 4),
            sr_ratios=(4, 2, 1, 1),
        ),
    ),
    "levit_conv": ("levit_conv_128s", dict(img_size=64)),
    "tnt": ("tnt_s_patch16_224", dict(img_size=64, depth=2)),
    "crossvit": ("crossvit_tiny_240", dict(img_size=[64, 64], depth=[[1, 1, 0]])),
    "vit_reg_avg": (
        "vit_tiny_patch16_224",
        dict(
            img_size=64,
            patch_size=8,
            embed_dim=48,
            depth=2,
            num_heads=3,
            reg_tokens=4,
            global_pool="avg",
        ),
    ),
    "flexivit": (
        "flexivit_small",
        dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    ),
    "mixer": (
        "timm.models.mlp_mixer:MlpMixer",
        dict(img_size=64, patch_size=8, embed_dim=48, num_blocks=2),
    ),
    "edgenext": ("edgenext_xx_small", dict(depths=(1, 1, 1, 1))),
    "mobilevitv2": ("mobilevitv2_050", dict()),
    "efficientformerv2": ("efficientformerv2_s0", dict(img_size=64)),
    "repvit": ("repvit_m0_9", dict()),
    "coat_lite": ("coat_lite_tiny", dict(img_size=64)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=Path("/tmp/explore"))
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(CFGS))
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in CFGS]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}: choose from {', '.join(CFGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in args.names or list(CFGS):
        arch, kw = CFGS[name]
        out = args.out / f"{name}.onnx"
        try:
            if ":" in arch:  # a class, for configurations no named model allows
                module, cls = arch.split(":")
                m = getattr(importlib.import_module(module), cls)(num_classes=4, **kw).eval()
            else:
                m = timm.create_model(arch, pretrained=False, num_classes=4, **kw).eval()
        except Exception as exc:  # noqa: BLE001 - a configuration timm refuses, reported
            print(f"{name}: timm refused the configuration ({type(exc).__name__}: {exc})")
            continue
        try:
            torch.onnx.export(
                m,
                torch.rand(2, 3, 64, 64),
                str(out),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "b"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter's refusal, reported
            print(f"{name}: export refused by torch.onnx ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        p = subprocess.run(
            ["onnx-sp2ps", "inspect", str(out), "--format", "json"], capture_output=True, text=True
        )
        if p.returncode:
            print(f"{name}: inspect exit {p.returncode}: {p.stderr.strip()[-300:]}")
            continue
        d = json.loads(p.stdout)
        fm = d["feature_map"]
        a = subprocess.run(
            ["onnx-sp2ps", "audit", str(out), str(out), "--images", str(IMAGES), "-q"],
            capture_output=True,
            text=True,
        )
        print(
            f"{name}: map {fm['name']} {fm['shape']} tokens {fm.get('tokens')}, "
            f"gradient {d['head']['gradient']}, audit exit {a.returncode} {a.stderr.strip()[-200:]}"
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Robustness exploration: onnx-sp2ps on torch exports of well-known CNN families.

Dev-only (needs torch; torchvision is not needed: the architectures are written here,
compactly, in the style of each family, with random weights and small inputs).  For every
architecture and exporter (TorchScript exporter at opsets 13 and 17 with a dynamic batch,
and the dynamo exporter at opset 18 where it works):

1. export the original and a "pruned" candidate (50% smallest conv weights per layer
   zeroed) to ``OUT/<arch>_<exporter>{,_pruned}.onnx``;
2. run ``onnx-sp2ps inspect --format json`` (detected feature map, gradient path) and
   ``onnx-sp2ps audit ORIG CAND --images sample_models/images -q`` (exit code, time);
3. compare onnx-sp2ps's Grad-CAM raw maps with pytorch-grad-cam's on the module whose
   output is the tensor a Grad-CAM user picks (``model.features``): Pearson r per image,
   mean over a few images.

Usage (from the repository root)::

    python scripts/explore_exports.py [--out /tmp/explore] [--arch resnet ...] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent / "_stubs"))  # stand-in torchvision
sys.path.insert(1, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import pytorch_grad_cam as pgc  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from onnx_sp2ps import compute_cams  # noqa: E402

IMAGES = REPO / "sample_models" / "images"
K = 4  # classes (the sample images have 4)
N_CAM_IMAGES = 8


def cbr(cin, cout, k=3, s=1, g=1, act=nn.ReLU):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
        nn.BatchNorm2d(cout),
        act() if act else nn.Identity(),
    )


class Net(nn.Module):
    """features (the Grad-CAM target module) -> head (-> final activation)."""

    def __init__(self, features, head, final=None):
        super().__init__()
        self.features, self.head, self.final = features, head, final

    def forward(self, x):
        y = self.head(self.features(x))
        return self.final(y) if self.final is not None else y


def gap_fc(c, k=K):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, k))


# -- ResNet ------------------------------------------------------------------------------


class Basic(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.a, self.b = cbr(cin, cout, 3, s), cbr(cout, cout, 3, 1, act=None)
        self.down = cbr(cin, cout, 1, s, act=None) if (s != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(self.a(x)) + self.down(x))


def resnet(final=None):
    f = nn.Sequential(
        cbr(3, 16, 3, 2),
        nn.MaxPool2d(3, 2, 1),
        Basic(16, 16, 1),
        Basic(16, 32, 2),
        Basic(32, 64, 2),
    )
    return Net(f, gap_fc(64), final)


# -- MobileNetV2 / V3, EfficientNet ----------------------------------------------------------


class SE(nn.Module):
    def __init__(self, c, r=4, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(8, c // r), 1), nn.Conv2d(max(8, c // r), c, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvRes(nn.Module):
    def __init__(self, cin, cout, s, e=4, act=nn.ReLU6, se=None, k=3):
        super().__init__()
        mid = cin * e
        layers = [cbr(cin, mid, 1, act=act), cbr(mid, mid, k, s, g=mid, act=act)]
        if se:
            layers.append(se(mid))
        layers.append(cbr(mid, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


def mobilenet_v2():
    f = nn.Sequential(
        cbr(3, 16, 3, 2, act=nn.ReLU6),
        InvRes(16, 16, 1),
        InvRes(16, 24, 2),
        InvRes(24, 24, 1),
        InvRes(24, 32, 2),
        cbr(32, 128, 1, act=nn.ReLU6),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, K))
    return Net(f, head)


def mobilenet_v3():
    h = nn.Hardswish
    f = nn.Sequential(
        cbr(3, 16, 3, 2, act=h),
        InvRes(16, 16, 2, 1, nn.ReLU, SE),
        InvRes(16, 24, 2, 3, nn.ReLU),
        InvRes(24, 40, 2, 3, h, SE, k=5),
        InvRes(40, 40, 1, 3, h, SE, k=5),
        cbr(40, 96, 1, act=h),
    )
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 128),
        nn.Hardswish(),
        nn.Dropout(0.2),
        nn.Linear(128, K),
    )
    return Net(f, head)


def efficientnet():
    se = lambda c: SE(c, 4, nn.SiLU, nn.Sigmoid)  # noqa: E731
    f = nn.Sequential(
        cbr(3, 16, 3, 2, act=nn.SiLU),
        InvRes(16, 16, 1, 1, nn.SiLU, se),
        InvRes(16, 24, 2, 4, nn.SiLU, se),
        InvRes(24, 40, 2, 4, nn.SiLU, se, k=5),
        InvRes(40, 40, 1, 4, nn.SiLU, se, k=5),
        cbr(40, 128, 1, act=nn.SiLU),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, K))
    return Net(f, head)


# -- DenseNet --------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin, g=12):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * g, 1, bias=False),
            nn.BatchNorm2d(4 * g),
            nn.ReLU(),
            nn.Conv2d(4 * g, g, 3, 1, 1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = (
            [
                nn.Conv2d(3, 24, 3, 2, 1, bias=False),
                nn.BatchNorm2d(24),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            ],
            24,
        )
        for block in range(2):
            for _ in range(3):
                layers.append(DenseLayer(c))
                c += 12
            if block == 0:
                layers += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                    nn.Conv2d(c, c // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2),
                ]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]  # final norm5 + relu
        self.seq, self.channels = nn.Sequential(*layers), c

    def forward(self, x):
        return self.seq(x)


def densenet():
    f = DenseFeatures()
    return Net(f, gap_fc(f.channels))


# -- SqueezeNet ------------------------------------------------------------------------------


class Fire(nn.Module):
    def __init__(self, cin, s, e):
        super().__init__()
        self.sq, self.e1, self.e3 = (
            nn.Conv2d(cin, s, 1),
            nn.Conv2d(s, e, 1),
            nn.Conv2d(s, e, 3, 1, 1),
        )

    def forward(self, x):
        x = F.relu(self.sq(x))
        return torch.cat([F.relu(self.e1(x)), F.relu(self.e3(x))], 1)


def squeezenet():
    f = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(32, 8, 32),
        Fire(64, 8, 32),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(64, 16, 64),
    )
    head = nn.Sequential(
        nn.Dropout(0.5), nn.Conv2d(128, K, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return Net(f, head)


# -- ShuffleNetV2 ----------------------------------------------------------------------------


def shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.s = s
        b = cout // 2
        if s > 1:
            self.left = nn.Sequential(cbr(cin, cin, 3, s, g=cin, act=None), cbr(cin, b, 1))
        self.right = nn.Sequential(
            cbr(cin if s > 1 else b, b, 1), cbr(b, b, 3, s, g=b, act=None), cbr(b, b, 1)
        )

    def forward(self, x):
        if self.s == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return shuffle(out)


class ShuffleFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(
            cbr(3, 24, 3, 2),
            nn.MaxPool2d(3, 2, 1),
            ShuffleUnit(24, 48, 2),
            ShuffleUnit(48, 48, 1),
            ShuffleUnit(48, 96, 2),
            ShuffleUnit(96, 96, 1),
            cbr(96, 192, 1),
        )

    def forward(self, x):
        return self.seq(x)


class MeanFc(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, K)

    def forward(self, x):
        return self.fc(x.mean([2, 3]))  # torchvision ShuffleNetV2 head


def shufflenet():
    return Net(ShuffleFeatures(), MeanFc(192))


# -- VGG -------------------------------------------------------------------------------------


def vgg(plan=(16, "M", 32, "M", 64, 64, "M", 64, 64, "M"), pool=7, hidden=128):
    """conv-ReLU stages (``plan``: widths, "M" a MaxPool 2x2), the last MaxPool right
    before the classifier (AdaptiveAvgPool ``pool`` -> Flatten -> Linear-ReLU-Dropout-
    Linear)."""
    layers, c = [], 3
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, 1, 1), nn.ReLU()]
            c = v
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(c * pool * pool, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, K),
    )
    return Net(nn.Sequential(*layers), head)  # 112x112 -> 7x7 with the defaults


# -- GoogLeNet -------------------------------------------------------------------------------


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = cbr(cin, c1, 1)
        self.b2 = nn.Sequential(cbr(cin, c3r, 1), cbr(c3r, c3, 3))
        self.b3 = nn.Sequential(cbr(cin, c5r, 1), cbr(c5r, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), cbr(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def googlenet():
    f = nn.Sequential(
        cbr(3, 32, 3, 2),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Inception(32, 16, 16, 24, 8, 8, 8),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Inception(56, 24, 16, 32, 8, 16, 16),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(88, K))
    return Net(f, head)


# -- ConvNeXt --------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm, self.fc1, self.fc2 = (
            nn.LayerNorm(c, eps=1e-6),
            nn.Linear(c, 4 * c),
            nn.Linear(4 * c, c),
        )
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def convnext():
    f = nn.Sequential(
        nn.Conv2d(3, 32, 4, 4),
        LayerNorm2d(32, eps=1e-6),
        CNBlock(32),
        LayerNorm2d(32, eps=1e-6),
        nn.Conv2d(32, 64, 2, 2),
        CNBlock(64),
    )
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), LayerNorm2d(64, eps=1e-6), nn.Flatten(1), nn.Linear(64, K)
    )
    return Net(f, head)


# -- RegNet ----------------------------------------------------------------------------------


class XBlock(nn.Module):
    def __init__(self, cin, cout, s, gw=8):
        super().__init__()
        self.body = nn.Sequential(
            cbr(cin, cout, 1),
            cbr(cout, cout, 3, s, g=cout // gw),
            SE(cout, 4, nn.ReLU, nn.Sigmoid),
            cbr(cout, cout, 1, act=None),
        )
        self.proj = cbr(cin, cout, 1, s, act=None) if (s != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return F.relu(self.proj(x) + self.body(x))


def regnet():
    f = nn.Sequential(cbr(3, 16, 3, 2), XBlock(16, 32, 2), XBlock(32, 32, 1), XBlock(32, 64, 2))
    return Net(f, gap_fc(64))


ARCHS = {
    "resnet": (resnet, 64),
    "mobilenet_v2": (mobilenet_v2, 64),
    "mobilenet_v3": (mobilenet_v3, 64),
    "efficientnet": (efficientnet, 64),
    "densenet": (densenet, 64),
    "squeezenet": (squeezenet, 64),
    "shufflenet_v2": (shufflenet, 64),
    "vgg": (vgg, 112),
    "googlenet": (googlenet, 64),
    "convnext": (convnext, 64),
    "regnet": (regnet, 64),
    "resnet_softmax": (lambda: resnet(nn.Softmax(dim=1)), 64),
    "resnet_logsoftmax": (lambda: resnet(nn.LogSoftmax(dim=1)), 64),
}
EXPORTERS = ("ts13", "ts17", "dynamo18")


def make(arch: str, seed: int = 0) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    build, size = ARCHS[arch]
    model = build().eval()
    with torch.no_grad():  # non-trivial BN statistics, so that BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model, size


def pruned(model: nn.Module) -> nn.Module:
    """A copy with the 50% smallest-magnitude weights of every conv zeroed."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                w[w.abs() <= w.abs().flatten().median()] = 0.0
    return out


def export(model: nn.Module, size: int, exporter: str, path: Path) -> str | None:
    """Export; returns None or the first line of the error."""
    x = torch.randn(2, 3, size, size)
    try:
        if exporter.startswith("ts"):
            torch.onnx.export(
                model,
                (x,),
                str(path),
                opset_version=int(exporter[2:]),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                opset_version=18,
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:150]}"
    return None


def run(cmd: list[str]) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def load_images(size: int, n: int) -> np.ndarray:
    paths = sorted(IMAGES.rglob("*.png"))[:: max(1, len(list(IMAGES.rglob("*.png"))) // n)][:n]
    arrays = [
        np.asarray(
            Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), np.float32
        ).transpose(2, 0, 1)
        / 255.0
        for p in paths
    ]
    return np.stack(arrays)


def torch_gradcam_raw(model: nn.Module, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam GradCAM on ``model.features``: the raw map (feature resolution)."""
    core = model if model.final is None else Net(model.features, model.head)  # pre-softmax
    cam = pgc.GradCAM(model=core, target_layers=[model.features])
    captured = []
    original = cam.get_cam_image

    def capture(*args, **kwargs):
        value = original(*args, **kwargs)
        captured.append(np.array(value, dtype=np.float64))
        return value

    cam.get_cam_image = capture
    cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    cam.activations_and_grads.release()
    return captured[0]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    rs = []
    for u, v in zip(a, b):
        u, v = np.maximum(u.ravel(), 0), np.maximum(v.ravel(), 0)
        if u.std() == 0 or v.std() == 0:
            rs.append(1.0 if np.allclose(u, v) else 0.0)
        else:
            rs.append(float(np.corrcoef(u, v)[0, 1]))
    return float(np.mean(rs))


def explore(arch: str, exporter: str, out: Path) -> dict:
    model, size = make(arch)
    row = {"arch": arch, "exporter": exporter}
    orig, cand = out / f"{arch}_{exporter}.onnx", out / f"{arch}_{exporter}_pruned.onnx"
    err = export(model, size, exporter, orig) or export(pruned(model), size, exporter, cand)
    if err:
        row["export_error"] = err
        return row
    code, stdout, stderr, _ = run(["onnx-sp2ps", "inspect", str(orig), "--format", "json"])
    row["inspect_exit"] = code
    if code == 0:
        info = json.loads(stdout)
        row["feature"] = info["feature_map"]["name"]
        row["feature_shape"] = info["feature_map"]["shape"]
        row["head_ops"] = info["head"]["ops"]
        row["gradient"] = info["head"]["gradient"]
        row["gradient_reason"] = info["head"]["gradient_reason"]
    else:
        row["inspect_error"] = (stderr.strip().splitlines() or [""])[-1][:200]
    # Expected: the output shape of model.features.
    with torch.no_grad():
        row["expected_shape"] = list(model.features(torch.zeros(1, 3, size, size)).shape[1:])
    code, stdout, stderr, secs = run(
        ["onnx-sp2ps", "audit", str(orig), str(cand), "--images", str(IMAGES), "-q"]
    )
    row["audit_exit"], row["audit_seconds"] = code, round(secs, 1)
    if code not in (0, 1):
        row["audit_error"] = (stderr.strip().splitlines() or [""])[-1][:200]
    else:
        score = [ln for ln in stdout.splitlines() if ln.strip()]
        row["audit_last"] = score[-1][:120] if score else ""
    if row.get("inspect_exit") == 0:
        try:
            x = load_images(size, N_CAM_IMAGES)
            npy = out / f"images_{size}.npy"
            np.save(npy, x)
            maps, _, _ = compute_cams(
                str(orig), str(npy), method="gradcam", target="own", provider="cpu"
            )
            with torch.no_grad():
                logits = model(torch.from_numpy(x))
                if model.final is not None:
                    logits = model.head(model.features(torch.from_numpy(x)))
            targets = maps.targets
            row["top1_agree_torch"] = float(np.mean(logits.argmax(1).numpy() == targets))
            ref = torch_gradcam_raw(model, x, targets)
            row["pearson"] = (
                round(pearson(maps.raw, ref), 4)
                if maps.raw.shape == ref.shape
                else f"shape {maps.raw.shape[1:]} vs {ref.shape[1:]}"
            )
        except Exception as exc:  # noqa: BLE001
            row["pearson"] = f"error {type(exc).__name__}: {str(exc)[:120]}"
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| architecture | exporter | feature map detected (shape; expected C,h,w) | gradient path"
        " | exit (inspect/audit) | Pearson vs pytorch-grad-cam | audit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "export_error" in r:
            lines.append(
                f"| {r['arch']} | {r['exporter']} | export failed: {r['export_error']} | | | | |"
            )
            continue
        shape = r.get("feature_shape")
        feat = (
            f"`{r.get('feature', '-')}` {shape[1:] if shape else ''}; exp {r['expected_shape']}"
            if "feature" in r
            else f"error: {r.get('inspect_error')}"
        )
        grad = r.get("gradient", "-")
        if r.get("gradient_reason"):
            grad += f" ({r['gradient_reason']})"
        ex = f"{r.get('inspect_exit')}/{r.get('audit_exit')}"
        if r.get("audit_error"):
            ex += f" ({r['audit_error']})"
        lines.append(
            f"| {r['arch']} | {r['exporter']} | {feat} | {grad} | {ex} | "
            f"{r.get('pearson', '-')} | {r.get('audit_seconds', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/explore"))
    parser.add_argument("--arch", nargs="*", default=list(ARCHS))
    parser.add_argument("--exporter", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.arch:
        for exporter in args.exporter:
            row = explore(arch, exporter, args.out)
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = markdown(rows)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

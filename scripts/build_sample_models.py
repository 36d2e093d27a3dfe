#!/usr/bin/env python
"""Build the sample models, sample images and Grad-CAM fixtures of onnx-sp2ps.

Dev-only (needs PyTorch, see scripts/requirements-dev.txt). One run does everything:

1. generates a synthetic "shapes in clutter" data set (train/val/test from different seeds);
2. trains two small CNNs: ``gap`` (conv trunk -> GAP -> Linear -> Softmax, outputs
   probabilities) and ``fc`` (conv trunk -> Flatten -> Linear -> ReLU -> Linear, outputs
   logits);
3. prunes each with L1-norm filter pruning (30 % and 60 % of the channels of every conv
   layer, without and with a short fine-tune) and with random filter pruning (60 %, with
   fine-tune), physically removing channels;
4. exports every model to ONNX (opset 17, legacy TorchScript exporter, single file) and
   checks it with onnx.checker and against ONNX Runtime;
5. writes ~50 test images as PNG plus class_names.txt;
6. writes sample_models/README.md with a table of the models;
7. computes reference Grad-CAM maps with torch autograd for four models and writes them
   to tests/fixtures/gradcam_{stem}.npz.

Usage (from the repository root)::

    python scripts/build_sample_models.py
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "sample_models"
FIXTURES = REPO / "tests" / "fixtures"

CLASS_NAMES = ["circle", "square", "triangle", "cross"]
NUM_CLASSES = len(CLASS_NAMES)
IMG = 64  # image side, pixels
SS = 4  # supersampling factor used to anti-alias the object mask

SEEDS = {"train": 1001, "val": 2002, "test": 3003}
N_TRAIN, N_VAL, N_TEST = 12000, 1000, 2000
N_IMAGES = 50  # images written to sample_models/images
OPSET = 17
RATIOS = (0.3, 0.6)
FIXTURE_STEMS = ("gap_original", "gap_l1_60", "fc_original", "fc_l1_60")


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------
# 1. Synthetic data
# ----------------------------------------------------------------------------------------


def _shape_polygon(label: int, cx: float, cy: float, size: float, angle: float):
    """Polygon (list of (x, y)) of a square/triangle/cross, or None for the circle."""
    if label == 0:
        return None
    if label == 1:  # square, half side so that its area is close to the circle's
        a = size / 2 * 0.85
        pts = [(-a, -a), (a, -a), (a, a), (-a, a)]
    elif label == 2:  # equilateral triangle, circumradius
        r = size / 2 * 1.1
        pts = [
            (r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    else:  # plus / cross
        L = size / 2
        t = L * 0.34
        pts = [
            (-t, -L),
            (t, -L),
            (t, -t),
            (L, -t),
            (L, t),
            (t, t),
            (t, L),
            (-t, L),
            (-t, t),
            (-L, t),
            (-L, -t),
            (-t, -t),
        ]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _object_mask(label: int, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Anti-aliased object mask in [0, 1], shape (IMG, IMG)."""
    big = Image.new("L", (IMG * SS, IMG * SS), 0)
    d = ImageDraw.Draw(big)
    poly = _shape_polygon(label, cx * SS, cy * SS, size * SS, angle)
    if poly is None:
        r = size / 2 * SS
        d.ellipse([cx * SS - r, cy * SS - r, cx * SS + r, cy * SS + r], fill=255)
    else:
        d.polygon(poly, fill=255)
    small = big.resize((IMG, IMG), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _random_colour(rng: np.random.RandomState) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def make_image(rng: np.random.RandomState, label: int) -> np.ndarray:
    """One 64x64 RGB uint8 image (H, W, 3) containing one shape of class ``label``."""
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float32)

    # background: random linear colour gradient
    c0, c1 = _random_colour(rng), _random_colour(rng)
    th = rng.uniform(0, 2 * math.pi)
    g = (xx * math.cos(th) + yy * math.sin(th)) / IMG
    g = (g - g.min()) / max(g.max() - g.min(), 1e-6)
    img = c0[None, None, :] * (1 - g[..., None]) + c1[None, None, :] * g[..., None]

    # stripes (texture)
    if rng.rand() < 0.6:
        th = rng.uniform(0, math.pi)
        period = rng.uniform(3.0, 12.0)
        phase = (xx * math.cos(th) + yy * math.sin(th)) * 2 * math.pi / period
        wave = np.sin(phase) if rng.rand() < 0.5 else np.sign(np.sin(phase))
        amp = rng.uniform(10, 45)
        direction = rng.uniform(-1, 1, size=3).astype(np.float32)
        direction /= max(np.linalg.norm(direction), 1e-6)
        img = img + amp * wave[..., None] * direction[None, None, :]

    # soft colour blobs (no sharp edges)
    for _ in range(rng.randint(0, 4)):
        bx, by = rng.uniform(0, IMG, size=2)
        sig = rng.uniform(3, 10)
        alpha = rng.uniform(0.3, 0.8) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sig**2))
        img = img * (1 - alpha[..., None]) + _random_colour(rng)[None, None, :] * alpha[..., None]

    img = np.clip(img, 0, 255)
    pil = Image.fromarray(img.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)

    # distractor lines and small dots (colours drawn from the same distribution as objects)
    def lines(n):
        for _ in range(n):
            p = rng.uniform(-8, IMG + 8, size=4)
            draw.line(
                [tuple(p[:2]), tuple(p[2:])],
                fill=tuple(int(v) for v in _random_colour(rng)),
                width=int(rng.randint(1, 3)),
            )

    def dots(n):
        for _ in range(n):
            x, y = rng.uniform(0, IMG, size=2)
            r = rng.uniform(0.8, 2.5)
            draw.ellipse(
                [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in _random_colour(rng))
            )

    lines(rng.randint(2, 7))
    dots(rng.randint(0, 10))
    img = np.asarray(pil, dtype=np.float32)

    # the object: random size, position, rotation and colour (colour is independent of class)
    size = rng.uniform(18, 34)
    m = size / 2 + 2
    cx, cy = rng.uniform(m, IMG - m, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = _object_mask(label, cx, cy, size, angle)
    inside = mask > 0.5
    bg_mean = img[inside].mean(axis=0)
    for _ in range(100):  # ensure the object is visible against its local background
        col = _random_colour(rng)
        if np.linalg.norm(col - bg_mean) > 90:
            break
    img = img * (1 - mask[..., None]) + col[None, None, :] * mask[..., None]

    # a few thin lines / dots may cross the object
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    lines(rng.randint(0, 2))
    dots(rng.randint(0, 3))
    img = np.asarray(pil, dtype=np.float32)

    # sensor noise
    img = img + rng.normal(0, rng.uniform(3, 12), size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced split: images uint8 (N, 3, H, W), labels int64 (N,)."""
    rng = np.random.RandomState(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    x = np.empty((n, 3, IMG, IMG), dtype=np.uint8)
    for i, y in enumerate(labels):
        x[i] = make_image(rng, int(y)).transpose(2, 0, 1)
    return x, labels


# ----------------------------------------------------------------------------------------
# 2. Models
# ----------------------------------------------------------------------------------------


def conv_block(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    ]


class Net(nn.Module):
    """features (conv trunk ending in an 8x8 map after a ReLU) -> head -> [softmax]."""

    def __init__(self, head_kind: str, widths: list[int], hidden: int = 64, softmax: bool = False):
        super().__init__()
        self.head_kind = head_kind
        self.widths = list(widths)
        self.hidden = hidden
        self.softmax = softmax
        layers: list[nn.Module] = []
        cin = 3
        # 64x64 -> 5x5 stride-2 conv -> 32 -> 3x3 conv, MaxPool -> 16 -> 3x3 conv, MaxPool -> 8
        # -> 3x3 conv (the last conv block works at 8x8 and feeds the head directly)
        for i, w in enumerate(widths):
            layers += conv_block(cin, w, kernel=5, stride=2) if i == 0 else conv_block(cin, w)
            if 0 < i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        if head_kind == "gap":
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES)
            )
        elif head_kind == "fc":
            side = IMG // 2 ** (len(widths) - 1)  # 8
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(cin * side * side, hidden),
                nn.ReLU(),
                nn.Linear(hidden, NUM_CLASSES),
            )
        else:
            raise ValueError(head_kind)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return torch.softmax(z, dim=1) if self.softmax else z

    def convs_bns(self):
        mods = list(self.features)
        return [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]


def make_model(head: str) -> Net:
    if head == "gap":
        return Net("gap", [16, 32, 64, 96], softmax=True)
    return Net("fc", [16, 32, 32, 32], hidden=64, softmax=False)


def to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """The model input: NCHW float32 = uint8 / 255.0 (no mean/std)."""
    return x_uint8.float() / 255.0


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random element of the dihedral group D4 per sample (all classes are invariant)."""
    n = x.shape[0]
    m = torch.rand(n, 3, generator=g) < 0.5
    x = torch.where(m[:, 0, None, None, None], x.flip(3), x)
    x = torch.where(m[:, 1, None, None, None], x.flip(2), x)
    x = torch.where(m[:, 2, None, None, None], x.transpose(2, 3), x)
    return x


def train(
    model: Net,
    data,
    epochs: int,
    lr: float,
    seed: int,
    tag: str,
    batch: int = 128,
    pct_start: float = 0.1,
) -> None:
    xtr, ytr, xva, yva = data
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=pct_start
    )
    for ep in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xtr), generator=g)
        tot, n = 0.0, 0
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            xb = to_input(augment(xtr[idx], g))
            loss = F.cross_entropy(model.logits(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            n += len(idx)
        va = accuracy(model, xva, yva)
        log(
            f"  [{tag}] epoch {ep + 1}/{epochs} loss {tot / n:.4f} val acc {va:.4f} ({time.time() - t0:.1f}s)"
        )


@torch.no_grad()
def predict_logits(model: Net, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model.logits(to_input(x[i : i + batch])) for i in range(0, len(x), batch)])


def accuracy(model: Net, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------------------
# 3. Pruning (channels are physically removed)
# ----------------------------------------------------------------------------------------


def keep_indices(
    conv: nn.Conv2d, ratio: float, method: str, rng: np.random.RandomState
) -> np.ndarray:
    c = conv.out_channels
    n_keep = max(1, c - int(round(c * ratio)))
    if method == "l1":
        score = conv.weight.detach().abs().sum(dim=(1, 2, 3)).numpy()
        keep = np.argsort(-score, kind="stable")[:n_keep]
    elif method == "random":
        keep = rng.choice(c, size=n_keep, replace=False)
    else:
        raise ValueError(method)
    return np.sort(keep)


@torch.no_grad()
def prune(model: Net, ratio: float, method: str, seed: int = 0) -> Net:
    """Filter pruning of every conv layer (independent per-layer criterion, Li et al. 2017)."""
    rng = np.random.RandomState(seed)
    pairs = model.convs_bns()
    keeps = [keep_indices(conv, ratio, method, rng) for conv, _ in pairs]
    new = Net(model.head_kind, [len(k) for k in keeps], hidden=model.hidden, softmax=model.softmax)
    prev = np.arange(3)
    for (conv, bn), (nconv, nbn), keep in zip(pairs, new.convs_bns(), keeps):
        ko, ki = torch.from_numpy(keep), torch.from_numpy(prev)
        nconv.weight.copy_(conv.weight[ko][:, ki])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(nbn, name).copy_(getattr(bn, name)[ko])
        nbn.num_batches_tracked.copy_(bn.num_batches_tracked)
        prev = keep
    last = torch.from_numpy(prev)
    if model.head_kind == "gap":
        lin, nlin = model.head[2], new.head[2]
        nlin.weight.copy_(lin.weight[:, last])
        nlin.bias.copy_(lin.bias)
    else:
        lin, nlin = model.head[1], new.head[1]
        c_old = model.widths[-1]
        w = lin.weight.view(lin.out_features, c_old, -1)[:, last]  # flatten order is (C, H, W)
        nlin.weight.copy_(w.reshape(lin.out_features, -1))
        nlin.bias.copy_(lin.bias)
        new.head[3].load_state_dict(model.head[3].state_dict())
    return new


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# 4. Export and checks
# ----------------------------------------------------------------------------------------


def export(model: Net, path: Path, x_check: torch.Tensor) -> None:
    model.eval()
    out_name = "probabilities" if model.softmax else "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (to_input(x_check[:2]),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=[out_name],
            export_params=True,
            do_constant_folding=True,
            dynamic_axes={"image": {0: "batch"}, out_name: {0: "batch"}},
        )
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = to_input(x_check)
    with torch.no_grad():
        ref = model(xb).numpy()
    got = sess.run(None, {"image": xb.numpy()})[0]
    err = float(np.abs(got - ref).max())
    assert err < 1e-4, f"{path.name}: ORT vs torch max abs diff {err}"
    log(
        f"  exported {path.name} ({path.stat().st_size / 1024:.1f} KB), ORT vs torch max|diff| {err:.2e}"
    )


def ort_predict(path: Path, x_uint8: np.ndarray, batch: int = 500) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [
        sess.run(None, {"image": x_uint8[i : i + batch].astype(np.float32) / 255.0})[0]
        for i in range(0, len(x_uint8), batch)
    ]
    return np.concatenate(outs)


def onnx_param_count(path: Path) -> int:
    m = onnx.load(str(path))
    return int(
        sum(np.prod(t.dims) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    )


# ----------------------------------------------------------------------------------------
# 5-7. Images, README, Grad-CAM fixtures
# ----------------------------------------------------------------------------------------


def write_images(x_test: np.ndarray, y_test: np.ndarray) -> None:
    img_dir = OUT / "images"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    per_class = [
        N_IMAGES // NUM_CLASSES + (1 if c < N_IMAGES % NUM_CLASSES else 0)
        for c in range(NUM_CLASSES)
    ]
    for c, name in enumerate(CLASS_NAMES):
        d = img_dir / str(c)
        d.mkdir(parents=True)
        idx = np.flatnonzero(y_test == c)[: per_class[c]]  # the first ones: no cherry-picking
        for j, i in enumerate(idx):
            Image.fromarray(x_test[i].transpose(1, 2, 0), "RGB").save(
                d / f"{name}_{j:03d}.png", optimize=True
            )
    (OUT / "class_names.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))


def load_images() -> tuple[list[str], np.ndarray, np.ndarray]:
    """The written PNGs, sorted by relative posix path: (paths, uint8 NCHW, labels)."""
    img_dir = OUT / "images"
    files = sorted(img_dir.rglob("*.png"), key=lambda p: p.relative_to(img_dir).as_posix())
    paths = [p.relative_to(img_dir).as_posix() for p in files]
    x = np.stack(
        [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1) for p in files]
    )
    labels = np.array([int(p.split("/")[0]) for p in paths], dtype=np.int64)
    return paths, x, labels


def gradcam(model: Net, x_uint8: np.ndarray) -> dict[str, np.ndarray]:
    """Reference Grad-CAM (float64 autograd) at the input of the head (last conv block ReLU)."""
    m = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(x_uint8).double() / 255.0
    a = m.features(x).detach().requires_grad_(True)
    z = m.head(a)
    target = z.argmax(1)
    (grad,) = torch.autograd.grad(z.gather(1, target[:, None]).sum(), a)
    alpha = grad.mean(dim=(2, 3))
    raw = F.relu((alpha[:, :, None, None] * a).sum(1))
    return {
        "logits": z.detach().numpy().astype(np.float32),
        "targets": target.numpy().astype(np.int64),
        "weights": alpha.numpy().astype(np.float32),
        "raw": raw.detach().numpy().astype(np.float32),
        "features": a.detach().numpy().astype(np.float32),
    }


def check_feature_map(path: Path, x_uint8: np.ndarray, ref: np.ndarray) -> str:
    """Expose the tensor the head consumes as an output of an in-memory copy; compare."""
    m = onnx.load(str(path))
    consumers = {"GlobalAveragePool", "Flatten"}
    node = next(n for n in m.graph.node if n.op_type in consumers)
    name = node.input[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feat = sess.run([name], {"image": x_uint8.astype(np.float32) / 255.0})[0]
    err = float(np.abs(feat - ref).max())
    assert feat.shape == ref.shape and err < 1e-4, (path.name, feat.shape, ref.shape, err)
    return name


def write_readme(
    rows: list[dict], n_images: int, total_kb: float, epochs: int, ft_epochs: int
) -> None:
    lines = [
        "# Sample models",
        "",
        "Small image classifiers and pruned versions of them, for trying out and testing",
        "onnx-sp2ps. Everything here (models, images, `class_names.txt`, this README) and the",
        "Grad-CAM fixtures `tests/fixtures/gradcam_*.npz` are made by one deterministic run of",
        "",
        "```",
        "pip install -r scripts/requirements-dev.txt   # torch==2.13.0 (CPU), onnx, onnxruntime, numpy, pillow",
        "python scripts/build_sample_models.py",
        "python scripts/make_reference_cams.py   # also run by the line above: "
        "tests/fixtures/cams_*.npz (pytorch-grad-cam, see requirements-dev.txt)",
        "```",
        "",
        "(fixed seeds, deterministic algorithms, 2 CPU threads; PyTorch is needed only for this",
        "script, never at run time or in the test suite).",
        "",
        "## Data",
        "",
        f"Synthetic 64x64 RGB images, {NUM_CLASSES} classes by **shape**: "
        + ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES))
        + ".",
        "Each image holds one filled shape with a random colour (independent of the class),",
        "random position, size (18-34 px) and rotation, on a cluttered background: a random",
        "colour gradient, stripes of random period/orientation/colour, soft colour blobs, thin",
        "random lines and small dots (drawn with the same colour distribution as the objects,",
        "a few of them over the object) and Gaussian noise. Only the shape tells the class, so",
        "a good model has to look at the object.",
        f"Splits (balanced): train {N_TRAIN} (seed {SEEDS['train']}), val {N_VAL} (seed {SEEDS['val']}),",
        f"test {N_TEST} (seed {SEEDS['test']}).",
        "",
        f"`images/<class_index>/<class_name>_<nnn>.png`: {n_images} test-split images, the first",
        f"{n_images // NUM_CLASSES}-{-(-n_images // NUM_CLASSES)} of each class in split order (not selected for being classified",
        "correctly).",
        "`class_names.txt`: one class name per line, in class-index order.",
        "",
        "## Models",
        "",
        "Input `image`: float32 NCHW `[batch, 3, 64, 64]` = uint8 RGB / 255.0 (no mean/std).",
        "",
        "- `gap_*`: Conv-BN-ReLU x4 (16-32-64-96 channels; the first conv is 5x5 stride 2, the",
        "  others 3x3 with MaxPool 2x2 after the second and third) -> 8x8 feature map ->",
        "  GlobalAveragePool -> Flatten -> Linear(4) -> **Softmax**; output",
        "  `probabilities` `[batch, 4]`.",
        "- `fc_*`: Conv-BN-ReLU x4 (16-32-32-32 channels, same pooling) -> 8x8 feature map ->",
        "  Flatten -> Linear(64) -> ReLU -> Linear(4); output `logits` `[batch, 4]` (no softmax).",
        "",
        "Exported with `torch.onnx.export(..., dynamo=False, opset_version=17)` (TorchScript",
        "exporter), eval mode, dynamic batch axis, weights embedded (no external data). The",
        "exporter folds BatchNorm into the Conv weights. Each file passes",
        "`onnx.checker.check_model(full_check=True)` and matches PyTorch within 1e-4 in ONNX Runtime.",
        "",
        "Pruning is L1-norm filter pruning (Li et al. 2017, per-layer criterion: keep the",
        "filters with the largest sum of |weights|) or random filter pruning, applied to every",
        "conv layer including the last one with the given ratio of channels removed; the",
        "channels are physically removed (smaller Conv/BN layers; the next layer's input",
        "channels and, for `fc`, the matching columns of the first Linear). `_ft` = fine-tuned",
        f"for {ft_epochs} epochs afterwards (AdamW, one-cycle lr 2e-3). The originals were trained",
        f"for {epochs} epochs (AdamW, one-cycle lr 4e-3, batch 128, random flips/transposes).",
        "Parameters are counted in the ONNX file (float initializers, BN folded).",
        "",
        "| file | head | pruning | ratio | fine-tuned | channels | parameters | size (KB) | test acc | acc on images |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['file']}` | {r['head']} | {r['method']} | {r['ratio']} | {r['ft']} | {r['widths']} | "
            f"{r['params']:,} | {r['kb']:.1f} | {r['test_acc'] * 100:.2f} % | "
            f"{r['img_correct']}/{n_images} ({r['img_acc'] * 100:.0f} %) |"
        )
    lines += [
        "",
        f"Test acc: on the {N_TEST}-image test split, computed with ONNX Runtime. Total size of",
        f"`sample_models/`: {total_kb:.0f} KB.",
        "",
        "## Grad-CAM fixtures",
        "",
        "`tests/fixtures/gradcam_{" + ",".join(FIXTURE_STEMS) + "}.npz`: reference Grad-CAM",
        "computed with PyTorch autograd (float64) on the images above, loaded back from the PNG",
        "files and sorted by relative posix path. Keys: `paths` (N,) str, `labels` (N,) int64,",
        "`targets` (N,) int64 (the model's own top-1), `logits` (N, K) float32 (pre-softmax),",
        "`weights` (N, C) float32 (alpha_k = mean_ij d logit_target / d A_kij), `raw` (N, 8, 8)",
        "float32 = ReLU(sum_k alpha_k A_k), where A is the output of the last conv block's ReLU",
        "(the input of GlobalAveragePool for `gap`, of Flatten for `fc`).",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=16, help="training epochs of the original models")
    ap.add_argument(
        "--ft-epochs", type=int, default=5, help="fine-tune epochs of the pruned models"
    )
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for p in OUT.glob("*.onnx"):
        p.unlink()

    log("generating data ...")
    t0 = time.time()
    splits = {
        k: make_split(SEEDS[k], n)
        for k, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST))
    }
    log(f"  done in {time.time() - t0:.1f}s")
    xtr, ytr = (torch.from_numpy(a) for a in splits["train"])
    xva, yva = (torch.from_numpy(a) for a in splits["val"])
    x_test_np, y_test_np = splits["test"]
    xte, yte = torch.from_numpy(x_test_np), torch.from_numpy(y_test_np)
    data = (xtr, ytr, xva, yva)

    write_images(x_test_np, y_test_np)
    paths, x_img, y_img = load_images()
    log(f"wrote {len(paths)} images to {OUT / 'images'}")

    x_check = xte[:64]
    models: dict[str, tuple[Net, dict]] = {}
    for hi, head in enumerate(("gap", "fc")):
        log(f"training {head} ...")
        model = make_model(head)
        train(model, data, args.epochs, lr=4e-3, seed=10 + hi, tag=f"{head}_original")
        acc = accuracy(model, xte, yte)
        log(f"{head}_original: test acc {acc:.4f}, {n_params(model):,} params")
        if acc < 0.95:
            log(f"WARNING: {head}_original test accuracy {acc:.4f} < 0.95")
        models[f"{head}_original"] = (model, dict(head=head, method="none", ratio="-", ft="no"))

        variants = []
        for r in RATIOS:
            variants.append(("l1", r, False))
            variants.append(("l1", r, True))
        variants.append(("random", 0.6, True))
        for vi, (method, r, ft) in enumerate(variants):
            stem = f"{head}_{method}_{int(round(r * 100))}" + ("_ft" if ft else "")
            pruned = prune(model, r, method, seed=100 + hi)
            if ft:
                train(pruned, data, args.ft_epochs, lr=2e-3, seed=20 + 10 * hi + vi, tag=stem)
            acc = accuracy(pruned, xte, yte)
            log(
                f"{stem}: channels {pruned.widths}, test acc {acc:.4f}, {n_params(pruned):,} params"
            )
            models[stem] = (
                pruned,
                dict(
                    head=head,
                    method=method,
                    ratio=f"{int(round(r * 100))} %",
                    ft="yes" if ft else "no",
                ),
            )

    log("exporting ...")
    order = [
        f"{h}_{s}"
        for h in ("gap", "fc")
        for s in ("original", "l1_30", "l1_30_ft", "l1_60", "l1_60_ft", "random_60_ft")
    ]
    rows = []
    for stem in order:
        model, meta = models[stem]
        path = OUT / f"{stem}.onnx"
        export(model, path, x_check)
        probs = ort_predict(path, x_test_np)
        test_acc = float((probs.argmax(1) == y_test_np).mean())
        img_pred = ort_predict(path, x_img).argmax(1)
        rows.append(
            dict(
                file=path.name,
                widths="-".join(map(str, model.widths)),
                params=onnx_param_count(path),
                kb=path.stat().st_size / 1024,
                test_acc=test_acc,
                img_correct=int((img_pred == y_img).sum()),
                img_acc=float((img_pred == y_img).mean()),
                **meta,
            )
        )
        log(
            f"  {stem}: ONNX test acc {test_acc:.4f}, images {rows[-1]['img_correct']}/{len(paths)}"
        )

    log("Grad-CAM fixtures ...")
    for stem in FIXTURE_STEMS:
        model, _ = models[stem]
        cam = gradcam(model, x_img)
        path = OUT / f"{stem}.onnx"
        feat_name = check_feature_map(path, x_img, cam["features"])
        onnx_top1 = ort_predict(path, x_img).argmax(1)
        assert np.array_equal(onnx_top1, cam["targets"]), (
            f"{stem}: ONNX top-1 differs from the fixture"
        )
        fx = FIXTURES / f"gradcam_{stem}.npz"
        np.savez_compressed(
            fx,
            paths=np.array(paths, dtype=np.str_),
            labels=y_img,
            targets=cam["targets"],
            logits=cam["logits"],
            raw=cam["raw"],
            weights=cam["weights"],
        )
        log(
            f"  {fx.relative_to(REPO)}: raw {cam['raw'].shape}, weights {cam['weights'].shape}, "
            f"feature tensor in ONNX: {feat_name!r}, {fx.stat().st_size / 1024:.1f} KB"
        )

    for _ in range(2):  # twice, so that the total includes the README itself
        total_kb = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file()) / 1024
        write_readme(rows, len(paths), total_kb, args.epochs, args.ft_epochs)
    log(f"sample_models/: {total_kb:.0f} KB in total")
    log(f"done in {time.time() - t_start:.0f}s")

    # Reference maps of every CAM method (pytorch-grad-cam, torch autograd):
    # tests/fixtures/cams_*.npz, in a process of its own (it uses a torchvision stand-in).
    import subprocess

    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("make_reference_cams.py"))], check=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

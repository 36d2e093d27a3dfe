#!/usr/bin/env python
"""Reference CAMs of the sample models from PyTorch and pytorch-grad-cam (``grad-cam``).

Dev-only (needs torch and grad-cam, see scripts/requirements-dev.txt; no torchvision: a
stand-in for the few names pytorch-grad-cam imports lives in ``scripts/_stubs`` and is put
first on ``sys.path`` by this script only). For each of the sample models gap_original,
gap_l1_60, fc_original and fc_l1_60:

1. the ONNX graph is executed by a small PyTorch interpreter (:class:`OnnxNet`, float64,
   weights = the ONNX initializers), without a final Softmax (the reference scores
   pre-softmax logits); the feature map (the tensor onnx-sp2ps detects, the input of the
   GlobalAveragePool / Flatten that starts the head) passes through an ``nn.Identity``,
   pytorch-grad-cam's target layer; its logits are checked against ONNX Runtime (CPU);
2. the target of each image is the model's own top-1 class (``ClassifierOutputTarget``);
3. pytorch-grad-cam's GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, AblationCAM
   (``ratio_channels_to_ablate=1.0``), ScoreCAM (default batch size) and EigenCAM are run
   through their normal ``__call__`` (``aug_smooth=False, eigen_smooth=False``); the raw
   map at feature resolution is what ``get_cam_image`` returns inside the library's
   ``compute_cam_per_layer``, clipped at 0 as the library does before scaling;
4. ReciproCAM (not in pytorch-grad-cam) is written here independently in torch;
5. exact per-position gradients d logit_target / dA of the first 10 images by autograd.

Output ``tests/fixtures/cams_{stem}.npz`` (np.savez_compressed):

- ``paths`` (N,) str: image paths relative to sample_models/images, sorted (posix);
- ``targets`` (N,) int64: the model's own top-1 class; ``logits`` (N, K) float32;
- ``raw_<method>`` (N, h, w) float32, method in gradcam, gradcampp, xgradcam, hirescam,
  layercam, ablationcam, scorecam, eigencam, reciprocam: max(get_cam_image(...), 0) (for
  reciprocam the map itself, probabilities);
- ``eigen_projection`` (N, h, w) float32: EigenCAM's get_cam_image before the clip (its
  sign is arbitrary, see README "CAM methods": the test applies onnx-sp2ps' sign rule);
- ``grads`` (10, C, h, w) float32 and ``grad_paths`` (10,) str;
- ``feature_name`` str, ``logits_name`` str, ``gradcam_version`` str.

Usage (from the repository root; also run at the end of build_sample_models.py)::

    python scripts/make_reference_cams.py [--stems gap_original ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_models"
FIXTURES = REPO / "tests" / "fixtures"
STUBS = Path(__file__).resolve().parent / "_stubs"
STEMS = ("gap_original", "gap_l1_60", "fc_original", "fc_l1_60")
N_GRADS = 10
CHUNK = 10  # images per call of a pytorch-grad-cam method (bounds Score-CAM's memory)

# pytorch-grad-cam imports torchvision (which has no build for the pinned torch): use the
# stand-in, for this process only.  tqdm bars of ScoreCAM/AblationCAM: off.
sys.path.insert(0, str(STUBS))
sys.path.insert(1, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from PIL import Image  # noqa: E402

try:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError as exc:  # pragma: no cover
    sys.exit(
        f"make_reference_cams.py needs pytorch-grad-cam ({exc}); install it without its "
        "dependencies (they include torchvision): pip install --no-deps grad-cam==1.5.7 "
        "&& pip install ttach tqdm opencv-python-headless matplotlib scikit-learn scipy"
    )

from onnx_sp2ps.model import analyse_model, load_model  # noqa: E402  (feature map name only)

try:
    from importlib.metadata import version as _dist_version

    GRADCAM_VERSION = _dist_version("grad-cam")
except Exception:  # pragma: no cover
    GRADCAM_VERSION = "unknown"

#: fixture key suffix -> pytorch-grad-cam class and constructor options.
LIBRARY_METHODS = {
    "gradcam": (pgc.GradCAM, {}),
    "gradcampp": (pgc.GradCAMPlusPlus, {}),
    "xgradcam": (pgc.XGradCAM, {}),
    "hirescam": (pgc.HiResCAM, {}),
    "layercam": (pgc.LayerCAM, {}),
    "ablationcam": (pgc.AblationCAM, {"ratio_channels_to_ablate": 1.0}),
    "scorecam": (pgc.ScoreCAM, {}),
    "eigencam": (pgc.EigenCAM, {}),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------
# ONNX -> torch interpreter
# ----------------------------------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads2d(pads):
    """ONNX pads [top, left, bottom, right] -> torch padding (symmetric) or None."""
    if not pads or not any(pads):
        return (0, 0), None
    top, left, bottom, right = pads
    if (top, left) == (bottom, right):
        return (top, left), None
    return (0, 0), (left, right, top, bottom)


class OnnxNet(nn.Module):
    """Executes a (small, CNN classifier) ONNX graph with torch ops.

    ``forward(x)`` returns the logits (the input of a final Softmax, which is dropped);
    the feature map passes through ``self.target`` (an ``nn.Identity``, the target layer of
    pytorch-grad-cam).  ``features(x)`` returns the feature map, ``head(a)`` the logits
    from a feature map.  Float initializers are ``nn.Parameter`` (so that activations
    require grad, as pytorch-grad-cam's gradient hooks need).
    """

    OPS = (
        "Conv",
        "Relu",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Reshape",
        "Identity",
        "Dropout",
        "BatchNormalization",
        "Constant",
        "Softmax",
    )

    def __init__(self, model: onnx.ModelProto, feature_name: str, dtype=torch.float64):
        super().__init__()
        g = model.graph
        self.dtype = dtype
        self.feature_name = feature_name
        self.target = nn.Identity()
        self.nodes = list(g.node)
        unknown = sorted({n.op_type for n in self.nodes} - set(self.OPS))
        if unknown:
            raise NotImplementedError(f"ops without a torch rule here: {unknown}")
        inits = {t.name for t in g.initializer}
        self.input_name = next(i.name for i in g.input if i.name not in inits)
        self.params = nn.ParameterList()
        self.key: dict[str, int] = {}
        self.consts: dict[str, np.ndarray] = {}
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            if arr.dtype.kind == "f":
                self.key[t.name] = len(self.params)
                self.params.append(nn.Parameter(torch.from_numpy(arr.astype(np.float64)).to(dtype)))
            else:
                self.consts[t.name] = arr
        # logits: the graph output, or the input of a final Softmax producing it
        out = g.output[0].name
        producer = {o: n for n in self.nodes for o in n.output}
        self.final_softmax = producer.get(out) is not None and producer[out].op_type == "Softmax"
        self.logits_name = producer[out].input[0] if self.final_softmax else out
        if feature_name not in producer:
            raise ValueError(f"feature map {feature_name!r} is not produced by a node")

    # -- evaluation --------------------------------------------------------------------

    def _value(self, env: dict, name: str):
        if name in env:
            return env[name]
        if name in self.key:
            return self.params[self.key[name]]
        if name in self.consts:
            return self.consts[name]
        raise KeyError(name)

    def _available(self, env: dict, name: str) -> bool:
        return name == "" or name in env or name in self.key or name in self.consts

    def _run(self, env: dict, *, through_target: bool, start_after_feature: bool) -> dict:
        started = not start_after_feature
        for node in self.nodes:
            if not started:
                started = self.feature_name in node.output
                continue
            if (
                self.final_softmax
                and node.op_type == "Softmax"
                and node.input[0] == self.logits_name
            ):
                continue  # the final Softmax: the reference scores the logits
            if not all(self._available(env, i) for i in node.input):
                continue
            ins = [self._value(env, i) if i else None for i in node.input]
            outs = self._op(node, ins)
            for name, val in zip(node.output, outs):
                if name == self.feature_name and through_target:
                    val = self.target(val)
                env[name] = val
        return env

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = self._run(
            {self.input_name: x.to(self.dtype)}, through_target=True, start_after_feature=False
        )
        return env[self.logits_name]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        env = self._run(
            {self.input_name: x.to(self.dtype)}, through_target=False, start_after_feature=False
        )
        return env[self.feature_name]

    def head(self, a: torch.Tensor) -> torch.Tensor:
        env = self._run({self.feature_name: a}, through_target=False, start_after_feature=True)
        return env[self.logits_name]

    def _op(self, node: onnx.NodeProto, ins: list):
        op, at = node.op_type, _attrs(node)
        if op == "Conv":
            x, w = ins[0], ins[1]
            b = ins[2] if len(ins) > 2 else None
            assert at.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"), "auto_pad"
            pad, explicit = _pads2d(at.get("pads"))
            if explicit is not None:
                x = F.pad(x, explicit)
            return [
                F.conv2d(
                    x,
                    w,
                    b,
                    stride=tuple(at.get("strides", (1, 1))),
                    padding=pad,
                    dilation=tuple(at.get("dilations", (1, 1))),
                    groups=at.get("group", 1),
                )
            ]
        if op == "Relu":
            return [torch.relu(ins[0])]
        if op in ("MaxPool", "AveragePool"):
            assert at.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"), "auto_pad"
            x = ins[0]
            k = tuple(at["kernel_shape"])
            pad, explicit = _pads2d(at.get("pads"))
            if explicit is not None:
                x = F.pad(x, explicit, value=-float("inf") if op == "MaxPool" else 0.0)
            stride = tuple(at.get("strides", (1,) * len(k)))
            ceil = bool(at.get("ceil_mode", 0))
            if op == "MaxPool":
                return [
                    F.max_pool2d(
                        x, k, stride, pad, tuple(at.get("dilations", (1, 1))), ceil_mode=ceil
                    )
                ] + [None] * (len(node.output) - 1)
            return [
                F.avg_pool2d(
                    x,
                    k,
                    stride,
                    pad,
                    ceil_mode=ceil,
                    count_include_pad=bool(at.get("count_include_pad", 0)),
                )
            ]
        if op == "GlobalAveragePool":
            return [ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)]
        if op == "Flatten":
            axis = at.get("axis", 1)
            x = ins[0]
            axis = axis % x.dim() if x.dim() else 0
            lead = int(np.prod(x.shape[:axis])) if axis else 1
            return [x.reshape(lead, -1)]
        if op == "Gemm":
            a, b = ins[0], ins[1]
            if at.get("transA", 0):
                a = a.t()
            if at.get("transB", 0):
                b = b.t()
            y = at.get("alpha", 1.0) * (a @ b)
            if len(ins) > 2 and ins[2] is not None:
                y = y + at.get("beta", 1.0) * ins[2]
            return [y]
        if op == "MatMul":
            return [ins[0] @ ins[1]]
        if op == "Add":
            return [ins[0] + ins[1]]
        if op == "Mul":
            return [ins[0] * ins[1]]
        if op == "Reshape":
            shape = [int(s) for s in np.asarray(ins[1]).ravel()]
            x = ins[0]
            if not at.get("allowzero", 0):
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return [x.reshape(shape)]
        if op in ("Identity", "Dropout"):
            return [ins[0]] + [None] * (len(node.output) - 1)
        if op == "BatchNormalization":
            x, scale, bias, mean, var = ins[:5]
            return [
                F.batch_norm(x, mean, var, scale, bias, training=False, eps=at.get("epsilon", 1e-5))
            ]
        if op == "Constant":
            return [torch.from_numpy(numpy_helper.to_array(at["value"]).copy())]
        if op == "Softmax":
            return [torch.softmax(ins[0], dim=at.get("axis", -1))]
        raise NotImplementedError(op)


# ----------------------------------------------------------------------------------------
# data, ONNX Runtime check
# ----------------------------------------------------------------------------------------


def load_images(img_dir: Path) -> tuple[list[str], np.ndarray]:
    """PNGs sorted by relative posix path; float32 NCHW = uint8 RGB / 255.0."""
    files = sorted(img_dir.rglob("*.png"), key=lambda p: p.relative_to(img_dir).as_posix())
    paths = [p.relative_to(img_dir).as_posix() for p in files]
    x = np.stack(
        [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1) for p in files]
    ).astype(np.float32) / np.float32(255.0)
    return paths, x


def ort_logits(model: onnx.ModelProto, logits_name: str, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime (CPU) value of ``logits_name`` (added as a graph output if needed)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if logits_name not in [o.name for o in m.graph.output]:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(logits_name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([logits_name], {sess.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------


def library_raw(
    net: OnnxNet, cls, options: dict, x: torch.Tensor, targets: np.ndarray
) -> np.ndarray:
    """The library's raw maps at feature resolution: what ``get_cam_image`` returns inside
    ``compute_cam_per_layer`` during a normal ``__call__`` (unclipped)."""
    out = []
    for s in range(0, len(x), CHUNK):
        cam = cls(model=net, target_layers=[net.target], **options)
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
        assert len(captured) == 1, f"{cls.__name__}: get_cam_image called {len(captured)} times"
        out.append(captured[0])
    return np.concatenate(out)


def reciprocam(net: OnnxNet, a: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """ReciproCAM, single-cell mosaics: R_ij = softmax(head(A with only cell ij kept))_c."""
    n, _, h, w = a.shape
    rows = torch.arange(n)
    tg = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    out = torch.zeros(n, h, w, dtype=a.dtype)
    with torch.no_grad():
        for i in range(h):
            for j in range(w):
                mosaic = torch.zeros_like(a)
                mosaic[:, :, i, j] = a[:, :, i, j]
                out[:, i, j] = torch.softmax(net.head(mosaic), dim=1)[rows, tg]
    return out.numpy()


def autograd_gradients(net: OnnxNet, x: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """d logit_target / dA (N, C, h, w) with plain autograd."""
    with torch.no_grad():
        a0 = net.features(x)
    a = a0.clone().requires_grad_(True)
    y = net.head(a)
    tg = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    y[torch.arange(len(a)), tg].sum().backward()
    return a.grad.numpy()


def make_fixture(
    stem: str, paths: list[str], x_np: np.ndarray, out_dir: Path, samples: Path = SAMPLES
) -> Path:
    t0 = time.time()
    path = samples / f"{stem}.onnx"
    model = onnx.load(str(path))
    feature_name = analyse_model(load_model(path)).feature_map.name
    net = OnnxNet(model, feature_name).eval()
    x = torch.from_numpy(x_np).double()

    with torch.no_grad():
        logits = net(x).numpy()
        a = net.features(x)
    ref = ort_logits(model, net.logits_name, x_np)
    err = float(np.abs(logits - ref).max())
    assert err <= 1e-4, f"{stem}: torch interpreter vs ONNX Runtime logits differ by {err:.2e}"
    targets = logits.argmax(1).astype(np.int64)
    assert np.array_equal(targets, ref.argmax(1)), f"{stem}: top-1 differs from ONNX Runtime"
    log(
        f"{stem}: feature map {feature_name!r} {tuple(a.shape[1:])}, logits {net.logits_name!r} "
        f"(final Softmax dropped: {net.final_softmax}); |torch - ORT| max {err:.1e}"
    )

    data = dict(
        paths=np.array(paths, dtype=np.str_),
        targets=targets,
        logits=logits.astype(np.float32),
        feature_name=np.str_(feature_name),
        logits_name=np.str_(net.logits_name),
        gradcam_version=np.str_(GRADCAM_VERSION),
    )
    for key, (cls, options) in LIBRARY_METHODS.items():
        t1 = time.time()
        raw = library_raw(net, cls, options, x, targets)
        if key == "eigencam":
            data["eigen_projection"] = raw.astype(np.float32)
        data[f"raw_{key}"] = np.maximum(raw, 0).astype(np.float32)
        log(f"  {key:12s} {raw.shape} in {time.time() - t1:.1f}s")
    data["raw_reciprocam"] = reciprocam(net, a, targets).astype(np.float32)

    grads = autograd_gradients(net, x[:N_GRADS], targets[:N_GRADS])
    data["grads"] = grads.astype(np.float32)
    data["grad_paths"] = np.array(paths[:N_GRADS], dtype=np.str_)

    # sanity: Grad-CAM from the autograd gradients equals the library's
    alpha = grads.mean(axis=(2, 3))
    mine = np.maximum(np.einsum("nc,nchw->nhw", alpha, a[:N_GRADS].numpy()), 0)
    lib = data["raw_gradcam"][:N_GRADS]
    assert np.allclose(mine, lib, rtol=1e-5, atol=1e-6 * max(1e-12, np.abs(lib).max())), stem

    out = out_dir / f"cams_{stem}.npz"
    np.savez_compressed(out, **data)
    log(
        f"  -> {out.relative_to(REPO) if out.is_relative_to(REPO) else out}: "
        f"{out.stat().st_size / 1024:.1f} KB, {time.time() - t0:.0f}s"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stems", nargs="+", default=list(STEMS), help="sample model stems")
    ap.add_argument("--samples", type=Path, default=SAMPLES, help="models and images/")
    ap.add_argument("--out", type=Path, default=FIXTURES, help="output folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    log(
        f"pytorch-grad-cam (grad-cam) {GRADCAM_VERSION}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}"
    )
    paths, x_np = load_images(args.samples / "images")
    log(f"{len(paths)} images from {args.samples / 'images'}")
    args.out.mkdir(parents=True, exist_ok=True)
    for stem in args.stems:
        make_fixture(stem, paths, x_np, args.out, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an audit costs on top of running the two models (issue: speed and memory).

    python benchmarks/bench_audit.py                      # ResNet-18 pair, 224x224, 256 images
    python benchmarks/bench_audit.py --model sample       # the 64x64 sample models
    python benchmarks/bench_audit.py --memory             # peak RSS, 256 vs 2048 images
    python benchmarks/bench_audit.py --compare-pytorch-grad-cam   # needs torch + grad-cam

Everything is measured in one run and printed as ratios to (a), the floor: plain
onnxruntime inference of the original and the candidate over the same preprocessed
images.  (b) is the Python API's ``audit``, (c) the CLI, (e) the same audit reading a
folder of JPEGs instead of the preprocessed .npy.  Run by hand; never in the tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def pruned_copy(model: onnx.ModelProto, seed: int = 1, noise: float = 0.05) -> onnx.ModelProto:
    """A candidate of the same architecture: weights perturbed (timing only)."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim == 4:
            a = (a * (1 + noise * rng.standard_normal(a.shape))).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out


def make_models(kind: str, workdir: Path) -> tuple[Path, Path, int]:
    if kind == "sample":
        return (ROOT / "sample_models/gap_original.onnx",
                ROOT / "sample_models/gap_l1_30_ft.onnx", 64)
    from models import build_resnet18

    original = build_resnet18(num_classes=1000, size=224, seed=0)
    a, b = workdir / "resnet18.onnx", workdir / "resnet18_candidate.onnx"
    onnx.save(original, a)
    onnx.save(pruned_copy(original), b)
    return a, b, 224


def make_images(n: int, size: int, workdir: Path) -> tuple[Path, Path]:
    """The same images as a JPEG folder and as the preprocessed .npy (unit preset)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = workdir / f"jpeg_{n}_{size}"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        yy, xx = np.mgrid[:size, :size]
        cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
        pixels = (255 * np.clip(blob[..., None] * rng.random(3) + 0.3 * rng.random(
            (size, size, 3)), 0, 1)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    from onnx_sp2ps.data import InputSpec, open_images

    images = open_images(folder, spec=InputSpec("NCHW", 3, size, size))
    array = np.concatenate([b.inputs for b in images.iter_batches(64)])
    npy = workdir / f"images_{n}_{size}.npy"
    np.save(npy, array)
    return folder, npy


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floor_run(paths, array: np.ndarray, batch: int, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                for p in paths]
    names = [s.get_inputs()[0].name for s in sessions]

    def run():
        for start in range(0, len(array), batch):
            x = array[start:start + batch]
            for s, name in zip(sessions, names):
                s.run(None, {name: x})

    run()  # warm-up
    return run


def api_run(paths, images, batch: int, threads: int | None):
    from onnx_sp2ps import audit
    from onnx_sp2ps.pipeline import AuditSettings

    settings = AuditSettings(batch_size=batch, provider="cpu", threads=threads)

    def run():
        audit(paths[0], [paths[1]], images, settings=settings)

    return run


def cli_run(paths, images, batch: int, threads: int | None, out: Path):
    cmd = [sys.executable, "-m", "onnx_sp2ps", "audit", str(paths[0]), str(paths[1]),
           "--images", str(images), "--batch-size", str(batch), "--provider", "cpu",
           "--out", str(out), "--overlays", "none", "--worst", "0", "-q"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run():
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)

    return run


def profile_split(paths, npy: Path, batch: int, threads: int | None) -> dict:
    """Time inside one API audit: model runs vs maps and similarity (monkeypatched)."""
    import onnx_sp2ps.pipeline as pipeline
    import onnx_sp2ps.runtime as runtime

    spent = {"runs": 0.0, "maps": 0.0, "score": 0.0}
    original_run = runtime.ModelRunner.run
    original_maps = pipeline._Explainer.maps
    original_score = pipeline.score_pairs

    def timed(key, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    runtime.ModelRunner.run = timed("runs", original_run)
    pipeline._Explainer.maps = timed("maps", original_maps)
    pipeline.score_pairs = timed("score", original_score)
    try:
        start = time.perf_counter()
        api_run(paths, npy, batch, threads)()
        spent["total"] = time.perf_counter() - start
    finally:
        runtime.ModelRunner.run = original_run
        pipeline._Explainer.maps = original_maps
        pipeline.score_pairs = original_score
    return spent


def peak_rss(paths, images: Path, batch: int) -> float:
    """Peak RSS (MB) of a fresh process auditing ``images``."""
    code = ("import resource, sys; sys.path.insert(0, %r)\n"
            "from onnx_sp2ps import audit\n"
            "from onnx_sp2ps.pipeline import AuditSettings\n"
            "audit(%r, [%r], %r, settings=AuditSettings(batch_size=%d, provider='cpu'))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            % (str(ROOT), str(paths[0]), str(paths[1]), str(images), batch))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "sample"], default="resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak RSS for 256 and 2048 images")
    parser.add_argument("--compare-pytorch-grad-cam", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_models(args.model, work)[:2]
        size = 224 if args.model == "resnet18" else 64
        folder, npy = make_images(args.images, size, work)
        array = np.load(npy)
        b, t, r = args.batch_size, args.threads, args.repeat
        rows = [("(a) floor: plain onnxruntime, both models", best_of(r, floor_run(paths, array, b, t)))]
        rows.append(("(b) audit, Python API, .npy", best_of(r, api_run(paths, npy, b, t))))
        rows.append(("(c) audit, CLI, .npy", best_of(r, cli_run(paths, npy, b, t, work / "out"))))
        rows.append(("(e) audit, Python API, JPEG folder", best_of(r, api_run(paths, folder, b, t))))
        split = profile_split(paths, npy, b, t)
        floor = rows[0][1]
        print(f"\n{args.model}, {args.images} images at {size}x{size}, batch {b}, "
              f"threads {t or 'all'}, best of {r}\n")
        print("| measurement | seconds | ms per image | ratio to (a) |")
        print("|---|---:|---:|---:|")
        for name, sec in rows:
            print(f"| {name} | {sec:.3f} | {1000 * sec / args.images:.2f} | {sec / floor:.3f}x |")
        rest = split["maps"] + split["score"]
        print(f"\nInside one API audit: model runs {split['runs']:.3f} s, maps (CAM, "
              f"upsampling, normalising) {split['maps']:.3f} s, similarity "
              f"{split['score']:.3f} s = {rest / split['total']:.1%} of {split['total']:.3f} s; "
              f"JPEG folder vs .npy: {rows[3][1] / rows[1][1]:.3f}x")
        if args.memory:
            small = peak_rss(paths, npy, b)
            big_folder, big_npy = make_images(2048, size, work)
            big = peak_rss(paths, big_npy, b)
            print(f"\nPeak RSS: 256 images {small:.0f} MB, 2048 images {big:.0f} MB "
                  f"({big / small:.3f}x)")
        if args.compare_pytorch_grad_cam:
            print("\n--compare-pytorch-grad-cam: not implemented in this version "
                  "(needs torch models of the same weights).")


if __name__ == "__main__":
    main()

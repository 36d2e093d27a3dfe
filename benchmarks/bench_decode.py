"""Can image decoding keep up with inference? (issue 12, section 4)

    python benchmarks/bench_decode.py                 # accuracy + timings, 128 images
    python benchmarks/bench_decode.py --images 32 --repeat 2   # quicker look
    python benchmarks/bench_decode.py --no-timing     # pixel and score differences only

Images: 1920x1080 JPEGs at quality 90 of two kinds, half each: *synthetic* (smooth
random fields at three scales, hard-edged shapes, Gaussian noise) and *photo-like* (a
mosaic of the photographs shipped with scikit-image, enlarged 1-2.2x, with a grass,
gravel or brick texture at full resolution and sensor-like noise; synthetic only when
scikit-image is not installed).

Part 1, accuracy: every image through the library's preprocessing (unit preset) with
the exact path and with ``fast_decode``; the largest and the mean absolute difference in
0..255 units, for --center-crop 224 (resize 455x256, then crop), a plain 224x224
resize and a 64x64 resize (the sample models' size: 1080p to 64 is extreme but valid).
For scale, the exact path's own difference from the uncompressed pixels (what JPEG
quality 90 costs once resized). Then the effect on the audit: the sample pair
(gap_original vs gap_l1_30_ft, 64x64) audited on the folder both ways: largest change of
a per-image Sp2PS, of the mean Sp2PS, and top-1 changes of the original.

Part 2, timings (ResNet-18 vs its L1-pruned copy from models.py, --center-crop 224,
default Grad-CAM audit through the Python API, batch 16, best of --repeat interleaved
rounds): the same images as preprocessed .npy inputs (made by the exact path) against
the JPEG folder with the exact and the fast path. Target: JPEG folder / .npy <= 1.15x.

Not part of the test suite, and never imported by it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_audit import make_pair  # noqa: E402
from bench_cams import SETTLE_S  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
QUALITY = 90
#: JPEG folder / .npy allowed (the fast path).
TARGET = 1.15
PHOTOS = (
    "coffee.png",
    "astronaut.png",
    "chelsea.png",
    "motorcycle_left.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "rocket.jpg",
    "ihc.png",
)
TEXTURES = ("grass.png", "gravel.png", "brick.png")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- images -----------------------------------------------------------------------------


def synthetic(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: smooth random fields + hard-edged shapes + noise."""
    from scipy import ndimage

    field = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    for sigma, amplitude in ((120, 90), (30, 40), (6, 15)):
        small = rng.standard_normal((HEIGHT // 4, WIDTH // 4, 3))
        smooth = ndimage.gaussian_filter(small, (sigma / 4, sigma / 4, 0))
        smooth = ndimage.zoom(smooth, (4, 4, 1), order=1)
        field += amplitude * smooth / smooth.std()
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for _ in range(12):
        cx, cy, r = rng.integers(0, WIDTH), rng.integers(0, HEIGHT), rng.integers(30, 300)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r / 2)
        field[mask] = field[mask] * 0.3 + rng.uniform(-100, 100, 3)
    field += rng.normal(0, 6, field.shape)
    return np.clip(field + 128, 0, 255).astype(np.uint8)


def photo_like(rng: np.random.Generator, folder: Path) -> np.ndarray:
    """(H, W, 3) uint8: a mosaic of real photographs + a full-resolution texture + noise."""
    from PIL import Image

    canvas = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    for _ in range(10):
        with Image.open(folder / PHOTOS[rng.integers(len(PHOTOS))]) as opened:
            image = opened.convert("RGB")
        factor = rng.uniform(1.0, 2.2)
        size = (int(image.width * factor), int(image.height * factor))
        pixels = np.asarray(image.resize(size, Image.Resampling.BICUBIC), np.float32)
        x, y = rng.integers(-200, WIDTH - 200), rng.integers(-200, HEIGHT - 200)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + pixels.shape[1], WIDTH), min(y + pixels.shape[0], HEIGHT)
        canvas[y0:y1, x0:x1] = pixels[y0 - y : y1 - y, x0 - x : x1 - x]
    with Image.open(folder / TEXTURES[rng.integers(len(TEXTURES))]) as opened:
        texture = np.asarray(opened.convert("L"), np.float32)
    texture = np.tile(texture, (3, 4))[:HEIGHT, :WIDTH]
    canvas += 0.25 * (texture - texture.mean())[..., None]
    canvas += rng.normal(0, 3, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _skimage_data() -> Path | None:
    try:
        import skimage
    except ImportError:
        return None
    folder = Path(skimage.__file__).parent / "data"
    return folder if all((folder / n).exists() for n in PHOTOS + TEXTURES) else None


def make_folder(n: int, workdir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """``n`` JPEGs (half synthetic, half photo-like) and a few uncompressed originals."""
    from PIL import Image

    folder = workdir / f"fullhd_{n}"
    photos = _skimage_data()
    originals: dict[str, np.ndarray] = {}
    if not folder.exists():
        log(f"writing {n} JPEGs of {WIDTH}x{HEIGHT} ...")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        kind = "photo" if photos is not None and i % 2 else "synthetic"
        path = folder / f"{i:05d}_{kind}.jpg"
        if path.exists() and i >= 8:
            continue
        pixels = photo_like(rng, photos) if kind == "photo" and photos else synthetic(rng)
        if i < 8:
            originals[path.name] = pixels
        if not path.exists():
            Image.fromarray(pixels).save(path, quality=QUALITY)
    return folder, originals


# -- part 1: accuracy -------------------------------------------------------------------

CASES = (("--center-crop 224", 224, True), ("224x224", 224, False), ("64x64", 64, False))


def accuracy(folder: Path, originals: dict[str, np.ndarray]) -> list[str]:
    from PIL import Image

    from onnx_sp2ps.data import InputSpec, Preprocess, open_images
    from onnx_sp2ps.data.preprocess import _resize

    out = [
        f"### Fast decoding against the exact path ({len(os.listdir(folder))} {WIDTH}x{HEIGHT} "
        f"JPEGs, quality {QUALITY}; 0..255 units, after resize + crop + normalise)",
        "",
        "| size | images | max abs | mean abs | p99.9 abs | exact vs uncompressed: max / mean |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, size, crop in CASES:
        spec = InputSpec("NHWC", 3, size, size)
        got = {}
        for fast in (False, True):
            images = open_images(
                folder, spec=spec, preprocess=Preprocess(center_crop=crop, fast_decode=fast)
            )
            inputs = np.concatenate([b.inputs for b in images.iter_batches(32)])
            got[fast] = (np.asarray(images.paths), inputs * 255.0)
        paths = got[False][0]
        for kind in ("synthetic", "photo"):
            rows = np.asarray([kind in p for p in paths])
            if not rows.any():
                continue
            diff = np.abs(got[True][1][rows] - got[False][1][rows])
            pre = images.preprocess
            ref = [
                (np.asarray(_resize(Image.fromarray(originals[p]), pre), np.float64), i)
                for i, p in enumerate(paths)
                if p in originals and kind in p
            ]
            jpeg = [np.abs(got[False][1][i] - r) for r, i in ref]
            scale = f"{max(j.max() for j in jpeg):.0f} / {np.mean(jpeg):.3f}" if jpeg else "-"
            out.append(
                f"| {label} | {kind} ({rows.sum()}) | {diff.max():.0f} | {diff.mean():.3f} | "
                f"{np.quantile(diff, 0.999):.0f} | {scale} |"
            )
    return out + [""]


def score_effect(folder: Path) -> list[str]:
    from onnx_sp2ps import audit
    from onnx_sp2ps.data import Preprocess

    pair = make_pair("samples", folder.parent)
    results = {
        fast: audit(
            pair.original, [pair.candidate], folder, preprocess=Preprocess(fast_decode=fast)
        )
        for fast in (False, True)
    }
    exact, fast = results[False], results[True]
    score_e = np.asarray(exact.candidates[0].scores.score, np.float64)
    score_f = np.asarray(fast.candidates[0].scores.score, np.float64)
    delta = np.abs(score_f - score_e)
    flips = int(np.sum(exact.original_predictions != fast.original_predictions))
    flips_c = int(np.sum(exact.candidates[0].predictions != fast.candidates[0].predictions))
    return [
        f"Effect on the audit of the sample pair (64x64, {len(score_e)} images): per-image "
        f"Sp2PS changes by at most {delta.max():.4f} (mean {delta.mean():.4f}); the mean "
        f"Sp2PS {score_e.mean():.4f} (exact) vs {score_f.mean():.4f} (fast); top-1 changes: "
        f"{flips} of the original's, {flips_c} of the candidate's.",
        "",
    ]


# -- part 2: timings --------------------------------------------------------------------


def timings(folder: Path, workdir: Path, repeat: int, batch: int) -> list[str]:
    from onnx_sp2ps import audit
    from onnx_sp2ps.data import InputSpec, Preprocess, open_images
    from onnx_sp2ps.data.sources import _decode_workers
    from onnx_sp2ps.pipeline import AuditSettings

    pair = make_pair("resnet18", workdir)
    n = len(os.listdir(folder))
    npy = workdir / f"fullhd_{n}.npy"
    if not npy.exists():
        log("preprocessing the JPEGs into the .npy (exact path) ...")
        images = open_images(
            folder, spec=InputSpec("NCHW", 3, 224, 224), preprocess=Preprocess(center_crop=True)
        )
        np.save(npy, np.concatenate([b.inputs for b in images.iter_batches(32)]))
    settings = AuditSettings(batch_size=batch)
    passes = {
        ".npy": lambda: audit(pair.original, [pair.candidate], npy, settings=settings),
        "JPEG exact": lambda: audit(
            pair.original,
            [pair.candidate],
            folder,
            preprocess=Preprocess(center_crop=True),
            settings=settings,
        ),
        "JPEG fast": lambda: audit(
            pair.original,
            [pair.candidate],
            folder,
            preprocess=Preprocess(center_crop=True, fast_decode=True),
            settings=settings,
        ),
    }
    best = {name: float("inf") for name in passes}
    for round_ in range(repeat):
        for name, run in passes.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
        log(
            f"  round {round_ + 1}/{repeat}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in best.items())
        )
    floor = best[".npy"]
    out = [
        f"### {pair.description}: {n} {WIDTH}x{HEIGHT} JPEGs, --center-crop 224, batch {batch}, "
        f"{_decode_workers()} decoding threads, best of {repeat} interleaved rounds",
        "",
        "| input | seconds | ms per image | ratio to .npy | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, sec in best.items():
        target = (
            ""
            if name == ".npy"
            else f"<= {TARGET:.2f}x: " + ("met" if sec / floor <= TARGET else "**not met**")
        )
        out.append(f"| {name} | {sec:.2f} | {1000 * sec / n:.1f} | {sec / floor:.3f}x | {target} |")
    return out + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-timing", dest="timing", action="store_false")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    p.add_argument("--workdir", type=Path, default=None, help="keep models and images here")
    args = p.parse_args(argv)
    started = time.perf_counter()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sp2ps-decode-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        folder, originals = make_folder(args.images, workdir)
        if args.accuracy:
            lines += accuracy(folder, originals) + score_effect(folder)
        if args.timing:
            lines += timings(folder, workdir, args.repeat, args.batch_size)
    import PIL

    lines.append(
        f"{os.cpu_count()} CPUs, Pillow {PIL.__version__}; benchmark wall time "
        f"{time.perf_counter() - started:.0f} s."
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

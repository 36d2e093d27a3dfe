"""What the confidence intervals cost (issue 14: at most 5 % of the audit's time for
10,000 images).

    python benchmarks/bench_intervals.py                   # ~1 min
    python benchmarks/bench_intervals.py --images 10000 --candidates 1 5 --repeat 5

Measured in one run, interleaved, best of ``--repeat``:

- the audit's cost per image: ``onnx_sp2ps.audit`` of the sample GAP models (the
  cheapest pair this project has: 64x64, 0.1 ms per forward pass, so the intervals weigh
  most here) on the 50 sample images repeated as an array of ``--audit-images`` images,
  with 1 and 5 candidates; its fixed cost (model preparation, sessions) is taken out by
  timing two sizes, and the audit of ``--images`` images is projected as fixed + per
  image x images;
- ``onnx_sp2ps.intervals.audit_intervals`` on ``--images`` per-image scores drawn like
  the sample models' (beta(8, 2)), 100 classes, the default 2000 resamples, for the same
  numbers of candidates: what ``summarise`` adds.

Prints the ratio intervals / projected audit.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_sp2ps import audit  # noqa: E402
from onnx_sp2ps.intervals import audit_intervals, seed_key  # noqa: E402

SAMPLES = ROOT / "sample_models"
CANDIDATES = ["gap_l1_30_ft", "gap_l1_30", "gap_l1_60_ft", "gap_random_60_ft", "gap_l1_60"]


def _array_of(n: int, folder: Path) -> Path:
    """The sample images as the ``unit`` preset makes them (x / 255, NCHW; they are
    64x64 already), repeated to ``n`` rows, as an .npy file."""
    from PIL import Image

    files = sorted((SAMPLES / "images").rglob("*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files])
    path = folder / f"images_{n}.npy"
    np.save(path, np.resize(x.transpose(0, 3, 1, 2), (n, 3, *x.shape[1:3])))
    return path


def _best(f, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--audit-images", type=int, nargs=2, default=[256, 1024])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    small, large = args.audit_images
    rng = np.random.default_rng(0)
    scores = rng.beta(8.0, 2.0, (max(args.candidates), args.images))
    classes = rng.integers(0, 100, args.images)
    key = seed_key(np.arange(args.images, dtype=np.int64))
    print(f"{args.images:,} images, 2000 resamples; audit: sample GAP models, CPU\n")
    print(
        "| candidates | audit per image (ms) | audit fixed (s) | projected audit (s) "
        "| intervals (s) | intervals / audit |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {n: _array_of(n, Path(tmp)) for n in (small, large)}
        for m in args.candidates:
            models = [SAMPLES / f"{c}.onnx" for c in CANDIDATES[:m]]
            times = {}
            for n, path in arrays.items():
                times[n] = _best(
                    lambda path=path: audit(SAMPLES / "gap_original.onnx", models, path),
                    args.repeat,
                )
            per_image = (times[large] - times[small]) / (large - small)
            fixed = max(times[small] - per_image * small, 0.0)
            projected = fixed + per_image * args.images
            cost = _best(
                lambda m=m: audit_intervals(list(scores[:m]), classes, key=key), args.repeat
            )
            print(
                f"| {m} | {per_image * 1e3:.3f} | {fixed:.2f} | {projected:.1f} | "
                f"{cost:.3f} | **{cost / projected:.1%}** |"
            )


if __name__ == "__main__":
    main()

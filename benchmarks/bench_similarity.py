"""What the Sp2PS comparison of one pair of maps costs (issue 6): SSIM and spectra.

    python benchmarks/bench_similarity.py                 # 64x64 and 224x224, ~20 s
    python benchmarks/bench_similarity.py --workers 1 --sizes 224 --repeat 20

Maps like the audit's: ReLU of random 7x7 (224) or 8x8 (64) maps, upsampled bilinearly
and min-max normalised by the library's own ``upsample_bilinear``/``normalise_maps``
(float32, as the pipeline hands them over), candidates a perturbed copy; batches of
``--batch`` (16, the audit's) pairs.

Timed in ``--repeat`` interleaved rounds, best of each, so every ratio compares passes
that saw the same machine load:

- ``before``: the previous implementation, kept here: the five Gaussian-filtered images
  of scikit-image (``scipy.ndimage.gaussian_filter``, mode 'reflect', truncate 3.5) on
  the whole maps, then cropped; spectra from two ``scipy.fft.rfft2`` calls;
- ``after``: the library (``ssim``, ``spectral_similarity``, ``score_pairs``);
- ``skimage``: ``structural_similarity`` per pair, for scale.

Also printed: the largest difference of the library's SSIM from scikit-image's on these
maps and on uniform noise (the test suite's bound is 1e-6).

Not part of the test suite, and never imported by it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_sp2ps.cams.base import normalise_maps, upsample_bilinear  # noqa: E402
from onnx_sp2ps.similarity import score_pairs, spectral_similarity, ssim  # noqa: E402


def cam_like_maps(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, size, size) float32 stacks of CAM images, the second a perturbed first."""
    low = 7 if size % 7 == 0 else 8
    raw = rng.normal(size=(n, low, low))
    other = raw + rng.normal(scale=0.5, size=raw.shape)
    maps = [
        normalise_maps(upsample_bilinear(np.maximum(r, 0), (size, size)))[0] for r in (raw, other)
    ]
    return maps[0], maps[1]


def ssim_before(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """The previous implementation (scikit-image's steps, batched), sigma 1.5."""
    a = maps_a.astype(np.float64)
    b = maps_b.astype(np.float64)

    def smooth(images):
        return ndimage.gaussian_filter(images, sigma=(0.0, 1.5, 1.5), mode="reflect", truncate=3.5)

    c1, c2, pad = 0.01**2, 0.03**2, 5
    mean_a, mean_b = smooth(a), smooth(b)
    cov = smooth(a * b) - mean_a * mean_b
    var_a = smooth(a * a) - mean_a * mean_a
    var_b = smooth(b * b) - mean_b * mean_b
    ssim_map = (
        (2 * mean_a * mean_b + c1)
        * (2 * cov + c2)
        / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    )
    return ssim_map[:, pad:-pad, pad:-pad].mean(axis=(1, 2), dtype=np.float64)


def spectral_before(maps_a: np.ndarray, maps_b: np.ndarray, workers: int) -> np.ndarray:
    a = np.abs(scipy.fft.rfft2(maps_a.astype(np.float64), workers=workers))
    b = np.abs(scipy.fft.rfft2(maps_b.astype(np.float64), workers=workers))
    weights = np.full(a.shape[-1], 2.0)
    weights[0] = 1.0
    if maps_a.shape[-1] % 2 == 0:
        weights[-1] = 1.0
    difference = np.abs(a - b).sum(axis=1) @ weights
    total = (a + b).sum(axis=1) @ weights
    return 1.0 - difference / total


def skimage_ssim(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
            )
            for a, b in zip(maps_a.astype(np.float64), maps_b.astype(np.float64))
        ]
    )


def best_times(functions: dict, repeat: int, inner: int) -> dict[str, float]:
    """Best time of each function over ``repeat`` interleaved rounds of ``inner`` calls."""
    best = dict.fromkeys(functions, float("inf"))
    for function in functions.values():
        function()  # warm-up
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(inner):
                function()
            best[name] = min(best[name], (time.perf_counter() - start) / inner)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--workers", type=int, default=None, help="default: all cores")
    args = p.parse_args()
    workers = args.workers
    fft_workers = workers or -1
    rng = np.random.default_rng(0)
    print(
        f"ms per pair, batches of {args.batch}, workers={workers or 'all'}, "
        f"best of {args.repeat} interleaved rounds"
    )
    print(f"{'size':>7} {'part':<9} {'before':>8} {'after':>8} {'ratio':>6} {'skimage':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        maps_a, maps_b = cam_like_maps(rng, args.batch, size)
        inner = max(1, 20000 // (size * size))
        times = best_times(
            {
                "ssim before": lambda: ssim_before(maps_a, maps_b),
                "ssim after": lambda: ssim(maps_a, maps_b, workers=workers),
                "spectral before": lambda: spectral_before(maps_a, maps_b, fft_workers),
                "spectral after": lambda: spectral_similarity(maps_a, maps_b, workers=workers),
                "score after": lambda: score_pairs(maps_a, maps_b, workers=workers),
            },
            args.repeat,
            inner,
        )
        sk = best_times({"sk": lambda: skimage_ssim(maps_a, maps_b)}, 3, 1)["sk"]
        per_pair = {k: v / args.batch * 1e3 for k, v in times.items()}
        for part in ("ssim", "spectral"):
            before, after = per_pair[f"{part} before"], per_pair[f"{part} after"]
            extra = f"{sk / args.batch * 1e3:8.3f}" if part == "ssim" else ""
            print(
                f"{size:>3}x{size:<3} {part:<9} {before:8.3f} {after:8.3f} "
                f"{before / after:5.2f}x {extra}"
            )
        both_before = per_pair["ssim before"] + per_pair["spectral before"]
        print(
            f"{size:>3}x{size:<3} {'both':<9} {both_before:8.3f} {per_pair['score after']:8.3f} "
            f"{both_before / per_pair['score after']:5.2f}x  (after: score_pairs)"
        )
        noise_a, noise_b = rng.random((2, 4, size, size))
        error = max(
            np.abs(ssim(a, b) - skimage_ssim(a, b)).max()
            for a, b in ((maps_a, maps_b), (noise_a, noise_b))
        )
        print(f"{'':7} max |SSIM - skimage| = {error:.1e} (CAM-like maps and noise)")


if __name__ == "__main__":
    main()

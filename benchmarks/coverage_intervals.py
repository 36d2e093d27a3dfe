"""How often the interval of the mean covers the true mean (issue 14): the coverage table
of README, "Intervals".

    python benchmarks/coverage_intervals.py                  # n = 20, 50, 200; 2000 trials
    python benchmarks/coverage_intervals.py --trials 400 --sizes 20 200

Per-image scores are drawn from distributions shaped like audits' (bounded in [0, 1],
skewed toward 0, with a known mean), seeded:

- ``beta(8, 2)``: mean 0.8, a long tail toward 0 (a candidate that mostly keeps the
  attention);
- ``mixture``: 10 % exact zeros (flat maps) and 90 % beta(6, 1.5): mean 0.72, a point
  mass at the bound as un-fine-tuned pruning gives.

For each size n and each trial, ``onnx_sp2ps.intervals.audit_intervals`` (BCa, the
library's default 2000 resamples, one stratum) gives the 95 % interval of the mean; the
table says in what share of the trials it covers the true mean, with the binomial
standard error of that share, and beside it the plain percentile interval from the same
kind of bootstrap (not what the library uses; shown because it is the other candidate).
Each trial's random numbers come from the trial's number, so every run prints the same
table.  Not part of the test suite (tests/test_intervals.py runs a small version).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_sp2ps.intervals import IntervalSettings, audit_intervals  # noqa: E402

#: name -> (draw n scores, true mean)
DISTRIBUTIONS = {
    "beta(8, 2)": (lambda rng, n: rng.beta(8.0, 2.0, n), 0.8),
    "mixture": (
        lambda rng, n: np.where(rng.random(n) < 0.1, 0.0, rng.beta(6.0, 1.5, n)),
        0.9 * 6.0 / 7.5,
    ),
}


def coverage(
    draw, truth: float, n: int, trials: int, settings: IntervalSettings, seed: int
) -> tuple[float, float, float]:
    """(BCa coverage, percentile coverage, mean BCa width) over ``trials`` samples."""
    bca = pct = 0
    width = 0.0
    alpha = (1 - settings.confidence) / 2
    for t in range(trials):
        rng = np.random.default_rng([seed, n, t])
        x = draw(rng, n)
        key = t.to_bytes(8, "little") + n.to_bytes(8, "little")
        ci = audit_intervals([x], np.zeros(n, np.int64), settings=settings, key=key)
        mean = ci.candidates[0].mean
        bca += mean.low <= truth <= mean.high
        width += mean.width
        reps = x[rng.integers(0, n, size=(settings.resamples, n))].mean(axis=1)
        low, high = np.quantile(reps, [alpha, 1 - alpha])
        pct += low <= truth <= high
    return bca / trials, pct / trials, width / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 200])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    settings = IntervalSettings(confidence=0.95, resamples=args.resamples)
    print(
        f"95 % intervals of the mean, {args.trials} trials each, {args.resamples} resamples "
        "(BCa: the library's; percentile: for comparison)\n"
    )
    print(
        "| distribution | n | BCa coverage | +- (1 s.e.) | percentile coverage | mean BCa width |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for name, (draw, truth) in DISTRIBUTIONS.items():
        for n in args.sizes:
            bca, pct, width = coverage(draw, truth, n, args.trials, settings, args.seed)
            se = (bca * (1 - bca) / args.trials) ** 0.5
            print(f"| {name} | {n} | {bca:.1%} | {se:.1%} | {pct:.1%} | {width:.4f} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

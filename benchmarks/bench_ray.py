"""An audit in one process against the same audit on Ray workers (issue 12, "Ray").

    python benchmarks/bench_ray.py                        # both pairs, ~5 min on 2 cores
    python benchmarks/bench_ray.py --model samples --repeat 1   # quick look
    python benchmarks/bench_ray.py --workdir /tmp/sp2ps-bench   # keep built models/images

Pairs and images as in ``bench_audit.py``: the sample models ``gap_original`` against
``gap_l1_30_ft`` on ``--samples-images`` (default 2048) 64x64 images, and ResNet-18 from
``models.py`` against its L1-pruned copy on ``--resnet-images`` (default 256) 224x224
images, both as preprocessed ``.npy`` files, batches of 16.

Timed in ``--repeat`` interleaved rounds (best of each, so every ratio compares passes
that saw the same machine load):

(local)      ``onnx_sp2ps.audit`` in this process (onnxruntime on all cores);
(ray)        ``onnx_sp2ps.ray_engine.audit`` with ``--workers`` actors of
             ``--cpus-per-worker`` CPUs on a Ray instance this script started once (its
             start is not timed): what the engine costs on a running cluster;
(local-cli)  ``onnx-sp2ps audit --engine local -q`` in a fresh process;
(ray-cli)    ``onnx-sp2ps audit --engine ray --workers N -q`` in a fresh process, which
             starts its own local Ray instance and shuts it down.

It checks that (ray) gives the same per-image scores as (local), bit for bit, and prints
ray / local and ray-cli / local-cli. Target (ray / local): <= 1.25x. Not part of the test
suite, and never imported by it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_audit import Pair, interleaved, log, make_images, make_pair  # noqa: E402

#: (ray) / (local) allowed.
TARGET = 1.25


def local_pass(pair: Pair, npy: Path, batch: int) -> object:
    from onnx_sp2ps.pipeline import AuditSettings, audit

    return audit(pair.original, [pair.candidate], npy, settings=AuditSettings(batch_size=batch))


def ray_pass(pair: Pair, npy: Path, batch: int, workers: int, cpus: float) -> object:
    from onnx_sp2ps.pipeline import AuditSettings
    from onnx_sp2ps.ray_engine import RayOptions, audit

    return audit(
        pair.original,
        [pair.candidate],
        npy,
        settings=AuditSettings(batch_size=batch),
        options=RayOptions(workers=workers, cpus_per_worker=cpus),
    )


def cli_pass(pair: Pair, npy: Path, batch: int, engine: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "onnx_sp2ps", "audit", str(pair.original), str(pair.candidate)]
    cmd += ["--images", str(npy), "--batch-size", str(batch), "-q", *engine]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def same_scores(a: object, b: object) -> bool:
    ca, cb = a.candidates[0], b.candidates[0]  # type: ignore[attr-defined]
    return bool(
        np.array_equal(a.indices, b.indices)  # type: ignore[attr-defined]
        and np.array_equal(ca.scores.score, cb.scores.score, equal_nan=True)
        and np.array_equal(ca.predictions, cb.predictions)
    )


def bench(pair: Pair, n: int, args, workdir: Path) -> list[str]:
    _, npy = make_images(n, pair.size, workdir)
    b, w, c = args.batch_size, args.workers, args.cpus_per_worker
    ray_cli = ["--engine", "ray", "--workers", str(w), "--cpus-per-worker", str(c)]
    log(f"{pair.name}: {n} images, {pair.description}")
    same = same_scores(local_pass(pair, npy, b), ray_pass(pair, npy, b, w, c))  # and warm-up
    passes = {
        "local": lambda: local_pass(pair, npy, b) and None,
        "ray": lambda: ray_pass(pair, npy, b, w, c) and None,
    }
    if not args.no_cli:
        passes["local-cli"] = lambda: cli_pass(pair, npy, b, ["--engine", "local"])
        passes["ray-cli"] = lambda: cli_pass(pair, npy, b, ray_cli)
    best = interleaved(passes, args.repeat).best
    ratio = best["ray"] / best["local"]
    row = (
        f"| {pair.name} | {n} | {best['local']:.2f} | {best['ray']:.2f} | **{ratio:.2f}x** "
        f"| {'met' if ratio <= TARGET else 'missed'} |"
    )
    if not args.no_cli:
        row += (
            f" {best['local-cli']:.2f} | {best['ray-cli']:.2f} | "
            f"{best['ray-cli'] / best['local-cli']:.2f}x |"
        )
    return [row + f" {'yes' if same else 'NO'} |"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["samples", "resnet18", "both"], default="both")
    p.add_argument("--samples-images", type=int, default=2048)
    p.add_argument("--resnet-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-cli", action="store_true", help="skip the fresh-process passes")
    p.add_argument("--workdir", type=Path, help="keep built models and images here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    start = time.perf_counter()
    ray.init(
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    log(f"Ray {ray.__version__} started in {time.perf_counter() - start:.1f} s (not timed)")
    header = (
        "| pair | images | local, s | ray, s | ray / local | target <= 1.25x "
        + ("" if args.no_cli else "| local-cli, s | ray-cli, s | ray-cli / local-cli ")
        + "| same scores |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            kinds = ["samples", "resnet18"] if args.model == "both" else [args.model]
            for kind in kinds:
                n = args.samples_images if kind == "samples" else args.resnet_images
                rows += bench(make_pair(kind, workdir), n, args, workdir)
    finally:
        ray.shutdown()
    print(
        f"\n{os.cpu_count()} CPUs, batches of {args.batch_size}, {args.workers} Ray workers of "
        f"{args.cpus_per_worker:g} CPU, best of {args.repeat}:\n"
    )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

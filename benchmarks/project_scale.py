"""From measured per-image costs to whole validation sets (issue 12, section 5); run by
hand, never by the tests.

    python benchmarks/project_scale.py            # ~3 min on 2 cores
    python benchmarks/project_scale.py --write    # also benchmarks/results_projection.md

Measured in one run, on this machine:

- a shard's cost on the ResNet-18 pair of ``bench_audit.py`` (224x224, preprocessed
  ``.npy``): ``audit --shard 1/1 --out`` in a fresh process on ``--small`` and on
  ``--large`` images; the difference gives the cost per image, the rest the fixed cost of
  one process (interpreter, imports, model preparation, sessions);
- the merge's cost: ``shards.merge_shards`` on synthetic records of ``--rows`` rows in 8
  shard folders (``bench_scale.bench_merge``), in a fresh process: a fixed part and a
  part per row, from two sizes.

Projected, for 50,000 and 1,000,000 images on 8 and 64 workers (one shard per worker,
each worker as fast as this 2-core machine, images on storage that keeps up):
wall = fixed + ceil(images / workers) x per image + merge(images). The merge's
report writing (report.json, samples.csv: linear in rows) is not in the measured merge
and is named as such.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_audit import ROOT, make_images, make_pair  # noqa: E402
from bench_scale import bench_merge, log  # noqa: E402


def shard_seconds(pair, npy: Path, n: int, workdir: Path) -> float:
    """One ``audit --shard 1/1`` of the first ``n`` rows, in a fresh process."""
    part = workdir / f"first_{n}.npy"
    if not part.exists():
        np.save(part, np.load(npy, mmap_mode="r")[:n])
    out = workdir / f"shard_{n}"
    command = [sys.executable, "-m", "onnx_sp2ps", "audit", str(pair.original)]
    command += [str(pair.candidate), "--images", str(part), "--out", str(out)]
    command += ["--shard", "1/1", "--force", "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} -> {done.returncode}: {done.stderr}")
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=32)
    p.add_argument("--large", type=int, default=160)
    p.add_argument("--rows", default="100000,1000000", help="two merge sizes")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-project-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        pair = make_pair("resnet18", workdir)
        _, npy = make_images(args.large, 224, workdir)
        small = min(shard_seconds(pair, npy, args.small, workdir) for _ in range(2))
        large = min(shard_seconds(pair, npy, args.large, workdir) for _ in range(2))
        per_image = (large - small) / (args.large - args.small)
        fixed = small - args.small * per_image
        log(f"shard: {fixed:.2f} s fixed + {1000 * per_image:.1f} ms per image")
        r1, r2 = (int(r) for r in args.rows.split(","))
        m1, m2 = bench_merge(r1, workdir)["seconds"], bench_merge(r2, workdir)["seconds"]
        merge_row = (m2 - m1) / (r2 - r1)
        merge_fixed = max(m1 - r1 * merge_row, 0.0)
    lines = [
        "### Measured (this run)",
        "",
        "| part | fixed (s) | per image (ms) |",
        "|---|---:|---:|",
        f"| one shard, ResNet-18 pair, .npy 224x224 | {fixed:.2f} | {1000 * per_image:.2f} |",
        f"| merge of the records (8 shards) | {merge_fixed:.2f} | {1000 * merge_row:.4f} |",
        "",
        "### Projected wall time (one shard per worker, each worker like this machine)",
        "",
        "| images | workers | shards (h:mm:ss) | merge (s) | total (h:mm:ss) | one process |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for images in (50_000, 1_000_000):
        alone = fixed + images * per_image
        for workers in (8, 64):
            shard = fixed + math.ceil(images / workers) * per_image
            merge = merge_fixed + images * merge_row
            total = shard + merge
            lines.append(
                f"| {images:,} | {workers} | {_hms(shard)} | {merge:.1f} | {_hms(total)} | "
                f"{_hms(alone)} |"
            )
    lines += [
        "",
        "Not in the merge figure: writing report.json and samples.csv of every row (about "
        "the same as a one-process audit's, linear in rows).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        (Path(__file__).parent / "results_projection.md").write_text(
            "# project_scale.py results\n\n" + text + "\n"
        )


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


if __name__ == "__main__":
    main()

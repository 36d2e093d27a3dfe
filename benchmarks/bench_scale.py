"""What splitting an audit into shards costs (issue 12, "Shards and merge"); run by hand.

    python benchmarks/bench_scale.py                      # both parts, ~3 min on 2 cores
    python benchmarks/bench_scale.py --images 512 --rows 10000,100000   # quick look
    python benchmarks/bench_scale.py --write              # also benchmarks/results_scale.md

1. **Shards against one run.** The sample models (``gap_original`` against
   ``gap_l1_30_ft``, 64x64) on ``--images`` JPEGs made as ``bench_audit.py`` makes them
   (a coloured blob on noise): one ``audit --out`` against three ``audit --shard K/3
   --out`` run one after the other plus the ``merge``, each a fresh CLI process (the
   shards' sum is what the split costs in machine time, not in wall time). The merged
   samples.csv is checked to be the one run's.
2. **The merge alone.** Synthetic records (``records.Records`` built directly: one
   candidate, the 10 worst images with 64x64 maps) of ``--rows`` images split into 8
   shard folders; a fresh child process reads and merges them with
   ``shards.merge_shards`` (sha256 check, ``Records.from_npz``, ``merge_stream``) and
   reports its time and peak RSS (``ru_maxrss``). Target: 10^6 rows in seconds, well
   under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLES = ROOT / "sample_models"
MODELS = [SAMPLES / "gap_original.onnx", SAMPLES / "gap_l1_30_ft.onnx"]
SHARDS = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- 1. shards against one run ----------------------------------------------------------


def make_images(n: int, workdir: Path) -> Path:
    from bench_audit import _pixels
    from PIL import Image

    folder = workdir / f"jpeg_{n}_64"
    if folder.exists():
        return folder
    log(f"writing {n} JPEGs of 64x64 ...")
    tmp = folder.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, n, 64):
        for i, pixels in enumerate(_pixels(min(64, n - start), 64, rng), start):
            Image.fromarray(pixels).save(tmp / f"{i:05d}.jpg", quality=90)
    tmp.rename(folder)
    return folder


def cli(*args: object) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "onnx_sp2ps", *map(str, args), "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} -> {done.returncode}: {done.stderr}")
    return seconds


def bench_shards(images: Path, workdir: Path, repeat: int) -> dict[str, float]:
    common = [*MODELS, "--images", images, "--batch-size", "16"]
    best: dict[str, float] = {}
    for r in range(repeat):
        times = {"one": cli("audit", *common, "--out", workdir / "one", "--force")}
        for k in (1, 2, 3):
            folder = workdir / f"shard{k}"
            times[f"shard {k}/3"] = cli("audit", *common, "--out", folder, "--shard", f"{k}/3")
        folders = [workdir / f"shard{k}" for k in (3, 1, 2)]
        times["merge"] = cli("merge", *folders, "--out", workdir / "merged")
        for key, value in times.items():
            best[key] = min(best.get(key, value), value)
        log(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    same = (workdir / "one" / "samples.csv").read_bytes() == (
        workdir / "merged" / "samples.csv"
    ).read_bytes()
    if not same:
        raise SystemExit("the merged samples.csv differs from the one run's")
    return best


# -- 2. the merge alone -----------------------------------------------------------------


def synthetic(start: int, stop: int, worst: int = 10, size: int = 64):
    """Records of positions [start, stop): one candidate, the ``worst`` lowest scores
    with their maps."""
    from onnx_sp2ps.records import CandidateColumns, ModelColumns, Records, WorstImages
    from onnx_sp2ps.similarity import PairScores

    positions = np.arange(start, stop, dtype=np.int64)
    n = len(positions)
    rng = np.random.default_rng(start)
    score = rng.random(n)
    cols = ModelColumns(
        targets=positions % 10,
        predictions=(positions + rng.integers(0, 2, n)) % 10,
        confidence=rng.random(n).astype(np.float32),
    )
    pair = PairScores(
        spatial=score * 0.9,
        spectral=score * 1.1,
        score=score,
        finite=np.ones(n, bool),
        flat_a=np.zeros(n, bool),
        flat_b=np.zeros(n, bool),
    )
    keep = np.lexsort((positions, score))[:worst]
    maps = rng.random((len(keep), size, size), dtype=np.float32)
    w = WorstImages(worst, positions[keep], score[keep], maps, maps[::-1].copy())
    return Records(
        positions=positions,
        paths=[f"{p // 1000:04d}/img_{p:07d}.png" for p in positions],
        labels=positions % 10,
        original=cols,
        candidates=(CandidateColumns(cols, pair, w),),
    )


def write_shards(rows: int, folder: Path) -> list[dict]:
    """``SHARDS`` records files and the identities merge_shards reads."""
    from onnx_sp2ps.shards import file_sha256

    out = []
    bounds = np.linspace(0, rows, SHARDS + 1).astype(int)
    for k in range(SHARDS):
        start, stop = int(bounds[k]), int(bounds[k + 1])
        part = folder / f"shard{k + 1}"
        part.mkdir(parents=True, exist_ok=True)
        with open(part / "records.npz", "wb") as handle:
            synthetic(start, stop).to_npz(handle)
        identity = {
            "shard": {"index": k + 1, "count": SHARDS, "start": start, "stop": stop},
            "records": {
                "bytes": os.path.getsize(part / "records.npz"),
                "sha256": file_sha256(part / "records.npz"),
            },
        }
        identity["shard"]["rows"] = stop - start
        out.append({"folder": str(part), "identity": identity})
    return out


def child_merge(spec: Path) -> None:
    """In a fresh process: merge the shards ``spec`` lists; print seconds and peak RSS."""
    from onnx_sp2ps.shards import Shard, merge_shards

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shards = [Shard(Path(s["folder"]), s["identity"]) for s in json.loads(spec.read_text())]
    start = time.perf_counter()
    records = merge_shards(shards, max_memory=8 << 30)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(records) == sum(s.identity["shard"]["rows"] for s in shards)
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "base_kib": base}))


def bench_merge(rows: int, workdir: Path) -> dict[str, float]:
    folder = workdir / f"records_{rows}"
    spec = folder / "shards.json"
    if not spec.exists():
        log(f"writing {SHARDS} shards of {rows:,} synthetic rows ...")
        folder.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(write_shards(rows, folder)))
    size = sum(p.stat().st_size for p in folder.rglob("records.npz"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "--child-merge", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    got["file_mib"] = size / 2**20
    log(f"{rows:,} rows: {got['seconds']:.2f} s, peak {got['peak_kib'] / 1024:.0f} MiB")
    return got


# -- tables -----------------------------------------------------------------------------


def tables(args, shards: dict[str, float] | None, merges: dict[int, dict]) -> list[str]:
    lines = []
    if shards:
        one = shards["one"]
        split = sum(v for k, v in shards.items() if k != "one")
        lines += [
            f"### Three shards and the merge against one run ({args.images} images, sample "
            f"models, best of {args.repeat}, each a fresh CLI process)",
            "",
            "| run | seconds | / one run |",
            "|---|---:|---:|",
        ]
        for key, value in shards.items():
            lines.append(f"| {key} | {value:.2f} | {value / one:.2f}x |")
        lines += [f"| **shards + merge** | **{split:.2f}** | **{split / one:.2f}x** |", ""]
    if merges:
        lines += [
            f"### The merge of {SHARDS} shards of synthetic records (one candidate, 10 worst "
            "64x64 maps), in a fresh process",
            "",
            "| rows | records files (MiB) | merge (s) | peak RSS (MiB) | of which imports "
            "(MiB) | target |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for rows, got in merges.items():
            peak = got["peak_kib"] / 1024
            ok = got["seconds"] < 10 and peak < 1024
            lines.append(
                f"| {rows:,} | {got['file_mib']:.0f} | {got['seconds']:.2f} | {peak:.0f} | "
                f"{got['base_kib'] / 1024:.0f} | seconds, < 1 GB: {'met' if ok else 'missed'} |"
            )
        lines.append("")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--rows", default="10000,100000,1000000")
    p.add_argument("--no-shards", action="store_true", help="only the merge of records")
    p.add_argument("--workdir", type=Path, default=None, help="keep images and records here")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results_scale.md")
    p.add_argument("--child-merge", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_merge:
        child_merge(args.child_merge)
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        shards = None
        if not args.no_shards:
            shards = bench_shards(make_images(args.images, workdir), workdir, args.repeat)
        merges = {int(r): bench_merge(int(r), workdir) for r in args.rows.split(",") if r}
    text = "\n".join(tables(args, shards, merges))
    print(text)
    if args.write:
        (Path(__file__).parent / "results_scale.md").write_text(
            "# bench_scale.py results\n\n" + text + "\n"
        )


if __name__ == "__main__":
    main()

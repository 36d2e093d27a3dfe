"""What ``--original-cache`` saves: a warm audit (the original's results read from the
cache, only the candidate run) against the two-model floor (issue 12, section 3).

    python benchmarks/bench_cache.py                    # ResNet-18, 256 images, ~4 min on 2 cores
    python benchmarks/bench_cache.py --images 64 --repeat 1   # quicker look

The pair and the images are ``bench_audit.py``'s: ResNet-18 from ``models.py`` (224x224,
random weights, BatchNorm folded) against its copy with half the filters of each block's
``conv1`` removed, on ``--images`` smooth random blobs as a preprocessed ``.npy``.  Whole
processes are timed, in ``--repeat`` interleaved rounds (best of each):

(a')   the two-model floor: a fresh ``python -c`` making two plain onnxruntime CPU
       sessions and running every batch through both (bench_audit.py's (a'));
(a1)   the one-model floor: the same with the candidate only;
(c)    ``onnx-sp2ps audit`` (CLI, fresh process, ``--out``) without the cache;
(warm) the same with ``--original-cache`` filled by one earlier (cold) run.

Target: warm / (a') <= 0.65.  Then, in this process: what the cache holds per image,
and what the warm run does instead of the original's run (remaking the CAM images from
the cached raw maps) next to reading stored CAM images.

Not part of the test suite, and never imported by it.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_audit  # noqa: E402
from bench_audit import FLOOR_CODE, cli_command, floor_process_pass, log, make_images, make_pair  # noqa: E402
from bench_cams import SETTLE_S  # noqa: E402

#: Warm audit over the two-model floor.
TARGET = 0.65

#: The floor's code with one model: ``argv[1]`` the model, ``argv[2]`` unused.
ONE_MODEL_CODE = FLOOR_CODE.replace("sys.argv[1:3], sys.argv[3]", "sys.argv[1:2], sys.argv[3]")
assert ONE_MODEL_CODE != FLOOR_CODE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sp2ps-bench")
    args = parser.parse_args()
    bench_audit.PROVIDER = "cpu"
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    pair = make_pair("resnet18", workdir)
    _, npy = make_images(args.images, pair.size, workdir)
    batch, threads = args.batch_size, args.threads
    cache = workdir / "original-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(out: str, cached: bool) -> None:
        cmd = cli_command(pair, npy, batch, threads, workdir / out)
        if cached:
            cmd += ["--original-cache", str(cache)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)

    def one_model() -> None:
        subprocess.run(
            [
                sys.executable,
                "-c",
                ONE_MODEL_CODE,
                str(pair.candidate),
                "-",
                str(npy),
                str(batch),
                str(threads or 0),
                "CPUExecutionProvider",
            ],
            check=True,
        )

    log(f"{pair.description}; {args.images} images, batch {batch}")
    start = time.perf_counter()
    cli("out-cold", cached=True)
    cold = time.perf_counter() - start
    passes = {
        "a'": lambda: floor_process_pass(pair, npy, batch, threads),
        "a1": one_model,
        "c": lambda: cli("out-plain", cached=False),
        "warm": lambda: cli("out-warm", cached=True),
    }
    best: dict[str, float] = {}
    for round_ in range(args.repeat):
        for name, run in passes.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        log(
            f"  round {round_ + 1}/{args.repeat}: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in best.items())
        )
    same = all(
        (workdir / "out-warm" / f).read_bytes() == (workdir / "out-plain" / f).read_bytes()
        for f in ("report.json", "samples.csv", "report.html")
    )
    floor = best["a'"]
    print(f"\n{pair.description}; {args.images} images, batch {batch}, CPU, best of {args.repeat}")
    print("| pass | seconds | / two-model floor (a') |")
    print("|---|---|---|")
    rows = [
        ("(a') two-model floor, fresh process", floor),
        ("(a1) one-model floor (candidate only), fresh process", best["a1"]),
        ("(c) audit CLI, no cache", best["c"]),
        ("cold audit CLI, --original-cache (fills it; one run)", cold),
        ("(warm) audit CLI, --original-cache warm", best["warm"]),
    ]
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} | {seconds / floor:.2f}x |")
    ratio = best["warm"] / floor
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"\nwarm / (a') = {ratio:.2f} (target <= {TARGET}): {verdict}")
    print(f"warm / (c) = {best['warm'] / best['c']:.2f}; report set identical to (c): {same}")
    _what_is_stored(cache, args.images, pair.size)


def _what_is_stored(cache: Path, n: int, size: int) -> None:
    """Bytes per image on disk; remaking CAM images from raw maps vs reading stored ones."""
    from onnx_sp2ps.cams.base import normalise_maps, upsample_bilinear

    entries = sorted(cache.glob("*/b*.npz"))
    total = sum(p.stat().st_size for p in entries)
    print(f"\ncache: {len(entries)} entries, {total / n:,.0f} bytes per image")
    raw = np.concatenate([np.load(p)["raw"] for p in entries])
    start = time.perf_counter()
    for s in range(0, len(raw), 16):
        normalise_maps(upsample_bilinear(raw[s : s + 16], (size, size)))
    remake = time.perf_counter() - start
    maps = normalise_maps(upsample_bilinear(raw, (size, size)))[0]
    buffer = io.BytesIO()
    start = time.perf_counter()
    np.savez(buffer, maps=maps)
    write = time.perf_counter() - start
    path = cache.parent / "maps-probe.npz"
    path.write_bytes(buffer.getvalue())
    start = time.perf_counter()
    with np.load(path) as z:
        z["maps"]
    read = time.perf_counter() - start
    path.unlink()
    print(
        f"remaking {len(raw)} CAM images from raw maps: {remake:.3f} s; storing them "
        f"instead: {maps.nbytes / len(raw):,.0f} bytes per image, written in {write:.3f} s "
        f"(to memory), read back in {read:.3f} s (page cache)"
    )


if __name__ == "__main__":
    main()

"""What an audit costs on top of running the two models (issue 6: speed and memory).

    python benchmarks/bench_audit.py                          # everything, ~6 min on 2 cores
    python benchmarks/bench_audit.py --model samples --no-memory   # quick look, ~30 s
    python benchmarks/bench_audit.py --compare-pytorch-grad-cam    # needs torch + grad-cam
    python benchmarks/bench_audit.py --write                  # also benchmarks/results_audit.md

Pairs (original, candidate): ResNet-18 from ``models.py`` (224x224, random weights,
BatchNorm folded) against its copy with half the filters of every block's ``conv1``
removed by L1 norm (``prune_resnet18``); and the sample models ``gap_original`` against
``gap_l1_30_ft`` (64x64).  The images (``--images``, default 256) are made once: smooth
random blobs written as a JPEG folder, then decoded with the library's own reader into
the preprocessed ``.npy`` (unit preset), so both hold the same pixels.

Timed, in ``--repeat`` interleaved rounds (a, a', b, c, e, a, a', ...; best of each, so
that every ratio compares passes that saw the same machine load; this box is shared):

(a)  floor: plain onnxruntime in this process: two default CPU sessions made from the
     files, then every batch of the .npy through the original and the candidate.
     (a) includes making the sessions, as an audit must; (a-run) is the runs alone.
(a') the same floor in a fresh ``python -c`` process (interpreter start, imports):
     what the CLI is compared with.
(b)  ``onnx_sp2ps.audit`` through the Python API on the .npy (models loaded, detected,
     edited and compiled inside the timing; default Grad-CAM with exact head gradients).
(c)  the ``onnx-sp2ps audit`` CLI in a fresh process on the .npy, with ``--out``
     (report.json, report.html, samples.csv, overlays of the 12 worst images).
(d)  ``--compare-pytorch-grad-cam``: pytorch-grad-cam's ``GradCAM`` on torch versions
     of both models (the same weights, executed node by node by the ONNX -> torch
     interpreter of ``scripts/make_reference_cams.py``), same batches, torch's threads =
     all cores; building the torch models is not timed.
(e)  (b) on the JPEG folder (decoding prefetched by the library's pool of 2 threads).

Then one instrumented (b) says where an audit's time goes (exclusive times of the
library's stages), and peak RSS (VmHWM of a fresh process running (b)) is taken
for ``--memory-images`` (256 and 2048) on ``--memory-models``: the samples and ResNet-18
at a 112x112 input (all that grows with the image count -- per-image results, 1000-class
logits, the input file's pages -- is the same as at 224, and 2048 images run 4x faster).

Not part of the test suite, and never imported by it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cams import SETTLE_S, Breakdown, OtherLoad  # noqa: E402
from models import build_resnet18, prune_resnet18  # noqa: E402

#: Ratio (b)/(a) allowed per pair.
AUDIT_TARGET = {"resnet18": 1.10, "samples": 1.25}
#: onnx-sp2ps must be at least this much faster than pytorch-grad-cam on both models.
TORCH_SPEEDUP = 3.0
#: Share of an audit's time allowed for maps (CAM, upsampling, normalising) + similarity.
MAPS_SHARE = 0.05
#: Peak RSS growth allowed from the smallest to the largest --memory-images.
RSS_GROWTH = 0.10
#: JPEG folder (e) over .npy (b).
JPEG_OVERHEAD = 0.10
PRUNE_RATIO = 0.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- models and images ------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    name: str
    original: Path
    candidate: Path
    size: int
    description: str


def make_pair(kind: str, workdir: Path, size: int = 224) -> Pair:
    """The two models of ``kind`` (``resnet18`` built once into ``workdir``)."""
    if kind == "samples":
        original = ROOT / "sample_models" / "gap_original.onnx"
        candidate = ROOT / "sample_models" / "gap_l1_30_ft.onnx"
        if not (original.exists() and candidate.exists()):
            raise SystemExit("sample models missing: python scripts/build_sample_models.py")
        return Pair(
            kind,
            original,
            candidate,
            64,
            "sample gap_original vs gap_l1_30_ft (64x64, 8x8 feature map)",
        )
    original = workdir / f"resnet18_{size}.onnx"
    candidate = workdir / f"resnet18_{size}_l1_{round(100 * PRUNE_RATIO)}.onnx"
    if not (original.exists() and candidate.exists()):
        log(f"building ResNet-18 at {size}x{size} and its pruned copy ...")
        model = build_resnet18(size=size)
        onnx.save(model, original)
        onnx.save(prune_resnet18(model, PRUNE_RATIO), candidate)
    return Pair(
        kind,
        original,
        candidate,
        size,
        f"ResNet-18 vs conv1 of each block L1-pruned {PRUNE_RATIO:.0%} "
        f"({size}x{size}, {size // 32}x{size // 32} feature map)",
    )


def _pixels(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(count, size, size, 3) uint8: a coloured Gaussian blob on noise per image."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    centres = rng.integers(size // 4, 3 * size // 4, (count, 2)).astype(np.float32)
    blob = np.exp(
        -((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2)
        / (2 * (size / 8) ** 2)
    )
    colour = rng.random((count, 1, 1, 3), dtype=np.float32)
    noise = 0.3 * rng.random((count, size, size, 3), dtype=np.float32)
    return (255 * np.clip(blob[..., None] * colour + noise, 0, 1)).astype(np.uint8)


def make_images(n: int, size: int, workdir: Path) -> tuple[Path, Path]:
    """The same ``n`` images as a JPEG folder and as the preprocessed .npy (NCHW, unit)."""
    from PIL import Image

    from onnx_sp2ps.data import InputSpec, open_images

    folder = workdir / f"jpeg_{n}_{size}"
    npy = workdir / f"images_{n}_{size}.npy"
    if npy.exists():
        return folder, npy
    log(f"writing {n} JPEGs of {size}x{size} and their .npy ...")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, n, 64):
        for i, pixels in enumerate(_pixels(min(64, n - start), size, rng), start):
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    images = open_images(folder, spec=InputSpec("NCHW", 3, size, size))
    out = np.lib.format.open_memmap(
        npy.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(n, 3, size, size)
    )
    for batch in images.iter_batches(64):
        out[batch.indices] = batch.inputs
    out.flush()
    del out
    npy.with_suffix(".tmp.npy").rename(npy)
    return folder, npy


# -- the timed passes -------------------------------------------------------------------


def _spans(n: int, batch: int):
    return [slice(s, min(s + batch, n)) for s in range(0, n, batch)]


FLOOR_CODE = """\
import sys, time
import numpy as np, onnxruntime as ort
paths, npy, batch, threads = sys.argv[1:3], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
PROVIDERS = sys.argv[6].split(",")
so = ort.SessionOptions()
if threads:
    so.intra_op_num_threads = threads
sessions = [ort.InferenceSession(p, so, providers=PROVIDERS) for p in paths]
names = [s.get_inputs()[0].name for s in sessions]
x = np.load(npy, mmap_mode="r")
for start in range(0, len(x), batch):
    xb = np.ascontiguousarray(x[start:start + batch])
    for s, name in zip(sessions, names):
        s.run(None, {name: xb})
"""


#: --provider -> onnxruntime providers of the floor (the audit gets --provider itself).
ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROVIDER = "cpu"  # set from --provider in main()


def floor_pass(pair: Pair, array: np.ndarray, batch: int, threads: int | None) -> dict:
    """(a): make both sessions, run every batch through both; plain onnxruntime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sessions = [
        ort.InferenceSession(str(p), so, providers=ORT_PROVIDERS[PROVIDER])
        for p in (pair.original, pair.candidate)
    ]
    names = [s.get_inputs()[0].name for s in sessions]
    loaded = time.perf_counter()
    for span in _spans(len(array), batch):
        for session, name in zip(sessions, names):
            session.run(None, {name: array[span]})
    return {"a-run": time.perf_counter() - loaded}


def floor_process_pass(pair: Pair, npy: Path, batch: int, threads: int | None) -> None:
    """(a'): the floor in a fresh interpreter."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            FLOOR_CODE,
            str(pair.original),
            str(pair.candidate),
            str(npy),
            str(batch),
            str(threads or 0),
            ",".join(ORT_PROVIDERS[PROVIDER]),
        ],
        check=True,
    )


def api_pass(pair: Pair, images: Path, batch: int, threads: int | None) -> None:
    """(b) and (e): the Python API's default audit."""
    from onnx_sp2ps import audit
    from onnx_sp2ps.pipeline import AuditSettings

    audit(
        pair.original,
        [pair.candidate],
        images,
        settings=AuditSettings(batch_size=batch, provider=PROVIDER, threads=threads),
    )


def cli_command(pair: Pair, images: Path, batch: int, threads: int | None, out: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "onnx_sp2ps",
        "audit",
        str(pair.original),
        str(pair.candidate),
        "--images",
        str(images),
        "--batch-size",
        str(batch),
        "--provider",
        PROVIDER,
        "--out",
        str(out),
        "-q",
    ]
    return cmd + (["--threads", str(threads)] if threads else [])


def cli_pass(pair: Pair, images: Path, batch: int, threads: int | None, out: Path) -> None:
    """(c): the CLI in a fresh process, writing its reports."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        cli_command(pair, images, batch, threads, out),
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def torch_pass_factory(pair: Pair, array: np.ndarray, batch: int, threads: int | None):
    """(d): pytorch-grad-cam's GradCAM on torch versions of both models, or the reason
    it cannot run here."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import torch
        from make_reference_cams import OnnxNet  # puts scripts/_stubs on sys.path
        from pytorch_grad_cam import GradCAM
    except (ImportError, SystemExit) as exc:
        return f"torch and grad-cam not importable ({exc}); see benchmarks/README.md"
    from onnx_sp2ps.model import analyse_model, load_model

    torch.set_num_threads(threads or os.cpu_count() or 1)
    device = "cuda" if PROVIDER == "cuda" and torch.cuda.is_available() else "cpu"
    nets = []
    for path in (pair.original, pair.candidate):
        model = load_model(path)
        net = OnnxNet(model, analyse_model(model).feature_map.name, dtype=torch.float32)
        nets.append(net.eval().to(device))

    def run() -> None:
        cams = [GradCAM(model=net, target_layers=[net.target]) for net in nets]
        for span in _spans(len(array), batch):
            x = torch.from_numpy(np.ascontiguousarray(array[span])).to(device)
            for cam in cams:
                cam(input_tensor=x, targets=None)

    return run


@dataclass
class Timings:
    best: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.best[name] = min(self.best.get(name, float("inf")), seconds)


def interleaved(passes: dict, repeat: int) -> Timings:
    """Best wall time of each pass over ``repeat`` rounds of all passes in turn."""
    timings = Timings()
    for round_ in range(repeat):
        for name, run in passes.items():
            time.sleep(SETTLE_S)  # let the last pass's spinning threads go idle
            start = time.perf_counter()
            extra = run()
            timings.add(name, time.perf_counter() - start)
            for key, value in (extra or {}).items():
                timings.add(key, value)
        log(
            f"  round {round_ + 1}/{repeat}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in timings.best.items())
        )
    return timings


# -- where the time goes ----------------------------------------------------------------


def _stages() -> list[tuple[object, str, str]]:
    """(owner, attribute, label) of the library's stages, timed by :func:`stage_split`."""
    from onnx_sp2ps import pipeline, runtime

    return [
        (pipeline, "_prepare", "load, check, detect, edit graphs"),
        (pipeline, "_open", "open images"),
        (pipeline._Explainer, "__init__", "head gradient graph + sessions"),
        (runtime.ModelRunner, "run", "model runs (with gradients)"),
        (pipeline._Explainer, "maps", "maps: CAM, upsample, normalise"),
        (pipeline, "score_pairs", "similarity: SSIM, spectra"),
    ]


def stage_split(pair: Pair, npy: Path, batch: int, threads: int | None) -> dict[str, float]:
    """Exclusive seconds per stage of one instrumented API audit, and the total."""
    timers = Breakdown()
    stages = _stages()
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in stages]
    for owner, attr, label in stages:
        setattr(owner, attr, timers.wrap(getattr(owner, attr), label))
    try:
        time.sleep(SETTLE_S)
        start = time.perf_counter()
        api_pass(pair, npy, batch, threads)
        total = time.perf_counter() - start
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    split = {label: timers.totals.get(label, 0.0) for _, _, label in stages}
    split["rest: batching, targets, results"] = total - sum(split.values())
    split["total"] = total
    return split


# -- memory -----------------------------------------------------------------------------


# VmHWM (peak RSS of this process's own memory since exec): ru_maxrss is not used
# because Linux carries the parent's peak over fork + exec (this benchmark's own
# process, with the models and torch loaded, would be reported).
RSS_CODE = """\
import sys
sys.path.insert(0, sys.argv[1])
from onnx_sp2ps import audit
from onnx_sp2ps.pipeline import AuditSettings
audit(sys.argv[2], [sys.argv[3]], sys.argv[4],
      settings=AuditSettings(batch_size=int(sys.argv[5]), provider=sys.argv[6]))
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]))
"""


def peak_rss_mb(pair: Pair, images: Path, batch: int) -> float:
    """Peak resident set (MiB) of a fresh process running the default API audit."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            RSS_CODE,
            str(ROOT),
            str(pair.original),
            str(pair.candidate),
            str(images),
            str(batch),
            PROVIDER,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[-1]) / 1024  # KiB


# -- report -----------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def timing_table(
    pair: Pair, args, t: Timings, split: dict, other: float | None, torch_note: str | None
) -> list[str]:
    n = args.images
    floor, floor_proc = t.best["a"], t.best["a'"]
    rows = [
        ("(a) floor: 2 plain onnxruntime sessions, load + run", "a", floor, None),
        ("(a-run) the floor's runs alone (sessions made)", "a-run", floor, None),
        ("(a') the floor in a fresh process", "a'", floor, None),
        ("(b) audit, Python API, .npy", "b", floor, AUDIT_TARGET[pair.name]),
        ("(c) audit, CLI with --out, .npy (vs a')", "c", floor_proc, AUDIT_TARGET[pair.name]),
        ("(d) pytorch-grad-cam GradCAM on both models", "d", floor, None),
        ("(e) audit, Python API, JPEG folder", "e", floor, None),
    ]
    out = [
        f"### {pair.description}",
        "",
        f"{n} images, batch {args.batch_size}, threads {args.threads or 'all'}, "
        f"provider {args.provider}, "
        f"best of {args.repeat} interleaved rounds"
        + (
            ""
            if other is None
            else f"; other processes used {100 * other:.0f} % of the "
            "CPUs during the run" + (" (**disturbed**)" if other > 0.05 else "")
        ),
        "",
        "| measurement | seconds | ms per image | ratio | target | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, key, ref, target in rows:
        if key not in t.best:
            continue
        sec = t.best[key]
        ratio = sec / ref
        verdict = "" if target is None else _verdict(ratio <= target)
        out.append(
            f"| {label} | {sec:.3f} | {1000 * sec / n:.2f} | {ratio:.3f}x | "
            f"{'' if target is None else f'<= {target:.2f}x'} | {verdict} |"
        )
    out.append("")
    checks = []
    if "d" in t.best:
        speedup = t.best["d"] / t.best["b"]
        checks.append(
            f"- pytorch-grad-cam (d) / audit (b): {speedup:.2f}x "
            f"(target >= {TORCH_SPEEDUP:.0f}x: {_verdict(speedup >= TORCH_SPEEDUP)})"
        )
    elif torch_note:
        checks.append(f"- (d) not run: {torch_note}")
    jpeg = t.best["e"] / t.best["b"]
    checks.append(
        f"- JPEG folder (e) / .npy (b): {jpeg:.3f}x (target <= "
        f"{1 + JPEG_OVERHEAD:.2f}x: {_verdict(jpeg <= 1 + JPEG_OVERHEAD)})"
    )
    share = (split["maps: CAM, upsample, normalise"] + split["similarity: SSIM, spectra"]) / split[
        "total"
    ]
    checks.append(
        f"- maps + similarity: {100 * share:.1f} % of one instrumented audit "
        f"(target <= {100 * MAPS_SHARE:.0f} %: {_verdict(share <= MAPS_SHARE)})"
    )
    out += checks + [
        "",
        "Where one instrumented audit (b) spends its time:",
        "",
        "| stage | seconds | share |",
        "|---|---:|---:|",
    ]
    for label, sec in split.items():
        if label != "total":
            out.append(f"| {label} | {sec:.3f} | {100 * sec / split['total']:.1f} % |")
    out += [f"| total | {split['total']:.3f} | 100 % |", ""]
    return out


def memory_table(rows: list[tuple[Pair, dict[int, float]]]) -> list[str]:
    counts = sorted({n for _, r in rows for n in r})
    out = [
        "### Peak RSS of a fresh process running the default API audit (.npy input)",
        "",
        "| pair | " + " | ".join(f"{n} images (MiB)" for n in counts) + " | growth | target |",
        "|---|" + "---:|" * len(counts) + "---:|---|",
    ]
    for pair, rss in rows:
        growth = rss[counts[-1]] / rss[counts[0]] - 1
        out.append(
            f"| {pair.description} | "
            + " | ".join(f"{rss[n]:.0f}" for n in counts)
            + f" | {100 * growth:+.1f} % | <= {100 * RSS_GROWTH:.0f} %: "
            f"{_verdict(growth <= RSS_GROWTH)} |"
        )
    return out + [""]


# -- main -------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["all", "resnet18", "samples"], default="all")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="default: the audit's")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument(
        "--provider",
        choices=sorted(ORT_PROVIDERS),
        default="cpu",
        help="cuda: floor, audits and (d) on the GPU (see benchmarks/README.md)",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-images", default="256,2048")
    p.add_argument(
        "--memory-models",
        default="samples,resnet18@112",
        help="comma list of samples, resnet18@SIZE",
    )
    p.add_argument("--compare-pytorch-grad-cam", action="store_true")
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep built models and images here between runs"
    )
    p.add_argument(
        "--write", action="store_true", help="also write the tables to benchmarks/results_audit.md"
    )
    return p.parse_args(argv)


def bench_pair(pair: Pair, args, workdir: Path) -> list[str]:
    folder, npy = make_images(args.images, pair.size, workdir)
    array = np.load(npy)
    b, th = args.batch_size, args.threads
    passes = {
        "a": lambda: floor_pass(pair, array, b, th),
        "a'": lambda: floor_process_pass(pair, npy, b, th),
        "b": lambda: api_pass(pair, npy, b, th),
        "c": lambda: cli_pass(pair, npy, b, th, workdir / f"out_{pair.name}"),
        "e": lambda: api_pass(pair, folder, b, th),
    }
    torch_note = None
    if args.compare_pytorch_grad_cam:
        run = torch_pass_factory(pair, array, b, th)
        if isinstance(run, str):
            torch_note = run
        else:
            passes["d"] = run
    log(f"{pair.description}: {args.images} images, {args.repeat} rounds")
    load = OtherLoad()
    timings = interleaved(passes, args.repeat)
    split = stage_split(pair, npy, b, th)
    return timing_table(pair, args, timings, split, load.share(), torch_note)


def bench_memory(args, workdir: Path) -> list[str]:
    counts = [int(c) for c in args.memory_images.split(",")]
    rows = []
    for spec in args.memory_models.split(","):
        kind, _, size = spec.partition("@")
        pair = make_pair(kind, workdir, int(size or 224))
        rss = {}
        for n in counts:
            _, npy = make_images(n, pair.size, workdir)
            log(f"peak RSS: {pair.name} {pair.size}x{pair.size}, {n} images ...")
            rss[n] = peak_rss_mb(pair, npy, args.batch_size)
        rows.append((pair, rss))
    return memory_table(rows)


def main(argv=None) -> int:
    global PROVIDER
    args = parse_args(argv)
    PROVIDER = args.provider
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sp2ps-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kinds = ["resnet18", "samples"] if args.model == "all" else [args.model]
        lines = []
        for kind in kinds:
            lines += bench_pair(make_pair(kind, workdir), args, workdir)
        if args.memory:
            lines += bench_memory(args, workdir)
    import onnxruntime

    command = "python benchmarks/bench_audit.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    lines += [
        f"Command: `{command.strip()}`; {os.cpu_count()} CPUs, onnxruntime "
        f"{onnxruntime.__version__}, numpy {np.__version__}; benchmark wall time "
        f"{time.perf_counter() - started:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = Path(__file__).resolve().parent / "results_audit.md"
        path.write_text("# bench_audit.py results\n\n" + text)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of every CAM method relative to one plain forward pass, on CPU.

    python benchmarks/bench_cams.py [--images 32] [--repeat 3] [--threads T]
                                    [--methods gradcam,eigencam] [--skip-resnet] [--vit]
                                    [--scorecam-channels 64] [--write] [--no-breakdown]
                                    [--profile eigencam,ablationcam]

Models: ``sample_models/gap_original.onnx`` and ``sample_models/fc_original.onnx``
(64x64; skipped with a message when missing) and ResNet-18 from ``benchmarks/models.py``
(224x224, random weights); with ``--vit`` also a ViT-S/16-like token model
(tests/token_builders.py: 224x224, depth 12, width 384, 6 heads, class token).  For each
model the same random images (uniform 0..1, fixed
seed) go through, in batches of 16:

- the *floor*: one plain onnxruntime CPU session of the unmodified model;
- each method: ``ModelRunner.run`` (model with the feature map as an extra output) ->
  ``cam(acts, targets, x)`` -> ``normalise_maps(upsample_bilinear(raw, (H, W)))``,
  as the library's audit does.

Every configuration gets one warm-up batch, then ``--repeat`` rounds of one floor pass
and one method pass over all images (``time.perf_counter``); the ratio is best method
pass / best floor pass of those rounds, so both saw the same machine load (this box is
shared) and all ratios come from one run; a 50 ms pause before each pass lets the
other session's spinning onnxruntime threads go idle.  The share of CPU used by other processes
is printed; above 5 % the timings are flagged as disturbed.  A breakdown table (one
extra instrumented pass per method) says where each method's time goes: the forward run
with extra outputs, the head's backward graph, head runs on perturbed maps, full-model
runs on masked inputs (Score-CAM), the rest of the CAM (numpy), and upsample/normalise.

No torch here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_sp2ps.cams import METHODS, make_cam  # noqa: E402
from onnx_sp2ps.cams.base import normalise_maps, upsample_bilinear  # noqa: E402
from onnx_sp2ps.model import prepare_model  # noqa: E402
from onnx_sp2ps.runtime import ModelRunner  # noqa: E402

BATCH = 16
SEED = 1234
#: Target ratio to one forward pass per method (None: no target).
TARGETS = {
    "gradcam": 1.10,
    "gradcam++": 1.10,
    "xgradcam": 1.10,
    "hirescam": 1.10,
    "layercam": 1.10,
    "cam": 1.10,
    "eigencam": 1.05,
    "ablationcam": 3.0,
    "reciprocam": 3.0,
    "scorecam": None,
}
#: Seconds of Score-CAM timing allowed per model before it runs on fewer images.
SCORECAM_BUDGET_S = 60.0
SAMPLES = ("gap_original.onnx", "fc_original.onnx")
#: Pause between floor and method passes: onnxruntime's intra-op threads spin for a
#: while after a run, and the other session's spinning pool would steal the cores.
SETTLE_S = 0.05


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- timing -------------------------------------------------------------------------------


class Breakdown:
    """Exclusive time per category of wrapped calls (nested calls are not double-counted)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[float] = []

    def wrap(self, fn, category: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                child = self._stack.pop()
                self.totals[category] = self.totals.get(category, 0.0) + elapsed - child
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


def _batches(images: np.ndarray):
    for s in range(0, len(images), BATCH):
        yield images[s : s + BATCH]


def _pass(fn, images: np.ndarray) -> float:
    """Wall time (s) of ``fn`` over all batches of ``images``."""
    t0 = time.perf_counter()
    for x in _batches(images):
        fn(x)
    return time.perf_counter() - t0


def _best_interleaved(
    floor, floor_images: np.ndarray, fn, images: np.ndarray, repeat: int
) -> tuple[float, float]:
    """Best wall times (s) of the floor and of ``fn``, timed in alternating passes (floor,
    method, floor, method, ...) after one warm-up batch of ``fn``, so that both see the
    same machine load."""
    fn(images[:BATCH])
    best_floor = best = float("inf")
    for _ in range(repeat):
        time.sleep(SETTLE_S)
        best_floor = min(best_floor, _pass(floor, floor_images))
        time.sleep(SETTLE_S)
        best = min(best, _pass(fn, images))
    return best_floor, best


class OtherLoad:
    """Share of the machine's CPU time used by other processes between start and stop
    (from /proc/stat minus the CPU time of this process and of its waited-for children):
    timings mean little when high."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        t = os.times()
        busy = sum(v) - v[3] - v[4]  # minus idle and iowait
        own = t.user + t.system + t.children_user + t.children_system
        return busy / os.sysconf("SC_CLK_TCK"), own, time.perf_counter()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or cpus)))


def floor_fn(model: onnx.ModelProto, threads: int):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x):
        return sess.run(None, {name: x})

    return run


def cam_fn(runner: ModelRunner, cam, size: tuple[int, int], timers: Breakdown | None = None):
    # As the audit pipeline does: methods that use gradients get them from the same run
    # as the activations (targets -1 = each image's top-1, resolved in the graph).
    uses_gradients = getattr(cam, "uses_gradients", False)
    run = runner.run
    up, norm = upsample_bilinear, normalise_maps
    if timers is not None:
        run = timers.wrap(run, "forward+outputs")
        cam = timers.wrap(cam, "cam numpy")
        up = timers.wrap(up, "upsample+normalise")
        norm = timers.wrap(norm, "upsample+normalise")

    def step(x):
        if uses_gradients:
            acts, logits = run(x, targets=np.full(len(x), -1, dtype=np.int64))
        else:
            acts, logits = run(x)
        targets = logits.argmax(1)
        raw = cam(acts, targets, x)
        return norm(up(raw, size))

    return step


def profile(step, images: np.ndarray, top: int = 15) -> str:
    """cProfile of one pass of ``step`` over ``images``: the ``top`` functions by own
    time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for x in _batches(images):
        step(x)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = buf.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return (
        "\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:] if line.strip())
        + "\n"
    )


def instrument(runner: ModelRunner, timers: Breakdown) -> dict:
    """Wrap the runner's head/gradient/masked-input entry points (instance attributes);
    returns the originals for :func:`restore`."""
    names = {
        "head_gradients": "head backward graph",
        "run_head": "head runs",
        "run_inputs": "masked full-model runs",
    }
    saved = {n: getattr(runner, n) for n in names}
    for n, cat in names.items():
        setattr(runner, n, timers.wrap(saved[n], cat))
    return saved


def restore(runner: ModelRunner, saved: dict) -> None:
    for n in saved:
        delattr(runner, n)


# -- one model ----------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    ms: float | None
    images: int
    repeat: int
    note: str = ""
    floor_ms: float | None = None  # floor timed in the same rounds
    breakdown: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class ModelResult:
    name: str
    detail: str
    floor_ms: float
    gradient_path: str
    rows: list[Row]
    notes: list[str]
    other_load: float | None = None


def bench_model(name: str, model: onnx.ModelProto, args, *, resnet: bool) -> ModelResult:
    prepared = prepare_model(model)
    spec = prepared.spec
    h, w = spec.input_size
    c = spec.input_channels or 3
    shape = (args.images, h, w, c) if spec.layout == "NHWC" else (args.images, c, h, w)
    images = np.random.default_rng(SEED).uniform(0, 1, shape).astype(np.float32)
    fm = spec.feature_map
    head_ops = spec.to_dict().get("head", {}).get("ops") or []
    detail = (
        f"input {list(shape[1:])}, feature map `{fm.name}` {list(fm.shape[1:])}, "
        f"head {' -> '.join(head_ops)}"
    )

    load = OtherLoad()
    floor = floor_fn(model, args.threads)
    floor(images[:BATCH])
    floor_s = float("inf")
    runner = ModelRunner(prepared, provider="cpu", threads=args.threads)
    rows, notes = [], []
    for method in args.methods:
        options = {}
        if method == "scorecam" and resnet and args.scorecam_channels:
            options["scorecam_channels"] = args.scorecam_channels
        try:
            cam = make_cam(method, runner, **options)
        except Exception as exc:  # e.g. classic CAM on a head it does not support
            rows.append(Row(method, None, 0, 0, error=f"{type(exc).__name__}: {exc}"))
            _log(f"[{name}] {method}: not applicable ({exc})")
            continue
        n_img, repeat, note = args.images, args.repeat, ""
        if "scorecam_channels" in options:
            note = f"{args.scorecam_channels} of {fm.shape[1]} channels"
        step = cam_fn(runner, cam, (h, w))
        if method == "scorecam":
            # Estimate from a 2-image probe; shrink images/repeats to the budget.
            t0 = time.perf_counter()
            step(images[:2])
            per_img = (time.perf_counter() - t0) / 2
            while n_img > 2 and per_img * n_img * (repeat + 1) > SCORECAM_BUDGET_S:
                if repeat > 1:
                    repeat -= 1
                else:
                    n_img //= 2
            if (n_img, repeat) != (args.images, args.repeat):
                note = "; ".join(filter(None, [note, f"{n_img} images, best of {repeat}"]))
        _log(f"[{name}] {method} ({n_img} images x {repeat}) ...")
        sub = images[:n_img]
        f, t = _best_interleaved(floor, images, step, sub, repeat)
        floor_s = min(floor_s, f)
        row = Row(method, 1000 * t / n_img, n_img, repeat, note, floor_ms=1000 * f / args.images)
        if args.breakdown:
            timers = Breakdown()
            saved = instrument(runner, timers)
            try:
                timed = cam_fn(runner, cam, (h, w), timers)
                t0 = time.perf_counter()
                for x in _batches(sub):
                    timed(x)
                total = time.perf_counter() - t0
            finally:
                restore(runner, saved)
            row.breakdown = {k: 1000 * v / n_img for k, v in timers.totals.items()}
            row.breakdown["total"] = 1000 * total / n_img
        rows.append(row)
        if method in args.profile:
            notes.append(
                f"cProfile of {method}, one pass over {n_img} images:\n\n```text\n"
                + profile(step, sub)
                + "```"
            )
    if not np.isfinite(floor_s):
        floor_s = min(_pass(floor, images) for _ in range(args.repeat))
    return ModelResult(
        name, detail, 1000 * floor_s / args.images, runner.gradient_path, rows, notes, load.share()
    )


# -- report -------------------------------------------------------------------------------

BREAKDOWN_COLUMNS = (
    "forward+outputs",
    "head backward graph",
    "head runs",
    "masked full-model runs",
    "cam numpy",
    "upsample+normalise",
)


def render(result: ModelResult, args) -> str:
    out = [
        f"### {result.name}",
        "",
        f"{result.detail}; {args.images} random images, batches of {BATCH}, "
        f"{args.threads} intra-op thread(s), best of {args.repeat}.",
        "",
        f"- forward pass (plain onnxruntime session, unmodified model, best of all "
        f"rounds): **{result.floor_ms:.3f} ms per image**",
        f"- gradient path: `{result.gradient_path}`",
        "- ratio = the method's best pass / the best floor pass timed in alternation "
        "with it (column `floor`), so that both saw the same machine load",
    ]
    if result.other_load is not None:
        out.append(
            f"- other processes used {100 * result.other_load:.0f} % of the CPUs "
            "during these measurements"
            + (" (**timings disturbed**)" if result.other_load > 0.05 else "")
        )
    out += [
        "",
        "| method | ms per image | floor ms per image | ratio to one forward pass "
        "| target | met? |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for r in result.rows:
        target = TARGETS.get(r.method)
        tgt = f"<= {target:.2f}x" if target else "none"
        if r.ms is None:
            out.append(f"| {r.method} | n/a | | n/a | {tgt} | n/a ({r.error}) |")
            continue
        ratio = r.ms / r.floor_ms
        met = "-" if target is None else ("yes" if ratio <= target else "**no**")
        name = f"{r.method} ({r.note})" if r.note else r.method
        out.append(f"| {name} | {r.ms:.3f} | {r.floor_ms:.3f} | {ratio:.2f}x | {tgt} | {met} |")
    if any(r.breakdown for r in result.rows):
        out += [
            "",
            "Where the time goes (ms per image, one instrumented pass; exclusive "
            "times; `cam numpy` = the CAM call minus the runner calls inside it):",
            "",
            "| method | " + " | ".join(BREAKDOWN_COLUMNS) + " | total |",
            "|---|" + "---:|" * (len(BREAKDOWN_COLUMNS) + 1),
        ]
        for r in result.rows:
            if not r.breakdown:
                continue
            cells = [f"{r.breakdown[k]:.3f}" if k in r.breakdown else "" for k in BREAKDOWN_COLUMNS]
            out.append(f"| {r.method} | " + " | ".join(cells) + f" | {r.breakdown['total']:.3f} |")
    out += ["\n" + n for n in result.notes]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list (default: all: %(default)s)"
    )
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument(
        "--vit",
        action="store_true",
        help="also a ViT-S/16-like token model (224x224, depth 12, width 384, class token; "
        "tests/token_builders.py, random weights)",
    )
    p.add_argument(
        "--scorecam-channels",
        type=int,
        default=64,
        help="Score-CAM channels on ResNet-18 (0: all 512)",
    )
    p.add_argument("--write", action="store_true", help="also write benchmarks/results_cams.md")
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the instrumented pass that splits each method's time",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma list of methods to also run under cProfile (top 15 by own time)",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.profile = [m.strip() for m in args.profile.split(",") if m.strip()]
    unknown = [m for m in args.methods + args.profile if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if args.images < 1 or args.repeat < 1 or args.threads < 1:
        p.error("--images, --repeat and --threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    models: list[tuple[str, object, bool]] = []
    for fname in SAMPLES:
        path = ROOT / "sample_models" / fname
        if path.exists():
            models.append((f"sample_models/{fname}", path, False))
        else:
            _log(
                f"skipping sample_models/{fname}: not found "
                "(build it with scripts/build_sample_models.py)"
            )
    if not args.skip_resnet:
        models.append(("ResNet-18 (benchmarks/models.py)", None, True))
    if args.vit:
        models.append(("ViT-S/16-like (tests/token_builders.py)", "vit", True))

    sections = []
    for name, source, resnet in models:
        if source == "vit":
            sys.path.insert(0, str(ROOT / "tests"))
            from token_builders import build_vit

            _log("building a ViT-S/16-like model ...")
            model = build_vit(
                depth=12, dim=384, heads=6, patch=16, size=(224, 224), classes=1000
            ).model
        elif resnet:
            from models import build_resnet18

            _log("building ResNet-18 ...")
            model = build_resnet18()
        else:
            model = onnx.load(str(source))
        result = bench_model(name, model, args, resnet=resnet)
        text = render(result, args)
        print(text, flush=True)
        sections.append(text)
    total = time.perf_counter() - start
    footer = (
        f"Total benchmark time {total:.0f} s; onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPU(s)."
    )
    print(footer)
    if args.write:
        cmd = "python benchmarks/bench_cams.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        text = (
            "# CAM cost relative to one forward pass\n\n"
            f"`{cmd.strip()}`\n\n" + "\n".join(sections) + "\n" + footer + "\n"
        )
        (ROOT / "benchmarks" / "results_cams.md").write_text(text)
        _log("wrote benchmarks/results_cams.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

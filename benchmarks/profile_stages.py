"""Per-stage cost of the CAM pipeline on one batch of 16, each stage timed alone (min of
many repetitions) and then the whole pipeline: the gap between the sum of the stages and
the pipeline is thread-pool interplay (three onnxruntime sessions and OpenBLAS threads
sharing the cores).

    python benchmarks/profile_stages.py MODEL METHODS [REPS]
    # MODEL: resnet or a path such as sample_models/gap_original.onnx
    # METHODS: comma list, e.g. gradcam,eigencam,reciprocam

Experiment knob: ORT_SPIN=0 turns off onnxruntime's intra-op spinning in every session
(patched in this process only, through the library's private ``_session_options``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_sp2ps.runtime as rt  # noqa: E402

SPIN = os.environ.get("ORT_SPIN")
if SPIN is not None:
    _orig = rt._session_options

    def _options(threads):
        so = _orig(threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", SPIN)
        return so

    rt._session_options = _options

import onnxruntime as ort  # noqa: E402
from bench_cams import BATCH, cam_fn  # noqa: E402

from onnx_sp2ps.cams import make_cam  # noqa: E402
from onnx_sp2ps.cams.base import normalise_maps, upsample_bilinear  # noqa: E402
from onnx_sp2ps.model import prepare_model  # noqa: E402
from onnx_sp2ps.runtime import ModelRunner  # noqa: E402


def main() -> None:
    name, methods = sys.argv[1], sys.argv[2].split(",")
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    threads = len(os.sched_getaffinity(0))
    if name == "resnet":
        from models import build_resnet18

        model = build_resnet18()
    else:
        model = onnx.load(name)
    prepared = prepare_model(model)
    runner = ModelRunner(prepared, provider="cpu", threads=threads)
    h, w = prepared.spec.input_size
    x = np.random.default_rng(0).uniform(0, 1, (BATCH, 3, h, w)).astype(np.float32)
    so = rt._session_options(threads)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name

    def tmin(fn):
        fn()
        time.sleep(0.05)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return 1000 * best / BATCH

    acts, logits = runner.run(x)
    targets = logits.argmax(1)
    floor = tmin(lambda: sess.run(None, {inp: x}))
    fwd = tmin(lambda: runner.run(x))
    print(
        f"{name} (spinning {'default' if SPIN is None else SPIN}), ms per image, min of "
        f"{reps}: floor {floor:.3f}, runner.run {fwd:.3f}"
    )
    for method in methods:
        cam = make_cam(method, runner)
        raw = cam(acts, targets, x)
        c = tmin(lambda: cam(acts, targets, x))
        u = tmin(lambda: normalise_maps(upsample_bilinear(raw, (h, w))))
        step = cam_fn(runner, cam, (h, w))
        pipe = tmin(lambda: step(x))
        print(
            f"  {method:11s} cam() {c:.3f}  upsample+normalise {u:.3f}  "
            f"sum of stages {fwd + c + u:.3f} ({(fwd + c + u) / floor:.2f}x)  "
            f"pipeline {pipe:.3f} ({pipe / floor:.2f}x)"
        )


if __name__ == "__main__":
    main()

"""How long a signal takes to end an audit, at moments through a run (README "Hostile
inputs and faults": signals end the run within a second).

    python benchmarks/bench_signals.py [--signal TERM] [--no-supervisor]

Runs a small audit (8 sample images, --overlays all --save-maps) once per moment, sends
the signal that many seconds after the process catches it, and prints the exit code and
the seconds from the signal to the end of the process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_faults import _wait_for_handlers  # noqa: E402

MOMENTS = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0, 3.3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", default="TERM", choices=["TERM", "INT", "HUP"])
    parser.add_argument("--no-supervisor", action="store_true")
    args = parser.parse_args()
    signum = getattr(signal, f"SIG{args.signal}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.no_supervisor:
        env["ONNX_SP2PS_NO_SUPERVISOR"] = "1"
    with tempfile.TemporaryDirectory() as work:
        images = Path(work) / "images"
        for p in sorted((ROOT / "sample_models" / "images").rglob("*.png"))[:8]:
            (images / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, images / p.parent.name / p.name)
        print(f"{'moment s':>9} {'exit':>5} {'ended after s':>14}")
        worst = 0.0
        for moment in MOMENTS:
            out = Path(work) / "out"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "onnx_sp2ps",
                    "audit",
                    str(ROOT / "sample_models" / "gap_original.onnx"),
                    str(ROOT / "sample_models" / "gap_l1_60.onnx"),
                    "--images",
                    str(images),
                    "--out",
                    str(out),
                    "--batch-size",
                    "2",
                    "--overlays",
                    "all",
                    "--save-maps",
                    "-q",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _wait_for_handlers(proc.pid, signum)
            time.sleep(moment)
            sent = time.monotonic()
            proc.send_signal(signum)
            proc.communicate(timeout=120)
            took = time.monotonic() - sent
            if proc.returncode != 0:
                worst = max(worst, took)
            print(f"{moment:9.1f} {proc.returncode:5d} {took:14.2f}")
        print(f"slowest end after a signal: {worst:.2f} s")


if __name__ == "__main__":
    main()

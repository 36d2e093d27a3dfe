"""The audits behind the golden reports (scripts/make_golden.py writes them,
tests/test_golden.py checks them): what they run and what of their output is compared."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest

from onnx_sp2ps.cli import main

from conftest import SAMPLES

#: name -> (models, extra options); models relative to sample_models/.
CASES = {
    "gap_gradcam": (
        ["gap_original.onnx", "gap_l1_30.onnx", "gap_l1_60_ft.onnx", "gap_random_60_ft.onnx"],
        ["--worst", "4", "--fail-under", "0.7", "--fail-under-p5", "0.3", "--save-maps"],
    ),
    "fc_label_gradcampp": (
        ["fc_original.onnx", "fc_l1_60.onnx", "fc_original.onnx"],
        [
            "--method",
            "gradcam++",
            "--target",
            "label",
            "--class-names",
            str(SAMPLES / "class_names.txt"),
            "--worst",
            "3",
            "--batch-size",
            "7",
        ],
    ),
}


def fingerprint() -> dict:
    """What decides which CPU kernels ONNX Runtime runs (and so the last bits of a float)."""
    import onnxruntime

    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = sorted(
                    f
                    for f in line.split(":", 1)[1].split()
                    if "avx" in f or "amx" in f or f in ("fma", "f16c")
                )
                break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "cpu_flags": flags,
    }


def run_case(name: str, out: Path) -> dict:
    """Run one case's audit into ``out``; its report.json without what names the machine
    or the run (versions, absolute paths), plus the list of overlay files written."""
    models, extra = CASES[name]
    args = ["audit", *(str(SAMPLES / m) for m in models), "--images", str(SAMPLES / "images")]
    args += ["--out", str(out / "audit"), "-q", *extra]
    cwd = os.getcwd()
    os.chdir(SAMPLES.parent)  # paths in the report are shown relative to the current folder
    try:
        with pytest.raises(SystemExit) as info:
            main([a.replace(str(SAMPLES.parent) + os.sep, "") for a in args])
    finally:
        os.chdir(cwd)
    report = json.loads((out / "audit" / "report.json").read_text())
    report.pop("versions")
    report["exit_code"] = info.value.code
    report["overlays"] = sorted(
        str(p.relative_to(out / "audit")) for p in (out / "audit" / "overlays").rglob("*.png")
    )
    report["maps"] = {
        str(f.relative_to(out / "audit")): {
            k: {
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "sha256": _digest(a),
                "sum": float(a.sum()),
            }
            for k, a in sorted(np.load(f, allow_pickle=False).items())
            if a.dtype.kind in "biuf"
        }
        for f in sorted((out / "audit" / "maps").glob("*.npz"))
    }
    return report


def split_added(report: dict) -> tuple[dict, dict]:
    """The report without the fields added after the golden files were written, and
    those fields (the intervals of issue 14: each candidate's ``sp2ps.ci``, the
    top-level ``comparisons``, the gate's ``gate_on`` and ``max_ci_width`` criteria and
    each check's ``interval``), which ``<case>.added.json`` holds."""
    report = json.loads(json.dumps(report))
    added: dict = {"comparisons": report.pop("comparisons", None), "candidates": []}
    criteria = report.get("gate_criteria")
    if criteria is not None:
        added["gate_criteria"] = {k: criteria.pop(k, None) for k in ("gate_on", "max_ci_width")}
    for cand in report["candidates"]:
        gate = cand.get("gate") or {}
        added["candidates"].append(
            {
                "ci": cand["sp2ps"].pop("ci", None),
                "check_intervals": [c.pop("interval", None) for c in gate.get("checks", [])],
            }
        )
    return report, added


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

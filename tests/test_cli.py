"""The command line end to end on the sample models: outputs, reports, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_sp2ps.cli import main

from conftest import ROOT
from conftest import run_cli as run


@pytest.fixture(scope="module")
def audit_out(samples, tmp_path_factory):
    """One audit of the original against itself and a pruned copy, kept for several tests."""
    out = tmp_path_factory.mktemp("audit")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "audit",
                str(samples / "gap_original.onnx"),
                str(samples / "gap_original.onnx"),
                str(samples / "gap_l1_60.onnx"),
                "--images",
                str(samples / "images"),
                "--out",
                str(out),
                "--save-maps",
                "-q",
            ]
        )
    return out, info.value.code


def test_inspect_text_names_what_was_detected(capsys, samples):
    code, out, _ = run(capsys, "inspect", samples / "gap_original.onnx")
    assert code == 0
    assert "feature map" in out and "Softmax" in out and "CPUExecutionProvider" in out


def test_inspect_json_has_the_documented_fields(capsys, samples):
    code, out, _ = run(capsys, "inspect", samples / "fc_original.onnx", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["input"]["name"] == "image" and data["input"]["layout"] == "NCHW"
    assert data["input"]["shape"][1:] == [3, 64, 64]
    assert data["feature_map"]["shape"][1:][1:] == [8, 8]
    assert data["logits"]["activation"] is None
    assert data["logits"]["shape"][-1] == 4
    assert data["head"]["ops"][0] == "Flatten" and "Gemm" in data["head"]["ops"]
    assert "CPUExecutionProvider" in data["providers"]


def test_audit_writes_a_complete_report(audit_out):
    out, code = audit_out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1
    assert {"onnx", "onnxruntime", "onnx_sp2ps"} <= set(report["versions"])
    assert report["providers"]["used"][0] == "CPUExecutionProvider"
    assert report["preprocess"]["preset"] == "unit"
    assert report["settings"]["method"] == "gradcam"
    assert report["images"]["scored"] == 50 and report["images"]["labelled"] is True
    assert report["original"]["accuracy"] is not None
    same, pruned = report["candidates"]
    for cand in (same, pruned):
        for key in (
            "mean",
            "class_balanced_mean",
            "median",
            "p5",
            "minimum",
            "spatial_mean",
            "spectral_mean",
            "flat_original",
            "flat_candidate",
        ):
            assert key in cand["sp2ps"]
        assert {"agreement", "accuracy", "confidence_drop"} <= set(cand)
        assert len(cand["images"]) == 50
        row = cand["images"][0]
        assert {"path", "target", "spatial", "spectral", "score"} <= set(row)


def test_an_unpruned_copy_scores_one_and_pruning_scores_less(audit_out):
    out, _ = audit_out
    report = json.loads((out / "report.json").read_text())
    same, pruned = report["candidates"]
    assert same["sp2ps"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert same["agreement"] == 1.0 and same["confidence_drop"] == pytest.approx(0.0, abs=1e-7)
    assert pruned["sp2ps"]["mean"] < 0.99


def test_save_maps_writes_one_npz_per_model(audit_out):
    out, _ = audit_out
    files = sorted(p.name for p in (out / "maps").glob("*.npz"))
    assert files == ["gap_l1_60.npz", "gap_original.npz", "gap_original_2.npz"]
    with np.load(out / "maps" / "gap_l1_60.npz", allow_pickle=False) as maps:
        assert maps["maps"].shape == (50, 64, 64) and maps["raw"].shape[0] == 50
        assert maps["logits"].shape == (50, 4) and maps["targets"].dtype == np.int64
        assert maps["paths"].shape == (50,)
        assert np.nanmax(maps["maps"]) <= 1.0 and np.nanmin(maps["maps"]) >= 0.0


def test_gate_passes_with_exit_0_and_a_passed_line(capsys, samples):
    code, out, _ = run(
        capsys,
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_original.onnx",
        "--images",
        samples / "images",
        "--fail-under",
        "0.99",
        "-q",
    )
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("PASSED | ")


def test_gate_fails_with_exit_1_and_a_failed_line(capsys, samples):
    code, out, _ = run(
        capsys,
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_l1_60.onnx",
        "--images",
        samples / "images",
        "--fail-under",
        "0.999",
        "-q",
    )
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAILED | ") and "0.999000" in last


def test_json_format_prints_only_json_on_stdout(capsys, samples):
    code, out, err = run(
        capsys,
        "audit",
        samples / "fc_original.onnx",
        samples / "fc_l1_30_ft.onnx",
        "--images",
        samples / "images",
        "--format",
        "json",
        "--fail-under",
        "0.0",
    )
    assert code == 0
    data = json.loads(out)
    gate = data["candidates"][0]["gate"]
    assert gate["passed"] is True and data["passed"] is True
    assert gate["checks"][0]["criterion"] == "sp2ps mean"
    assert gate["checks"][0]["threshold"] == 0.0
    assert "PASSED" in err


def test_saved_report_is_rechecked_by_gate(capsys, audit_out):
    out, _ = audit_out
    code, text, _ = run(capsys, "gate", out / "report.json", "--fail-under", "0.5")
    assert code == (
        0
        if all(
            c["sp2ps"]["mean"] >= 0.5
            for c in json.loads((out / "report.json").read_text())["candidates"]
        )
        else 1
    )
    code, text, _ = run(capsys, "gate", out / "report.json", "--fail-under", "0.9999")
    assert code == 1 and text.strip().splitlines()[-1].startswith("FAILED | ")


def test_gate_fails_when_the_score_is_missing(capsys, audit_out, tmp_path):
    out, _ = audit_out
    report = json.loads((out / "report.json").read_text())
    report["candidates"][0]["sp2ps"]["mean"] = None
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    code, text, _ = run(capsys, "gate", path, "--fail-under", "0.0")
    assert code == 1 and "missing" in text


def test_cam_writes_maps_and_overlays(capsys, samples, tmp_path):
    code, out, _ = run(
        capsys,
        "cam",
        samples / "fc_original.onnx",
        "--images",
        samples / "images",
        "--out",
        tmp_path,
        "--overlays",
        "--target",
        "label",
        "-q",
    )
    assert code == 0
    with np.load(tmp_path / "cams.npz", allow_pickle=False) as cams:
        assert set(cams.files) == {"paths", "targets", "logits", "raw", "maps"}
        assert cams["raw"].dtype == np.float32 and cams["raw"].min() >= 0
        assert cams["maps"].shape == (50, 64, 64)
        labels = [int(Path(p).parts[0]) for p in cams["paths"]]
        cams_paths = [str(p) for p in cams["paths"]]
        assert cams["targets"].tolist() == labels
    overlays = sorted((tmp_path / "overlays").rglob("*.png"))
    assert len(overlays) == 50
    # The image's own path, sub-folder included, with .png added: 0/x.png -> 0/x.png.png.
    names = {p.relative_to(tmp_path / "overlays").as_posix() for p in overlays}
    assert names == {f"{p}.png" for p in cams_paths}


def test_a_foreign_report_json_is_never_overwritten(capsys, samples, tmp_path):
    (tmp_path / "report.json").write_text('{"mine": true}')
    code, _, err = run(
        capsys,
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_original.onnx",
        "--images",
        samples / "images",
        "--out",
        tmp_path,
        "-q",
    )
    assert code == 3 and "not written by onnx-sp2ps" in err
    assert (tmp_path / "report.json").read_text() == '{"mine": true}'


def test_internal_errors_are_exit_4_with_traceback_only_in_debug(capsys, samples, monkeypatch):
    import onnx_sp2ps.pipeline as audit_module

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(audit_module, "audit", boom)
    args = [
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_original.onnx",
        "--images",
        samples / "images",
        "--fail-under",
        "0.5",
    ]
    code, out, err = run(capsys, *args)
    assert code == 4 and "simulated bug" in err and "Traceback" not in err
    assert "FAILED" not in out
    code, _, err = run(capsys, *args, "--debug")
    assert code == 4 and "Traceback" in err


def test_cuda_request_falls_back_with_one_note(capsys, samples):
    code, out, err = run(
        capsys,
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_original.onnx",
        "--images",
        samples / "images",
        "--provider",
        "cuda",
        "--format",
        "json",
        "-q",
    )
    assert code == 0
    report = json.loads(out)
    notes = [ln for ln in err.splitlines() if "CUDA" in ln]
    if report["providers"]["used"][0] == "CUDAExecutionProvider":
        assert notes == [] and report["providers"]["note"] is None
    else:  # this machine: no usable GPU
        assert len(notes) == 1 and notes[0].startswith("note: ") and "CPU" in notes[0]
        assert report["providers"]["note"] in notes[0]
    assert "onnxruntime" not in err  # its own CUDA error spam is silenced


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys, samples):
    code, _, err = run(
        capsys,
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_original.onnx",
        "--images",
        samples / "images",
    )
    assert code == 0
    assert "[#" not in err and "audit  [" not in err
    assert "preprocess: unit: 64x64 RGB NCHW" in err


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_sp2ps", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "onnx-sp2ps" in proc.stdout


def test_a_preprocessed_array_gives_the_same_audit_as_the_folder(capsys, samples, tmp_path):
    from onnx_sp2ps.data import InputSpec, open_images

    images = open_images(samples / "images", spec=InputSpec("NCHW", 3, 64, 64))
    x = np.concatenate([b.inputs for b in images.iter_batches(50)])
    np.savez(tmp_path / "val.npz", images=x, labels=images.labels)
    args = [samples / "gap_original.onnx", samples / "gap_l1_30.onnx", "--format", "json"]
    code, out_folder, _ = run(capsys, "audit", *args, "--images", samples / "images")
    code2, out_array, _ = run(capsys, "audit", *args, "--images", tmp_path / "val.npz")
    assert code == code2 == 0
    a, b = json.loads(out_folder), json.loads(out_array)
    assert b["candidates"][0]["sp2ps"]["mean"] == a["candidates"][0]["sp2ps"]["mean"]
    assert b["original"]["accuracy"] == a["original"]["accuracy"]
    assert b["preprocess"]["applied"] is False


def test_progress_bar_appears_on_a_terminal_only_after_the_delay(monkeypatch, capsys):
    from onnx_sp2ps import cli

    clock = {"t": 100.0}
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True)
    update, close = cli._Console(quiet=False).progress("audit", delay=2.0)
    update(10, 100)
    assert "audit" not in capsys.readouterr().err  # a short run draws nothing
    clock["t"] += 3.0
    update(20, 100)
    close()
    assert "20/100" in capsys.readouterr().err
    quiet_update, _ = cli._Console(quiet=True).progress("audit")
    assert quiet_update is None

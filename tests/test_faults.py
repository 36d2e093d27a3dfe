"""Faults and hostile outputs (README "Supported and refused"): candidates with the same
file name, hand-edited reports, special files where outputs go, files this tool did not
write, signals at many moments of a run, a full disk, file modes and odd file names.

The report set under --out is checked the same way everywhere: after any failure it is
byte for byte the previous run's set or a complete new one (outputs are deterministic, so
"complete new" is "equal to an uninterrupted run's").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli

SET = ("report.json", "samples.csv", "report.html", "overlays", "maps")


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden files included)."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(samples, tmp_path_factory):
    """Eight sample images in class folders, the original and a pruned candidate."""
    root = tmp_path_factory.mktemp("small")
    images = root / "images"
    for p in sorted((samples / "images").rglob("*.png"))[:8]:
        target = images / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    return {
        "orig": samples / "gap_original.onnx",
        "cand": samples / "gap_l1_60.onnx",
        "images": images,
        "root": root,
    }


def _audit(small, out, *extra):
    return [
        "audit",
        small["orig"],
        small["cand"],
        "--images",
        small["images"],
        "--out",
        out,
        "--batch-size",
        "2",
        "-q",
        *extra,
    ]


# --------------------------------------------------------------------------- names


def test_candidates_with_one_file_name_get_their_own_rows_and_verdicts(capsys, small, tmp_path):
    a, b = tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"
    for target, source in ((a, small["orig"]), (b, small["cand"])):
        target.parent.mkdir()
        shutil.copy(source, target)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys,
        "audit",
        small["orig"],
        a,
        b,
        "--images",
        small["images"],
        "--out",
        out,
        "--fail-under",
        "0.99",
        "-q",
    )
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    names = [c["model"]["name"] for c in report["candidates"]]
    assert names == ["a/model.onnx", "b/model.onnx"]
    # a is the original's copy: 1.0, passes; b is pruned: fails. Each is checked on its
    # own figures (by position), not on the other's.
    first, second = report["candidates"]
    assert first["sp2ps"]["mean"] == 1.0 and first["gate"]["passed"] is True
    assert second["sp2ps"]["mean"] < 0.99 and second["gate"]["passed"] is False
    assert second["gate"]["checks"][0]["value"] == second["sp2ps"]["mean"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "a_model",
        "b_model",
        "gap_original",
    ]
    rows = (out / "samples.csv").read_text().splitlines()[1:]
    assert sum(r.startswith("a/model.onnx,") for r in rows) == 8
    assert sum(r.startswith("b/model.onnx,") for r in rows) == 8
    assert "ok   a/model.onnx" in stdout and "FAIL b/model.onnx" in stdout


def test_a_candidate_named_like_the_original_is_told_apart(capsys, small, tmp_path):
    twin = tmp_path / "release" / small["orig"].name
    twin.parent.mkdir()
    shutil.copy(small["cand"], twin)
    code, stdout, _ = run_cli(
        capsys, "audit", small["orig"], twin, "--images", small["images"], "--format", "json", "-q"
    )
    report = json.loads(stdout)
    assert code == 0
    assert report["original"]["model"]["name"] == "sample_models/gap_original.onnx"
    assert report["candidates"][0]["model"]["name"] == "release/gap_original.onnx"


# --------------------------------------------------------------------------- gate reports


def _report(small, tmp_path_factory=None, out=None) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    from onnx_sp2ps.cli import main

    with pytest.raises(SystemExit):
        main([str(a) for a in _audit(small, out)])
    return json.loads((out / "report.json").read_text())


def _edit(report: dict, path: tuple, value) -> dict:
    data = json.loads(json.dumps(report))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


HOSTILE = {
    "bool_for_mean": (("candidates", 0, "sp2ps", "mean"), True, "not a number"),
    "string_for_mean": (("candidates", 0, "sp2ps", "mean"), "0.99", "not a number"),
    "mean_over_one": (("candidates", 0, "sp2ps", "mean"), 7.5, "not a number in [0, 1]"),
    "negative_agreement": (("candidates", 0, "agreement"), -1, "not a number in [0, 1]"),
    "list_for_p5": (("candidates", 0, "sp2ps", "p5"), [1], "not a number"),
    "schema_unknown": (("schema_version",), 99, "schema_version 99"),
    "schema_bool": (("schema_version",), True, "schema_version true"),
    "candidates_object": (("candidates",), {"a": 1}, "candidates is not a list"),
    "candidate_string": (("candidates", 0), "x", "is not an object"),
    "name_number": (("candidates", 0, "model", "name"), 3, "model.name"),
    "sp2ps_missing": (("candidates", 0, "sp2ps"), None, "sp2ps is missing"),
    "original_accuracy_string": (("original", "accuracy"), "high", "original.accuracy"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_gate_refuses_a_report_that_breaks_the_schema(name, saved, capsys, tmp_path):
    path, value, problem = HOSTILE[name]
    target = tmp_path / "report.json"
    target.write_text(json.dumps(_edit(saved, path, value)))
    code, _, err = run_cli(capsys, "gate", target, "--fail-under", "0.1")
    assert code == 3, err
    assert len(err.splitlines()) == 1 and problem in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text,problem",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"tool": "onnx-sp2ps", "schema_version": 1, "x": NaN}', "NaN is not a JSON number"),
        ('{"a": ' + "1" * 10_000 + "}", "cannot read report"),
        ("\xff\xfe", "cannot read report"),
        ("", "cannot read report"),
    ],
)
def test_gate_refuses_malformed_json_with_one_line(text, problem, capsys, tmp_path):
    target = tmp_path / "report.json"
    target.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    code, _, err = run_cli(capsys, "gate", target, "--fail-under", "0.1")
    assert code == 3 and len(err.splitlines()) == 1 and problem in err, err


def test_gate_refuses_an_oversized_report_without_reading_it(capsys, tmp_path, monkeypatch):
    import onnx_sp2ps.report as report

    monkeypatch.setattr(report, "MAX_REPORT_BYTES", 1000)
    target = tmp_path / "report.json"
    target.write_text(" " * 2000)
    code, _, err = run_cli(capsys, "gate", target, "--fail-under", "0.1")
    assert code == 3 and "over the limit of 1,000" in err


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_gate_never_opens_a_special_file(kind, capsys, tmp_path):
    target = tmp_path / "report.json"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    code, _, err = run_cli(capsys, "gate", target, "--fail-under", "0.1")
    assert code == 3 and "not a regular file" in err, err


def test_gate_accepts_the_saved_report(saved, capsys, tmp_path):
    target = tmp_path / "report.json"
    target.write_text(json.dumps(saved))
    code, out, _ = run_cli(capsys, "gate", target, "--fail-under", "0.1")
    assert code == 0 and out.splitlines()[-1].startswith("PASSED | ")


# --------------------------------------------------------------------------- outputs


def test_special_files_where_outputs_go_are_refused_before_the_run(capsys, small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").symlink_to("/dev/null")
    code, _, err = run_cli(capsys, *_audit(small, out, "--force"))
    assert code == 3 and "link to a special file" in err
    assert os.path.islink(out / "report.html")  # never replaced, even with --force
    fifo = tmp_path / "junit.xml"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "o2", "--junit", fifo))
    assert code == 3 and "special file" in err and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "o3", "--summary-md", fifo))
    assert code == 3 and "special file" in err
    assert not (tmp_path / "o2" / "report.json").exists()


@pytest.mark.parametrize(
    "member", ["report.html", "overlays/gap_l1_60/mine.png", "maps/notes.npz", "junit.xml"]
)
def test_a_file_not_ours_is_refused_unless_forced(member, capsys, small, tmp_path):
    out = tmp_path / "out"
    target = (tmp_path / member) if member == "junit.xml" else out / member
    target.parent.mkdir(parents=True, exist_ok=True)
    if member.endswith(".png"):
        Image.new("RGB", (4, 4)).save(target)  # a PNG, but not one of ours
    else:
        target.write_bytes(b"the user's own file")
    before = target.read_bytes()
    args = _audit(small, out, "--junit", tmp_path / "junit.xml", "--save-maps")
    code, _, err = run_cli(capsys, *args)
    assert code == 3 and "was not written by onnx-sp2ps" in err and "--force" in err, err
    assert target.read_bytes() == before and not (out / "report.json").exists()
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert not target.exists() or target.read_bytes() != before
    # What this run wrote is recognised as ours by the next run.
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err


def test_summary_md_appends_and_never_truncates(capsys, small, tmp_path):
    summary = tmp_path / "step-summary.md"
    summary.write_text("## an earlier step's summary\n")
    for _ in range(2):
        code, _, _ = run_cli(
            capsys,
            "audit",
            small["orig"],
            small["cand"],
            "--images",
            small["images"],
            "--summary-md",
            summary,
            "-q",
        )
        assert code == 0
    text = summary.read_text()
    assert text.startswith("## an earlier step's summary\n")
    assert text.count("### onnx-sp2ps audit") == 2


def test_out_inside_the_images_folder_and_an_empty_out_are_refused(capsys, small):
    code, _, err = run_cli(capsys, *_audit(small, small["images"] / "report"))
    assert code == 3 and "inside the --images folder" in err
    assert not (small["images"] / "report").exists()
    code, _, err = run_cli(capsys, *_audit(small, ""))
    assert code == 2 and "empty" in err


def test_written_files_get_the_mode_the_umask_gives(capsys, small, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, _ = run_cli(
            capsys, *_audit(small, tmp_path / "out", "--save-maps", "--junit", tmp_path / "j.xml")
        )
    finally:
        os.umask(old)
    assert code == 0
    files = [p for p in (tmp_path / "out").rglob("*")] + [tmp_path / "j.xml"]
    wrong = {
        str(p): oct(stat.S_IMODE(p.stat().st_mode))
        for p in files
        if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)
    }
    assert len(files) > 10 and wrong == {}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_odd_file_names_are_read_and_written_safely(capsys, small, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(small["images"], images)
    source = sorted(images.rglob("*.png"))
    os.rename(source[0], os.path.join(os.fsencode(source[0].parent), b"\xff bad.png"))
    os.rename(source[1], source[1].parent / "new\nline.png")
    shutil.copy(source[2], source[2].parent / "a b.png")
    shutil.copy(source[2], source[2].parent / "a_b.png")
    shutil.copy(source[2], source[2].parent / "a_b.jpg.png")
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "audit",
        small["orig"],
        small["cand"],
        "--images",
        images,
        "--out",
        out,
        "--overlays",
        "all",
        "-q",
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    paths = {row["path"] for row in report["candidates"][0]["images"]}
    assert any(p.endswith("\\xff bad.png") for p in paths)
    assert any(p.endswith("new\\nline.png") for p in paths)
    overlays = list((out / "overlays" / "gap_l1_60").rglob("*.png"))
    assert len(overlays) == len(paths) == 11  # three names that differ by one character
    text = (out / "samples.csv").read_bytes().decode("utf-8")
    assert len(text.splitlines()) == 12  # a header and 11 rows: no name broke a line
    html = (out / "report.html").read_bytes().decode("utf-8")
    assert "\\xff bad.png" in html or "worst" in html


@pytest.mark.parametrize(
    "option,value",
    [
        ("--threads", "100000"),
        ("--batch-size", "10000000"),
        ("--worst", "100000"),
        ("--scorecam-channels", "1000000"),
    ],
)
def test_options_have_upper_bounds(option, value, capsys, small, tmp_path):
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "out", option, value))
    assert code == 2 and len(err.splitlines()) == 1 and "range" in err, err


# --------------------------------------------------------------------------- signals


_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    """The set an uninterrupted run writes, and a previous set to replace."""
    out = tmp_path_factory.mktemp("reference")
    args = [str(a) for a in _audit(small, out, "--overlays", "all", "--save-maps")]
    subprocess.run(
        [sys.executable, "-m", "onnx_sp2ps", *args],
        check=True,
        env=_ENV,
        capture_output=True,
        timeout=120,
    )
    previous = tmp_path_factory.mktemp("previous")
    args = [str(a) for a in _audit(small, previous, "--overlays", "worst", "--worst", "2")]
    subprocess.run(
        [sys.executable, "-m", "onnx_sp2ps", *args],
        check=True,
        env=_ENV,
        capture_output=True,
        timeout=120,
    )
    return {"new": _tree(out), "previous": previous, "old": _tree(previous)}


def _wait_for_handlers(pid: int, signum: int) -> None:
    """Wait until the process catches ``signum`` (its SigCgt mask in /proc): before that,
    the interpreter is still starting and the default action (death by the signal, with
    nothing read or written yet) is all there is."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            caught = next(
                int(line.split()[1], 16)
                for line in status.read_text().splitlines()
                if line.startswith("SigCgt:")
            )
        except (OSError, StopIteration):
            return
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.005)


# Moments from the handlers' installation (then come the imports) through model loading,
# the batches and the writes (an uninterrupted run takes about 3-4 s here).
@pytest.mark.parametrize(
    "signum,delay",
    [
        *[(signal.SIGTERM, d) for d in (0.0, 0.6, 1.2, 1.8, 2.4, 3.0, 3.6)],
        (signal.SIGHUP, 0.6),
        (signal.SIGHUP, 2.4),
        (signal.SIGINT, 1.2),
        (signal.SIGINT, 3.0),
        (signal.SIGTERM, -2.4),
    ],
)  # (negative: one process, no supervisor)
def test_a_signal_at_any_moment_keeps_one_whole_report_set(
    signum, delay, small, reference, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(reference["previous"], out)
    args = [str(a) for a in _audit(small, out, "--overlays", "all", "--save-maps")]
    env = {**_ENV, "ONNX_SP2PS_NO_SUPERVISOR": "1"} if delay < 0 else _ENV
    delay = abs(delay)
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnx_sp2ps", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_handlers(proc.pid, signum)
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - sent
    found = _tree(out)
    assert found in (reference["old"], reference["new"]), sorted(found)
    leftovers = [
        p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
    ]
    assert leftovers == []
    if proc.returncode == 0:  # the run ended before the signal came
        assert found == reference["new"]
        return
    assert proc.returncode == 128 + signum, err
    # Within a second: the worker ends itself, or the supervisor ends it after 0.6 s
    # (importing ml_dtypes alone holds the interpreter for 1.5-2 s here).
    assert took < 1.5
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted ("), err


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (root only; skipped with the reason elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_keeps_the_previous_set(capsys, small, tmp_path, tiny_disk):
    out = tiny_disk / "out"
    code, _, err = run_cli(capsys, *_audit(small, out, "--worst", "2"))
    assert code == 0, err
    before = _tree(out)
    filler = tiny_disk / "filler"
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 60_000))
    code, _, err = run_cli(capsys, *_audit(small, out, "--overlays", "all", "--save-maps"))
    assert code == 3, err
    assert err.startswith("error: no space left on the device of") and "--out" in err
    assert len(err.splitlines()) == 1
    assert _tree(out) == before


def test_a_vanished_out_folder_is_one_line(capsys, small, tmp_path, monkeypatch):
    import onnx_sp2ps.report as report

    out = tmp_path / "out"
    real = report.ReportSet.commit

    def vanish(self):
        shutil.rmtree(self.out)
        return real(self)

    monkeypatch.setattr(report.ReportSet, "commit", vanish)
    code, _, err = run_cli(capsys, *_audit(small, out))
    assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_failed_swap_undoes_its_renames(capsys, small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, *_audit(small, out, "--worst", "2"))
    before = _tree(out)
    calls = {"n": 0}
    real = os.rename

    def failing(a, b):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-swap: old members moved aside, some new ones in
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "rename", failing)
    code, _, err = run_cli(capsys, *_audit(small, out, "--overlays", "all"))
    assert code == 3 and "no space left" in err
    assert _tree(out) == before


def test_memory_error_is_exit_3_with_one_line(capsys, small, tmp_path, monkeypatch):
    import onnx_sp2ps.pipeline as pipeline

    def boom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(pipeline, "score_pairs", boom)
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "out"))
    assert code == 3 and err.startswith("error: out of memory") and len(err.splitlines()) == 1
    assert np.all([not p.name.startswith(".") for p in (tmp_path / "out").iterdir()])


def test_a_signal_during_the_swap_is_held_until_the_set_is_whole(
    capsys, small, tmp_path, monkeypatch
):
    from onnx_sp2ps.files import interrupt

    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, *_audit(small, out, "--worst", "2"))
    calls = {"n": 0}
    real = os.rename

    def signalled(a, b):
        calls["n"] += 1
        if calls["n"] == 2:  # SIGTERM arrives between two renames of the swap
            interrupt(signal.SIGTERM)
        return real(a, b)

    monkeypatch.setattr(os, "rename", signalled)
    code, _, err = run_cli(capsys, *_audit(small, out, "--worst", "3"))
    assert code == 143 and err.startswith("interrupted (SIGTERM)")
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["worst"] if "worst" in report["settings"] else True
    assert len(list((out / "overlays" / "gap_l1_60").rglob("*.png"))) == 3  # the new set


# --------------------------------------------------------------------------- non-root


def _world(path: Path) -> Path:
    for p in [path, *path.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o644)
    return path


def test_as_a_non_root_user_an_unwritable_out_is_exit_3_and_onnxruntime_stays_quiet(
    small, open_tmp
):
    from conftest import run_as_nobody

    tmp_path = open_tmp
    images = _world(Path(shutil.copytree(small["images"], tmp_path / "images")))
    models = _world(tmp_path / "models") if (tmp_path / "models").mkdir() is None else None
    for key in ("orig", "cand"):
        shutil.copy(small[key], models / small[key].name)
        (models / small[key].name).chmod(0o644)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)  # root's folder: not writable by the user
    args = [
        "audit",
        models / small["orig"].name,
        models / small["cand"].name,
        "--images",
        images,
        "-q",
    ]
    code, _, err = run_as_nobody(tmp_path, *args, "--out", locked / "out")
    assert code == 3 and len(err.splitlines()) == 1 and "cannot write" in err, err
    # HOME does not exist: onnxruntime's own warnings (telemetry, logging) never show.
    out = tmp_path / "out"
    code, stdout, err = run_as_nobody(tmp_path, *args, "--out", out)
    assert code == 0 and err == "", err
    assert (out / "report.json").stat().st_uid == 65534
    # Run from a folder this user cannot read (./pyproject.toml cannot even be looked
    # for there): settings are simply absent, not an internal error.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code, _, err = run_as_nobody(tmp_path, *args, "--out", out, cwd=private)
    assert code == 0 and err == "", err
    # A model this user cannot read is an input problem (3), not a usage error.
    secret = models / "secret.onnx"
    shutil.copy(small["orig"], secret)
    secret.chmod(0o600)
    code, _, err = run_as_nobody(tmp_path, "inspect", secret)
    assert code == 3 and len(err.splitlines()) == 1 and "Permission denied" in err, err


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "huge"])
def test_config_files_are_read_only_when_plain_and_small(
    kind, capsys, small, tmp_path, monkeypatch
):
    import onnx_sp2ps.files as files

    config = tmp_path / "settings.toml"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "dev_zero":
        config.symlink_to("/dev/zero")
    elif kind == "folder":
        config.mkdir()
    else:
        monkeypatch.setattr(files, "MAX_TEXT_BYTES", 100)
        config.write_text("# " + "x" * 200 + "\n")
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "out", "--config", config))
    assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_max_memory_sets_the_budget_of_model_and_batch_checks(capsys, small, tmp_path):
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "out", "--max-memory", "64K"))
    assert code == 3 and "budget of 64.0 KiB" in err and len(err.splitlines()) == 1, err
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "out", "--max-memory", "1G"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "inspect", small["orig"], "--max-memory", "lots")
    assert code == 2 and "--max-memory" in err


@pytest.mark.parametrize(
    "crash,code,phrase",
    [
        ("SIGSEGV", 4, "internal error: the run crashed with SIGSEGV"),
        ("SIGKILL", 137, "killed (SIGKILL), perhaps by the out-of-memory killer"),
    ],
)
def test_a_worker_that_dies_by_a_signal_is_one_line_and_leaves_nothing(
    crash, code, phrase, small, tmp_path
):
    """A crash in a native library (or the out-of-memory killer) mid-run: the supervisor
    reports it in one line, with an exit code that is not a gate's, and removes the
    staging folder the worker announced."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "import onnx_sp2ps.pipeline as pipeline\n"
        "def crash(*args, **kwargs):\n"
        f"    os.kill(os.getpid(), signal.{crash})\n"
        "pipeline.score_pairs = crash\n"
    )
    out = tmp_path / "out"
    args = [str(a) for a in _audit(small, out, "--overlays", "all")]
    env = {**_ENV, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-m", "onnx_sp2ps", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and phrase in done.stderr
    assert list(out.iterdir()) == []  # the staging folder is gone, nothing else was made


def test_an_image_of_another_format_under_an_image_name_is_skipped_unread(capsys, small, tmp_path):
    """Only the formats of the suffixes read are decoded: a GIF (or EPS, PSD) named .png
    never reaches its Pillow plugin."""
    images = Path(shutil.copytree(small["images"], tmp_path / "images"))
    Image.new("RGB", (8, 8)).save(images / "0" / "disguised.png", format="GIF")
    code, stdout, err = run_cli(
        capsys, "audit", small["orig"], small["cand"], "--images", images, "--format", "json", "-q"
    )
    assert code == 0
    skipped = json.loads(stdout)["images"]["skipped"]
    assert [s["path"] for s in skipped] == ["0/disguised.png"]
    assert "cannot identify" in skipped[0]["reason"] or "cannot decode" in skipped[0]["reason"]


def test_two_runs_into_one_out_folder_leave_one_whole_set(small, reference, tmp_path):
    """Concurrent audits into one --out swap their sets one after the other."""
    out = tmp_path / "out"
    args = [str(a) for a in _audit(small, out, "--overlays", "all", "--save-maps")]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "onnx_sp2ps", *args],
            env=_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in runs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert _tree(out) == reference["new"]


@pytest.mark.parametrize(
    "text,phrase",
    [
        ("fail-under = {a = 1}", "is a dict"),
        ("out = {}", "is a dict"),
        ("save-maps = {x = 1}", "is a dict"),
        ("threads = 1.5", "not a valid integer"),
        ("mean = [[1]]", "is a list"),
        ("tool = {onnx-sp2ps = 3}", "is not a table"),
        ("[tool]\nonnx-sp2ps = [1]", "is not a table"),
    ],
)
def test_config_values_of_the_wrong_type_are_usage_errors(text, phrase, capsys, small, tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text(text + "\n")
    code, _, err = run_cli(capsys, *_audit(small, tmp_path / "out", "--config", config))
    assert code == 2 and len(err.splitlines()) == 1 and phrase in err, err


def test_a_summary_cut_short_by_a_full_disk_is_taken_back_off(capsys, small, tiny_disk):
    """--summary-md on a disk with room for part of the summary: exit 3 with one line,
    and the file holds what it held before, not half a summary."""
    summary = tiny_disk / "step-summary.md"
    summary.write_text("## an earlier step's summary\n" + "x" * (4096 - 80) + "\n")
    filler = tiny_disk / "filler"
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    filler.write_bytes(b"\0" * free)  # the disk is full to the block
    with open(filler, "ab") as f:  # (tmpfs may leave part of a page: fill that too)
        with contextlib.suppress(OSError):
            f.write(b"\0" * 65536)
    before = summary.read_bytes()
    images = ("--images", small["images"], "--batch-size", "2", "-q")
    args = ("audit", small["orig"], small["cand"], *images, "--summary-md", summary)
    code, _, err = run_cli(capsys, *args)
    assert code == 3, err
    assert len(err.splitlines()) == 1 and "no space left" in err
    assert summary.read_bytes() == before


def test_an_error_after_a_signal_is_the_signal_s_doing(capsys, small, monkeypatch):
    """A signal that lands inside an import (onnxruntime's cannot be repeated after one
    is cut short: "generic_type ... is already registered") leaves an ImportError behind:
    the run ends as interrupted (128 + the signal, one line), not as an internal error."""
    import onnx_sp2ps.files as files
    import onnx_sp2ps.pipeline as pipeline

    def audit(*args, **kwargs):
        try:
            files.interrupt(signal.SIGTERM)  # the handler, raising inside the import
        except files.Interrupted:
            pass  # (swallowed by the import machinery, as onnxruntime's was)
        raise ImportError('generic_type: type "GraphOptimizationLevel" is already registered!')

    monkeypatch.setattr(pipeline, "audit", audit)
    code, _, err = run_cli(
        capsys, "audit", small["orig"], small["cand"], "--images", small["images"]
    )
    assert code == 128 + signal.SIGTERM, err
    assert len(err.splitlines()) == 1 and err.startswith("interrupted ("), err

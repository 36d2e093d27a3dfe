"""Shared test setup: the tests folder on sys.path (for onnx_builders), paths, hashes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SAMPLES = ROOT / "sample_models"
FIXTURES = TESTS / "fixtures"

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Property tests draw the same examples on every run (CI must not fail by chance);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for failures by hand.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r of two maps (NaN when either is constant)."""
    a = a.ravel().astype(np.float64)
    b = b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def check_maps(
    ours: np.ndarray,
    ref: np.ndarray,
    paths,
    what: str,
    *,
    min_pearson: float = 0.99,
    value_rtol: float | None = None,
    zero_tol: float = 1e-5,
) -> None:
    """Each image's map against its reference: Pearson >= ``min_pearson`` (and, with
    ``value_rtol``, |ours - ref| <= value_rtol * max|ref|: Pearson is blind to a
    per-image factor); where the reference is all zero (no correlation is defined), ours
    may not exceed ``zero_tol`` times the largest reference value."""
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    assert np.isfinite(ours).all(), what
    scale = float(np.abs(ref).max())
    bad = []
    for i in range(len(ref)):
        if not (ref[i] != 0).any():
            if np.abs(ours[i]).max() > zero_tol * scale:
                bad.append(f"{paths[i]}: reference all zero, ours max {np.abs(ours[i]).max():.3g}")
            continue
        r = pearson(ours[i], ref[i])
        if value_rtol is None:
            if not r >= min_pearson:
                bad.append(f"{paths[i]}: Pearson {r:.4f}")
            continue
        err = np.abs(ours[i] - ref[i]).max() / np.abs(ref[i]).max()
        if not (r >= min_pearson and err <= value_rtol):
            bad.append(f"{paths[i]}: Pearson {r:.4f}, max relative difference {err:.2e}")
    assert not bad, f"{what}: {len(bad)} image(s) differ: " + "; ".join(bad[:8])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "gap_original.onnx").exists():
        pytest.fail("sample_models/ is missing: run scripts/build_sample_models.py")
    return SAMPLES


def save_with_external_data(model_path: Path, folder: Path) -> Path:
    """A copy of the model as ``folder/model.onnx`` with every weight in ``weights.bin``."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    onnx.save_model(
        onnx.load(str(model_path)),
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return out


def point_external_data(model_path: Path, location: str) -> None:
    """Rewrite the model file so that every external tensor reads ``location``."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def run_cli(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from onnx_sp2ps.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


NOBODY = 65534


@pytest.fixture
def open_tmp():
    """A folder every user can enter and write (pytest's own tmp folders are private to
    root), for tests that run as another user; removed after."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sp2ps-shared-"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o777)
    shutil.rmtree(folder, ignore_errors=True)


def run_as_nobody(tmp_path: Path, *args, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the CLI as an unprivileged user (uid and gid 65534) in a forked child.

    The child is forked from this process with the package, onnxruntime and a session
    already loaded, so the interpreter's own folder (often private to root) need not be
    readable by that user. Skips, with the reason, when the tests do not run as root.
    """
    if not hasattr(os, "fork") or os.geteuid() != 0:
        pytest.skip("dropping privileges needs a POSIX system and root")
    import json
    import tempfile

    from PIL import Image

    from onnx_sp2ps.cli import main
    from onnx_sp2ps.pipeline import compute_cams  # noqa: F401  (loaded before the fork)

    Image.init()  # every image plugin, loaded before the fork

    main_args = [str(a) for a in args]
    # One run as root first, in-process, so every lazily loaded library is in memory.
    with tempfile.TemporaryDirectory() as warm, contextlib.redirect_stdout(io.StringIO()):
        try:
            main(
                [
                    "audit",
                    str(SAMPLES / "gap_original.onnx"),
                    str(SAMPLES / "gap_l1_60.onnx"),
                    "--images",
                    str(SAMPLES / "images"),
                    "--out",
                    warm,
                    "--save-maps",
                    "--junit",
                    f"{warm}/j.xml",
                    "--summary-md",
                    f"{warm}/s.md",
                    "--fail-under",
                    "0.1",
                    "-q",
                ]
            )
        except SystemExit:
            pass
    out_path, err_path = tmp_path / ".nobody-out", tmp_path / ".nobody-err"
    with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 99
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                if cwd is not None:  # (entered as root: the user may not be able to)
                    os.chdir(cwd)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.environ["HOME"] = "/nonexistent"
                try:
                    main(main_args)
                except SystemExit as exc:
                    code = int(exc.code or 0)
            except BaseException as exc:  # noqa: BLE001
                print(json.dumps(repr(exc)), file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    out_path.unlink()
    err_path.unlink()
    return code, text[0], text[1]

"""Shared test setup: the tests folder on sys.path (for onnx_builders), paths, hashes."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

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


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "gap_original.onnx").exists():
        pytest.fail("sample_models/ is missing: run scripts/build_sample_models.py")
    return SAMPLES


def run_cli(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from onnx_sp2ps.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err

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


def save_with_external_data(model_path: Path, folder: Path) -> Path:
    """A copy of the model as ``folder/model.onnx`` with every weight in ``weights.bin``."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    onnx.save_model(onnx.load(str(model_path)), str(out), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
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

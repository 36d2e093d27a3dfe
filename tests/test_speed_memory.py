"""Issue 6 (speed and memory): the structural properties behind the benchmark's figures.

No timing here: what is asserted is how much work is done (sessions made, pages kept
resident), and that the faster paths give the same results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnx_sp2ps.runtime as runtime
import onnx_sp2ps.similarity as similarity
from onnx_sp2ps import audit
from onnx_sp2ps.data import InputSpec, open_images
from onnx_sp2ps.errors import UsageError
from onnx_sp2ps.model import prepare_model
from onnx_sp2ps.pipeline import AuditSettings
from onnx_sp2ps.similarity import score_pairs, ssim


def _count_sessions(monkeypatch) -> list[str]:
    made: list[str] = []
    real = runtime.create_session

    def counting(model, **kwargs):
        made.append(kwargs.get("what", "?"))
        return real(model, **kwargs)

    monkeypatch.setattr(runtime, "create_session", counting)
    return made


def test_a_gradcam_audit_makes_one_session_per_model(samples, monkeypatch):
    made = _count_sessions(monkeypatch)
    result = audit(
        samples / "gap_original.onnx",
        [samples / "gap_l1_30_ft.onnx"],
        samples / "images",
        settings=AuditSettings(provider="cpu", batch_size=8),
    )
    # The fused model (activations, logits and head gradients in one run) is all that
    # Grad-CAM needs: no plain-model, head or head-gradient session is compiled.
    assert len(made) == 2, made
    assert result.original.gradient == "exact" and len(result.paths) == 50


def test_sessions_a_method_needs_are_made_on_first_use(samples, monkeypatch):
    made = _count_sessions(monkeypatch)
    runner = runtime.ModelRunner(prepare_model(samples / "gap_original.onnx"), provider="cpu")
    assert len(made) == 1
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    acts, logits = runner.run(x)  # no targets: the plain model
    assert len(made) == 2 and acts.shape[0] == 3
    np.testing.assert_allclose(runner.run_head(acts), logits, rtol=1e-5, atol=1e-5)
    assert len(made) == 3
    _, grads = runner.head_gradients(acts, np.argmax(logits, axis=1))  # not from a fused run
    assert len(made) == 4 and grads.shape == acts.shape
    runner.run_head(acts)
    runner.head_gradients(acts, np.zeros(3, np.int64))
    assert len(made) == 4  # made once, then reused


def _resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef":
            inside = len(fields) >= 6 and fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_streaming_a_large_npy_keeps_few_of_its_pages_resident(tmp_path):
    path = tmp_path / "inputs.npy"
    n, size = 256, 96  # 28 MiB of float32
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 3, size, size))
    data[:] = np.arange(n, dtype=np.float32)[:, None, None, None]
    data.flush()
    del data
    images = open_images(path, spec=InputSpec("NCHW", 3, size, size))
    means = [batch.inputs.mean(axis=(1, 2, 3)) for batch in images.iter_batches(16)]
    np.testing.assert_array_equal(np.concatenate(means), np.arange(n))  # values unchanged
    file_bytes = path.stat().st_size
    assert _resident_bytes(path) < file_bytes // 4  # ~one batch, not the whole file
    # Rows already streamed can still be read again (overlays do).
    assert images.display_image(3).shape == (size, size, 3)


def test_ssim_and_scores_do_not_depend_on_the_number_of_threads(monkeypatch):
    monkeypatch.setattr(similarity, "_MIN_CHUNK_PIXELS", 0)  # small maps on threads too
    rng = np.random.default_rng(7)
    maps_a = rng.random((9, 40, 36))
    maps_b = np.clip(maps_a + rng.normal(0, 0.2, maps_a.shape), 0, 1)
    one = score_pairs(maps_a, maps_b, workers=1)
    for workers in (2, 3, 16):
        many = score_pairs(maps_a, maps_b, workers=workers)
        np.testing.assert_array_equal(many.spatial, one.spatial)
        np.testing.assert_array_equal(many.spectral, one.spectral)
    np.testing.assert_array_equal(ssim(maps_a, maps_b, workers=4), ssim(maps_a, maps_b))


@pytest.mark.parametrize("workers", [0, -1, 1.5])
def test_ssim_rejects_a_bad_number_of_threads(workers):
    maps = np.zeros((2, 16, 16))
    with pytest.raises(UsageError, match="workers"):
        ssim(maps, maps, workers=workers)

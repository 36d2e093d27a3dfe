"""Provider choice, CUDA fallback, batching of fixed-batch models and heads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_sp2ps.errors import ModelError, UsageError
from onnx_sp2ps.model import prepare_model
from onnx_sp2ps.pipeline import compute_cams
from onnx_sp2ps.runtime import (
    CPU,
    CUDA,
    ModelRunner,
    available_providers,
    create_session,
    resolve_providers,
)

from onnx_builders import build_cnn, run_model


def test_cpu_never_tries_cuda():
    assert resolve_providers("cpu", [CUDA, CPU]) == ([CPU], None)


def test_auto_tries_cuda_when_offered_and_is_silent_otherwise():
    assert resolve_providers("auto", [CUDA, CPU]) == ([CUDA, CPU], None)
    assert resolve_providers("auto", [CPU]) == ([CPU], None)


def test_cuda_without_a_cuda_build_says_so_in_one_line():
    tried, note = resolve_providers("cuda", [CPU])
    assert tried == [CPU]
    assert "CPU" in note and "\n" not in note


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="auto, cpu, cuda"):
        resolve_providers("tpu", [CPU])


def test_requesting_cuda_gets_cuda_or_an_honest_cpu_fallback(capfd):
    built = build_cnn()
    session, choice = create_session(built.model, provider="cuda")
    got = session.get_providers()
    assert tuple(got) == choice.providers
    if got[0] == CUDA:  # a machine with a usable GPU
        assert choice.device == "cuda" and choice.note is None
    else:
        assert choice.device == "cpu"
        assert choice.note and "CPU" in choice.note and "\n" not in choice.note
    # onnxruntime's own error spam about missing CUDA libraries is silenced.
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err and "CUDA" not in captured.err
    x = built.random_input()
    out = session.run(None, {built.input_name: x})[0]
    np.testing.assert_allclose(out, run_model(built, x)[built.output_name], rtol=1e-6)


def test_auto_on_this_machine_runs(capfd):
    built = build_cnn()
    session, choice = create_session(built.model, provider="auto")
    assert CPU in choice.providers
    assert choice.note is None
    assert "onnxruntime" not in capfd.readouterr().err


def test_available_providers_lists_cpu():
    assert CPU in available_providers()


def test_threads_must_be_positive():
    with pytest.raises(UsageError):
        create_session(build_cnn().model, threads=0)


def test_a_model_onnxruntime_cannot_load_is_a_model_error():
    model = build_cnn().model
    model.ir_version = 99
    with pytest.raises(ModelError, match="onnxruntime cannot run"):
        create_session(model, provider="cpu")


def test_fixed_batch_one_model_runs_any_number_of_images():
    built = build_cnn(fixed_batch=1)
    runner = ModelRunner(prepare_model(built.model), provider="cpu")
    rng = np.random.default_rng(0)
    x = rng.random((5,) + tuple(built.input_shape[1:]), dtype=np.float32)
    acts, logits = runner.run(x)
    assert acts.shape[0] == 5 and logits.shape == (5, built.num_classes)
    one = np.concatenate([runner.run(x[i : i + 1])[1] for i in range(5)])
    np.testing.assert_allclose(logits, one, rtol=1e-6)


def test_head_with_a_hard_coded_batch_is_run_one_map_at_a_time():
    built = build_cnn(head="gap_reshape_matmul", fixed_batch=1)
    model = built.model
    for t in model.graph.initializer:  # export-style Reshape to [1, C]
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.int64 and arr.tolist() == [-1, 16]:
            t.CopyFrom(numpy_helper.from_array(np.array([1, 16], np.int64), t.name))
    onnx.checker.check_model(model)
    runner = ModelRunner(prepare_model(model), provider="cpu")
    acts, logits = runner.run(built.random_input())
    many = np.repeat(acts, 6, axis=0)
    out = runner.run_head(many)
    assert runner.head_batch_limit == 1
    np.testing.assert_allclose(out, np.repeat(logits, 6, axis=0), rtol=1e-5, atol=1e-6)
    # The head's gradient graph keeps the hard-coded batch: it is run one map at a time too.
    fresh = ModelRunner(prepare_model(model), provider="cpu")
    y, grads = fresh.head_gradients(many, np.full(len(many), -1))
    assert grads.shape == many.shape and fresh.head_batch_limit == 1
    np.testing.assert_allclose(grads, np.repeat(grads[:1], 6, axis=0), rtol=1e-6)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gradients_from_the_fused_run_equal_the_head_gradient_run(layout):
    built = build_cnn(head="flatten_mlp", layout=layout)
    runner = ModelRunner(prepare_model(built.model), provider="cpu")
    x = built.random_input(seed=9)
    acts, logits = runner.run(x, targets=np.full(len(x), -1))
    own = np.argmax(logits, axis=1)
    _, cached = runner.head_gradients(acts, own)
    separate = ModelRunner(prepare_model(built.model), provider="cpu")
    plain_acts, _ = separate.run(x)
    _, fresh = separate.head_gradients(plain_acts, own)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-7)

    class Broken:
        def get_providers(self):
            return [CPU]

        def run(self, *a, **k):
            raise AssertionError("the fused run's gradients should have been used")

    grad_model = runner._grad[0]
    runner._grad = (grad_model, Broken())
    runner.head_gradients(acts, own)  # served from the fused run
    with pytest.raises(AssertionError):  # other targets: a new head-gradient run
        runner.head_gradients(acts, (own + 1) % built.num_classes)


@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "eigencam"])
def test_a_fixed_batch_above_one_takes_padded_batches(tmp_path, method):
    # Exported with batch 3 hard-coded (also in the head's Reshape); 7 images leave a last
    # batch of 1, which is padded and trimmed. The maps equal the dynamic-batch twin's.
    fixed = build_cnn(head="gap_reshape_matmul", fixed_batch=3, seed=4).model
    for t in fixed.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.int64 and arr.tolist() == [-1, 16]:
            t.CopyFrom(numpy_helper.from_array(np.array([3, 16], np.int64), t.name))
    onnx.checker.check_model(fixed)
    free = build_cnn(head="gap_reshape_matmul", seed=4).model
    images = np.random.default_rng(5).standard_normal((7, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    maps = {}
    for name, model in (("fixed", fixed), ("free", free)):
        onnx.save(model, tmp_path / f"{name}.onnx")
        maps[name], _, _ = compute_cams(
            tmp_path / f"{name}.onnx",
            tmp_path / "x.npy",
            method=method,
            batch_size=4,
            provider="cpu",
        )
    np.testing.assert_allclose(maps["fixed"].logits, maps["free"].logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps["fixed"].maps, maps["free"].maps, rtol=1e-4, atol=1e-5)


def test_provider_status_says_which_providers_can_run_here_and_why_not(monkeypatch):
    """Every provider onnxruntime offers is either usable (a session on it really runs on
    it) or unavailable with a one-line reason; the CPU is always usable; a provider that
    cannot be created (here a made-up one) is unavailable."""
    import onnxruntime as ort

    from onnx_sp2ps import runtime

    status = runtime.provider_status()
    assert list(status) == ort.get_available_providers()
    assert status[runtime.CPU] is None
    for provider, reason in status.items():
        assert reason is None or (reason.strip() and "\n" not in reason), (provider, reason)
    offered = ort.get_available_providers()
    monkeypatch.setattr(
        runtime, "available_providers", lambda: ["MadeUpExecutionProvider", *offered]
    )
    status = runtime.provider_status()
    assert status["MadeUpExecutionProvider"]


def test_inspect_lists_unavailable_providers_with_their_reason(capsys, samples, monkeypatch):
    from onnx_sp2ps import runtime

    from conftest import run_cli

    reason = "libcudart.so.12: cannot open"
    monkeypatch.setattr(
        runtime, "provider_status", lambda: {"CUDAExecutionProvider": reason, runtime.CPU: None}
    )
    code, out, _ = run_cli(capsys, "inspect", samples / "gap_original.onnx", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["providers"] == [runtime.CPU]
    assert data["providers_unavailable"] == {
        "CUDAExecutionProvider": "libcudart.so.12: cannot open"
    }
    code, out, _ = run_cli(capsys, "inspect", samples / "gap_original.onnx")
    assert "CUDAExecutionProvider: unavailable (libcudart.so.12: cannot open)" in out

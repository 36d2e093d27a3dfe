"""The CUDA code path (IO binding, one device copy of each batch) without a GPU.

A fake onnxruntime module stands in for a CUDA build: its sessions are real CPU sessions
that report ``CUDAExecutionProvider`` first, refuse ``session.run`` and record every IO
binding call; its ``OrtValue.ortvalue_from_numpy(x, "cuda", 0)`` records the upload and
keeps a private copy of ``x``, as a device copy would. The binding calls go through to
the real CPU session's IO binding, so the results are checked against the CPU path too.
The last tests check that the real fallback to CPU (this machine) never binds.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from onnx_sp2ps import runtime
from onnx_sp2ps.backward import build_head_gradient
from onnx_sp2ps.model import fuse_gradient, prepare_model
from onnx_sp2ps.pipeline import AuditSettings, audit
from onnx_sp2ps.runtime import CPU, CUDA, DeviceInputs, ModelRunner

from onnx_builders import build_cnn


class Log:
    def __init__(self):
        self.uploads: list[tuple[object, tuple, str, int]] = []  # (value, shape, device, id)
        self.bindings: list[FakeBinding] = []

    def uploaded(self, value) -> bool:
        return any(value is up[0] for up in self.uploads)


class FakeBinding:
    def __init__(self, real, session):
        self.real, self.session = real, session
        self.inputs: dict[str, tuple[str, object]] = {}
        self.outputs: list[tuple[str, str]] = []
        self.ran = self.read = False

    def bind_cpu_input(self, name, array):
        self.inputs[name] = ("host", array)
        self.real.bind_cpu_input(name, array)

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = ("device", value)
        self.real.bind_ortvalue_input(name, value)

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.outputs.append((name, device_type))
        self.real.bind_output(name, device_type, device_id)

    def copy_outputs_to_cpu(self):
        assert self.ran, "outputs read before the run"
        self.read = True
        return self.real.copy_outputs_to_cpu()


class FakeCudaSession:
    def __init__(self, real, log: Log):
        self._real, self._log = real, log

    def get_providers(self):
        return [CUDA, CPU]

    def get_inputs(self):
        return self._real.get_inputs()

    def get_outputs(self):
        return self._real.get_outputs()

    def run(self, *args, **kwargs):
        raise AssertionError("session.run on a CUDA session: IO binding expected")

    def io_binding(self):
        binding = FakeBinding(self._real.io_binding(), self)
        self._log.bindings.append(binding)
        return binding

    def run_with_iobinding(self, binding):
        assert binding.session is self
        self._real.run_with_iobinding(binding.real)
        binding.ran = True


class FakeOrt:
    """onnxruntime as a CUDA build on a machine with a GPU would look to runtime.py."""

    def __init__(self, log: Log):
        self._log = log
        fake = self

        class OrtValue:
            @staticmethod
            def ortvalue_from_numpy(array, device_type="cpu", device_id=0):
                if device_type == "cpu":
                    return onnxruntime.OrtValue.ortvalue_from_numpy(array)
                value = onnxruntime.OrtValue.ortvalue_from_numpy(np.array(array, copy=True))
                fake._log.uploads.append((value, array.shape, device_type, device_id))
                return value

        self.OrtValue = OrtValue

    def __getattr__(self, name):
        return getattr(onnxruntime, name)

    def get_available_providers(self):
        return [CUDA, CPU]

    def InferenceSession(self, data, options, providers):
        real = onnxruntime.InferenceSession(data, options, providers=[CPU])
        return FakeCudaSession(real, self._log) if providers[0] == CUDA else real


@pytest.fixture
def fake_cuda(monkeypatch) -> Log:
    log = Log()
    fake = FakeOrt(log)
    monkeypatch.setattr(runtime, "_ort", lambda: fake)
    return log


def _model(**kw):
    built = build_cnn(head="flatten_mlp", **kw)
    return built, prepare_model(built.model)


def _cpu_runner(built):
    return ModelRunner(prepare_model(built.model), provider="cpu", threads=1)


def test_a_cuda_session_runs_through_io_binding_with_the_batch_uploaded_once(fake_cuda):
    built, prepared = _model()
    x = built.random_input(seed=3)
    expected = _cpu_runner(built).run(x)
    runner = ModelRunner(prepared, provider="cuda", threads=1)
    assert runner.provider.device == "cuda" and runner.provider.note is None
    acts, logits = runner.run(x)

    assert len(fake_cuda.uploads) == 1
    value, shape, device, device_id = fake_cuda.uploads[0]
    assert shape == x.shape and (device, device_id) == ("cuda", 0)
    (binding,) = fake_cuda.bindings
    spec = prepared.spec
    assert binding.inputs == {spec.input.name: ("device", value)}
    assert binding.outputs == [(spec.feature_map.name, "cpu"), (spec.logits.name, "cpu")]
    assert binding.ran and binding.read
    np.testing.assert_array_equal(acts, expected[0])
    np.testing.assert_array_equal(logits, expected[1])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_the_fused_gradient_run_binds_the_targets_and_reads_every_output(fake_cuda, layout):
    built, prepared = _model(layout=layout)
    x = built.random_input(seed=4)
    targets = np.array([-1, 2], dtype=np.int64)[: len(x)]
    cpu = _cpu_runner(built)
    want_acts, want_logits = cpu.run(x, targets=targets)
    resolved = np.where(targets < 0, want_logits.argmax(1), targets)
    want_grads = cpu.head_gradients(want_acts, resolved)[1]

    runner = ModelRunner(prepared, provider="cuda", threads=1)
    acts, logits = runner.run(x, targets=targets)
    assert len(fake_cuda.uploads) == 1
    (binding,) = fake_cuda.bindings
    grad = runner._grad[0]
    kind, bound_targets = binding.inputs[grad.target]
    assert kind == "host" and bound_targets.dtype == np.int64
    np.testing.assert_array_equal(bound_targets, targets)
    assert binding.inputs[prepared.spec.input.name] == ("device", fake_cuda.uploads[0][0])
    assert [name for name, _ in binding.outputs] == [
        prepared.spec.feature_map.name,
        prepared.spec.logits.name,
        grad.gradient,
        grad.target_used,
    ]
    assert {device for _, device in binding.outputs} == {"cpu"} and binding.read
    np.testing.assert_array_equal(acts, want_acts)
    np.testing.assert_array_equal(logits, want_logits)
    # The gradients read back from the binding serve head_gradients without a run.
    _, grads = runner.head_gradients(acts, resolved)
    assert len(fake_cuda.bindings) == 1
    np.testing.assert_array_equal(grads, want_grads)


def test_runners_sharing_device_inputs_upload_each_batch_once(fake_cuda):
    built_a, prep_a = _model(seed=1)
    _, prep_b = _model(seed=2)
    shared = DeviceInputs()
    a = ModelRunner(prep_a, provider="cuda", device_inputs=shared)
    b = ModelRunner(prep_b, provider="cuda", device_inputs=shared)
    x = built_a.random_input(seed=5)
    targets = np.full(len(x), -1, dtype=np.int64)
    a.run(x, targets=targets)
    b.run(x, targets=targets)
    assert len(fake_cuda.uploads) == 1
    first = fake_cuda.uploads[0][0]
    name = prep_a.spec.input.name
    assert [bd.inputs[name] for bd in fake_cuda.bindings] == [("device", first)] * 2

    y = x.copy()  # the next batch: a new array, even with the same values, is uploaded
    a.run(y)
    b.run(y, targets=targets)
    assert len(fake_cuda.uploads) == 2
    # Masked inputs (Score-CAM) are uploaded for their one run and do not evict the batch.
    a.run_inputs(y * 0.5)
    assert len(fake_cuda.uploads) == 3
    b.run(y)
    assert len(fake_cuda.uploads) == 3
    assert fake_cuda.bindings[-1].inputs[name] == ("device", fake_cuda.uploads[1][0])


def test_a_fixed_batch_model_uploads_each_image_once_for_all_runners(fake_cuda):
    built = build_cnn(fixed_batch=1)
    shared = DeviceInputs()
    runners = [
        ModelRunner(prepare_model(built.model), provider="cuda", device_inputs=shared)
        for _ in range(2)
    ]
    rng = np.random.default_rng(0)
    x = rng.random((3,) + tuple(built.input_shape[1:]), dtype=np.float32)
    logits = [r.run(x)[1] for r in runners]
    assert [up[1] for up in fake_cuda.uploads] == [(1,) + x.shape[1:]] * 3
    assert len(fake_cuda.bindings) == 6
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_allclose(logits[0], _cpu_runner(built).run(x)[1], rtol=1e-6)


def test_without_sharing_every_run_uploads_its_own_copy(fake_cuda):
    # A runner not given DeviceInputs never reuses a copy: an array changed in place
    # between runs gives the new results.
    built, prepared = _model()
    runner = ModelRunner(prepared, provider="cuda", threads=1)
    x = built.random_input(seed=6)
    runner.run(x)
    x[:] = built.random_input(seed=7)
    _, logits = runner.run(x)
    assert len(fake_cuda.uploads) == 2
    np.testing.assert_array_equal(logits, _cpu_runner(built).run(x)[1])


def test_head_runs_on_cuda_bind_the_maps_and_read_the_logits(fake_cuda):
    built, prepared = _model()
    x = built.random_input(seed=8)
    cpu = _cpu_runner(built)
    acts, logits = cpu.run(x)
    maps = np.repeat(acts, 3, axis=0)
    others = (np.argmax(np.repeat(logits, 3, axis=0), axis=1) + 1) % built.num_classes

    runner = ModelRunner(prepared, provider="cuda", threads=1)
    np.testing.assert_array_equal(runner.run_head(maps), cpu.run_head(maps))
    head = runner.head_session
    (name_in,), (name_out,) = head.get_inputs(), head.get_outputs()
    last = fake_cuda.bindings[-1]
    assert last.session is head and last.read
    assert list(last.inputs) == [name_in.name] and last.inputs[name_in.name][0] == "host"
    assert last.outputs == [(name_out.name, "cpu")]

    y, grads = runner.head_gradients(maps, others)
    want_y, want_grads = cpu.head_gradients(maps, others)
    grad = runner._grad[0]
    last = fake_cuda.bindings[-1]
    assert set(last.inputs) == {grad.feature, grad.target}
    np.testing.assert_array_equal(last.inputs[grad.target][1], others)
    assert last.outputs == [(grad.logits, "cpu"), (grad.gradient, "cpu")] and last.read
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(grads, want_grads)
    assert fake_cuda.uploads == []  # maps used once go through host bindings


def test_an_audit_on_cuda_uploads_each_batch_once_and_scores_as_on_cpu(
    fake_cuda, samples, monkeypatch
):
    pair = (samples / "gap_original.onnx", [samples / "gap_l1_30_ft.onnx"])
    images = samples / "images"
    on_gpu = audit(*pair, images, settings=AuditSettings(batch_size=16, provider="cuda"))
    n = len(on_gpu.indices)
    assert len(fake_cuda.uploads) == -(-n // 16)
    assert on_gpu.original.providers[0] == CUDA
    monkeypatch.setattr(runtime, "_ort", lambda: onnxruntime)
    on_cpu = audit(*pair, images, settings=AuditSettings(batch_size=16, provider="cpu"))
    np.testing.assert_allclose(
        on_gpu.candidates[0].scores.score, on_cpu.candidates[0].scores.score, rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(on_gpu.original_targets, on_cpu.original_targets)


# -- the real fallback to CPU on this machine -------------------------------------------


@pytest.fixture
def no_binding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("IO binding used on a CPU session")

    monkeypatch.setattr(onnxruntime.InferenceSession, "io_binding", refuse)
    monkeypatch.setattr(onnxruntime.OrtValue, "ortvalue_from_numpy", refuse)


def _plain_session(model):
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(model.SerializeToString(), so, providers=[CPU])


@pytest.fixture
def cuda_unusable(monkeypatch):
    """onnxruntime offers CUDA, but its sessions load on CPU only: what it does when the
    CUDA or cuDNN libraries are missing (as on this machine), also on one with a GPU."""
    real = onnxruntime.InferenceSession

    class CpuOnly(real):
        def __init__(self, model, options=None, providers=None, **kwargs):
            kept = [p for p in (providers or [CPU]) if p != CUDA]
            super().__init__(model, options, providers=kept, **kwargs)

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnxruntime, "InferenceSession", CpuOnly)


def test_a_cuda_request_that_fell_back_to_cpu_runs_as_plain_onnxruntime(no_binding, cuda_unusable):
    built, prepared = _model()
    runner = ModelRunner(prepared, provider="cuda", threads=1, device_inputs=DeviceInputs())
    assert runner.provider.device == "cpu" and runner.provider.note  # the fallback, said
    spec = prepared.spec
    x = built.random_input(seed=10)
    acts, logits = runner.run(x)
    want = _plain_session(prepared.audit_model).run(
        [spec.feature_map.name, spec.logits.name], {spec.input.name: x}
    )
    np.testing.assert_array_equal(acts, want[0])
    np.testing.assert_array_equal(logits, want[1])
    np.testing.assert_array_equal(runner.run_inputs(x), want[1])

    grad = build_head_gradient(prepared.head_model)
    targets = np.full(len(x), -1, dtype=np.int64)
    acts, logits = runner.run(x, targets=targets)
    fused = _plain_session(fuse_gradient(prepared.audit_model, grad)).run(
        [spec.feature_map.name, spec.logits.name, grad.gradient, grad.target_used],
        {spec.input.name: x, grad.target: targets},
    )
    np.testing.assert_array_equal(acts, fused[0])
    np.testing.assert_array_equal(logits, fused[1])
    np.testing.assert_array_equal(runner.head_gradients(acts, fused[3])[1], fused[2])

    head = _plain_session(prepared.head_model)
    np.testing.assert_array_equal(
        runner.run_head(acts), head.run(None, {head.get_inputs()[0].name: acts})[0]
    )
    other = (fused[3] + 1) % built.num_classes
    y, grads = runner.head_gradients(acts, other)
    want_y, want_grads = _plain_session(grad.model).run(
        [grad.logits, grad.gradient], {grad.feature: acts, grad.target: other}
    )
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(grads, want_grads)

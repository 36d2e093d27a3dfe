"""ONNX Runtime sessions: provider choice, the edited model and its head.

No graph edits here (that is :mod:`onnx_sp2ps.model.edit`).  Nothing is printed: the one
line about a CUDA fallback is returned in :attr:`ProviderChoice.note` for the CLI.

Activations are handed out in NCHW whatever the model's feature layout, so that the CAM
code has one convention; :meth:`ModelRunner.run_head` takes NCHW and converts back.

On CPU every run is ``session.run``. A session that really got the CUDA provider is run
through IO binding (:func:`_run`): the image batch is copied to the GPU once per batch,
shared by the runners given the same :class:`DeviceInputs` (the audit's original and
candidates), and the outputs the numpy CAM maths needs are bound to host memory.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from onnx_sp2ps.backward import UnsupportedHead, build_head_gradient
from onnx_sp2ps.errors import DataError, ModelError, UsageError
from onnx_sp2ps.model.detect import linear_classifier_weights
from onnx_sp2ps.model.edit import PreparedModel, fuse_gradient
from onnx_sp2ps.model.load import is_too_large, split_large_weights
from onnx_sp2ps.providers import CPU, CUDA, PROVIDERS

__all__ = [
    "PROVIDERS",
    "ProviderChoice",
    "available_providers",
    "resolve_providers",
    "create_session",
    "DeviceInputs",
    "ModelRunner",
]

#: The GPU the CUDA provider runs on (its default; no option selects another).
CUDA_DEVICE_ID = 0
#: Bytes of perturbed feature maps sent to the head in one run.
HEAD_CHUNK_BYTES = 64 * 2**20


def _ort():
    import onnxruntime

    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (not all may be usable)."""
    return list(_ort().get_available_providers())


#: The shared library each GPU provider of an onnxruntime build loads on first use.
_PROVIDER_LIBRARIES = {
    CUDA: "libonnxruntime_providers_cuda.so",
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
}


def provider_status() -> dict[str, str | None]:
    """Each execution provider this onnxruntime build offers -> None when a session can
    be created on it here, else why not (onnxruntime offers CUDA and TensorRT in its GPU
    build even where their libraries are missing, and then falls back to the CPU)."""
    import io

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8
    ).SerializeToString()
    ort = _ort()
    status: dict[str, str | None] = {}
    for provider in available_providers():
        if provider == CPU:
            status[provider] = None
            continue
        printed = io.StringIO()  # onnxruntime prints its fallback to stdout
        try:
            with _quiet_ort(), contextlib.redirect_stdout(printed), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (its own warning for unknown names)
                used = ort.InferenceSession(model, providers=[provider]).get_providers()
        except Exception as exc:  # any failure to create it is the reason
            status[provider] = _one_line(str(exc))
            continue
        status[provider] = None if used and used[0] == provider else _load_reason(provider)
    return status


def _load_reason(provider: str) -> str:
    """Why ``provider`` fell back to the CPU: the loader's message for its library."""
    import ctypes

    library = _PROVIDER_LIBRARIES.get(provider)
    if library is not None:
        path = Path(_ort().__file__).parent / "capi" / library
        try:
            ctypes.CDLL(str(path))
        except OSError as exc:
            return _one_line(str(exc).replace(str(path.parent) + "/", ""))
    return "onnxruntime could not create a session on it and fell back to the CPU"


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 200 else line[:197] + "..."


@dataclass(frozen=True)
class ProviderChoice:
    """What was asked for and what the sessions really run on."""

    requested: str
    providers: tuple[str, ...]
    note: str | None = None

    @property
    def device(self) -> str:
        return _device(self.providers)

    def to_dict(self) -> dict:
        return {"requested": self.requested, "used": list(self.providers), "note": self.note}


def _device(providers: Sequence[str]) -> str:
    """ "cuda" when a session's providers (most preferred first) start with CUDA."""
    return "cuda" if providers and providers[0] == CUDA else "cpu"


def resolve_providers(requested: str, offered: Sequence[str]) -> tuple[list[str], str | None]:
    """Providers to try for ``requested`` given the ``offered`` ones, and a note when
    CUDA was asked for explicitly but is not offered.

    ``auto`` tries CUDA when offered; ``cuda`` tries it and says when it is not offered;
    ``cpu`` never tries it.
    """
    if requested not in PROVIDERS:
        raise UsageError(f"unknown provider {requested!r}: choose one of {', '.join(PROVIDERS)}")
    if requested == "cpu":
        return [CPU], None
    if CUDA in offered:
        return [CUDA, CPU], None
    note = None
    if requested == "cuda":
        note = (
            "CUDA requested but this onnxruntime build has no CUDA provider "
            "(install onnxruntime-gpu); running on CPU"
        )
    return [CPU], note


@contextlib.contextmanager
def _quiet_ort():
    """Silence onnxruntime's own logging (CUDA load failures print many lines)."""
    ort = _ort()
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(3)


def _session_options(threads: int | None):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors reach the user once, as one line of ours
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting after a run: between runs the audit does numpy work (maps, SSIM)
    # and runs the other model's session, and spinning pools would steal their cores
    # (benchmarks/README.md, "bench_audit.py": measured, no slower for the runs).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def create_session(
    model: onnx.ModelProto | bytes,
    *,
    provider: str = "auto",
    threads: int | None = None,
    what: str = "model",
):
    """An onnxruntime session and the :class:`ProviderChoice` it really got.

    When CUDA is tried but the session does not get it (no GPU, missing CUDA/cuDNN
    libraries), the session runs on CPU and the note says so in one line.

    Raises
    ------
    ModelError
        When onnxruntime cannot load or run the model (unsupported opset, IR version or
        operator), with onnxruntime's reason shortened to one line.
    """
    ort = _ort()
    if threads is not None and threads < 1:
        raise UsageError("--threads must be 1 or more")
    tried, note = resolve_providers(provider, ort.get_available_providers())
    try:
        data, held = _serialized(model)
    except MemoryError as exc:
        raise _out_of_memory(what) from exc

    def options():
        so = _session_options(threads)
        if held:
            so.add_external_initializers(list(held), list(held.values()))
        return so

    with _quiet_ort():
        try:
            session = ort.InferenceSession(data, options(), providers=tried)
        except MemoryError as exc:  # (std::bad_alloc, as pybind11 translates it)
            raise _out_of_memory(what) from exc
        except Exception as exc:
            if CUDA in tried:
                try:
                    session = ort.InferenceSession(data, options(), providers=[CPU])
                except Exception as exc2:
                    raise ModelError(_ort_reason(what, exc2)) from exc2
            else:
                raise ModelError(_ort_reason(what, exc)) from exc
    got = tuple(session.get_providers())
    if CUDA in tried and CUDA not in got and provider == "cuda":
        note = (
            "CUDA requested but not usable here (no GPU or CUDA/cuDNN libraries "
            "missing); running on CPU"
        )
    # onnxruntime reads the held weights in place: they must live as long as the session.
    session.sp2ps_held_weights = held
    session.sp2ps_what = what  # named in errors of later runs
    return session, ProviderChoice(requested=provider, providers=got, note=note)


def _out_of_memory(what: str) -> ModelError:
    return ModelError(
        f"{what}: out of memory while onnxruntime loaded it: free memory, use "
        "a machine with more, or check that the model is what it claims to be"
    )


def _serialized(model: onnx.ModelProto | bytes) -> tuple[bytes, dict]:
    """The model's bytes, and the large weights (as OrtValues, by name) held outside them
    when the model is over protobuf's 2 GB limit."""
    if isinstance(model, bytes):
        return model, {}
    if not is_too_large(model):
        return model.SerializeToString(), {}
    light, held = split_large_weights(model)
    ort = _ort()
    return light.SerializeToString(), {
        name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in held.items()
    }


def _ort_text(exc: Exception, markers: Sequence[str]) -> str:
    """onnxruntime's message on one line, without the prefixes up to each of ``markers``
    (error codes and the C++ source locations before the reason)."""
    text = " ".join(str(exc).split())
    for marker in markers:
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    return text


def _ort_reason(what: str, exc: Exception) -> str:
    text = _ort_text(exc, ("failed:", "FAIL :", "INVALID_GRAPH :", "NOT_IMPLEMENTED :"))
    version = getattr(_ort(), "__version__", "")
    opset = re.search(
        r"Opset (\d+) is under development.*support for domain (\S+) is till "
        r"opset (\d+)",
        text,
    )
    if opset:
        used, domain, top = opset.groups()
        return (
            f"onnxruntime cannot run the {what}: it uses opset {used} of {domain}, "
            f"onnxruntime {version} supports up to opset {top}: export the model again "
            f"with opset {top} or lower"
        )
    unknown = re.search(r"(\S+)\(-?\d+\) is not a registered function/op", text)
    if unknown:
        return (
            f"onnxruntime cannot run the {what}: onnxruntime {version} has no op "
            f"{unknown.group(1)} (unknown domain, or not in the model's opset): export "
            "the model with standard ONNX ops (or register the custom-op library)"
        )
    if " onnxruntime::" in text:
        # Drop C++ source locations, keep the message after them.
        text = text.split(")")[-1].strip() or text
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", text)
    if ir:
        return (
            f"onnxruntime cannot run the {what}: its IR version is {ir.group(1)}, "
            f"onnxruntime {version} reads up to {ir.group(2)}: save the model with "
            f"ir_version {ir.group(2)} or lower (or upgrade onnxruntime)"
        )
    return (
        f"onnxruntime cannot run the {what}: {text[:300]}: check that onnxruntime "
        f"{version} supports the model's ops and opset"
    )


def _as_float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _run(session, names: list[str], feed: dict) -> list[np.ndarray]:
    """The outputs ``names`` of one run, as numpy arrays.

    On CPU this is ``session.run(names, feed)``. When the session really got CUDA it runs
    through IO binding: values of ``feed`` that are OrtValues (already on the GPU, see
    :class:`DeviceInputs`) are bound as they are, numpy arrays as host inputs (onnxruntime
    copies them where the graph needs them: small ones such as the int64 targets, or maps
    used once), and every output in ``names`` is bound to host memory, since the CAM
    maths is numpy; outputs not in ``names`` are not copied back.
    """
    try:
        return _run_unchecked(session, names, feed)
    except Exception as exc:
        if type(exc).__module__ != "onnxruntime.capi.onnxruntime_pybind11_state":
            raise
        # onnxruntime refused these inputs: the model cannot run at this size or on this
        # data (e.g. a Flatten head exported for another input size), not a bug of ours.
        text = _ort_text(exc, ("Status Message:", "INVALID_ARGUMENT :", "FAIL :"))
        what = getattr(session, "sp2ps_what", "model")
        raise ModelError(
            f"onnxruntime could not run the {what} on these inputs: {text[:300]}: "
            "check --size and the preprocessing against what the model was "
            "exported for"
        ) from exc


def _run_unchecked(session, names: list[str], feed: dict) -> list[np.ndarray]:
    if _device(session.get_providers()) != "cuda":
        return session.run(names, feed)
    binding = session.io_binding()
    for name, value in feed.items():
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        else:
            binding.bind_ortvalue_input(name, value)
    for name in names:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


class DeviceInputs:
    """The GPU copy of the latest image batch, shared by the runners given this object,
    so that a batch that both the original and a candidate run on is copied to the
    device once (:meth:`ModelRunner.run` on CUDA sessions; unused on CPU).

    A copy is reused while the runners are handed the *same array object* (held here,
    so its id cannot be reused by another array) with the same rows and input dtype;
    any other array replaces the copies. Callers must not change a batch in place
    between the runs that share it (the audit makes a new array for each batch).
    """

    def __init__(self) -> None:
        self._host: np.ndarray | None = None
        self._values: dict[tuple[object, ...], object] = {}

    def get(
        self, host: np.ndarray, key: tuple[object, ...], upload: Callable[[], object]
    ) -> object:
        """The device value for ``key`` (rows and dtype) of ``host``, made by
        ``upload()`` the first time it is asked for."""
        if host is not self._host:
            self._host, self._values = host, {}
        if key not in self._values:
            self._values[key] = upload()
        return self._values[key]


@dataclass(frozen=True)
class _HeadContext:
    """What a head reads per image besides the map, for the ``images`` of one run: the
    prefix tokens (N, P, D) of a token model (None without), and the side inputs in the
    head's input order and dtypes."""

    images: int
    prefix: np.ndarray | None
    side: list[np.ndarray]


class ModelRunner:
    """Runs a :class:`PreparedModel`: the full model with its feature map and logits,
    and the head on (perturbed) feature maps.

    Parameters
    ----------
    prepared
        From :func:`onnx_sp2ps.model.prepare_model`.
    provider, threads
        See :func:`create_session`.
    device_inputs
        Shared by runners that run the same batches (on CUDA, each batch is then copied
        to the GPU once for all of them); by default each run copies its own.
    """

    def __init__(
        self,
        prepared: PreparedModel,
        *,
        provider: str = "auto",
        threads: int | None = None,
        device_inputs: DeviceInputs | None = None,
    ):
        self.prepared = prepared
        self._uploads = device_inputs
        spec = prepared.spec
        self._name = prepared.path or "model"
        self._threads = threads
        self._input = spec.input.name
        self._input_dtype = _np_dtype(spec.input.dtype)
        self._outputs = [spec.feature_map.name, spec.logits.name, *spec.side_inputs]
        self._nhwc = spec.feature_layout == "NHWC"
        self._tokens = spec.tokens
        self._side_dtypes = [
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in prepared.head_model.graph.input[1:]
        ]
        #: What the head needs per image besides the map, from the latest run() (see
        #: :meth:`run_head`); None when the head needs nothing else.
        self._context: _HeadContext | None = None
        self._head_dtype = np.dtype(np.float32)  # model.float32_head: all head maths in fp32
        self.batch_limit = spec.fixed_batch
        self.head_batch_limit: int | None = None
        self._head_checked = False
        self.gradient_path, self.gradient_note = "finite-difference", None
        self._grad = None
        self._fused = None
        self._session = self._head_session = None
        self._cache: tuple | None = None
        grad = None
        try:
            grad = build_head_gradient(prepared.head_model)
        except UnsupportedHead as exc:
            self.gradient_note = str(exc)
        if grad is not None and spec.feature_map.dtype == "float32":
            # One run for activations, logits and gradients (see run(..., targets=)).
            # Made first: with it, the gradient methods need no other session, and the
            # plain model's and the head's sessions are only made if something asks.
            try:
                fused = fuse_gradient(prepared.audit_model, grad)
                self._fused, self.provider = create_session(
                    fused, provider=provider, threads=threads, what=f"model {self._name}"
                )
            except Exception:  # the plain model and a separate head-gradient run still work
                self._fused = None
        if self._fused is None:  # made now, so that a model ORT cannot run fails here
            self._session, self.provider = create_session(
                prepared.audit_model, provider=provider, threads=threads, what=f"model {self._name}"
            )
        if grad is not None:
            try:
                # Checked now unless the fused session (which contains it) already ran
                # through onnxruntime; else made on first use.
                session = (
                    None
                    if self._fused is not None
                    else self._create(grad.model, f"head gradient of {self._name}")
                )
                self._grad = (grad, session)
                self.gradient_path, self.gradient_note = "exact", grad.note
            except ModelError as exc:
                self.gradient_note = str(exc)

    @property
    def layout(self) -> str:
        """The model input's layout, ``"NCHW"`` or ``"NHWC"``."""
        return self.prepared.spec.layout

    def classifier_weights(self) -> np.ndarray:
        """The ``(K, C)`` weights of the linear layer after global average pooling
        (classic CAM's weights); :class:`ModelError` for any other head."""
        if self._tokens is not None:
            raise ModelError(
                "classic CAM is defined for a convolutional feature map followed by global "
                "average pooling and one linear layer; this model's feature map is a token "
                "grid (a transformer): use --method gradcam"
            )
        return linear_classifier_weights(self.prepared.head_model)

    def _create(self, model, what: str):
        """A session on the device the first session got."""
        return create_session(
            model, provider=self.provider.device, threads=self._threads, what=what
        )[0]

    @property
    def session(self):
        """The edited model (feature map and logits as outputs), made on first use."""
        if self._session is None:
            self._session = self._create(self.prepared.audit_model, f"model {self._name}")
        return self._session

    @property
    def head_session(self):
        """The head (feature map -> logits), made on first use."""
        if self._head_session is None:
            self._head_session = self._create(self.prepared.head_model, f"head of {self._name}")
            self._head_inputs = [i.name for i in self._head_session.get_inputs()]
            self._head_output = self._head_session.get_outputs()[0].name
        return self._head_session

    # -- full model ----------------------------------------------------------------

    def run(
        self, inputs: np.ndarray, targets: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Activations (N, C, h, w) float32 and logits (N, K) float32 for a batch.

        For token models the activations are the patch tokens (N, T, D) viewed as their
        grid (N, D, h, w), prefix tokens dropped; the head runs later put them back.
        With ``targets`` (N,) int64 (-1: each image's top-1) and an exact head gradient,
        the same run also computes d logit_target / dA; :meth:`head_gradients` then
        returns it for these activations without another run.
        """
        return self._run_model(inputs, targets, self._uploads, keep=True)

    def _run_model(
        self,
        inputs: np.ndarray,
        targets: np.ndarray | None,
        uploads: DeviceInputs | None,
        keep: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        fused = self._fused is not None and targets is not None
        # (a fused session is only made with the exact gradient it contains: _grad is set)
        grad = self._grad[0] if fused and self._grad is not None else None
        names = self._outputs + ([grad.gradient, grad.target_used] if grad is not None else [])
        session = self._fused if fused and self._fused is not None else self.session
        on_device = _device(session.get_providers()) == "cuda"

        def run(images, *rest, span):
            feed = {self._input: self._image_input(images, span, on_device, uploads)}
            if grad is not None:
                feed[grad.target] = np.asarray(rest[0][span], dtype=np.int64)
            out = _run(session, names, feed)
            self._check_side_rows(out[2 : len(self._outputs)], len(images[span]))
            return out

        rows = [inputs, np.asarray(targets)] if fused else [inputs]
        parts = _in_batches(self.batch_limit, rows, run, len(names))
        raw = _as_float32(parts[0])
        activations = self._to_nchw(raw)
        out = _as_float32(parts[1])
        logits = out.reshape(len(out), -1)
        if not keep:
            return activations, logits
        self._context = self._head_context(raw, parts[2 : len(self._outputs)])
        self._cache = None
        if fused:
            grads = self._to_nchw(_as_float32(parts[-2]))
            self._cache = (activations, parts[-1], logits, grads)
        return activations, logits

    def _check_side_rows(self, side: list[np.ndarray], rows: int) -> None:
        """Refuse side inputs that do not hold one row per image of the run (they could
        not be fed back with the image's maps)."""
        for name, value in zip(self.prepared.spec.side_inputs, side):
            if value.ndim == 0 or len(value) != rows:
                raise ModelError(
                    f"the head of {self._name} also reads {name!r} of shape "
                    f"{list(value.shape)}, which is not one row per image: choose another "
                    "layer with --feature-layer"
                )

    def _head_context(self, raw: np.ndarray, side: list[np.ndarray]) -> _HeadContext | None:
        """The prefix tokens and side inputs of a batch (the side inputs' rows were
        checked by :meth:`_check_side_rows`); None when the head needs neither."""
        prefix = self._tokens.prefix if self._tokens is not None else 0
        if not prefix and not side:
            return None
        return _HeadContext(
            images=len(raw),
            prefix=raw[:, :prefix] if prefix else None,
            side=[np.ascontiguousarray(v, dtype=t) for v, t in zip(side, self._side_dtypes)],
        )

    def _image_input(
        self, inputs: np.ndarray, span: slice, on_device: bool, uploads: DeviceInputs | None
    ):
        """The image input of the run on ``inputs[span]``: the host array, or on CUDA its
        copy on the GPU (made once for all runners sharing ``uploads``)."""
        if not on_device:
            return self._as_input(inputs[span])

        def upload():
            return _ort().OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(self._as_input(inputs[span])), "cuda", CUDA_DEVICE_ID
            )

        if uploads is None:
            return upload()
        return uploads.get(inputs, (span.start, span.stop, self._input_dtype), upload)

    def _as_input(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images in the dtype of the model's image input."""
        if np.issubdtype(self._input_dtype, np.integer):
            return _integer_input(images, self._input_dtype, self._input)
        return images.astype(self._input_dtype, copy=False)

    def _to_nchw(self, a: np.ndarray) -> np.ndarray:
        """Feature maps (or their gradients) as the model makes them, in NCHW: tokens
        (N, T, D) become their patch grid (N, D, h, w)."""
        if self._tokens is not None:
            h, w = self._tokens.grid
            patches = a[:, self._tokens.prefix :]
            return np.ascontiguousarray(
                patches.reshape(len(a), h, w, a.shape[-1]).transpose(0, 3, 1, 2)
            )
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if self._nhwc else a

    def _head_feed(self, a: np.ndarray, rows: np.ndarray | None) -> list[np.ndarray]:
        """The head's inputs for NCHW maps ``a`` of the images ``rows`` of the latest
        run: the maps in the layout and dtype the head takes (tokens, with the images'
        prefix tokens in front), then the images' side inputs."""
        if self._tokens is not None:
            a = a.reshape(a.shape[0], a.shape[1], -1).transpose(0, 2, 1)
        elif self._nhwc:
            a = a.transpose(0, 2, 3, 1)
        a = np.ascontiguousarray(a, dtype=self._head_dtype)
        context = self._context
        if context is None or rows is None:
            return [a]
        if context.prefix is not None:
            a = np.concatenate([context.prefix[rows].astype(self._head_dtype), a], axis=1)
        return [a, *(v[rows] for v in context.side)]

    def _rows(self, count: int, rows: np.ndarray | int | None) -> np.ndarray | None:
        """The images of the latest run that ``count`` maps belong to (None when the head
        needs nothing per image): ``rows`` as given (one index for all), else the whole
        latest batch, which must then have ``count`` images."""
        if self._context is None:
            return None
        if rows is None:
            if self._context.images != count:
                raise UsageError(
                    f"the head of {self._name} reads per-image activations besides the map: "
                    "say which images the maps belong to (rows=)"
                )
            return np.arange(count)
        return np.broadcast_to(np.asarray(rows, dtype=np.int64), (count,))

    def _check_head_batch(self, activations: np.ndarray, rows: np.ndarray | None) -> None:
        """Find, on first use, how many maps the head takes in one run (some exports
        hard-code the batch): sets ``head_batch_limit``."""
        if not self._head_checked:
            self._probe_head_batch(activations, rows)

    def run_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """Logits (N, K) only, for full-model runs on masked inputs (used once: they do
        not replace the batch shared through ``device_inputs``, nor the latest run's
        per-image head inputs)."""
        return self._run_model(inputs, None, None)[1]

    # -- head ----------------------------------------------------------------------

    def run_head(self, activations: np.ndarray, rows: np.ndarray | int | None = None) -> np.ndarray:
        """Logits (M, K) float32 of the head for feature maps (M, C, h, w) in NCHW.

        ``rows``: the image of the latest :meth:`run` each map belongs to (one index for
        all maps, or (M,)), for heads that read more than the map (the prefix tokens and
        residual stream of a transformer); by default the maps are that batch's own."""
        if len(activations) == 0:
            return np.zeros((0, 0), np.float32)
        index = self._rows(len(activations), rows)
        self._check_head_batch(activations, index)
        arrays = [activations] if index is None else [activations, index]
        (y,) = _in_batches(
            self.head_batch_limit,
            arrays,
            lambda a, *r, span: [self._head(a[span], r[0][span] if r else None)],
            1,
        )
        return _as_float32(y).reshape(len(activations), -1)

    def _head(self, activations: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        session = self.head_session
        feed = dict(zip(self._head_inputs, self._head_feed(activations, rows)))
        return _run(session, [self._head_output], feed)[0]

    def _probe_head_batch(self, activations: np.ndarray, rows: np.ndarray | None) -> None:
        """Find whether the head takes batches > 1 (some exports hard-code batch 1)."""
        self._head_checked = True
        if len(activations) < 2:
            return
        # Two maps at once; else the model's own fixed batch (a head may hard-code it
        # in a Reshape), else one at a time.
        for limit in (None, self.batch_limit, 1):
            size = 2 if limit is None else limit
            try:
                y = self._head(
                    _padded(activations[:size], size),
                    None if rows is None else _padded(rows[:size], size),
                )
                if len(y) == size:
                    self.head_batch_limit = limit
                    return
            except Exception:
                pass
        self.head_batch_limit = 1

    @property
    def has_exact_gradient(self) -> bool:
        return self._grad is not None

    def head_gradients(
        self,
        activations: np.ndarray,
        targets: np.ndarray,
        rows: np.ndarray | int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, K) and exact gradients d logit_target / dA (N, C, h, w) in NCHW, in
        one run of the head's backward graph; ``targets`` -1 means each image's top-1.
        ``rows``: the images of the latest :meth:`run` the maps are (see
        :meth:`run_head`); by default that whole batch."""
        if self._grad is None:
            raise UsageError(f"no exact gradient for this head ({self.gradient_note})")
        cache = self._cache
        if (
            cache is not None
            and activations is cache[0]
            and np.array_equal(np.asarray(targets), cache[1])
        ):
            return cache[2], cache[3]
        grad, session = self._grad
        if session is None:
            session = self._create(grad.model, f"head gradient of {self._name}")
            self._grad = (grad, session)
        index = self._rows(len(activations), rows)
        self._check_head_batch(activations, index)
        names = [grad.feature, *grad.side_inputs]

        def run(a, t, *r, span):
            feed = dict(zip(names, self._head_feed(a[span], r[0][span] if r else None)))
            feed[grad.target] = np.asarray(t[span], dtype=np.int64)
            return _run(session, [grad.logits, grad.gradient], feed)

        arrays = [activations, np.asarray(targets)] + ([] if index is None else [index])
        y, g = _in_batches(self.head_batch_limit, arrays, run, 2)
        y = _as_float32(y)
        return y.reshape(len(y), -1), self._to_nchw(_as_float32(g))

    def head_chunk(self, per_item_shape: tuple[int, ...]) -> int:
        """How many feature maps of ``per_item_shape`` fit in one head run."""
        per_item = int(np.prod(per_item_shape)) * 4
        return max(1, HEAD_CHUNK_BYTES // max(per_item, 1))

    def map_head(
        self,
        make: Callable[[int, int], np.ndarray],
        total: int,
        per_item_shape: tuple[int, ...],
        row: int | None = None,
    ) -> np.ndarray:
        """Run the head on ``total`` maps made chunk by chunk by ``make(start, stop)``,
        so that memory stays bounded; returns the logits (total, K).  ``row``: the image
        of the latest :meth:`run` the maps are perturbations of (see :meth:`run_head`)."""
        step = self.head_chunk(per_item_shape)
        outs = [self.run_head(make(s, min(s + step, total)), row) for s in range(0, total, step)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _padded(rows: np.ndarray, limit: int | None) -> np.ndarray:
    """``rows`` padded with copies of the last row to a multiple of ``limit`` (a model
    exported with a fixed batch size takes only full batches; the extra rows' results
    are dropped)."""
    if not limit or len(rows) % limit == 0 or len(rows) == 0:
        return rows
    extra = limit - len(rows) % limit
    return np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)])


def _in_batches(limit: int | None, rows: list[np.ndarray], run, outputs: int) -> list[np.ndarray]:
    """``run(*padded_rows, span=span)`` over slices of ``limit`` rows (all at once without
    a limit), rows padded to full batches (:func:`_padded`); each of the ``outputs``
    results concatenated over the slices and trimmed to the real rows."""
    count = len(rows[0])
    padded = [_padded(r, limit) for r in rows]
    parts: list[list[np.ndarray]] = [[] for _ in range(outputs)]
    for span in _spans(len(padded[0]), limit):
        for part, value in zip(parts, run(*padded, span=span)):
            part.append(value)
    return [np.concatenate(part)[:count] for part in parts]


def _spans(total: int, limit: int | None):
    """Slices covering ``range(total)`` in steps of ``limit`` (all at once without one)."""
    step = max(limit or total, 1)
    return [slice(start, start + step) for start in range(0, total, step)]


def _integer_input(values: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``values`` as the integer ``dtype`` of an image input (e.g. uint8 pixels), refusing
    values a cast would silently change (fractions, values out of range, NaN)."""
    info = np.iinfo(dtype)
    with np.errstate(invalid="ignore"):
        bad = (
            ~np.isfinite(values)
            | (values != np.round(values))
            | (values < info.min)
            | (values > info.max)
        )
    if np.any(bad):
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        raise DataError(
            f"model input {name!r} is {dtype.name}, but the preprocessed images hold values "
            f"from {low:g} to {high:g} that are not {dtype.name}: feed raw pixels with "
            f"--preprocess raw (or a .npy of {dtype.name}-valued pixels)"
        )
    return values.astype(dtype)


def _np_dtype(name: str) -> np.dtype:
    if name in ("undefined", "", None):
        return np.dtype(np.float32)
    return np.dtype(name)

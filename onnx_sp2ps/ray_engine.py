"""An audit's batches run on Ray (README, "Ray"): ``onnx-sp2ps audit --engine ray``.

The driver (this process) prepares the models once (detection, edits, head gradients:
:func:`onnx_sp2ps.pipeline.prepare_audit`), opens the image set, and puts the prepared
models into Ray's object store once (``ray.put``).  Each worker is a Ray actor
(:class:`AuditWorker`) that takes them from the store, opens their sessions, opens the
image set from the same path (shared storage) and checks that it reads the same files
(:meth:`onnx_sp2ps.data.ImageSet.fingerprint`).  The driver hands out batch-aligned
ranges of image positions; a worker maps a range exactly as one process does
(:func:`onnx_sp2ps.pipeline.map_range`, the same batches) and returns its records in
their exact binary form (:meth:`onnx_sp2ps.records.Records.to_bytes`); the driver merges
them as they come (:func:`onnx_sp2ps.records.merge_stream`, order-free) and summarises.
So a Ray audit's records, and every figure of its report, are those of one process, bit
for bit.

A worker that dies is restarted by Ray, which re-runs its unfinished ranges
(``max_restarts`` / ``max_task_retries``); every range is handed out once and its
records taken once, and merging refuses a position seen twice, so no image is lost or
counted twice.

Ray is imported only here, and only when an audit asks for it (:func:`import_ray`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import onnx_sp2ps.errors as _errors
from onnx_sp2ps.data import ImageSet, Preprocess, open_images
from onnx_sp2ps.errors import DataError, InputError, Sp2psError, UsageError
from onnx_sp2ps.model import PreparedModel, is_too_large
from onnx_sp2ps.pipeline import (
    AuditContext,
    AuditModels,
    AuditResult,
    AuditSettings,
    ClassNames,
    ImageSource,
    MapsCallback,
    ModelInfo,
    ModelOptions,
    Progress,
    input_spec,
    map_range,
    open_audit_models,
    prepare_audit,
    summarise,
    versions,
)
from onnx_sp2ps.records import Records, merge_stream

__all__ = [
    "INSTALL_HINT",
    "RayOptions",
    "AuditWorker",
    "import_ray",
    "audit_records",
    "audit",
    "task_ranges",
]

#: What to run when Ray is missing.
INSTALL_HINT = "pip install 'onnx-sp2ps[ray]'"
#: Restarts of a dead worker, and retries of the ranges it had, before the audit fails.
MAX_RESTARTS = 3
#: Ranges queued per worker (one running, the next waiting), so a worker never idles
#: while the driver merges.
IN_FLIGHT = 2
#: About this many ranges per worker, so that a slow worker delays the end little ...
TASKS_PER_WORKER = 4
#: ... and at most this many batches per range (progress moves, a retry redoes little).
MAX_BATCHES_PER_TASK = 8
#: Seconds to wait for a --ray-address to answer before it is refused.
CONNECT_S = 5.0
#: Seconds the driver waits for a range at a time (it handles signals in between).
WAIT_S = 0.25
#: Versions that must agree between the driver and every worker (the report names the
#: driver's; a worker with another onnxruntime could give other numbers).
SAME_VERSIONS = ("onnx_sp2ps", "onnx", "onnxruntime", "numpy")
#: The workers' concurrency group for calls that must not wait for a map (pid).
CONTROL = "control"
#: Prefix of the workers' actor names (then the run's id and the worker's number).
ACTOR_PREFIX = "onnx-sp2ps-worker"


@dataclass(frozen=True)
class RayOptions:
    """Where and how the workers run.

    ``address``: a running cluster to join (``ray.init(address=...)``); None starts a
    local Ray instance for the audit and shuts it down after (a process already
    connected to Ray uses its connection). ``workers``: how many actors (None: as many
    as the cluster's CPUs, or GPUs with ``gpus_per_worker``, allow, and no more than
    there are ranges). ``cpus_per_worker`` / ``gpus_per_worker``: each actor's Ray
    resources; its onnxruntime threads are ``--threads``, or the CPUs rounded up; with
    GPUs its provider is CUDA unless ``--provider`` says otherwise."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise UsageError(f"--workers must be 1 or more; got {self.workers}")
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise UsageError(f"--cpus-per-worker must be over 0; got {self.cpus_per_worker}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise UsageError(f"--gpus-per-worker must be 0 or more; got {self.gpus_per_worker}")
        if self.address is not None and not self.address.strip():
            raise UsageError("--ray-address is empty: give host:port, or leave it out")

    def actor_options(self) -> dict[str, Any]:
        """The Ray options of each worker actor (resources and restarts)."""
        return {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
            "max_restarts": MAX_RESTARTS,
            "max_task_retries": MAX_RESTARTS,
        }

    def worker_settings(self, settings: AuditSettings) -> AuditSettings:
        """The settings a worker runs with: its threads and, on a GPU, CUDA. They change
        no number of the report (README, "Ray"), whose settings stay the driver's."""
        threads = settings.threads or max(1, math.ceil(self.cpus_per_worker))
        provider = settings.provider
        if self.gpus_per_worker > 0 and provider == "auto":
            provider = "cuda"
        return replace(settings, threads=threads, provider=provider)


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`InputError` saying how to install it."""
    # Ray's native crash handler would print a stack dump on SIGTERM and SIGINT too: the
    # run's one line about the signal (and the supervisor) is what reports those. (Read
    # when Ray is first imported; inherited by the processes of a local instance.)
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise InputError(
            f"--engine ray needs Ray, which is not installed here: {INSTALL_HINT}"
        ) from None


# --------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class _Models:
    """The prepared models, put into the object store once and shared by the workers."""

    original: PreparedModel
    candidates: tuple[PreparedModel, ...]


@dataclass(frozen=True)
class _Job:
    """What every worker needs besides the models."""

    images: str  # the image folder or array file, as an absolute path
    preprocess: Preprocess
    class_names: list[str] | None
    settings: AuditSettings  # the worker's (RayOptions.worker_settings)
    keep_maps: bool
    worst: int
    fingerprint: str


@dataclass(frozen=True)
class _Failure:
    """An error raised in a worker, carried back as a value (Ray would wrap it, with a
    traceback, in an exception of its own): the class name and the one-line message."""

    kind: str
    message: str
    node: str
    detail: str = ""

    @staticmethod
    def of(exc: BaseException, node: str) -> _Failure:
        known = isinstance(exc, (Sp2psError, MemoryError))
        return _Failure(type(exc).__name__, str(exc), node, "" if known else traceback.format_exc())

    def error(self) -> BaseException:
        """The exception to raise in the driver: the worker's, by class."""
        if self.kind == "MemoryError":
            return MemoryError(self.message)
        cls = getattr(_errors, self.kind, None) if self.kind in _errors.__all__ else None
        if isinstance(cls, type) and issubclass(cls, Sp2psError):
            return cls(self.message)
        return RuntimeError(
            f"{self.kind} in a Ray worker on {self.node}: {self.message}"
            + (f"\n{self.detail}" if self.detail else "")
        )


@dataclass(frozen=True)
class _Ready:
    """A worker's answer once it has opened its sessions and images."""

    original: ModelInfo
    candidates: tuple[ModelInfo, ...]
    provider_note: str | None
    versions: dict[str, str]
    node: str


def _node() -> str:
    try:
        return str(import_ray().util.get_node_ip_address())
    except Exception:
        return "this node"


class AuditWorker:
    """One Ray actor: the models' sessions and the image set, opened on its first call
    (and again after Ray restarts it), then any number of ranges mapped to records.

    The prepared models come with every call, as an object-store reference inside a
    list, which Ray passes on unfetched: the worker fetches them once. (Passed to the
    constructor, they would be fetched before the actor starts, and Ray warns that
    restarting actors with such arguments may fail; with the calls, a retried call
    brings them to the restarted actor.)

    Errors are kept and returned as values (:class:`_Failure`), so that the driver
    raises the same exception, with the same message, as one process would."""

    def __init__(self, job: _Job):
        self._job = job
        self._node = _node()
        self._opened: tuple[AuditModels, ImageSet] | _Failure | None = None

    def pid(self) -> int:
        """The worker's process id (tests kill it); call it in the :data:`CONTROL`
        concurrency group to have it while the worker maps a range."""
        return os.getpid()

    def _open(self, models: list[Any]) -> tuple[AuditModels, ImageSet] | _Failure:
        if self._opened is None:
            try:
                prepared = import_ray().get(models[0])
                assert isinstance(prepared, _Models)
                job = self._job
                opened = open_audit_models(
                    prepared.original,
                    prepared.candidates,
                    settings=job.settings,
                    keep_maps=job.keep_maps,
                    worst=job.worst,
                )
                self._opened = opened, _open_images(job, prepared.original)
            except Exception as exc:  # (MemoryError included)
                self._opened = _Failure.of(exc, self._node)
        return self._opened

    def ready(self, models: list[Any]) -> _Ready | _Failure:
        """What the report says of the models here (providers really used, gradient
        paths) and this worker's versions, once it has opened everything."""
        opened = self._open(models)
        if isinstance(opened, _Failure):
            return opened
        m = opened[0]
        return _Ready(
            original=m.original.info,
            candidates=tuple(c.info for c in m.candidates),
            provider_note=m.original.runner.provider.note,
            versions=versions(),
            node=self._node,
        )

    def map(self, models: list[Any], start: int, stop: int) -> bytes | _Failure:
        """The records (exact binary form) of the image positions ``[start, stop)``."""
        opened = self._open(models)
        if isinstance(opened, _Failure):
            return opened
        try:
            return map_range(opened[0], opened[1], start, stop).to_bytes()
        except Exception as exc:  # (MemoryError included)
            return _Failure.of(exc, self._node)


def _open_images(job: _Job, original: PreparedModel) -> ImageSet:
    """The image set as the driver opened it, read from the same path, or a
    :class:`DataError` when this worker cannot read it or sees other files."""
    try:
        image_set = open_images(
            job.images,
            spec=input_spec(original.spec, job.preprocess.layout),
            preprocess=job.preprocess,
            class_names=job.class_names,
            strict=job.settings.strict,
            max_memory=job.settings.max_memory,
        )
    except DataError as exc:
        raise DataError(
            f"a Ray worker on {_node()} cannot use the images at {job.images}: {exc} "
            "(workers read --images from the same path as the driver: put them on storage "
            "that every node mounts there)"
        ) from None
    if image_set.fingerprint() != job.fingerprint:
        raise DataError(
            f"a Ray worker on {_node()} sees other files at {job.images} than the driver "
            "(names, sizes or modification times differ): workers read --images from the "
            "same path as the driver; give every node the same files there"
        )
    return image_set


# --------------------------------------------------------------------------- driver


def task_ranges(total: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Image positions ``[start, stop)`` handed out one at a time: runs of whole batches
    of one pass (each range starts at a multiple of ``batch_size``), about
    :data:`TASKS_PER_WORKER` per worker and at most :data:`MAX_BATCHES_PER_TASK`
    batches each; together they cover ``[0, total)`` once."""
    batches = -(-total // batch_size)
    per_task = max(1, min(MAX_BATCHES_PER_TASK, batches // max(1, workers * TASKS_PER_WORKER)))
    return [
        (b * batch_size, min((b + per_task) * batch_size, total))
        for b in range(0, batches, per_task)
    ]


def _shared_path(images: ImageSource) -> str:
    """The path workers open the images from: the driver's, made absolute (a worker's
    working directory is not the driver's on another node)."""
    if isinstance(images, ImageSet):
        raise UsageError(
            "the Ray engine opens the images on every worker: pass their path, not an "
            "opened ImageSet"
        )
    return os.path.abspath(os.fspath(images))


def _check_reachable(address: str) -> None:
    """Refuse at once a ``host:port`` (or ``ray://host:port``) where nothing answers:
    Ray itself would retry for minutes, printing warnings."""
    import re
    import socket

    found = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address.strip())
    if found is None:
        return  # ("auto", or a form Ray knows and this check does not)
    host, port = found.group(1), int(found.group(2))
    try:
        with socket.create_connection((host, port), timeout=CONNECT_S):
            pass
    except (OSError, ValueError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({reason}): "
            "start it with `ray start --head` and pass the address it prints, or leave "
            "--ray-address out for a local instance"
        ) from None


@contextlib.contextmanager
def _own_sigterm() -> Iterator[None]:
    """Keep the process's SIGTERM handler: ``ray.init`` replaces it with one that exits
    at once, which would skip the CLI's clean-up and its line about the signal."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _connected(ray: Any, options: RayOptions) -> Iterator[None]:
    """Ray ready to use: the caller's connection, the cluster at ``options.address``, or
    a local instance for this audit (shut down after)."""
    if ray.is_initialized():
        yield
        return
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if options.address is not None:
        _check_reachable(options.address)
    try:
        with _own_sigterm():
            if options.address is not None:
                ray.init(address=options.address, **quiet)
            else:
                cpus = os.cpu_count() or 1
                if options.workers is not None:
                    cpus = max(cpus, math.ceil(options.workers * options.cpus_per_worker))
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            ray.shutdown()  # (what a start cut short by a signal or an error had started)
        if not isinstance(exc, (ConnectionError, RuntimeError, ValueError, TimeoutError)):
            raise
        where = (
            f"join the Ray cluster at {options.address}"
            if options.address is not None
            else "start a local Ray instance"
        )
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InputError(
            f"cannot {where}: {reason}: start one with `ray start --head` and pass its "
            "address (--ray-address host:port), or leave --ray-address out"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _get_all(ray: Any, refs: list[Any]) -> list[Any]:
    """``ray.get(refs)``, waiting in slices (signals are handled in between)."""
    while True:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=WAIT_S)
        if len(done) == len(refs):
            return list(ray.get(refs))


def _worker_count(ray: Any, options: RayOptions, batches: int) -> int:
    """How many workers: ``options.workers``, else what the cluster's resources allow;
    never more than there are batches (:func:`task_ranges` then makes at least one
    range per worker). A cluster too small for the request is refused
    (its actors would wait forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if options.workers is not None:
        n = options.workers
    else:
        n = max(1, int(cpus // options.cpus_per_worker + 1e-9))
        if options.gpus_per_worker > 0:
            n = min(n, int(gpus // options.gpus_per_worker + 1e-9))
    n = max(1, min(n, batches))
    for kind, have, each in (
        ("CPU", cpus, options.cpus_per_worker),
        ("GPU", gpus, options.gpus_per_worker),
    ):
        if each > 0 and n * each > have + 1e-9:
            option = f"--{kind.lower()}s-per-worker"
            raise InputError(
                f"the Ray cluster has {have:g} {kind}s; {n} worker(s) x {option} {each:g} "
                f"need {n * each:g}: lower --workers or {option}, or add nodes"
            )
    return n


def _check_ready(answers: Sequence[_Ready | _Failure], driver: dict[str, str]) -> _Ready:
    for answer in answers:
        if isinstance(answer, _Failure):
            raise answer.error()
    ready = [a for a in answers if isinstance(a, _Ready)]
    for a in ready:
        for key in SAME_VERSIONS:
            if a.versions.get(key) != driver.get(key):
                raise InputError(
                    f"a Ray worker on {a.node} runs {key} {a.versions.get(key)}, this "
                    f"process {driver.get(key)}: install the same versions on every node"
                )
    return ready[0]


def _without_maps(records: Records) -> Records:
    return replace(
        records,
        original=replace(records.original, maps=None),
        candidates=tuple(
            replace(c, columns=replace(c.columns, maps=None)) for c in records.candidates
        ),
    )


def _lost_worker(exc: BaseException) -> Sp2psError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return Sp2psError(
        f"a Ray worker died and stayed dead after {MAX_RESTARTS} restarts "
        f"({type(exc).__name__}: {first[:300]}); no report was written: check the "
        "workers' memory and logs (ray logs), then run again"
    )


def audit_records(
    original: str | Path | PreparedModel,
    candidates: Sequence[str | Path | PreparedModel],
    images: ImageSource,
    *,
    preprocess: Preprocess = Preprocess(),
    settings: AuditSettings = AuditSettings(),
    original_options: ModelOptions = ModelOptions(),
    candidate_options: ModelOptions = ModelOptions(),
    class_names: ClassNames = None,
    keep_maps: bool = False,
    worst: int = 0,
    on_maps: MapsCallback | None = None,
    progress: Progress | None = None,
    options: RayOptions = RayOptions(),
) -> tuple[Records, AuditContext]:
    """:func:`onnx_sp2ps.pipeline.audit_records` with the batches mapped by Ray workers
    (``options``); the same records and context. ``images`` must be a path that every
    worker can read. ``on_maps`` is called in this process, once per range of batches.

    Raises
    ------
    InputError
        What one process raises; also: Ray is not installed, the cluster cannot be
        joined or is too small, or a worker cannot read the images or runs other
        versions.
    Sp2psError
        A worker died more than :data:`MAX_RESTARTS` times.
    """
    ray = import_ray()
    shared = _shared_path(images)
    orig_prep, cand_preps, image_set = prepare_audit(
        original,
        candidates,
        images,  # as given, so that the report names the source as one process does
        preprocess=preprocess,
        settings=settings,
        original_options=original_options,
        candidate_options=candidate_options,
        class_names=class_names,
    )
    for prep in [orig_prep, *cand_preps]:
        if is_too_large(prep.audit_model):
            raise InputError(
                f"{prep.path or 'a model'} is over 2 GB, which cannot be sent to Ray "
                "workers yet: use --engine local"
            )
    job = _Job(
        images=shared,
        preprocess=preprocess,
        class_names=image_set.class_names,
        settings=options.worker_settings(settings),
        keep_maps=keep_maps or on_maps is not None,
        worst=worst,
        fingerprint=image_set.fingerprint(),
    )
    driver_versions = versions()
    with _connected(ray, options):
        workers = _worker_count(ray, options, -(-len(image_set) // settings.batch_size))
        ranges = task_ranges(len(image_set), settings.batch_size, workers)
        run = uuid.uuid4().hex[:12]
        # (pid answers at once, beside a running map: maps run one at a time)
        actor = ray.remote(concurrency_groups={CONTROL: 1})(AuditWorker)
        actors = [
            actor.options(name=f"{ACTOR_PREFIX}-{run}-{i}", **options.actor_options()).remote(job)
            for i in range(workers)
        ]
        try:
            # Once, for every worker; inside a list, so that Ray passes the reference on.
            models = [ray.put(_Models(orig_prep, tuple(cand_preps)))]
            answers = [a.ready.remote(models) for a in actors]
            dispatch = _Dispatcher(ray, actors, models, ranges)  # (queued behind ready)
            try:
                ready = _check_ready(_get_all(ray, answers), driver_versions)
            except ray.exceptions.RayError as exc:
                raise _lost_worker(exc) from None
            parts = dispatch.results(len(image_set), progress)
            records = _collect(parts, image_set, keep_maps, on_maps, len(cand_preps), worst)
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
    context = AuditContext(
        settings=settings,
        images=image_set,
        original=ready.original,
        candidates=ready.candidates,
        provider_note=ready.provider_note,
        versions=driver_versions,
    )
    return records, context


class _Dispatcher:
    """Hands the ranges out: at most :data:`IN_FLIGHT` queued per worker, the next one
    to a worker as soon as one of its ranges is done. Every range goes to one worker
    once (Ray re-runs it on the restarted worker if that one dies) and its records are
    taken once."""

    def __init__(
        self, ray: Any, actors: list[Any], models: list[Any], ranges: list[tuple[int, int]]
    ):
        self._ray = ray
        self._actors = actors
        self._models = models
        self._queue = list(reversed(ranges))
        self._pending: dict[Any, tuple[int, tuple[int, int]]] = {}
        for k in range(len(actors)):
            for _ in range(IN_FLIGHT):
                self._submit(k)

    def _submit(self, k: int) -> None:
        if self._queue:
            span = self._queue.pop()
            self._pending[self._actors[k].map.remote(self._models, *span)] = (k, span)

    def results(self, total: int, progress: Progress | None) -> Iterator[Records]:
        """Each range's records, in the order they finish; ``progress(done, total)``
        after each (``done``: the positions of the ranges finished)."""
        ray, done = self._ray, 0
        while self._pending:
            finished: list[Any] = []
            while not finished:  # (in slices, so that a signal is handled within one)
                finished, _ = ray.wait(list(self._pending), num_returns=1, timeout=WAIT_S)
            k, (start, stop) = self._pending.pop(finished[0])
            try:
                answer = ray.get(finished[0])
            except ray.exceptions.RayError as exc:
                raise _lost_worker(exc) from None
            if isinstance(answer, _Failure):
                raise answer.error()
            self._submit(k)
            yield Records.from_npz(answer)
            done += stop - start
            if progress:
                progress(done, total)


def _collect(
    parts: Iterator[Records],
    image_set: ImageSet,
    keep_maps: bool,
    on_maps: MapsCallback | None,
    candidates: int,
    worst: int,
) -> Records:
    """The parts merged (:func:`merge_stream`), after ``on_maps`` has seen their maps;
    maps kept only for ``keep_maps``. A part without rows (every image of its range
    unreadable) adds only its failures."""
    failures: dict[int, str] = {}

    def rows() -> Iterator[Records]:
        for part in parts:
            if not len(part):
                failures.update(part.failures)
                continue
            if on_maps is not None:
                o = part.original.maps
                cands = [c.columns.maps for c in part.candidates]
                assert o is not None and all(m is not None for m in cands)
                on_maps(image_set, part.positions, o.maps, [m.maps for m in cands if m])
            yield part if keep_maps else _without_maps(part)

    merged = merge_stream(rows())
    if merged is None:
        merged = Records.empty(candidates, worst, labels=image_set.labels is not None)
    return replace(merged, failures=dict(sorted({**merged.failures, **failures}.items())))


def audit(
    original: str | Path | PreparedModel,
    candidates: Sequence[str | Path | PreparedModel],
    images: ImageSource,
    *,
    preprocess: Preprocess = Preprocess(),
    settings: AuditSettings = AuditSettings(),
    original_options: ModelOptions = ModelOptions(),
    candidate_options: ModelOptions = ModelOptions(),
    class_names: ClassNames = None,
    keep_maps: bool = False,
    worst: int = 0,
    on_maps: MapsCallback | None = None,
    progress: Progress | None = None,
    options: RayOptions = RayOptions(),
) -> AuditResult:
    """:func:`onnx_sp2ps.pipeline.audit` on Ray workers (:func:`audit_records`, then
    :func:`onnx_sp2ps.pipeline.summarise`): the same result."""
    records, context = audit_records(
        original,
        candidates,
        images,
        preprocess=preprocess,
        settings=settings,
        original_options=original_options,
        candidate_options=candidate_options,
        class_names=class_names,
        keep_maps=keep_maps,
        worst=worst,
        on_maps=on_maps,
        progress=progress,
        options=options,
    )
    return summarise(records, context)

"""One audit, as map, merge and summarise (docs/architecture.md, "One audit"): models and
images in, a result object out.  Never prints.  Named ``pipeline`` so that ``from
onnx_sp2ps import audit`` can be the function without shadowing a module.

:func:`score_batch` (map) runs one batch through the original and every candidate,
computes both CAMs per image for the same target class and scores each pair
(:mod:`onnx_sp2ps.similarity`) into :class:`onnx_sp2ps.records.Records`;
:func:`onnx_sp2ps.records.merge` joins records; :func:`summarise` computes every aggregate
of the merged records into an :class:`AuditResult`.  :func:`audit` is map over the
batches, merge, summarise.  :func:`compute_cams` does the first half of the map for a
single model.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

from onnx_sp2ps._version import __version__
from onnx_sp2ps.cache import CACHE_FORMAT, OriginalBatch, OriginalCache, check_folder
from onnx_sp2ps.cams import make_cam
from onnx_sp2ps.cams.base import BaseCAM, normalise_maps, softmax, upsample_bilinear
from onnx_sp2ps.data import Batch, ImageSet, InputSpec, Preprocess, open_images
from onnx_sp2ps.errors import (
    DataError,
    InputError,
    MismatchError,
    NonFiniteError,
    UsageError,
)
from onnx_sp2ps.files import human_bytes, memory_budget, show
from onnx_sp2ps.gate import GateCriteria, apply_gate
from onnx_sp2ps.gate import finite_or_none as _num
from onnx_sp2ps.intervals import (
    Comparison,
    IntervalSettings,
    ScoreIntervals,
    audit_intervals,
    seed_key,
)
from onnx_sp2ps.model import ModelSpec, PreparedModel, model_digest, prepare_model
from onnx_sp2ps.records import (
    CandidateColumns,
    ModelColumns,
    ModelMaps,
    Records,
    WorstImages,
    merge,
    merge_stream,
)
from onnx_sp2ps.runtime import DeviceInputs, ModelRunner
from onnx_sp2ps.similarity import PairScores, ScoreSummary, score_pairs, summarise_scores
from onnx_sp2ps.targets import AUDIT_TARGETS, select_targets, top1

__all__ = [
    "ModelOptions",
    "AuditSettings",
    "ModelMaps",
    "ModelInfo",
    "CandidateResult",
    "WorstImages",
    "AuditResult",
    "ImageRecord",
    "input_spec",
    "check_batch_memory",
    "compute_cams",
    "audit",
    "AuditModels",
    "AuditContext",
    "open_audit_models",
    "score_batch",
    "summarise",
    "audit_records",
    "prepare_audit",
    "shard_range",
    "map_range",
    "Records",
    "merge",
    "SCHEMA_VERSION",
    "audit_to_dict",
    "display_names",
    "path_endings",
]

#: Version of the report.json layout (see README, "report.json").
SCHEMA_VERSION = 1

Progress = Callable[[int, int], None]
#: Images to audit: a folder, an ``.npy``/``.npz`` file, or an opened set.
ImageSource = Union[str, "os.PathLike[str]", ImageSet]
#: Class names: a file of one name per line, or the names.
ClassNames = Union[str, "os.PathLike[str]", list[str], None]


@dataclass(frozen=True)
class ModelOptions:
    """Detection overrides for one model: tensor names, and for token models the prefix
    token count and the (h, w) patch grid."""

    input_name: str | None = None
    feature_layer: str | None = None
    logits: str | None = None
    prefix_tokens: int | None = None
    token_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class AuditSettings:
    """How maps are computed and compared."""

    method: str = "gradcam"
    target: str | int = "original"
    batch_size: int = 16
    provider: str = "auto"
    threads: int | None = None
    threshold: float | None = None
    strict: bool = False
    scorecam_channels: int | None = None
    #: Memory budget in bytes for a model's tensors and one batch of inputs and feature
    #: maps; None: half the memory available (:func:`onnx_sp2ps.files.memory_budget`).
    #: Not in :meth:`to_dict`: it depends on the machine and changes no result.
    max_memory: int | None = None
    #: Folder of the original's cached results (``--original-cache``; README,
    #: "Commands"): every process that opens audit models with these settings (a shard,
    #: a Ray worker) reads and writes it.  Not in :meth:`to_dict`: it changes no result.
    original_cache: str | None = None
    #: Confidence and resamples of the intervals (``--confidence``, ``--resamples``).
    #: Not in :meth:`to_dict`: each interval in the report says them, and like the gate
    #: threshold they belong to the summary (a merge of shards sets its own).
    intervals: IntervalSettings = IntervalSettings()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scorecam_channels": self.scorecam_channels,
            "target": self.target,
            "batch_size": self.batch_size,
            "provider": self.provider,
            "threads": self.threads,
            "threshold": self.threshold,
            "strict": self.strict,
        }


@dataclass(frozen=True)
class ModelInfo:
    """A model as the report describes it."""

    path: str | None
    spec: ModelSpec
    size_bytes: int | None
    parameters: int
    providers: tuple[str, ...]
    provider_note: str | None = None
    gradient: str = "finite-difference"
    gradient_note: str | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "model"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "parameters": self.parameters,
            "providers": list(self.providers),
            **self.spec.to_dict(),
            "gradient": {"path": self.gradient, "reason": self.gradient_note},
        }


MapsCallback = Callable[[ImageSet, np.ndarray, np.ndarray, list[np.ndarray]], None]


@dataclass(frozen=True)
class CandidateResult:
    """Scores of one candidate against the original."""

    model: ModelInfo
    scores: PairScores
    summary: ScoreSummary
    targets: np.ndarray  # (N,) target class used for the candidate's maps
    predictions: np.ndarray  # (N,) candidate's top-1
    confidence: np.ndarray  # (N,) candidate's probability of the original's target
    agreement: float  # top-1 agreement with the original
    accuracy: float | None  # when labels are known
    confidence_drop: float  # mean over images of p_orig[c] - p_cand[c]
    non_finite_paths: tuple[str, ...]
    maps: ModelMaps | None = None
    worst: "WorstImages | None" = None
    #: Intervals of the mean, class-balanced mean and 5th percentile (README, "Intervals").
    intervals: ScoreIntervals | None = None


@dataclass(frozen=True)
class ImageRecord:
    """One image of one candidate's audit."""

    path: str
    label: int | None
    target: int
    prediction_original: int
    prediction_candidate: int
    spatial: float
    spectral: float
    score: float
    finite: bool


@dataclass(frozen=True)
class AuditResult:
    """Everything an audit found; :mod:`onnx_sp2ps.report` writes it out."""

    settings: AuditSettings
    preprocess: dict[str, Any]
    images: ImageSet
    original: ModelInfo
    original_targets: np.ndarray
    original_predictions: np.ndarray
    original_confidence: np.ndarray
    original_accuracy: float | None
    candidates: tuple[CandidateResult, ...]
    indices: np.ndarray  # (N,) positions in ``images`` of the images scored
    provider_note: str | None
    versions: dict[str, str] = field(default_factory=dict)
    original_maps: ModelMaps | None = None
    #: Every pair of candidates compared on the same images (README, "Intervals"):
    #: ``a``, ``b`` are positions in :attr:`candidates`.
    comparisons: tuple[Comparison, ...] = ()

    @property
    def paths(self) -> list[str]:
        return [self.images.paths[i] for i in self.indices]

    @property
    def labels(self) -> np.ndarray | None:
        return _labels_at(self.images, self.indices)

    def records(self, candidate: int = 0) -> list[ImageRecord]:
        """Per-image results of candidate number ``candidate``."""
        cand = self.candidates[candidate]
        labels = self.labels
        return [
            ImageRecord(
                path=path,
                label=None if labels is None or labels[i] < 0 else int(labels[i]),
                target=int(cand.targets[i]),
                prediction_original=int(self.original_predictions[i]),
                prediction_candidate=int(cand.predictions[i]),
                spatial=float(cand.scores.spatial[i]),
                spectral=float(cand.scores.spectral[i]),
                score=float(cand.scores.score[i]),
                finite=bool(cand.scores.finite[i]),
            )
            for i, path in enumerate(self.paths)
        ]

    def to_dict(self, criteria: GateCriteria | None = None) -> dict[str, Any]:
        """The report.json content (see README); ``criteria`` a
        :class:`onnx_sp2ps.gate.GateCriteria` to record a gate."""
        return audit_to_dict(self, criteria=criteria)

    def to_json(self, criteria: GateCriteria | None = None) -> str:
        """:meth:`to_dict` as JSON text (non-finite numbers as null)."""
        import json

        return json.dumps(self.to_dict(criteria), indent=2, allow_nan=False)


# --------------------------------------------------------------------------- report.json


def path_endings(paths: list[str | None]) -> list[str]:
    """For each model path, the shortest ending (file name, then parent/file name, ...)
    that the other, different paths do not share; the same path given twice keeps one
    ending."""
    parts = []
    for p in paths:
        pure = PurePath(show(p)) if p else PurePath("model")
        parts.append(pure.parts[1:] if pure.anchor else pure.parts)
    out = []
    for mine in parts:
        others = [q for q in parts if q != mine]
        depth = 1
        while depth < len(mine) and any(q[-depth:] == mine[-depth:] for q in others):
            depth += 1
        out.append("/".join(mine[-depth:]))
    return out


def display_names(paths: list[str | None]) -> list[str]:
    """Distinct display names of models (``paths[0]`` the original, then the candidates):
    :func:`path_endings`, and ``(candidate K)`` after a path given before. Models are
    identified by position and path, never by file name alone."""
    endings = path_endings(paths)
    return [e if e not in endings[:i] else f"{e} (candidate {i})" for i, e in enumerate(endings)]


def _model_dict(info: ModelInfo, name: str) -> dict[str, Any]:
    out = info.to_dict()
    out["name"] = name
    out["path"] = None if info.path is None else show(info.path)
    return out


def audit_to_dict(
    result: "AuditResult",
    *,
    schema_version: int = SCHEMA_VERSION,
    criteria: GateCriteria | None = None,
) -> dict[str, Any]:
    """report.json content of an :class:`onnx_sp2ps.pipeline.AuditResult` (README documents
    the schema); with ``criteria``, each candidate's ``gate`` and the top-level
    ``passed`` are filled in."""
    labels = result.labels
    paths = result.paths  # (image paths and reasons come escaped from the data layer)
    names = display_names([result.original.path] + [c.model.path for c in result.candidates])
    candidates = []
    for cand, name in zip(result.candidates, names[1:]):
        rows = []
        for i, path in enumerate(paths):
            rows.append(
                {
                    "path": path,
                    "label": None if labels is None or labels[i] < 0 else int(labels[i]),
                    "target": int(cand.targets[i]),
                    "target_original": int(result.original_targets[i]),
                    "prediction_original": int(result.original_predictions[i]),
                    "prediction_candidate": int(cand.predictions[i]),
                    "confidence_original": _num(result.original_confidence[i]),
                    "confidence_candidate": _num(cand.confidence[i]),
                    "spatial": _num(cand.scores.spatial[i]),
                    "spectral": _num(cand.scores.spectral[i]),
                    "score": _num(cand.scores.score[i]),
                    "finite": bool(cand.scores.finite[i]),
                    "flat_original": bool(cand.scores.flat_a[i]),
                    "flat_candidate": bool(cand.scores.flat_b[i]),
                }
            )
        summary: dict[str, Any] = {
            k: (_num(v) if isinstance(v, float) else v) for k, v in cand.summary.to_dict().items()
        }
        if cand.intervals is not None:
            summary["ci"] = cand.intervals.to_dict()
        candidates.append(
            {
                "model": _model_dict(cand.model, name),
                "sp2ps": summary,
                "agreement": _num(cand.agreement),
                "accuracy": _num(cand.accuracy),
                "confidence_drop": _num(cand.confidence_drop),
                "non_finite_images": list(cand.non_finite_paths),
                "gate": None,
                "images": rows,
            }
        )
    report = {
        "schema_version": schema_version,
        "tool": "onnx-sp2ps",
        "versions": dict(result.versions),
        "settings": result.settings.to_dict(),
        "preprocess": result.preprocess,
        "providers": {
            "requested": result.settings.provider,
            "used": list(result.original.providers),
            "note": result.provider_note,
        },
        "images": {
            "source": result.images.source,
            "scored": int(len(result.indices)),
            "skipped": [{"path": p, "reason": r} for p, r in result.images.skipped],
            "labelled": labels is not None and bool((labels >= 0).any()),
        },
        "original": {
            "model": _model_dict(result.original, names[0]),
            "accuracy": _num(result.original_accuracy),
        },
        "candidates": candidates,
        "comparisons": [_comparison_dict(c, result.candidates) for c in result.comparisons],
        "passed": None,
    }
    if criteria is not None and criteria.any():
        apply_gate(report, criteria)
    return report


def _comparison_dict(c: Comparison, candidates: Sequence[CandidateResult]) -> dict[str, Any]:
    def path(i: int | None) -> str | None:
        info = None if i is None else candidates[i].model
        return None if info is None or info.path is None else show(info.path)

    return {
        "a": path(c.a),
        "b": path(c.b),
        "positions": [c.a, c.b],
        "difference": _num(c.difference),
        "ci": c.ci.to_list(),
        "exact": c.ci.exact,
        "better": path(c.better),
    }


# --------------------------------------------------------------------------- helpers


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "onnx_sp2ps": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def input_spec(spec: ModelSpec, layout: str | None = None) -> InputSpec:
    """What :mod:`onnx_sp2ps.data` needs to know of a model's image input."""
    layout = layout or spec.layout
    shape = spec.input.shape or (None, None, None, None)

    def static(d: object) -> int | None:
        return d if isinstance(d, int) and d > 0 else None

    if layout == "NCHW":
        c, h, w = shape[1], shape[2], shape[3]
    else:
        h, w, c = shape[1], shape[2], shape[3]
    return InputSpec(
        layout=layout, channels=static(c), height=static(h), width=static(w), batch=spec.fixed_batch
    )


def _probabilities(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """The model's own probabilities: sigmoid for Sigmoid models, else softmax."""
    if activation == "Sigmoid":
        with np.errstate(over="ignore", invalid="ignore"):
            return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return softmax(logits, axis=1)


def _check_compatible(original: ModelSpec, candidate: ModelSpec, name: str) -> None:
    problems = []
    if original.layout != candidate.layout:
        problems.append(f"input layout {original.layout} vs {candidate.layout}")
    a, b = original.input.shape, candidate.input.shape
    if a is not None and b is not None and len(a) == len(b) == 4:
        for i, (da, db) in enumerate(zip(a, b)):
            if i and isinstance(da, int) and isinstance(db, int) and da != db:
                problems.append(f"input shape {list(a)} vs {list(b)}")
                break
    if (
        original.num_classes
        and candidate.num_classes
        and original.num_classes != candidate.num_classes
    ):
        problems.append(f"{original.num_classes} vs {candidate.num_classes} classes")
    if problems:
        raise MismatchError(
            f"candidate {name} does not match the original: "
            + "; ".join(problems)
            + ": compare a candidate made from this "
            "original (same input size, layout and classes)"
        )


class _Explainer:
    """One model's runner and CAM method.

    With ``lazy`` the session is opened on first use (an original whose results all come
    from the original cache is never opened); until then :attr:`info` is the one
    :meth:`describe_cached` gave, from a cache entry."""

    def __init__(
        self,
        prepared: PreparedModel,
        settings: AuditSettings,
        device_inputs: DeviceInputs | None = None,
        *,
        lazy: bool = False,
    ):
        self.prepared = prepared
        self._settings = settings
        self._device_inputs = device_inputs
        self._runner: ModelRunner | None = None
        self._cached_info: ModelInfo | None = None
        if not lazy:
            self._open()

    def _open(self) -> ModelRunner:
        if self._runner is None:
            settings = self._settings
            runner = ModelRunner(
                self.prepared,
                provider=settings.provider,
                threads=settings.threads,
                device_inputs=self._device_inputs,
            )
            self._cam = make_cam(
                settings.method, runner, scorecam_channels=settings.scorecam_channels
            )
            self._runner = runner
        return self._runner

    @property
    def cam(self) -> BaseCAM:
        self._open()
        return self._cam

    @property
    def runner(self) -> ModelRunner:
        return self._open()

    @property
    def info(self) -> ModelInfo:
        if self._runner is None and self._cached_info is not None:
            return self._cached_info
        runner = self._open()
        return self._describe(
            runner.provider.providers,
            runner.provider.note,
            runner.gradient_path,
            runner.gradient_note,
        )

    def _describe(
        self,
        providers: tuple[str, ...],
        provider_note: str | None,
        gradient: str,
        gradient_note: str | None,
    ) -> ModelInfo:
        prepared = self.prepared
        return ModelInfo(
            path=prepared.path,
            spec=prepared.spec,
            size_bytes=prepared.size_bytes,
            parameters=prepared.parameters,
            providers=providers,
            provider_note=provider_note,
            gradient=gradient,
            gradient_note=gradient_note,
        )

    def describe_cached(self, entry: OriginalBatch) -> None:
        """Take the session's description (providers, gradient path) from a cache entry
        while the session is not open."""
        if self._cached_info is None:
            self._cached_info = self._describe(
                entry.providers, entry.provider_note, entry.gradient, entry.gradient_note
            )

    def run(self, inputs: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Activations and logits; with the gradients in the same run when the method
        uses them (``targets`` -1 = each image's top-1, resolved in the graph)."""
        runner = self._open()
        if targets is None or not self.cam.uses_gradients:
            return runner.run(inputs)
        return runner.run(inputs, targets=targets)

    def maps(
        self,
        activations: np.ndarray,
        targets: np.ndarray,
        logits: np.ndarray,
        size: tuple[int, int],
        inputs: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raw = self.cam(activations, targets, inputs)
        bad = ~np.isfinite(logits).all(axis=1)
        raw[bad] = np.nan
        return (raw, *_cam_images(raw, size))


def _cam_images(raw: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The CAM images (upsampled, normalised) and flat flags of raw maps: the one way
    they are made, so that maps from cached raw maps are the same bits."""
    return normalise_maps(upsample_bilinear(raw, size))


def _target_hint(
    target: str | int,
    labels: np.ndarray | None,
    original_targets: np.ndarray | None,
    n: int,
) -> np.ndarray | None:
    """Targets known before a model runs (-1: its own top-1), or None when unknown."""
    if target in ("own",) or (target == "original" and original_targets is None):
        return np.full(n, -1, dtype=np.int64)
    if target == "original":
        return np.asarray(original_targets, dtype=np.int64)
    if target == "label":
        if labels is None or (np.asarray(labels) < 0).any():
            return None
        return np.asarray(labels, dtype=np.int64)
    if isinstance(target, (int, np.integer)):
        return np.full(n, int(target), dtype=np.int64)
    return None


def _open(
    images: ImageSource,
    spec: ModelSpec,
    preprocess: Preprocess,
    class_names: ClassNames,
    strict: bool,
    max_memory: int | None,
) -> ImageSet:
    if isinstance(images, ImageSet):
        return images
    return open_images(
        images,
        spec=input_spec(spec, preprocess.layout),
        preprocess=preprocess,
        class_names=class_names,
        strict=strict,
        max_memory=max_memory,
    )


def _prepare(
    model: str | Path | PreparedModel,
    options: ModelOptions,
    preprocess: Preprocess,
    max_memory: int | None = None,
) -> PreparedModel:
    if isinstance(model, PreparedModel):
        return model
    return prepare_model(
        model,
        input_name=options.input_name,
        feature_layer=options.feature_layer,
        logits=options.logits,
        size=preprocess.size,
        max_memory=max_memory,
        prefix_tokens=options.prefix_tokens,
        token_grid=options.token_grid,
    )


def _dim_product(dims: Sequence[object]) -> int | None:
    n = 1
    for d in dims:
        if not isinstance(d, int) or d < 0:
            return None
        n *= d
    return n


def check_batch_memory(
    specs: Sequence[ModelSpec],
    size: tuple[int, int],
    batch_size: int,
    channels: int | None = None,
    max_memory: int | None = None,
) -> int:
    """Refuse a run whose one batch cannot fit the memory budget, before it is allocated.

    The rule: the rows run at once (``batch_size``, padded up to a multiple of the
    models' fixed batch when one has one) times the bytes of one row must fit
    ``max_memory`` (bytes; None: :func:`onnx_sp2ps.files.memory_budget`'s default, half
    the available memory).  One row is estimated, from below, as the input (C x H x W
    float32 at the resolved ``size``), twice the largest activation of any one model
    (onnxruntime holds a node's input and output at once; the models run one after the
    other), and, for each model, its feature map and four H x W float32 maps (the CAM,
    its upsampled and normalised forms, the scoring's copies), which are kept until all
    models have run; a feature map whose size is symbolic counts as the largest
    activation.  Sizes unknown to shape inference count as 0.  Returns the bytes.

    Raises
    ------
    InputError
        Saying whether the fixed batch, the input size or the batch size is to blame.
    """
    budget = memory_budget(max_memory)
    h, w = int(size[0]), int(size[1])
    c = channels or specs[0].input_channels or 3
    fixed = max((s.fixed_batch or 0 for s in specs), default=0)
    rows = fixed * -(-batch_size // fixed) if fixed else batch_size
    per_row = c * h * w * 4
    per_row += 2 * max((s.largest_activation or 0 for s in specs), default=0)
    for spec in specs:
        fm = spec.feature_map.shape
        maps = _dim_product(fm[1:]) if fm else None
        per_row += 4 * maps if maps is not None else spec.largest_activation or 0
        per_row += 4 * h * w * 4
    total = rows * per_row
    if total <= budget:
        return total
    shape = f"{c}x{h}x{w}"
    over = (
        f"over the memory budget of {human_bytes(budget)} (--max-memory): refused before allocating"
    )
    if fixed and fixed * per_row > budget:
        raise InputError(
            f"the model's fixed batch of {fixed} inputs of {shape} (with its "
            f"feature maps) takes {human_bytes(fixed * per_row)}, {over}; export "
            "the model with a dynamic (or smaller) batch dimension"
        )
    if per_row > budget:
        declared = all(s.input_size == (h, w) for s in specs)
        remedy = (
            "export the model with a smaller (or dynamic) input size"
            if declared
            else "pass a smaller --size"
        )
        raise InputError(
            f"one input of {shape} (with its feature maps) takes "
            f"{human_bytes(per_row)}, {over}; {remedy}"
        )
    raise InputError(
        f"one batch of {rows} inputs of {shape} (with their feature maps) "
        f"takes {human_bytes(total)}, {over}; lower --batch-size to "
        f"{max(budget // per_row, 1)} or less"
    )


def _labels_at(image_set: ImageSet, indices: np.ndarray) -> np.ndarray | None:
    return None if image_set.labels is None else np.asarray(image_set.labels)[indices]


def _nothing_read(image_set: ImageSet, what: str) -> DataError:
    skipped = image_set.skipped
    example = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
    return DataError(
        f"none of the {len(image_set)} images could be read{example}: "
        f"nothing to {what}; replace the files or point --images elsewhere"
    )


def _batches(
    image_set: ImageSet, batch_size: int, start: int = 0, stop: int | None = None
) -> Iterator[Batch]:
    if batch_size < 1:
        raise UsageError("--batch-size must be 1 or more")
    yield from image_set.iter_batches(batch_size, start, stop)


# --------------------------------------------------------------------------- API


def compute_cams(
    model: str | Path | PreparedModel,
    images: ImageSource,
    *,
    preprocess: Preprocess = Preprocess(),
    method: str = "gradcam",
    target: str | int = "own",
    options: ModelOptions = ModelOptions(),
    class_names: ClassNames = None,
    batch_size: int = 16,
    provider: str = "auto",
    threads: int | None = None,
    strict: bool = False,
    scorecam_channels: int | None = None,
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> tuple[ModelMaps, ModelInfo, ImageSet]:
    """CAMs of one model over a folder of images or an array file.

    Parameters
    ----------
    model
        Path to an ONNX model, or a :class:`PreparedModel`.
    images
        Folder, ``.npy``/``.npz`` path, or an :class:`ImageSet`.
    target
        ``"own"`` (top-1), ``"label"`` or a class index.

    Returns
    -------
    maps, model_info, image_set
    """
    if target == "original":
        raise UsageError("target 'original' is for audits; use own, label or a class index")
    prepared = _prepare(model, options, preprocess, max_memory)
    settings = AuditSettings(
        method=method,
        target=target,
        batch_size=batch_size,
        provider=provider,
        threads=threads,
        strict=strict,
        scorecam_channels=scorecam_channels,
        max_memory=max_memory,
    )
    explainer = _Explainer(prepared, settings)
    image_set = _open(images, prepared.spec, preprocess, class_names, strict, max_memory)
    size = image_set.preprocess.size
    check_batch_memory([prepared.spec], size, batch_size, image_set.preprocess.channels, max_memory)
    parts: list[ModelMaps] = []
    done = 0
    for batch in _batches(image_set, batch_size):
        labels = _labels_at(image_set, batch.indices)
        acts, logits = explainer.run(
            batch.inputs, _target_hint(target, labels, None, len(batch.indices))
        )
        targets = select_targets(target, logits=logits, labels=labels)
        raw, maps, flat = explainer.maps(acts, targets, logits, size, batch.inputs)
        paths = [image_set.paths[i] for i in batch.indices]
        parts.append(ModelMaps(paths, targets, logits, raw, maps, flat))
        done += len(batch.indices)
        if progress:
            progress(done, len(image_set))
    if not parts:
        raise _nothing_read(image_set, "explain")
    return ModelMaps.concatenate(parts), explainer.info, image_set


# --------------------------------------------------------------------------- the audit


@dataclass(frozen=True)
class AuditModels:
    """The models of one audit, ready to score batches: the original's and each
    candidate's runner and CAM method, and what the records keep (every map, or only
    the ``worst`` lowest-scoring per candidate)."""

    original: _Explainer
    candidates: tuple[_Explainer, ...]
    settings: AuditSettings
    keep_maps: bool = False
    worst: int = 0
    #: The original's cached results (``settings.original_cache``), or None.
    original_cache: OriginalCache | None = None


@dataclass(frozen=True)
class AuditContext:
    """What an audit's result says besides its per-image records: settings, the image
    set (source, skipped files), the models and the environment."""

    settings: AuditSettings
    images: ImageSet
    original: ModelInfo
    candidates: tuple[ModelInfo, ...]
    provider_note: str | None
    versions: dict[str, str]


def score_batch(
    models: AuditModels,
    batch: Batch,
    images: ImageSet,
    on_maps: MapsCallback | None = None,
) -> Records:
    """The map step of an audit: one batch of ``images`` through the original and each
    candidate, both maps of each image made for the same target class, and scored.

    ``on_maps`` (see :func:`audit`) sees the batch's maps before they are dropped."""
    settings = models.settings
    size = images.preprocess.size
    n = len(batch.indices)
    rows = np.arange(n)
    positions = batch.indices.astype(np.int64, copy=False)
    paths = [images.paths[i] for i in positions]
    labels = _labels_at(images, positions)
    orig = models.original
    o_targets, o_logits, o_raw, o_maps, o_flat = _original_batch(models, batch, images, labels)

    def columns(
        model: _Explainer,
        targets: np.ndarray,
        logits: np.ndarray,
        raw: np.ndarray,
        maps: np.ndarray,
        flat: np.ndarray,
    ) -> ModelColumns:
        prob = _probabilities(logits, model.prepared.spec.activation)
        return ModelColumns(
            targets=targets,
            predictions=top1(logits),
            confidence=prob[rows, o_targets],
            maps=ModelMaps(paths, targets, logits, raw, maps, flat) if models.keep_maps else None,
        )

    original = columns(orig, o_targets, o_logits, o_raw, o_maps, o_flat)
    candidates = []
    batch_maps = []
    for cand in models.candidates:
        c_acts, c_logits = cand.run(
            batch.inputs, _target_hint(settings.target, labels, o_targets, n)
        )
        c_targets = select_targets(
            settings.target, logits=c_logits, labels=labels, reference_logits=o_logits
        )
        c_raw, c_maps, c_flat = cand.maps(c_acts, c_targets, c_logits, size, batch.inputs)
        pair = score_pairs(o_maps, c_maps, workers=settings.threads)
        worst = WorstImages.select(models.worst, positions, pair.score, o_maps, c_maps)
        candidates.append(
            CandidateColumns(columns(cand, c_targets, c_logits, c_raw, c_maps, c_flat), pair, worst)
        )
        batch_maps.append(c_maps)
    if on_maps is not None:
        on_maps(images, batch.indices, o_maps, batch_maps)
    return Records(positions, paths, labels, original, tuple(candidates))


def _original_batch(
    models: AuditModels, batch: Batch, images: ImageSet, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The original's targets, logits, raw maps, CAM images and flat flags for a batch:
    from the original cache when it holds the batch (the CAM images made from the raw
    maps as a run makes them), else from a run (then stored in the cache)."""
    orig, cache = models.original, models.original_cache
    settings, size = models.settings, images.preprocess.size
    positions = batch.indices.astype(np.int64, copy=False)
    spec = orig.prepared.spec
    if cache is not None:
        entry = cache.load(
            images, positions, classes=spec.num_classes or None, raw_shape=spec.feature_size
        )
        if entry is not None:
            orig.describe_cached(entry)
            return (entry.targets, entry.logits, entry.raw, *_cam_images(entry.raw, size))
    n = len(positions)
    acts, logits = orig.run(batch.inputs, _target_hint(settings.target, labels, None, n))
    targets = select_targets(settings.target, logits=logits, labels=labels, reference_logits=logits)
    raw, maps, flat = orig.maps(acts, targets, logits, size, batch.inputs)
    if cache is not None:
        info = orig.info
        cache.store(
            images,
            OriginalBatch(
                positions=positions,
                targets=targets,
                logits=logits,
                raw=raw,
                providers=info.providers,
                provider_note=info.provider_note,
                gradient=info.gradient,
                gradient_note=info.gradient_note,
            ),
        )
    return targets, logits, raw, maps, flat


def original_cache_fields(prepared: PreparedModel, settings: AuditSettings) -> dict[str, Any]:
    """The original cache's key fields that do not depend on the image set (README,
    "Commands", --original-cache): the original's bytes and what detection made of
    them, every setting that changes its results, the versions and the machine."""
    import onnxruntime

    return {
        "format": CACHE_FORMAT,
        "original": {
            "sha256": model_digest(prepared.path, prepared.audit_model),
            "spec": prepared.spec.to_dict(),
        },
        "settings": {
            "method": settings.method,
            "scorecam_channels": settings.scorecam_channels,
            "target": settings.target,
            "batch_size": settings.batch_size,
            "provider": settings.provider,
            "threads": settings.threads,
        },
        "versions": {k: v for k, v in versions().items() if k != "python"},
        "machine": {
            "arch": platform.machine(),
            "cpu": _cpu_flags(),
            "cpus": os.cpu_count(),
            "providers": list(onnxruntime.get_available_providers()),
        },
    }


def _cpu_flags() -> str:
    """sha256 of the CPU's instruction-set flags (ONNX Runtime picks kernels by them)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return hashlib.sha256(line).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarise(records: Records, context: AuditContext) -> AuditResult:
    """The reduce step's end: every aggregate of an audit, computed from its merged
    records only.

    Raises
    ------
    DataError
        No image was scored.
    NonFiniteError
        Every image of some candidate gave non-finite logits or maps.
    """
    context.images.add_failures(records.failures)  # (found by whichever part read them)
    if not len(records):
        raise _nothing_read(context.images, "audit")
    labels = records.labels
    known = None if labels is None else labels >= 0
    o = records.original

    def accuracy(pred: np.ndarray) -> float | None:
        if labels is None or known is None or not known.any():
            return None
        return float(np.mean(pred[known] == labels[known]))

    intervals = audit_intervals(
        [c.scores.score for c in records.candidates],
        o.targets,
        settings=context.settings.intervals,
        key=seed_key(records.positions),
    )
    results = []
    for info, cand, ci in zip(context.candidates, records.candidates, intervals.candidates):
        scores, c = cand.scores, cand.columns
        if not scores.finite.any():
            raise NonFiniteError(
                f"every image gave non-finite logits or maps for {info.name} or the "
                "original: check the models and the preprocessing"
            )
        drop = o.confidence - c.confidence
        results.append(
            CandidateResult(
                model=info,
                scores=scores,
                summary=summarise_scores(scores, o.targets, threshold=context.settings.threshold),
                targets=c.targets,
                predictions=c.predictions,
                confidence=c.confidence,
                agreement=float(np.mean(c.predictions == o.predictions)),
                accuracy=accuracy(c.predictions),
                confidence_drop=float(np.nanmean(drop))
                if np.isfinite(drop).any()
                else float("nan"),
                non_finite_paths=tuple(p for p, ok in zip(records.paths, scores.finite) if not ok),
                maps=c.maps,
                worst=_worst_rows(cand.worst, records.positions) if cand.worst.limit > 0 else None,
                intervals=ci,
            )
        )
    return AuditResult(
        settings=context.settings,
        preprocess=context.images.preprocess.to_dict(),
        images=context.images,
        original=context.original,
        original_targets=o.targets,
        original_predictions=o.predictions,
        original_confidence=o.confidence,
        original_accuracy=accuracy(o.predictions),
        candidates=tuple(results),
        indices=records.positions,
        provider_note=context.provider_note,
        versions=context.versions,
        original_maps=o.maps,
        comparisons=intervals.comparisons,
    )


def _worst_rows(worst: WorstImages, positions: np.ndarray) -> WorstImages:
    """``worst`` with its image-set positions turned into rows of the result."""
    rows = np.searchsorted(positions, worst.positions).astype(np.int64)
    return WorstImages(worst.limit, rows, worst.scores, worst.original_maps, worst.candidate_maps)


def _prepare_all(
    original: str | Path | PreparedModel,
    candidates: Sequence[str | Path | PreparedModel],
    preprocess: Preprocess,
    settings: AuditSettings,
    original_options: ModelOptions,
    candidate_options: ModelOptions,
) -> tuple[PreparedModel, list[PreparedModel]]:
    """The original and the candidates prepared (detection, head gradients), each
    candidate checked against the original; no session is opened."""
    orig_prep = _prepare(original, original_options, preprocess, settings.max_memory)
    cand_preps = [
        _prepare(c, candidate_options, preprocess, settings.max_memory) for c in candidates
    ]
    for cp in cand_preps:
        _check_compatible(orig_prep.spec, cp.spec, Path(cp.path).name if cp.path else "model")
    return orig_prep, cand_preps


def open_audit_models(
    original: str | Path | PreparedModel,
    candidates: Sequence[str | Path | PreparedModel],
    *,
    preprocess: Preprocess = Preprocess(),
    settings: AuditSettings = AuditSettings(),
    original_options: ModelOptions = ModelOptions(),
    candidate_options: ModelOptions = ModelOptions(),
    keep_maps: bool = False,
    worst: int = 0,
) -> AuditModels:
    """Prepare the original and the candidates (detection, head gradients), check that
    each candidate fits the original, and open their sessions.  With
    ``settings.original_cache`` the original's session is opened only when a batch is
    not in the cache."""
    orig_prep, cand_preps = _prepare_all(
        original, candidates, preprocess, settings, original_options, candidate_options
    )
    cache = None
    if settings.original_cache is not None:
        cache = OriginalCache(settings.original_cache, original_cache_fields(orig_prep, settings))
    shared = DeviceInputs()  # on CUDA, each batch crosses to the GPU once for all models
    return AuditModels(
        original=_Explainer(orig_prep, settings, shared, lazy=cache is not None),
        candidates=tuple(_Explainer(cp, settings, shared) for cp in cand_preps),
        settings=settings,
        keep_maps=keep_maps,
        worst=worst,
        original_cache=cache,
    )


def prepare_audit(
    original: str | Path | PreparedModel,
    candidates: Sequence[str | Path | PreparedModel],
    images: ImageSource,
    *,
    preprocess: Preprocess,
    settings: AuditSettings,
    original_options: ModelOptions,
    candidate_options: ModelOptions,
    class_names: ClassNames,
) -> tuple[PreparedModel, list[PreparedModel], ImageSet]:
    """Everything an audit does before any session is opened or any batch allocated,
    wherever its batches then run: the call checked, the models prepared and checked
    against each other, the images opened and one batch checked against the memory
    budget."""
    if not candidates:
        raise UsageError("give at least one candidate model")
    if settings.target not in AUDIT_TARGETS:
        raise UsageError(f"--target for audits is original, label or own, not {settings.target!r}")
    if settings.original_cache is not None:
        check_folder(settings.original_cache)  # before the models are read
    orig_prep, cand_preps = _prepare_all(
        original, candidates, preprocess, settings, original_options, candidate_options
    )
    image_set = _open(
        images, orig_prep.spec, preprocess, class_names, settings.strict, settings.max_memory
    )
    check_batch_memory(
        [orig_prep.spec] + [cp.spec for cp in cand_preps],
        image_set.preprocess.size,
        settings.batch_size,
        image_set.preprocess.channels,
        settings.max_memory,
    )
    return orig_prep, cand_preps, image_set


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
    shard: tuple[int, int] | None = None,
) -> tuple[Records, AuditContext]:
    """The records of an audit (of all its images, or of shard ``(K, N)``:
    :func:`shard_range`) and its context: :func:`audit` before :func:`summarise`.
    Parameters and errors as :func:`audit`'s."""
    orig_prep, cand_preps, image_set = prepare_audit(
        original,
        candidates,
        images,
        preprocess=preprocess,
        settings=settings,
        original_options=original_options,
        candidate_options=candidate_options,
        class_names=class_names,
    )
    models = open_audit_models(
        orig_prep, cand_preps, settings=settings, keep_maps=keep_maps, worst=worst
    )
    start, stop = (
        (0, len(image_set))
        if shard is None
        else shard_range(len(image_set), settings.batch_size, shard)
    )
    records = map_range(models, image_set, start, stop, on_maps, progress)
    context = AuditContext(
        settings=settings,
        images=image_set,
        original=models.original.info,
        candidates=tuple(c.info for c in models.candidates),
        provider_note=models.original.info.provider_note,
        versions=versions(),
    )
    return records, context


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
) -> AuditResult:
    """Score each candidate's CAMs against the original's, image by image: map each
    batch to :class:`Records` (:func:`score_batch`), merge them, and summarise.

    Parameters
    ----------
    original, candidates
        Paths to ONNX models (or :class:`PreparedModel` objects).
    images
        Folder of images, ``.npy``/``.npz`` file, or an :class:`ImageSet`.
    preprocess, settings
        How images are prepared; how maps are made and compared.
    original_options, candidate_options
        Tensor-name overrides (pruned graphs may rename tensors).
    keep_maps
        Keep every model's maps in the result (for ``--save-maps``; memory grows with
        the number of images).
    worst
        Keep, per candidate, the maps of the ``worst`` lowest-scoring images
        (:class:`WorstImages`) for reports.
    on_maps
        Called after each batch as ``on_maps(image_set, indices, original_maps,
        candidate_maps)`` with the image-set positions (B,), the original's CAM images
        (B, H, W) and a list of each candidate's: a way to stream maps (overlays)
        without keeping them.
    progress
        Called as ``progress(done, total)`` after each batch.

    Raises
    ------
    InputError
        (and subclasses) when a model or the images are not usable.
    """
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
    )
    return summarise(records, context)


def shard_range(total: int, batch_size: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Positions ``[start, stop)`` of shard ``(K, N)`` (K from 1 to N) of ``total``
    images: the whole pass's batches split into N contiguous runs, so that every image
    is scored in the same batch as in one pass (README, "At scale")."""
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise UsageError(f"shard K/N needs 1 <= K <= N; got {k}/{n}")
    batches = -(-total // batch_size)
    first, last = (k - 1) * batches // n, k * batches // n
    return min(first * batch_size, total), min(last * batch_size, total)


def map_range(
    models: AuditModels,
    image_set: ImageSet,
    start: int,
    stop: int,
    on_maps: MapsCallback | None = None,
    progress: Progress | None = None,
) -> Records:
    """Map each batch of the positions ``[start, stop)`` to records and merge them,
    with the images of the range that could not be decoded."""

    def mapped() -> Iterator[Records]:
        done = 0
        for batch in _batches(image_set, models.settings.batch_size, start, stop):
            yield score_batch(models, batch, image_set, on_maps)
            done += len(batch.indices)
            if progress:
                progress(done, stop - start)

    merged = merge_stream(mapped())
    if merged is None:
        merged = Records.empty(
            len(models.candidates), models.worst, labels=image_set.labels is not None
        )
    return replace(merged, failures=image_set.failures_between(start, stop))

"""Orchestration (DESIGN.md's ``audit.py``): models and images in, a result object out.
Never prints.  Named ``pipeline`` so that ``from onnx_sp2ps import audit`` can be the
function without shadowing a module.

:func:`audit` streams the images in batches through the original and every candidate,
computes both CAMs per image for the same target class, scores each pair
(:mod:`onnx_sp2ps.similarity`) and returns an :class:`AuditResult`.  :func:`compute_cams`
does the first half for a single model.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable, Sequence

import numpy as np

from onnx_sp2ps._version import __version__
from onnx_sp2ps.cams import make_cam
from onnx_sp2ps.cams.base import normalise_maps, softmax, upsample_bilinear
from onnx_sp2ps.data import ImageSet, InputSpec, Preprocess, open_images
from onnx_sp2ps.errors import DataError, InputError, MismatchError, NonFiniteError, UsageError
from onnx_sp2ps.files import human_bytes, memory_budget, show
from onnx_sp2ps.gate import GateCriteria, apply_gate
from onnx_sp2ps.gate import finite_or_none as _num
from onnx_sp2ps.model import ModelSpec, PreparedModel, prepare_model
from onnx_sp2ps.runtime import DeviceInputs, ModelRunner
from onnx_sp2ps.similarity import PairScores, ScoreSummary, score_pairs, summarise_scores
from onnx_sp2ps.targets import select_targets, top1

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
    "SCHEMA_VERSION",
    "audit_to_dict",
    "display_names",
    "path_endings",
]

#: Version of the report.json layout (see README, "report.json").
SCHEMA_VERSION = 1

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelOptions:
    """Detection overrides for one model (tensor names)."""

    input_name: str | None = None
    feature_layer: str | None = None
    logits: str | None = None


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

    def to_dict(self) -> dict:
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

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "parameters": self.parameters,
            "providers": list(self.providers),
            **self.spec.to_dict(),
            "gradient": {"path": self.gradient, "reason": self.gradient_note},
        }


@dataclass
class ModelMaps:
    """CAMs of one model over a data set (the keys of ``cams.npz``)."""

    paths: list[str]
    targets: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, K) float32
    raw: np.ndarray  # (N, h, w) float32, ReLU(R) at feature resolution
    maps: np.ndarray  # (N, H, W) float32, normalised CAM images
    flat: np.ndarray  # (N,) bool

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "paths": np.asarray(self.paths, dtype=str),
            "targets": self.targets,
            "logits": self.logits,
            "raw": self.raw,
            "maps": self.maps,
        }


@dataclass
class WorstImages:
    """The lowest-scoring images of a candidate and both models' maps for them, kept
    while streaming so memory does not grow with the data set."""

    limit: int
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    original_maps: np.ndarray | None = None  # (n, H, W)
    candidate_maps: np.ndarray | None = None  # (n, H, W)

    def add(self, positions, scores, original_maps, candidate_maps) -> None:
        if self.limit <= 0:
            return
        if self.original_maps is None:
            self.original_maps = original_maps[:0]
            self.candidate_maps = candidate_maps[:0]
        pos = np.concatenate([self.positions, positions])
        sc = np.concatenate([self.scores, scores])
        om = np.concatenate([self.original_maps, original_maps])
        cm = np.concatenate([self.candidate_maps, candidate_maps])
        keep = np.lexsort((pos, sc))[: self.limit]  # lowest score first, then order
        self.positions, self.scores = pos[keep], sc[keep]
        self.original_maps, self.candidate_maps = om[keep], cm[keep]


MapsCallback = Callable[[ImageSet, np.ndarray, np.ndarray, list], None]


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
    preprocess: dict
    images: ImageSet
    original: ModelInfo
    original_targets: np.ndarray
    original_predictions: np.ndarray
    original_confidence: np.ndarray
    original_accuracy: float | None
    candidates: tuple[CandidateResult, ...]
    indices: np.ndarray  # (N,) positions in ``images`` of the images scored
    provider_note: str | None
    versions: dict = field(default_factory=dict)
    original_maps: ModelMaps | None = None

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

    def to_dict(self, criteria=None) -> dict:
        """The report.json content (see README); ``criteria`` a
        :class:`onnx_sp2ps.gate.GateCriteria` to record a gate."""
        return audit_to_dict(self, criteria=criteria)

    def to_json(self, criteria=None) -> str:
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


def _model_dict(info, name: str) -> dict:
    out = info.to_dict()
    out["name"] = name
    out["path"] = None if info.path is None else show(info.path)
    return out


def audit_to_dict(
    result: "AuditResult",
    *,
    schema_version: int = SCHEMA_VERSION,
    criteria: GateCriteria | None = None,
) -> dict:
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
        summary = {
            k: (_num(v) if isinstance(v, float) else v) for k, v in cand.summary.to_dict().items()
        }
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
        "passed": None,
    }
    if criteria is not None and criteria.any():
        apply_gate(report, criteria)
    return report


# --------------------------------------------------------------------------- helpers


def versions() -> dict:
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

    def static(d):
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
    """One model's runner and CAM method."""

    def __init__(
        self,
        prepared: PreparedModel,
        settings: AuditSettings,
        device_inputs: DeviceInputs | None = None,
    ):
        self.prepared = prepared
        self.runner = ModelRunner(
            prepared,
            provider=settings.provider,
            threads=settings.threads,
            device_inputs=device_inputs,
        )
        self.cam = make_cam(
            settings.method, self.runner, scorecam_channels=settings.scorecam_channels
        )
        self.info = ModelInfo(
            path=prepared.path,
            spec=prepared.spec,
            size_bytes=prepared.size_bytes,
            parameters=prepared.parameters,
            providers=self.runner.provider.providers,
            provider_note=self.runner.provider.note,
            gradient=self.runner.gradient_path,
            gradient_note=self.runner.gradient_note,
        )

    def run(self, inputs: np.ndarray, targets: np.ndarray | None):
        """Activations and logits; with the gradients in the same run when the method
        uses them (``targets`` -1 = each image's top-1, resolved in the graph)."""
        if targets is None or not self.cam.uses_gradients:
            return self.runner.run(inputs)
        return self.runner.run(inputs, targets=targets)

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
        images, flat = normalise_maps(upsample_bilinear(raw, size))
        return raw, images, flat


class _Collector:
    """Accumulates per-batch arrays and concatenates them at the end."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, **arrays: np.ndarray) -> None:
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(value)

    def get(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key])

    def has(self, key: str) -> bool:
        return key in self.parts


def _target_hint(target, labels, original_targets, n: int) -> np.ndarray | None:
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
    images, spec: ModelSpec, preprocess: Preprocess, class_names, strict, max_memory
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
    model, options: ModelOptions, preprocess: Preprocess, max_memory: int | None = None
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
    )


def _dim_product(dims) -> int | None:
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


def _batches(image_set: ImageSet, batch_size: int):
    if batch_size < 1:
        raise UsageError("--batch-size must be 1 or more")
    yield from image_set.iter_batches(batch_size)


# --------------------------------------------------------------------------- API


def compute_cams(
    model: str | Path | PreparedModel,
    images,
    *,
    preprocess: Preprocess = Preprocess(),
    method: str = "gradcam",
    target: str | int = "own",
    options: ModelOptions = ModelOptions(),
    class_names=None,
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
    out = _Collector()
    done = 0
    for batch in _batches(image_set, batch_size):
        labels = _labels_at(image_set, batch.indices)
        acts, logits = explainer.run(
            batch.inputs, _target_hint(target, labels, None, len(batch.indices))
        )
        targets = select_targets(target, logits=logits, labels=labels)
        raw, maps, flat = explainer.maps(acts, targets, logits, size, batch.inputs)
        out.add(
            indices=batch.indices, targets=targets, logits=logits, raw=raw, maps=maps, flat=flat
        )
        done += len(batch.indices)
        if progress:
            progress(done, len(image_set))
    if not out.has("indices"):
        raise _nothing_read(image_set, "explain")
    indices = out.get("indices")
    result = ModelMaps(
        paths=[image_set.paths[i] for i in indices],
        targets=out.get("targets"),
        logits=out.get("logits"),
        raw=out.get("raw"),
        maps=out.get("maps"),
        flat=out.get("flat"),
    )
    return result, explainer.info, image_set


def audit(
    original: str | Path | PreparedModel,
    candidates: Sequence[str | Path | PreparedModel],
    images,
    *,
    preprocess: Preprocess = Preprocess(),
    settings: AuditSettings = AuditSettings(),
    original_options: ModelOptions = ModelOptions(),
    candidate_options: ModelOptions = ModelOptions(),
    class_names=None,
    keep_maps: bool = False,
    worst: int = 0,
    on_maps: MapsCallback | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Score each candidate's CAMs against the original's, image by image.

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
    if not candidates:
        raise UsageError("give at least one candidate model")
    if settings.target not in ("original", "label", "own"):
        raise UsageError(f"--target for audits is original, label or own, not {settings.target!r}")

    orig_prep = _prepare(original, original_options, preprocess, settings.max_memory)
    cand_preps = [
        _prepare(c, candidate_options, preprocess, settings.max_memory) for c in candidates
    ]
    for cp in cand_preps:
        _check_compatible(orig_prep.spec, cp.spec, Path(cp.path).name if cp.path else "model")
    image_set = _open(
        images, orig_prep.spec, preprocess, class_names, settings.strict, settings.max_memory
    )
    size = image_set.preprocess.size
    check_batch_memory(
        [orig_prep.spec] + [cp.spec for cp in cand_preps],
        size,
        settings.batch_size,
        image_set.preprocess.channels,
        settings.max_memory,
    )

    shared = DeviceInputs()  # on CUDA, each batch crosses to the GPU once for all models
    orig = _Explainer(orig_prep, settings, shared)
    cands = [_Explainer(cp, settings, shared) for cp in cand_preps]
    o_out = _Collector()
    c_out = [_Collector() for _ in cands]
    worsts = [WorstImages(worst) for _ in cands]
    done = 0  # images scored so far: also the row of the batch's first image
    for batch in _batches(image_set, settings.batch_size):
        labels = _labels_at(image_set, batch.indices)
        o_acts, o_logits = orig.run(
            batch.inputs, _target_hint(settings.target, labels, None, len(batch.indices))
        )
        o_targets = select_targets(
            settings.target, logits=o_logits, labels=labels, reference_logits=o_logits
        )
        o_raw, o_maps, o_flat = orig.maps(o_acts, o_targets, o_logits, size, batch.inputs)
        o_prob = _probabilities(o_logits, orig_prep.spec.activation)
        o_out.add(
            indices=batch.indices,
            targets=o_targets,
            pred=top1(o_logits),
            conf=o_prob[np.arange(len(o_targets)), o_targets],
        )
        if keep_maps:  # (N, K) logits too: with many classes, they grow with N
            o_out.add(logits=o_logits, raw=o_raw, maps=o_maps, flat=o_flat)
        batch_maps = []
        for cand, out, wst in zip(cands, c_out, worsts):
            c_acts, c_logits = cand.run(
                batch.inputs, _target_hint(settings.target, labels, o_targets, len(batch.indices))
            )
            c_targets = select_targets(
                settings.target, logits=c_logits, labels=labels, reference_logits=o_logits
            )
            c_raw, c_maps, c_flat = cand.maps(c_acts, c_targets, c_logits, size, batch.inputs)
            pair = score_pairs(o_maps, c_maps, workers=settings.threads)
            c_prob = _probabilities(c_logits, cand.prepared.spec.activation)
            out.add(
                targets=c_targets,
                pred=top1(c_logits),
                conf=c_prob[np.arange(len(o_targets)), o_targets],
                spatial=pair.spatial,
                spectral=pair.spectral,
                score=pair.score,
                finite=pair.finite,
                flat_a=pair.flat_a,
                flat_b=pair.flat_b,
            )
            if keep_maps:
                out.add(logits=c_logits, raw=c_raw, maps=c_maps, flat=c_flat)
            wst.add(done + np.arange(len(batch.indices)), pair.score, o_maps, c_maps)
            batch_maps.append(c_maps)
        if on_maps is not None:
            on_maps(image_set, batch.indices, o_maps, batch_maps)
        done += len(batch.indices)
        if progress:
            progress(done, len(image_set))
    if not o_out.has("indices"):
        raise _nothing_read(image_set, "audit")

    indices = o_out.get("indices")
    paths = [image_set.paths[i] for i in indices]
    labels = _labels_at(image_set, indices)
    known = None if labels is None else labels >= 0
    o_pred = o_out.get("pred")
    o_targets = o_out.get("targets")

    def accuracy(pred):
        if known is None or not known.any():
            return None
        return float(np.mean(pred[known] == labels[known]))

    def model_maps(out: _Collector, targets):
        if not keep_maps:
            return None
        return ModelMaps(
            paths=paths,
            targets=targets,
            logits=out.get("logits"),
            raw=out.get("raw"),
            maps=out.get("maps"),
            flat=out.get("flat"),
        )

    results = []
    for cand, out, wst in zip(cands, c_out, worsts):
        scores = PairScores(
            spatial=out.get("spatial"),
            spectral=out.get("spectral"),
            score=out.get("score"),
            finite=out.get("finite"),
            flat_a=out.get("flat_a"),
            flat_b=out.get("flat_b"),
        )
        if not scores.finite.any():
            raise NonFiniteError(
                f"every image gave non-finite logits or maps for {cand.info.name} or the "
                "original: check the models and the preprocessing"
            )
        summary = summarise_scores(scores, o_targets, threshold=settings.threshold)
        c_pred = out.get("pred")
        drop = o_out.get("conf") - out.get("conf")
        results.append(
            CandidateResult(
                model=cand.info,
                scores=scores,
                summary=summary,
                targets=out.get("targets"),
                predictions=c_pred,
                confidence=out.get("conf"),
                agreement=float(np.mean(c_pred == o_pred)),
                accuracy=accuracy(c_pred),
                confidence_drop=float(np.nanmean(drop))
                if np.isfinite(drop).any()
                else float("nan"),
                non_finite_paths=tuple(p for p, ok in zip(paths, scores.finite) if not ok),
                maps=model_maps(out, out.get("targets")),
                worst=wst if worst > 0 else None,
            )
        )
    return AuditResult(
        settings=settings,
        preprocess=image_set.preprocess.to_dict(),
        images=image_set,
        original=orig.info,
        original_targets=o_targets,
        original_predictions=o_pred,
        original_confidence=o_out.get("conf"),
        original_accuracy=accuracy(o_pred),
        candidates=tuple(results),
        indices=indices,
        provider_note=orig.runner.provider.note,
        versions=versions(),
        original_maps=model_maps(o_out, o_targets),
    )

"""Per-image results of an audit, and their exact merge (docs/architecture.md, "One
audit").

An audit is map, merge, summarise: :func:`onnx_sp2ps.pipeline.score_batch` turns one
batch of images into :class:`Records`, :func:`merge` joins the records of any partition
of the images, and :func:`onnx_sp2ps.pipeline.summarise` computes every aggregate from
the merged records.  :func:`merge` is associative and independent of order: rows are
kept in the order of their positions in the image set, and the worst images are the
``limit`` lowest scores under one total order (score ascending, NaN last, then position
ascending), so the records of any partition, merged in any grouping and order, are
identical to those of one pass.

:meth:`Records.to_npz` and :meth:`Records.from_npz` are an exact binary form (an
uncompressed ``.npz`` of plain arrays, read without pickles): every array keeps its
dtype and bits.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field, fields, replace
from typing import IO, Any, Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from onnx_sp2ps.errors import DataError, MismatchError
from onnx_sp2ps.files import human_bytes, memory_budget
from onnx_sp2ps.similarity import PairScores

__all__ = [
    "ModelMaps",
    "WorstImages",
    "ModelColumns",
    "CandidateColumns",
    "Records",
    "merge",
    "merge_stream",
]

#: Identifies the binary form; a reader refuses any other.
RECORDS_FORMAT = "onnx-sp2ps-records/1"

Array = NDArray[Any]


@dataclass(frozen=True)
class ModelMaps:
    """CAMs of one model over a data set (the keys of ``cams.npz``)."""

    paths: list[str]
    targets: Array  # (N,) int64
    logits: Array  # (N, K) float32
    raw: Array  # (N, h, w) float32, ReLU(R) at feature resolution
    maps: Array  # (N, H, W) float32, normalised CAM images
    flat: Array  # (N,) bool

    def arrays(self) -> dict[str, Array]:
        return {
            "paths": np.asarray(self.paths, dtype=str),
            "targets": self.targets,
            "logits": self.logits,
            "raw": self.raw,
            "maps": self.maps,
        }

    def take(self, rows: NDArray[np.intp]) -> ModelMaps:
        return ModelMaps(
            paths=[self.paths[i] for i in rows],
            targets=self.targets[rows],
            logits=self.logits[rows],
            raw=self.raw[rows],
            maps=self.maps[rows],
            flat=self.flat[rows],
        )

    @staticmethod
    def concatenate(parts: Sequence[ModelMaps]) -> ModelMaps:
        return ModelMaps(
            paths=[p for part in parts for p in part.paths],
            targets=np.concatenate([p.targets for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
            raw=np.concatenate([p.raw for p in parts]),
            maps=np.concatenate([p.maps for p in parts]),
            flat=np.concatenate([p.flat for p in parts]),
        )


@dataclass(frozen=True)
class WorstImages:
    """The ``limit`` lowest-scoring images of a candidate and both models' maps for
    them, lowest score first (NaN last; equal scores by position).

    ``positions`` are rows of the :class:`onnx_sp2ps.pipeline.AuditResult` in a result,
    and positions in the image set inside :class:`Records` (where rows are not known
    until every part is merged)."""

    limit: int
    positions: NDArray[np.int64]
    scores: NDArray[np.float64]
    original_maps: Array | None = None  # (n, H, W); None while n is 0
    candidate_maps: Array | None = None  # (n, H, W)

    @staticmethod
    def select(
        limit: int,
        positions: NDArray[np.int64],
        scores: NDArray[np.float64],
        original_maps: Array,
        candidate_maps: Array,
    ) -> WorstImages:
        """The worst ``limit`` of the given images, by the one total order."""
        if limit <= 0 or len(positions) == 0:
            return WorstImages(limit, np.zeros(0, np.int64), np.zeros(0, np.float64))
        keep = np.lexsort((positions, scores))[:limit]  # score (NaN last), then position
        return WorstImages(
            limit, positions[keep], scores[keep], original_maps[keep], candidate_maps[keep]
        )

    @staticmethod
    def merge(parts: Sequence[WorstImages]) -> WorstImages:
        limit = parts[0].limit
        full = [p for p in parts if len(p.positions)]
        if not full:
            return parts[0]
        om = [p.original_maps for p in full]
        cm = [p.candidate_maps for p in full]
        return WorstImages.select(
            limit,
            np.concatenate([p.positions for p in full]),
            np.concatenate([p.scores for p in full]),
            np.concatenate([m for m in om if m is not None]),
            np.concatenate([m for m in cm if m is not None]),
        )


@dataclass(frozen=True)
class ModelColumns:
    """One model's per-image values (rows as in :attr:`Records.positions`)."""

    targets: NDArray[np.int64]  # class whose map was made
    predictions: NDArray[np.int64]  # top-1
    confidence: Array  # the model's probability of the original's target
    maps: ModelMaps | None = None  # every map, when the audit keeps them (--save-maps)


@dataclass(frozen=True)
class CandidateColumns:
    """One candidate's per-image values and its worst images."""

    columns: ModelColumns
    scores: PairScores
    worst: WorstImages


@dataclass(frozen=True)
class Records:
    """Per-image results of an audit over some of its images (one batch, a shard, or
    all of them), rows in ascending order of ``positions``."""

    positions: NDArray[np.int64]  # (N,) positions in the image set, unique
    paths: list[str]  # (N,) display names
    labels: NDArray[np.int64] | None  # (N,) -1 unknown; None: the image set has none
    original: ModelColumns
    candidates: tuple[CandidateColumns, ...]
    #: Positions (in the part's range) of the images that could not be decoded -> reason.
    failures: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.positions)

    @staticmethod
    def empty(candidates: int, worst: int, labels: bool) -> Records:
        """Records of no image (a part whose images were all unreadable); merging adds
        nothing but its :attr:`failures`."""
        none = np.zeros(0, np.int64)
        columns = ModelColumns(none, none, np.zeros(0, np.float32))
        flags = np.zeros(0, bool)
        real = np.zeros(0)
        scores = PairScores(real, real, real, flags, flags, flags)
        worst_none = WorstImages(worst, none, np.zeros(0))
        return Records(
            positions=none,
            paths=[],
            labels=none if labels else None,
            original=columns,
            candidates=tuple(
                CandidateColumns(columns, scores, worst_none) for _ in range(candidates)
            ),
        )

    # ------------------------------------------------------------------ binary form

    def to_npz(self, handle: IO[bytes]) -> None:
        """Write the records to an open binary file (exact; no pickles)."""
        np.savez(handle, allow_pickle=False, **self._arrays())

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self.to_npz(out)
        return out.getvalue()

    @staticmethod
    def from_npz(source: IO[bytes] | bytes, *, max_memory: int | None = None) -> Records:
        """Records written by :meth:`to_npz`.

        Raises
        ------
        DataError
            Not such a file, one whose arrays would inflate past the memory budget
            (``max_memory``, :func:`onnx_sp2ps.files.memory_budget`), or one whose arrays
            do not fit together (the first problem named).
        """
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            with zipfile.ZipFile(handle) as z:
                inflated = sum(info.file_size for info in z.infolist())
            budget = memory_budget(max_memory)
            if inflated > budget:
                raise DataError(
                    f"records file's arrays take {human_bytes(inflated)}, over the memory "
                    f"budget of {human_bytes(budget)} (--max-memory)"
                )
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"not a records file: {exc}") from None
        return _from_arrays(arrays)

    def _arrays(self) -> dict[str, Array]:
        out: dict[str, Array] = {
            "format": np.array(RECORDS_FORMAT),
            "positions": self.positions,
            "paths": np.array(self.paths, dtype=str),
            "candidates": np.array(len(self.candidates), np.int64),
        }
        if self.labels is not None:
            out["labels"] = self.labels
        failed = sorted(self.failures)
        out["failures.positions"] = np.array(failed, np.int64)
        out["failures.reasons"] = np.array([self.failures[i] for i in failed], dtype=str)
        _put_columns(out, "original", self.original)
        for j, cand in enumerate(self.candidates):
            key = f"candidate{j}"
            _put_columns(out, key, cand.columns)
            for f in fields(PairScores):
                out[f"{key}.scores.{f.name}"] = getattr(cand.scores, f.name)
            w = cand.worst
            out[f"{key}.worst.limit"] = np.array(w.limit, np.int64)
            out[f"{key}.worst.positions"] = w.positions
            out[f"{key}.worst.scores"] = w.scores
            if w.original_maps is not None and w.candidate_maps is not None:
                out[f"{key}.worst.original_maps"] = w.original_maps
                out[f"{key}.worst.candidate_maps"] = w.candidate_maps
        return out


def _put_columns(out: dict[str, Array], key: str, columns: ModelColumns) -> None:
    out[f"{key}.targets"] = columns.targets
    out[f"{key}.predictions"] = columns.predictions
    out[f"{key}.confidence"] = columns.confidence
    if columns.maps is not None:
        for name in _MAP_SHAPES:
            out[f"{key}.maps.{name}"] = getattr(columns.maps, name)


_INT = ("int64",)
_FLOAT = ("float32", "float64")
_BOOL = ("bool",)
_SCORE_DTYPES = {"finite": _BOOL, "flat_a": _BOOL, "flat_b": _BOOL}
#: Kept maps: name -> (dtypes, dimensions).
_MAP_SHAPES = {
    "targets": (_INT, 1),
    "logits": (_FLOAT, 2),
    "raw": (_FLOAT, 3),
    "maps": (_FLOAT, 3),
    "flat": (_BOOL, 1),
}


class _Reader:
    """Takes arrays out of a loaded archive, checking each one's dtype, dimensions and
    length, so that a damaged or hostile file is refused with its first problem named."""

    def __init__(self, arrays: dict[str, Array]):
        self.arrays = arrays

    def get(self, key: str, dtypes: tuple[str, ...], ndim: int, rows: int | None) -> Any:
        if key not in self.arrays:
            raise DataError(f"records file has no array {key!r}")
        a = self.arrays[key]
        if str(a.dtype) not in dtypes and not (dtypes == ("str",) and a.dtype.kind == "U"):
            raise DataError(f"records file's {key!r} is {a.dtype}, not {' or '.join(dtypes)}")
        if a.ndim != ndim or (rows is not None and len(a) != rows):
            want = f"{ndim}-d" + ("" if rows is None else f" with {rows} rows")
            raise DataError(f"records file's {key!r} has shape {a.shape}, not {want}")
        return a

    def has(self, key: str) -> bool:
        return key in self.arrays


def _from_arrays(arrays: dict[str, Array]) -> Records:
    r = _Reader(arrays)
    fmt = str(r.get("format", ("str",), 0, None))
    if fmt != RECORDS_FORMAT:
        raise DataError(f"records file is {fmt!r}, not {RECORDS_FORMAT!r}")
    positions = r.get("positions", _INT, 1, None)
    n = len(positions)
    if n and (positions[0] < 0 or (np.diff(positions) <= 0).any()):
        raise DataError("records file's positions are not ascending non-negative integers")
    paths = [str(p) for p in r.get("paths", ("str",), 1, n)]
    labels = r.get("labels", _INT, 1, n) if r.has("labels") else None
    count = int(r.get("candidates", _INT, 0, None))
    if not 0 < count <= 4096:
        raise DataError(f"records file holds {count} candidates, not 1 to 4096")

    def columns(key: str) -> ModelColumns:
        maps = None
        if r.has(f"{key}.maps.targets"):
            got = {
                name: r.get(f"{key}.maps.{name}", dtypes, ndim, n)
                for name, (dtypes, ndim) in _MAP_SHAPES.items()
            }
            maps = ModelMaps(paths=list(paths), **got)
        return ModelColumns(
            targets=r.get(f"{key}.targets", _INT, 1, n),
            predictions=r.get(f"{key}.predictions", _INT, 1, n),
            confidence=r.get(f"{key}.confidence", _FLOAT, 1, n),
            maps=maps,
        )

    original = columns("original")
    candidates = []
    for j in range(count):
        key = f"candidate{j}"
        scores = PairScores(
            **{
                f.name: r.get(f"{key}.scores.{f.name}", _SCORE_DTYPES.get(f.name, _FLOAT), 1, n)
                for f in fields(PairScores)
            }
        )
        limit = int(r.get(f"{key}.worst.limit", _INT, 0, None))
        w_pos = r.get(f"{key}.worst.positions", _INT, 1, None)
        k = len(w_pos)
        if not 0 <= k <= limit or not np.isin(w_pos, positions).all():
            raise DataError(f"records file's {key!r} worst images are not among its rows")
        om = cm = None
        if k:
            om = r.get(f"{key}.worst.original_maps", _FLOAT, 3, k)
            cm = r.get(f"{key}.worst.candidate_maps", _FLOAT, 3, k)
            if om.shape != cm.shape:
                raise DataError(f"records file's {key!r} worst maps differ in shape")
        worst = WorstImages(limit, w_pos, r.get(f"{key}.worst.scores", _FLOAT, 1, k), om, cm)
        candidates.append(CandidateColumns(columns(key), scores, worst))
    failed = r.get("failures.positions", _INT, 1, None)
    reasons = r.get("failures.reasons", ("str",), 1, len(failed))
    if len(failed) and (failed.min() < 0 or np.isin(failed, positions).any()):
        raise DataError("records file's undecodable images overlap its rows")
    failures = {int(i): str(reason) for i, reason in zip(failed, reasons)}
    if len(failures) != len(failed):
        raise DataError("records file lists an undecodable image twice")
    return Records(positions, paths, labels, original, tuple(candidates), failures)


# --------------------------------------------------------------------------- merge


def merge(parts: Sequence[Records]) -> Records:
    """The records of the union of the parts' images.

    Associative and independent of order (module docstring): rows sorted by position,
    worst images re-selected under one total order.

    Raises
    ------
    MismatchError
        The parts come from different audits (number of candidates, labels or not,
        worst-image limits, kept maps or not) or share an image position.
    """
    if not parts:
        raise MismatchError("nothing to merge: give at least one part")
    first = parts[0]
    for p in parts[1:]:
        problem = _incompatible(first, p)
        if problem:
            raise MismatchError(f"records to merge are from different audits: {problem}")
    positions = np.concatenate([p.positions for p in parts])
    failed = np.array([i for p in parts for i in p.failures], np.int64)
    seen = np.sort(np.concatenate([positions, failed]))
    repeated = seen[1:][seen[1:] == seen[:-1]]
    if len(repeated):
        raise MismatchError(
            f"records to merge share image position {int(repeated[0])}: "
            "each image may be read in one part only"
        )
    failures = dict(sorted(f for p in parts for f in p.failures.items()))
    full = [p for p in parts if len(p)]
    if len(full) <= 1:  # (the empty parts add no row and no worst image)
        return replace(full[0] if full else first, failures=failures)
    positions = np.concatenate([p.positions for p in full])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    paths = [p for part in full for p in part.paths]
    labels = None if first.labels is None else _cat([p.labels for p in full], order)
    return Records(
        positions=positions,
        paths=[paths[i] for i in order],
        labels=labels,
        original=_merge_columns([p.original for p in full], order),
        candidates=tuple(
            CandidateColumns(
                columns=_merge_columns([c.columns for c in cands], order),
                scores=PairScores(
                    **{
                        f.name: _cat([getattr(c.scores, f.name) for c in cands], order)
                        for f in fields(PairScores)
                    }
                ),
                worst=WorstImages.merge([c.worst for c in cands]),
            )
            for cands in zip(*(p.candidates for p in full))
        ),
        failures=failures,
    )


def _cat(arrays: Sequence[Array | None], order: NDArray[np.intp]) -> Array:
    return np.concatenate([a for a in arrays if a is not None])[order]


def _merge_columns(parts: Sequence[ModelColumns], order: NDArray[np.intp]) -> ModelColumns:
    maps = None
    kept = [p.maps for p in parts if p.maps is not None]
    if kept:
        maps = ModelMaps.concatenate(kept).take(order)
    return ModelColumns(
        targets=_cat([p.targets for p in parts], order),
        predictions=_cat([p.predictions for p in parts], order),
        confidence=_cat([p.confidence for p in parts], order),
        maps=maps,
    )


def _incompatible(a: Records, b: Records) -> str | None:
    if len(a.candidates) != len(b.candidates):
        return f"{len(a.candidates)} vs {len(b.candidates)} candidates"
    if (a.labels is None) != (b.labels is None):
        return "one has labels, the other none"
    if (a.original.maps is None) != (b.original.maps is None):
        return "one keeps every map, the other not"
    for j, (ca, cb) in enumerate(zip(a.candidates, b.candidates)):
        if ca.worst.limit != cb.worst.limit:
            return f"candidate {j} keeps {ca.worst.limit} vs {cb.worst.limit} worst images"
    return None


def merge_stream(parts: Iterable[Records]) -> Records | None:
    """:func:`merge` of a stream of records (None when it is empty), in memory that
    grows with the rows, not with the number of parts: parts are merged in pairs of
    equal rank, as in a binary counter, so each row is copied about log2(parts) times
    and at most log2(parts) sets of worst maps are held at once."""
    stack: list[tuple[int, Records]] = []
    for part in parts:
        rank = 0
        while stack and stack[-1][0] == rank:
            part = merge([stack.pop()[1], part])
            rank += 1
        stack.append((rank, part))
    if not stack:
        return None
    return merge([r for _, r in stack])

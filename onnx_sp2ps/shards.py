"""An audit split across processes or machines (README, "At scale"): each shard writes
its records and its identity; the merge checks the shards belong together and rebuilds
exactly the report one pass writes.

``audit --shard K/N --out DIR`` scores the positions :func:`onnx_sp2ps.pipeline.shard_range`
gives and writes :data:`SHARD_SET` into DIR as one set (:class:`onnx_sp2ps.report.ReportSet`:
staged, then swapped in; ``shard.json`` holds the sha256 of ``records.npz``, so a set left
half-swapped by a ``kill -9`` is told apart from a complete one).  ``merge`` reads the
shards' identities (:func:`read_shards`), refuses shards that are missing, given twice,
incomplete, damaged or of another audit, streams their records into one
(:func:`merge_shards`), re-opens the image set (:func:`reopen_images`) and builds the
audit's context (:func:`merged_context`); :func:`onnx_sp2ps.pipeline.summarise` does the
rest as in one pass.

A shard folder is read with the hostile-file rules of :mod:`onnx_sp2ps.files`: only
regular files (no FIFO, device or link to one), bounded reads, and the records' inflated
size checked against the memory budget before anything is inflated.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from onnx_sp2ps._version import __version__
from onnx_sp2ps.data import ImageSet, InputSpec, Preprocess, open_images
from onnx_sp2ps.errors import DataError, UsageError
from onnx_sp2ps.files import (
    NotRegularFile,
    check_regular,
    human_bytes,
    memory_budget,
    open_regular,
    read_bounded,
    show,
)
from onnx_sp2ps.intervals import IntervalSettings
from onnx_sp2ps.model import ModelSpec, load_model, model_digest
from onnx_sp2ps.pipeline import AuditContext, AuditSettings, ModelInfo, shard_range
from onnx_sp2ps.records import Records, WorstImages, merge_stream
from onnx_sp2ps.report import ReportSet, write_atomic

__all__ = [
    "SHARD_FORMAT",
    "SHARD_SET",
    "MAX_SHARDS",
    "parse_shard",
    "file_sha256",
    "shard_identity",
    "write_shard",
    "Shard",
    "read_shards",
    "merge_shards",
    "reopen_images",
    "merged_context",
    "RecordedModelInfo",
]

#: Identifies shard.json; a merge refuses any other.
SHARD_FORMAT = "onnx-sp2ps-shard/1"
#: What a shard writes under its --out, as one set; shard.json is swapped in last.
SHARD_SET = ("records.npz", "shard.json")
#: The largest N of --shard K/N.
MAX_SHARDS = 100_000
#: The largest shard.json read (it holds settings, model descriptions, class names).
MAX_IDENTITY_BYTES = 16 << 20


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N <= :data:`MAX_SHARDS` (:class:`UsageError`)."""
    k_text, slash, n_text = text.strip().partition("/")
    if not slash or not k_text.isdigit() or not n_text.isdigit():
        raise UsageError(f"expected K/N such as 2/8 (shard K of N), got {text!r}")
    k, n = int(k_text), int(n_text)
    if not 1 <= k <= n <= MAX_SHARDS:
        raise UsageError(f"shard K/N needs 1 <= K <= N <= {MAX_SHARDS}, got {text!r}")
    return k, n


def file_sha256(path: str | os.PathLike[str], what: str = "file") -> str:
    """The sha256 (hex) of a regular file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open_regular(path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except NotRegularFile as exc:
        raise DataError(f"{what} {show(path)} is {exc}, not a regular file: refused") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {show(path)}: {exc.strerror or exc}") from None
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def shard_identity(
    records: Records,
    context: AuditContext,
    *,
    shard: tuple[int, int],
    models: Sequence[str],
    images: str,
    preprocess: Preprocess,
    options: dict[str, Any],
    worst: int,
    save_maps: bool,
    overlays: str,
    setting_sources: dict[str, str],
) -> dict[str, Any]:
    """What shard.json says of a shard: which audit it belongs to (tool and library
    versions, settings, each model's path and sha256, the image set's fingerprint and
    source, K and N) and what the merge needs to rebuild the report exactly (the
    preprocessing asked and resolved, each model's report entry, the provider note, the
    worst images kept, the overlay mode, class names, where each setting came from).

    ``models``: the original's and the candidates' paths as given; ``images``: the
    --images path as given; ``options``: the detection overrides."""
    k, n = shard
    image_set = context.images
    max_memory = context.settings.max_memory
    start, stop = shard_range(len(image_set), context.settings.batch_size, shard)
    infos = [context.original, *context.candidates]
    return {
        "tool": "onnx-sp2ps",
        "format": SHARD_FORMAT,
        "version": __version__,
        "versions": dict(context.versions),
        "shard": {"index": k, "count": n, "start": start, "stop": stop, "rows": len(records)},
        "settings": context.settings.to_dict(),
        "options": options,
        "preprocess": {
            "asked": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(preprocess).items()
            },
            "resolved": image_set.preprocess.to_dict(),
        },
        "images": {
            "path": os.fsdecode(images),
            "abspath": os.path.abspath(os.fsdecode(images)),
            "source": image_set.source,
            "kind": image_set.kind,
            "count": len(image_set),
            "fingerprint": image_set.fingerprint(),
            "spec": asdict(image_set.spec),
            "class_names": image_set.class_names,
        },
        "models": [
            {
                "path": path,
                "sha256": model_digest(path, load_model(path, max_memory=max_memory)),
                "info": info.to_dict(),
                "provider_note": info.provider_note,
            }
            for path, info in zip(models, infos)
        ],
        "provider_note": context.provider_note,
        "report": {"worst": worst, "save_maps": save_maps, "overlays": overlays},
        "setting_sources": setting_sources,
    }


def write_shard(files: ReportSet, records: Records, identity: dict[str, Any]) -> None:
    """records.npz, then shard.json (naming the records' sha256 and size), staged in
    ``files`` (a :class:`onnx_sp2ps.report.ReportSet` of :data:`SHARD_SET`) and swapped
    in as one set."""
    path = files.path("records.npz")
    write_atomic(path, records.to_npz)
    identity = {
        **identity,
        "records": {
            "file": "records.npz",
            "bytes": os.path.getsize(path),
            "sha256": file_sha256(path, "records"),
        },
    }
    text = json.dumps(identity, indent=2, allow_nan=False) + "\n"
    write_atomic(files.path("shard.json"), lambda h: h.write(text.encode("utf-8")))
    files.commit()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Shard:
    """A shard folder whose shard.json was read and checked."""

    folder: Path
    identity: dict[str, Any]

    @property
    def index(self) -> int:
        return int(self.identity["shard"]["index"])

    @property
    def count(self) -> int:
        return int(self.identity["shard"]["count"])

    @property
    def name(self) -> str:
        return f"{show(self.folder)} ({self.index}/{self.count})"


#: shard.json keys -> the type of their value (checked before anything is used).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "version": str,
    "versions": dict,
    "shard": dict,
    "settings": dict,
    "options": dict,
    "preprocess": dict,
    "images": dict,
    "models": list,
    "provider_note": (str, type(None)),
    "report": dict,
    "setting_sources": dict,
    "records": dict,
}


def _read_identity(folder: Path) -> dict[str, Any]:
    where = show(folder)
    try:
        mode = os.stat(folder).st_mode
    except OSError as exc:
        raise DataError(f"shard folder {where} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"shard {where} is not a folder: pass the folders of audit --shard --out")
    path = folder / "shard.json"
    if not os.path.lexists(path):
        raise DataError(
            f"shard folder {where} is incomplete (no shard.json: the shard was interrupted "
            "or never ran): re-run that shard"
        )
    raw = read_bounded(path, "shard identity", limit=MAX_IDENTITY_BYTES, error=DataError)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{show(path)} is not valid JSON ({exc}): re-run that shard") from None
    problem = _identity_problem(data)
    if problem:
        raise DataError(f"{show(path)} is not a shard identity: {problem}: re-run that shard")
    return cast(dict[str, Any], data)


def _identity_problem(data: object) -> str | None:
    if not isinstance(data, dict) or data.get("tool") != "onnx-sp2ps":
        return 'no "tool": "onnx-sp2ps"'
    if data.get("format") != SHARD_FORMAT:
        return f"format {json.dumps(data.get('format'))[:60]}, not {SHARD_FORMAT!r}"
    for key, kind in _FIELDS.items():
        if not isinstance(data.get(key), kind):
            return f"{key!r} is missing or of the wrong type"
    s = data["shard"]
    ints = [s.get(k) for k in ("index", "count", "start", "stop", "rows")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        return "'shard' does not hold K, N and the range as integers"
    if not 1 <= s["index"] <= s["count"] <= MAX_SHARDS:
        return f"shard {s['index']}/{s['count']} is not K/N with 1 <= K <= N"
    images, report, records = data["images"], data["report"], data["records"]
    for key, kinds in (
        ("path", str),
        ("source", str),
        ("fingerprint", str),
        ("count", int),
        ("spec", dict),
        ("class_names", (list, type(None))),
    ):
        if not isinstance(images.get(key), kinds):
            return f"'images.{key}' is missing or of the wrong type"
    worst = report.get("worst")
    if not (isinstance(worst, int) and 0 <= worst <= 1000) or not isinstance(
        report.get("save_maps"), bool
    ):
        return "'report' does not say the worst images kept (0 to 1000) and whether maps were saved"
    spec = images["spec"]
    if not isinstance(spec.get("layout"), str) or not all(
        spec.get(k) is None or (isinstance(spec.get(k), int) and spec[k] > 0)
        for k in ("channels", "height", "width", "batch")
    ):
        return "'images.spec' is not a model input (layout, channels, height, width, batch)"
    if report.get("overlays") not in ("worst", "all", "none"):
        return "'report.overlays' is not worst, all or none"
    if not isinstance(records.get("sha256"), str) or not isinstance(records.get("bytes"), int):
        return "'records' does not name the records' sha256 and size"
    if not data["models"] or not all(
        isinstance(m, dict)
        and isinstance(m.get("path"), str)
        and isinstance(m.get("sha256"), str)
        and isinstance(m.get("info"), dict)
        for m in data["models"]
    ):
        return "'models' does not list each model's path, sha256 and description"
    if not isinstance(data["preprocess"].get("asked"), dict):
        return "'preprocess.asked' is missing"
    return None


#: What two shards of one audit agree on, by what a difference means.
_AGREEMENT: tuple[tuple[str, Callable[[dict[str, Any]], object]], ...] = (
    ("tool versions", lambda d: {"version": d["version"], **d["versions"]}),
    ("splits (N)", lambda d: {"N": d["shard"]["count"]}),
    (
        "models",
        lambda d: {f"model {i}": [m["path"], m["sha256"]] for i, m in enumerate(d["models"])},
    ),
    (
        "settings",
        lambda d: {
            **d["settings"],
            "options": d["options"],
            "preprocess": d["preprocess"],
            **d["report"],
        },
    ),
    ("image sets", lambda d: d["images"]),
    (
        "model setups",
        lambda d: {
            "models": [m["info"] for m in d["models"]],
            "provider_note": d["provider_note"],
        },
    ),
)


def _first_difference(a: object, b: object, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}".lstrip("."))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    shown = f"{json.dumps(a, default=str)[:60]} vs {json.dumps(b, default=str)[:60]}"
    return f"{where}: {shown}" if where else shown


def read_shards(folders: Sequence[str | os.PathLike[str]]) -> list[Shard]:
    """The shards in ``folders`` (any order), checked to make one whole audit, sorted
    by K.

    Raises
    ------
    DataError
        A folder that is not a shard, incomplete (interrupted) or whose shard.json is
        damaged; shards of different audits (tool versions, models, settings, image
        sets); a shard given twice; a shard of 1..N missing. One line naming the shards.
    """
    shards = [Shard(Path(f), _read_identity(Path(f))) for f in folders]
    first = shards[0]
    for other in shards[1:]:
        for what, key in _AGREEMENT:
            a, b = key(first.identity), key(other.identity)
            if a != b:
                raise DataError(
                    f"shards {first.name} and {other.name} are of different {what} "
                    f"({_first_difference(a, b)}): merge the shards of one audit"
                )
    by_index: dict[int, Shard] = {}
    for s in shards:
        if s.index in by_index:
            raise DataError(
                f"shards {by_index[s.index].name} and {s.name} are both shard "
                f"{s.index}/{s.count}: pass each shard once"
            )
        by_index[s.index] = s
    missing = [k for k in range(1, first.count + 1) if k not in by_index]
    if missing:
        listed = ", ".join(f"{k}/{first.count}" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"shard {listed}{more} missing (given: {', '.join(s.name for s in shards[:5])}"
            f"{' ...' if len(shards) > 5 else ''}): pass every shard's folder"
        )
    return [by_index[k] for k in sorted(by_index)]


def _records_file(shard: Shard, budget: int) -> tuple[Path, int]:
    """The shard's records.npz, checked to be a regular file of the size shard.json
    names, and the size its arrays inflate to."""
    path = shard.folder / "records.npz"
    if not os.path.lexists(path):
        raise DataError(
            f"shard folder {shard.name} is incomplete (no records.npz: the shard was "
            "interrupted): re-run that shard"
        )
    st = check_regular(path, f"records of shard {shard.name}", error=DataError)
    if st.st_size != shard.identity["records"]["bytes"]:
        raise DataError(
            f"records.npz of shard {shard.name} is damaged or from another run ("
            f"{st.st_size:,} bytes, shard.json says {shard.identity['records']['bytes']:,}): "
            "re-run that shard"
        )
    if st.st_size > budget:
        raise DataError(
            f"records.npz of shard {shard.name} is {human_bytes(st.st_size)}, over the "
            f"memory budget of {human_bytes(budget)} (--max-memory)"
        )
    try:
        with open_regular(path) as handle, zipfile.ZipFile(handle) as z:
            inflated = sum(info.file_size for info in z.infolist())
    except (OSError, NotRegularFile, zipfile.BadZipFile, ValueError) as exc:
        raise DataError(
            f"records.npz of shard {shard.name} is damaged ({exc}): re-run that shard"
        ) from None
    return path, inflated


def _load_records(shard: Shard, path: Path, max_memory: int | None) -> Records:
    """The shard's records, refused unless their bytes are those shard.json names."""
    digest = hashlib.sha256()
    problem = None
    try:
        with open_regular(path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            if digest.hexdigest() != shard.identity["records"]["sha256"]:
                problem = "its sha256 is not the one shard.json names"
            else:
                handle.seek(0)
                try:
                    records = Records.from_npz(handle, max_memory=max_memory)
                except DataError as exc:
                    problem = str(exc)
    except (OSError, NotRegularFile) as exc:
        raise DataError(f"cannot read records.npz of shard {shard.name}: {exc}") from None
    if problem is not None:
        raise DataError(
            f"records.npz of shard {shard.name} is damaged or from another run ({problem}): "
            "re-run that shard"
        )
    s = shard.identity["shard"]
    pos = records.positions
    outside = (len(pos) and (pos[0] < s["start"] or pos[-1] >= s["stop"])) or any(
        not s["start"] <= i < s["stop"] for i in records.failures
    )
    if outside or len(pos) != s["rows"]:
        raise DataError(
            f"records.npz of shard {shard.name} holds images outside its range "
            f"[{s['start']}, {s['stop']}) or not the {s['rows']} rows shard.json names"
        )
    return records


def merge_shards(
    shards: Sequence[Shard], *, max_memory: int | None = None, worst: int | None = None
) -> Records:
    """The records of every shard merged (:func:`onnx_sp2ps.records.merge_stream`: one
    shard's records read at a time), with the ``worst`` lowest-scoring images per
    candidate (at most what the shards kept; None: all they kept).

    Raises
    ------
    DataError
        A records file that is missing, special, damaged, not the one shard.json names,
        or whose arrays (all shards together) would inflate past the memory budget.
    """
    budget = memory_budget(max_memory)
    files = [(s, *_records_file(s, budget)) for s in shards]
    total = sum(inflated for _, _, inflated in files)
    if total > budget:
        raise DataError(
            f"the shards' records take {human_bytes(total)} inflated, over the memory budget "
            f"of {human_bytes(budget)} (--max-memory): merge on a machine with more memory"
        )
    failures: dict[int, str] = {}

    def parts() -> Iterator[Records]:
        for shard, path, _ in files:
            part = _load_records(shard, path, max_memory)
            if len(part):
                yield part
            else:  # an empty shard adds no row, only its undecodable images
                failures.update(part.failures)

    merged = merge_stream(parts())
    if merged is None:  # no shard scored an image: summarise says so
        merged = _load_records(files[0][0], files[0][1], max_memory)
    if failures:
        merged = replace(merged, failures=dict(sorted({**merged.failures, **failures}.items())))
    return merged if worst is None else cut_worst(merged, worst)


def cut_worst(records: Records, limit: int) -> Records:
    """``records`` keeping the ``limit`` worst images per candidate (at most as many as
    they kept): the first of the same total order, so exactly what a pass keeping
    ``limit`` selects."""
    cands = []
    for c in records.candidates:
        w = c.worst
        if limit > w.limit:
            raise UsageError(f"the records kept {w.limit} worst images, fewer than {limit}")
        if w.original_maps is None or w.candidate_maps is None or limit == 0:
            cut = WorstImages(limit, w.positions[:0], w.scores[:0])
        else:
            cut = WorstImages(
                limit,
                w.positions[:limit],
                w.scores[:limit],
                w.original_maps[:limit],
                w.candidate_maps[:limit],
            )
        cands.append(replace(c, worst=cut))
    return replace(records, candidates=tuple(cands))


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class RecordedModelInfo(ModelInfo):
    """A model as a shard described it (its report entry), without its graph: a merge
    reports the models the shards ran, without loading them again. ``spec`` is not
    available (None)."""

    recorded: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(json.dumps(self.recorded)))


def _model_info(entry: dict[str, Any]) -> RecordedModelInfo:
    info = entry["info"]
    gradient = info.get("gradient") if isinstance(info.get("gradient"), dict) else {}
    return RecordedModelInfo(
        path=info.get("path") if isinstance(info.get("path"), str) else None,
        spec=cast(ModelSpec, None),
        size_bytes=info.get("size_bytes"),
        parameters=int(info.get("parameters") or 0),
        providers=tuple(str(p) for p in info.get("providers") or ()),
        provider_note=entry.get("provider_note"),
        gradient=str(gradient.get("path", "finite-difference")),
        gradient_note=gradient.get("reason"),
        recorded=info,
    )


def reopen_images(
    identity: dict[str, Any],
    *,
    images: str | os.PathLike[str] | None = None,
    max_memory: int | None = None,
) -> ImageSet:
    """The shards' image set, opened again (from ``images`` when given, else where the
    shards read it: the path as given, else its absolute form) with the recorded
    preprocessing, and checked against the shards' fingerprint (names, sizes and
    modification times of the files; not their contents).

    Raises
    ------
    DataError
        Not found, or not the set the shards read.
    """
    recorded = identity["images"]
    if images is None:
        images = recorded["path"]
        if not os.path.exists(images) and isinstance(recorded.get("abspath"), str):
            images = recorded["abspath"]
    asked = dict(identity["preprocess"]["asked"])
    for key in ("size", "mean", "std"):
        if isinstance(asked.get(key), list):
            asked[key] = tuple(asked[key])
    try:
        preprocess = Preprocess(**asked)
        spec = InputSpec(**recorded["spec"])
    except (TypeError, UsageError) as exc:
        raise DataError(f"the shards' preprocessing cannot be read back ({exc})") from None
    try:
        image_set = open_images(
            images,
            spec=spec,
            preprocess=preprocess,
            class_names=recorded["class_names"],
            strict=bool(identity["settings"].get("strict")),
            max_memory=max_memory,
        )
    except DataError as exc:
        raise DataError(
            f"cannot open the shards' images again: {exc} (the merge needs them for the "
            "worst images; pass --images where they are)"
        ) from None
    if image_set.fingerprint() != recorded["fingerprint"] or len(image_set) != recorded["count"]:
        raise DataError(
            f"the images at {show(images)} are not the set the shards read (names, sizes "
            "or modification times differ): merge where the shards' images are, or pass "
            "--images"
        )
    if image_set.preprocess.to_dict() != identity["preprocess"]["resolved"]:
        raise DataError(
            f"the images at {show(images)} resolve to other preprocessing than the shards': "
            "merge with the shards' images"
        )
    image_set.source = recorded["source"]
    return image_set


def merged_context(
    identity: dict[str, Any],
    image_set: ImageSet,
    *,
    threshold: float | None,
    max_memory: int | None = None,
    intervals: IntervalSettings = IntervalSettings(),
) -> AuditContext:
    """The context one pass would have had: the shards' settings (the gate threshold
    and the intervals' settings the merge's), models, provider note and versions."""
    recorded = identity["settings"]
    try:
        settings = AuditSettings(
            **{k: recorded[k] for k in AuditSettings().to_dict()},
        )
    except (KeyError, TypeError) as exc:
        raise DataError(f"the shards' settings cannot be read back ({exc})") from None
    settings = replace(settings, threshold=threshold, max_memory=max_memory, intervals=intervals)
    try:
        models = [_model_info(m) for m in identity["models"]]
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"the shards' model descriptions cannot be read back ({exc})") from None
    return AuditContext(
        settings=settings,
        images=image_set,
        original=models[0],
        candidates=tuple(models[1:]),
        provider_note=identity["provider_note"],
        versions={str(k): str(v) for k, v in identity["versions"].items()},
    )

"""The original's results kept between audits (``--original-cache DIR``; README,
"Commands").

A release pipeline audits each new candidate against the same original on the same
images: the original's run is the same every time.  :class:`OriginalCache` keeps, per
batch, what the candidates' scoring needs of the original (its targets, logits and raw
maps, from which the CAM images, probabilities and predictions are recomputed bit for
bit) under ``DIR/<key>/``, where ``<key>`` is a sha256 of everything that changes those
results (:func:`key_digest`; the pipeline lists the fields).  Entries are one ``.npz``
per batch, written to a temporary name and renamed into place, so a killed run leaves
no half entry and two processes writing the same entry (two shards, two Ray workers)
leave one of their two identical copies.

Entries are read as hostile files: only a regular file (no link, FIFO or device) is
opened, never blocking; its size and its arrays' inflated size are bounded by what the
batch needs; every array's dtype and shape are checked, and the entry's key and image
positions must be the batch's.  Anything else is a damaged entry: the pipeline
recomputes the batch, replaces the entry and warns (:class:`CacheNote`, which the
command line prints as one ``note:`` line).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from onnx_sp2ps.errors import InputError
from onnx_sp2ps.files import file_kind, show, track_temporary, umask_mode, untrack_temporary

__all__ = [
    "CACHE_FORMAT",
    "CacheNote",
    "OriginalBatch",
    "OriginalCache",
    "check_folder",
    "key_digest",
]

#: Identifies the layout of the key and of an entry; part of every key.
CACHE_FORMAT = "onnx-sp2ps-original-cache/1"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
#: Room in an entry for the zip headers, the key and the model's description strings.
_SLACK = 1 << 20


class CacheNote(UserWarning):
    """A cache entry was not used or not written (the audit goes on, recomputing)."""


@dataclass(frozen=True)
class OriginalBatch:
    """The original's results for one batch: enough for the candidates' scoring, the
    original's columns and maps, and the report's description of the original."""

    positions: NDArray[np.int64]  # (n,) image-set positions of the batch
    targets: NDArray[np.int64]  # (n,) classes the original's maps explain
    logits: NDArray[np.float32]  # (n, K)
    raw: NDArray[np.floating[Any]]  # (n, h, w) the CAM before upsampling and normalising
    providers: tuple[str, ...]  # what the original's session used
    provider_note: str | None
    gradient: str
    gradient_note: str | None


def key_digest(fields: dict[str, Any]) -> str:
    """The sha256 (hex) of a key's fields as canonical JSON."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _note(message: str) -> None:
    warnings.warn(CacheNote(message), stacklevel=3)


def check_folder(root: str | os.PathLike[str]) -> Path:
    """``root`` made if missing; :class:`InputError` (one line) when it is not a folder
    this process can write in."""
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise InputError(
            f"--original-cache {show(path)} cannot be made: {exc.strerror or exc}: "
            "choose a writable folder"
        ) from None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(
            f"--original-cache {show(path)} cannot be read: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(
            f"--original-cache {show(path)} is {file_kind(st.st_mode)}, not a folder: "
            "choose a folder (it is made if missing)"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(
            f"--original-cache {show(path)} is not writable: choose a folder you can write in"
        )
    return path


class OriginalCache:
    """Per-batch entries of the original's results under ``root/<key>/``.

    ``fields`` are the key's fields that do not depend on the image set; the image
    set's part (its fingerprint and resolved preprocessing) is added by
    :meth:`folder`.  Loading never raises: a missing entry is a miss, a damaged one a
    miss with a :class:`CacheNote`.  Storing never raises either: a failed write warns
    once and the cache stops storing for the rest of the run."""

    def __init__(self, root: str | os.PathLike[str], fields: dict[str, Any]):
        self.root = check_folder(root)
        self.fields = dict(fields)
        self._images: tuple[object, Path, str] | None = None
        self._writable = True
        #: Batches read from the cache and batches computed and stored, this run.
        self.hits = 0
        self.stores = 0

    def folder(self, images: Any) -> tuple[Path, str]:
        """The entry folder and full key digest for an image set (computed once)."""
        if self._images is not None and self._images[0] is images:
            return self._images[1], self._images[2]
        fields = dict(
            self.fields,
            images={
                "fingerprint": images.fingerprint(),
                "preprocess": images.preprocess.to_dict(),
            },
        )
        digest = key_digest(fields)
        folder = self.root / digest[:32]
        self._images = (images, folder, digest)
        if self._writable and not (folder / "key.json").exists():
            text = json.dumps(fields, sort_keys=True, indent=1).encode("utf-8")
            self._write(folder, "key.json", text)
        return folder, digest

    @staticmethod
    def _name(positions: NDArray[np.int64]) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(positions, np.int64).tobytes())
        return f"b{int(positions[0]):010d}-{len(positions)}-{digest.hexdigest()[:16]}.npz"

    # ------------------------------------------------------------------ reading

    def load(
        self,
        images: Any,
        positions: NDArray[np.int64],
        *,
        classes: int | None,
        raw_shape: tuple[int | None, int | None],
    ) -> OriginalBatch | None:
        """The stored entry of the batch at ``positions``, or None (recompute)."""
        if not len(positions):
            return None
        folder, digest = self.folder(images)
        path = folder / self._name(positions)
        n = len(positions)
        h, w = raw_shape
        # (sizes the model leaves symbolic are bounded generously: 64Ki classes, 512x512)
        limit = n * (16 + 4 * (classes or 1 << 16) + 8 * (h or 512) * (w or 512)) + _SLACK
        try:
            data = _read_entry(path, limit)
        except FileNotFoundError:
            return None
        except _Damaged as exc:
            _note(f"original cache entry {show(path)} {exc}: recomputed")
            return None
        try:
            entry = _parse_entry(data, limit, digest, positions, classes, raw_shape)
        except Exception as exc:  # any failure to read it back is damage, never a crash
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            _note(f"original cache entry {show(path)} is damaged ({reason}): recomputed")
            return None
        self.hits += 1
        return entry

    # ------------------------------------------------------------------ writing

    def store(self, images: Any, entry: OriginalBatch) -> None:
        """Write the batch's entry (atomically: a temporary name, then a rename)."""
        if not self._writable or not len(entry.positions):
            return
        folder, digest = self.folder(images)
        out = io.BytesIO()
        np.savez(
            out,
            allow_pickle=False,
            format=np.array(CACHE_FORMAT),
            key=np.array(digest),
            positions=np.ascontiguousarray(entry.positions, np.int64),
            targets=np.ascontiguousarray(entry.targets, np.int64),
            logits=np.ascontiguousarray(entry.logits, np.float32),
            raw=np.ascontiguousarray(entry.raw),
            providers=np.array(list(entry.providers), dtype=str).reshape(-1),
            notes=np.array(
                [entry.provider_note or "", entry.gradient, entry.gradient_note or ""], dtype=str
            ),
            has_notes=np.array([entry.provider_note is not None, entry.gradient_note is not None]),
        )
        if self._write(folder, self._name(entry.positions), out.getvalue()):
            self.stores += 1

    def _write(self, folder: Path, name: str, data: bytes) -> bool:
        tmp = folder / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            track_temporary(tmp, lambda: _unlink(tmp))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, umask_mode())
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, folder / name)
            finally:
                _unlink(tmp)
                untrack_temporary(tmp)
        except OSError as exc:
            self._writable = False
            _note(
                f"cannot write the original cache under {show(self.root)} "
                f"({exc.strerror or exc}): this run goes on without storing"
            )
            return False
        return True


class _Damaged(Exception):
    pass


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_entry(path: Path, limit: int) -> bytes:
    """The bytes of an entry that is a regular file of at most ``limit`` bytes; links,
    FIFOs, devices and folders are refused without being opened (FileNotFoundError when
    there is none)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Damaged(f"cannot be examined ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode):
        raise _Damaged("is a symbolic link, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise _Damaged(f"is {file_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise _Damaged(f"is {st.st_size:,} bytes, more than a batch needs ({limit:,})")
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Damaged(f"cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _Damaged(f"changed into {file_kind(mode)} while being opened")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise _Damaged(f"grew past {limit:,} bytes while being read")
    return data


def _parse_entry(
    data: bytes,
    limit: int,
    digest: str,
    positions: NDArray[np.int64],
    classes: int | None,
    raw_shape: tuple[int | None, int | None],
) -> OriginalBatch:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        inflated = sum(info.file_size for info in archive.infolist())
    if inflated > limit:
        raise ValueError(f"its arrays inflate to {inflated:,} bytes, more than a batch needs")
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    n = len(positions)

    def get(key: str, kind: str, shape: tuple[int | None, ...]) -> Any:
        if key not in arrays:
            raise ValueError(f"no array {key!r}")
        a = arrays[key]
        if a.dtype.kind != kind or (kind != "U" and a.dtype.name not in _DTYPES[kind]):
            raise ValueError(f"{key!r} is {a.dtype}")
        if a.ndim != len(shape) or any(s is not None and d != s for d, s in zip(a.shape, shape)):
            raise ValueError(f"{key!r} has shape {a.shape}, not {shape}")
        return a

    if str(get("format", "U", ())) != CACHE_FORMAT:
        raise ValueError("another format")
    if str(get("key", "U", ())) != digest:
        raise ValueError("another key")
    got = get("positions", "i", (n,))
    if not np.array_equal(got, positions):
        raise ValueError("other image positions")
    targets = get("targets", "i", (n,))
    logits = get("logits", "f", (n, classes))
    raw = get("raw", "f", (n, *raw_shape))
    k = logits.shape[1]
    if n and (targets.min() < 0 or targets.max() >= k):
        raise ValueError("targets outside the classes")
    if raw.shape[1] < 1 or raw.shape[2] < 1:
        raise ValueError(f"'raw' has shape {raw.shape}")
    providers = get("providers", "U", (None,))
    notes = get("notes", "U", (3,))
    has = get("has_notes", "b", (2,))
    return OriginalBatch(
        positions=got,
        targets=targets,
        logits=logits,
        raw=raw,
        providers=tuple(str(p) for p in providers),
        provider_note=str(notes[0]) if has[0] else None,
        gradient=str(notes[1]),
        gradient_note=str(notes[2]) if has[1] else None,
    )


_DTYPES = {"i": ("int64",), "f": ("float32", "float64"), "b": ("bool",), "U": ()}

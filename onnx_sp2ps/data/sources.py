"""Where images come from: a folder of image files (scanned recursively, labels from its
first-level sub-folders, class names from a file or a list) or a preprocessed ``.npy`` /
``.npz`` array file (header and memory budget checked before the data is read), opened by
:func:`open_images` into an :class:`ImageSet` that yields float32 :class:`Batch` es in the
model's layout, decoding the next batch of folder images on a small thread pool while the
caller works on the current one. Problems raise :class:`~onnx_sp2ps.errors.DataError`
(unusable images or arrays), :class:`~onnx_sp2ps.errors.UsageError` (contradictory
settings) or :class:`~onnx_sp2ps.errors.MismatchError` (a size the model cannot take);
nothing is printed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import mmap
import operator
import os
import re
import stat
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np
from PIL import Image

from onnx_sp2ps.data.decode import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, _DecodeFailure, _open_image
from onnx_sp2ps.data.preprocess import (
    ARRAY_PRESET,
    InputSpec,
    Preprocess,
    ResolvedPreprocess,
    _as_rgb,
    _draft_request,
    _is_int,
    _resize_plan,
    _values,
    display_rgb,
    model_input,
)
from onnx_sp2ps.errors import DataError, MismatchError, UsageError
from onnx_sp2ps.files import (
    NotRegularFile,
    file_kind,
    memory_budget,
    open_regular,
    show,
    special_kind,
)

__all__ = [
    "ARRAY_SUFFIXES",
    "MAX_CLASS_NAMES_BYTES",
    "Batch",
    "ImageSet",
    "open_images",
]

ARRAY_SUFFIXES = (".npy", ".npz")
#: Class-names files larger than this (bytes) are refused, unread.
MAX_CLASS_NAMES_BYTES = 16 * 1024 * 1024

_NPZ_INPUT_KEYS = ("images", "inputs", "x")
_NPZ_LABEL_KEYS = ("labels", "y")
#: Most threads that decode images: each holds one decoded image (up to
#: MAX_IMAGE_PIXELS pixels) at a time, so this bounds the decoding's memory.
_MAX_DECODE_WORKERS = 8
_INTEGER_NAME = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------- image set


def _decode_workers() -> int:
    """Threads that decode images: one per CPU this process may run on (its affinity
    mask, which cgroup-confined containers and ``taskset`` set), at most
    :data:`_MAX_DECODE_WORKERS`. Pillow releases the interpreter while it decodes and
    resizes, so they run alongside ONNX Runtime's own threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DECODE_WORKERS))


def _release_rows(array: np.ndarray | None, stop: int) -> None:
    """Let the kernel drop the resident pages of rows ``[0, stop)`` of a memory-mapped
    ``.npy`` (read-only), so that streaming a large file keeps the resident set flat
    instead of growing by the file's size; a later read of those rows maps them again."""
    mapped = getattr(array, "_mmap", None)
    if (
        array is None
        or mapped is None
        or stop <= 0
        or not array.flags.c_contiguous
        or not hasattr(mapped, "madvise")
        or not hasattr(mmap, "MADV_DONTNEED")
    ):
        return
    offset = int(getattr(array, "offset", 0))
    begin = offset - offset % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping starts
    end = offset - begin + stop * array.strides[0]
    end -= end % mmap.PAGESIZE
    if end > 0:
        mapped.madvise(mmap.MADV_DONTNEED, 0, end)


class _RowNames(Sequence[str]):
    """``"file.npy[i]"`` for each row of an array file, made when asked for: an array may
    hold millions of rows, and its header is not trusted to build one string per row."""

    def __init__(self, name: str, n: int) -> None:
        self._name = name
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):  # int or slice, as a list's
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        position = operator.index(index)
        if position < 0:
            position += self._n
        if not 0 <= position < self._n:
            raise IndexError(f"image index {index} out of range for {self._n} images")
        return f"{self._name}[{position}]"

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        prefix = f"{self._name}["
        if isinstance(value, str) and value.startswith(prefix) and value.endswith("]"):
            digits = value[len(prefix) : -1]
            if _INTEGER_NAME.fullmatch(digits) and str(int(digits)) == digits:
                position = int(digits)
                end = self._n if stop is None else stop
                if position < self._n and start <= position < end:
                    return position
        raise ValueError(f"{value!r} is not in the list")

    def __contains__(self, value: object) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (_RowNames, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{self._n} rows of {self._name}>"


@dataclass(frozen=True)
class Batch:
    """A run of consecutive images of an :class:`ImageSet`, minus any that were skipped.

    Attributes
    ----------
    indices : numpy.ndarray
        (B,) int64 positions in the ImageSet of the images in this batch.
    inputs : numpy.ndarray
        (B, C, H, W) or (B, H, W, C) float32, C-contiguous.
    """

    indices: np.ndarray
    inputs: np.ndarray


class ImageSet:
    """Images to feed a model: where they are, their labels and how they are prepared.

    Made by :func:`open_images`.

    Attributes
    ----------
    source : str
        The folder or array file as given, shown on one printable line like
        :attr:`paths` (printable paths are unchanged).
    kind : {"folder", "array"}
    paths : sequence of str
        Display names: path relative to the folder (posix), or ``"file.npy[i]"`` (a
        sequence that makes each name when asked). Names are shown on one printable line:
        control characters, backslashes and bytes that are not UTF-8 are escaped
        (``"a\\n.png"``, ``"\\xff.png"``); the files are read under their real names.
    labels : numpy.ndarray or None
        (N,) int64, -1 where unknown; None when no image has a label.
    class_names : list of str or None
    label_source : str
        Where the labels came from, or why there are none (for diagnostics).
    preprocess : ResolvedPreprocess
    spec : InputSpec
        The model's input, as given to :func:`open_images`.
    strict : bool
        Raise on the first image that cannot be decoded instead of skipping it.
    """

    def __init__(
        self,
        *,
        source: str,
        kind: Literal["folder", "array"],
        paths: Sequence[str],
        labels: np.ndarray | None,
        class_names: list[str] | None,
        label_source: str,
        preprocess: ResolvedPreprocess,
        spec: InputSpec,
        strict: bool = False,
        files: list[Path] | None = None,
        array: np.ndarray | None = None,
        unlisted: Sequence[tuple[str, str]] = (),
        origin: Path | None = None,
    ) -> None:
        self.source = source
        self.kind = kind
        self.paths = paths
        self.labels = labels
        self.class_names = class_names
        self.label_source = label_source
        self.preprocess = preprocess
        self.spec = spec
        self.strict = strict
        self._files = files
        self._array = array
        self._failures: dict[int, str] = {}
        self._unlisted = list(unlisted)
        self._origin = origin  # the array file, for fingerprint()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageSet({self.source!r}, kind={self.kind!r}, n={len(self)}, "
            f"{self.preprocess.describe()!r})"
        )

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the images that could not be decoded, in order; then the
        sub-folders that could not be listed (path ending in ``/``), whose images were
        never seen.

        Images are added as batches are read: complete only after a full pass of
        :meth:`iter_batches`.
        """
        return [
            (self.paths[i], reason) for i, reason in sorted(self._failures.items())
        ] + self._unlisted

    def fingerprint(self) -> str:
        """A sha256 (hex) of what the set reads, for telling whether two runs read the
        same images: the kind, each image's name, size and modification time (an array
        file's size, time and shape), the labels and the class names.  Cheap (one stat
        per file, no reading): a file rewritten with the same size and time, or a copy
        with other times, is not told apart (README, "At scale")."""
        digest = hashlib.sha256()

        def add(*parts: object) -> None:
            digest.update(repr(parts).encode("utf-8", "backslashreplace") + b"\0")

        add(self.kind, len(self))
        if self._files is not None:
            for name, path in zip(self.paths, self._files):
                try:
                    st = os.stat(path)
                    add(name, st.st_size, st.st_mtime_ns)
                except OSError as exc:
                    add(name, "unreadable", exc.errno)
        if self._origin is not None:
            st = os.stat(self._origin)
            add(self._origin.name, st.st_size, st.st_mtime_ns)
        if self._array is not None:
            add(tuple(self._array.shape), str(self._array.dtype))
        add(None if self.labels is None else hashlib.sha256(self.labels.tobytes()).hexdigest())
        add(self.class_names)
        add(self._unlisted)
        return digest.hexdigest()

    def failures_between(self, start: int, stop: int) -> dict[int, str]:
        """Position -> reason of the images in ``[start, stop)`` that could not be
        decoded (complete once those positions have been read)."""
        return {i: r for i, r in self._failures.items() if start <= i < stop}

    def add_failures(self, failures: dict[int, str]) -> None:
        """Record images found undecodable elsewhere (by another process reading the
        same set), so that :attr:`skipped` lists them."""
        for i, reason in failures.items():
            if not 0 <= int(i) < len(self):
                raise DataError(f"image position {i} is outside this set of {len(self)}")
            self._failures[int(i)] = str(reason)

    def iter_batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        """Yield the images as float32 batches, in order.

        Folder images are decoded by a pool of 2 threads; the next batch is decoded while
        the caller works on the current one. Each batch covers the next ``batch_size``
        positions; images that cannot be decoded are left out (and listed in
        :attr:`skipped`), so a batch may be smaller, and a batch with no usable image is
        not yielded. The batch size is not adjusted to :attr:`InputSpec.batch`: a caller
        feeding a model with a fixed batch splits or pads.

        Parameters
        ----------
        batch_size : int
            Images per batch, at least 1.
        start, stop : int
            Read only the positions ``[start, stop)`` (default: all); batches start at
            ``start``, so with ``start`` a multiple of ``batch_size`` they are the
            batches of a whole pass that fall in the range.

        Yields
        ------
        Batch

        Raises
        ------
        UsageError
            batch_size is not a positive integer.
        DataError
            With ``strict``, the first image that cannot be decoded (named).
        """
        if not _is_int(batch_size) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer; got {batch_size!r}")
        end = len(self) if stop is None else min(int(stop), len(self))
        if not _is_int(start) or start < 0:
            raise UsageError(f"start must be a non-negative integer; got {start!r}")
        if self.kind == "array":
            return self._iter_array(int(batch_size), int(start), end)
        return self._iter_folder(int(batch_size), int(start), end)

    def _iter_array(self, batch_size: int, first: int, end: int) -> Iterator[Batch]:
        for start in range(first, end, batch_size):
            stop = min(start + batch_size, end)
            _release_rows(self._array, start)  # the caller is done with earlier batches
            yield Batch(
                indices=np.arange(start, stop, dtype=np.int64),
                inputs=self._array_inputs(slice(start, stop)),
            )

    def _array_inputs(self, index: slice) -> np.ndarray:
        assert self._array is not None
        inputs = np.asarray(self._array[index])
        if inputs.ndim == 3:  # (N, H, W) grey
            inputs = inputs[:, None] if self.preprocess.layout == "NCHW" else inputs[..., None]
        return np.ascontiguousarray(inputs, dtype=np.float32)

    def _decode(self, index: int) -> Image.Image:
        """The image file at ``index``, decoded into the model's colour mode; raises
        :class:`~onnx_sp2ps.data.decode._DecodeFailure`."""
        assert self._files is not None
        pre = self.preprocess
        return _open_image(
            self._files[index],
            pre.channels,
            functools.partial(_resize_plan, pre=pre),
            functools.partial(_draft_request, pre=pre) if pre.fast_decode else None,
        )

    def _load(self, index: int) -> tuple[np.ndarray | None, str | None]:
        try:
            return model_input(self._decode(index), self.preprocess), None
        except _DecodeFailure as exc:
            return None, str(exc)

    def _iter_folder(self, batch_size: int, begin: int, end: int) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=_decode_workers(), thread_name_prefix="sp2ps-decode")
        starts = iter(range(begin, end, batch_size))
        pending: list[Future] = []

        def submit(start: int | None) -> list[Future]:
            if start is None:
                return []
            stop = min(start + batch_size, end)
            return [pool.submit(self._load, i) for i in range(start, stop)]

        try:
            first = next(starts, None)
            offset = first
            pending = submit(first)
            while pending:
                results = [future.result() for future in pending]
                assert offset is not None
                following = next(starts, None)
                pending = submit(following)  # decodes while the caller works on this batch
                batch = self._collect(offset, results)
                offset = following
                if batch is not None:
                    yield batch
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _collect(
        self, start: int, results: list[tuple[np.ndarray | None, str | None]]
    ) -> Batch | None:
        indices: list[int] = []
        inputs: list[np.ndarray] = []
        for index, (values, reason) in enumerate(results, start):
            if values is None:
                if self.strict:
                    raise DataError(
                        f"cannot use image {self.paths[index]} in {self.source}: "
                        f"{reason}; "
                        "fix or remove the file, or drop --strict to skip unreadable images"
                    )
                self._failures[index] = str(reason)
                continue
            self._failures.pop(index, None)
            indices.append(index)
            inputs.append(values)
        if not indices:
            return None
        return Batch(indices=np.asarray(indices, dtype=np.int64), inputs=np.stack(inputs))

    def display_image(self, index: int) -> np.ndarray:
        """One image as the model sees it, for overlays.

        For folders the file is decoded again and resized/cropped as for the model.
        For arrays the recorded scale, mean and std are inverted, values clipped to
        0..255 (NaN -> 0), BGR swapped back and grey replicated.

        Parameters
        ----------
        index : int
            Position in the set (negative counts from the end).

        Returns
        -------
        numpy.ndarray
            (H, W, 3) uint8 RGB.

        Raises
        ------
        IndexError
            index is out of range.
        DataError
            The image file cannot be decoded.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        index = int(index) % len(self)
        pre = self.preprocess
        if self.kind == "folder":
            try:
                return display_rgb(self._decode(index), pre)
            except _DecodeFailure as exc:
                raise DataError(
                    f"cannot use image {self.paths[index]} in {self.source}: {exc}"
                ) from None
        x = self._array_inputs(slice(index, index + 1))[0].astype(np.float64)
        if pre.layout == "NCHW":
            x = x.transpose(1, 2, 0)
        if pre.bgr and x.shape[2] == 3:
            x = x[:, :, ::-1]  # back to RGB, the order of mean and std
        x = x * np.asarray(pre.std) + np.asarray(pre.mean)
        x = np.nan_to_num(x / pre.scale, nan=0.0, posinf=255.0, neginf=0.0)
        return _as_rgb(np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8))


# --------------------------------------------------------------------------- opening


def open_images(
    path: str | os.PathLike[str],
    *,
    spec: InputSpec,
    preprocess: Preprocess = Preprocess(),
    class_names: str | os.PathLike[str] | list[str] | None = None,
    strict: bool = False,
    max_memory: int | None = None,
) -> ImageSet:
    """Open a folder of images or a preprocessed array file for a model.

    ``max_memory``: the memory budget in bytes that the arrays of an ``.npz`` (inputs and
    labels together, uncompressed) must fit, checked from the archive's directory and
    the arrays' headers before anything is inflated (None: the default of
    :func:`onnx_sp2ps.files.memory_budget`). ``.npy`` files are memory-mapped, read as
    needed, and have no budget.

    Nothing is decoded yet (array files are memory-mapped): decoding happens in
    :meth:`ImageSet.iter_batches`.

    Only folders and regular files are read: the path, every image file found in the
    folder and the class names file are examined before they are opened, and a FIFO,
    socket or device (or a symlink to one) is refused, since reading it could block
    forever. Sub-folders that cannot be listed are recorded in :attr:`ImageSet.skipped`
    (refused with ``strict``). Nothing is read whose size is not known and bounded first:
    see :data:`MAX_IMAGE_PIXELS`, :data:`MAX_CLASS_NAMES_BYTES` and ``max_memory``.

    Parameters
    ----------
    path : str or path-like
        A folder, searched recursively for :data:`IMAGE_SUFFIXES` (any case; hidden files
        and folders ignored; sorted by relative posix path), or a ``.npy`` / ``.npz``
        file of float inputs in the model's layout.
    spec : InputSpec
        The model's image input.
    preprocess : Preprocess, optional
        How to prepare images. For array files nothing is applied; scale, mean, std and
        bgr then say how the array was made (used to display it), and ``size`` and
        ``center_crop`` must not ask for a change.
    class_names : path, list of str or None
        Class names, a file with one per line (blank lines ignored) or a list. Sub-folder
        names are looked up in them (an integer folder name is also taken as an index).
        Without them, labels come from sub-folders only when all are named by integers.
    strict : bool, default False
        Raise on the first image that cannot be decoded instead of skipping it.

    Returns
    -------
    ImageSet

    Raises
    ------
    DataError
        The path is missing, holds no images, is not a folder nor an array file; it, an
        image file in the folder or the class names file is a FIFO, socket or device; the
        class names file is over :data:`MAX_CLASS_NAMES_BYTES`; a sub-folder name is not a
        known class; with ``strict``, a sub-folder cannot be listed; the input size is over
        :data:`MAX_IMAGE_PIXELS`; an array is unusable, its header claims more data than
        the file holds, or an ``.npz`` would take more memory than its budget.
    UsageError
        Contradictory settings (see :meth:`Preprocess.resolved`).
    MismatchError
        The size asked or the array's shape does not fit the model.
    """
    root = Path(path)
    names = _read_class_names(class_names)
    try:
        mode = os.stat(root).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(
            f"image path {show(root)} does not exist: pass a folder of images "
            f"({', '.join(IMAGE_SUFFIXES)}) or a .npy/.npz array file"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot examine the image path {show(root)} ({_reason(exc)}): check its "
            "permissions, or pass another folder or array file"
        ) from None
    if stat.S_ISDIR(mode):
        opener = _open_folder
    elif not stat.S_ISREG(mode):
        raise DataError(
            f"image path {show(root)} is {file_kind(mode)}, not a folder nor a regular "
            "file; it is not read: pass a folder of images or a .npy/.npz array file"
        )
    elif root.suffix.lower() in ARRAY_SUFFIXES:
        opener = functools.partial(_open_array, max_memory=max_memory)
    else:
        raise DataError(
            f"{show(root)} is neither a folder of images nor a .npy/.npz array file: "
            "put the images in a folder and pass the folder"
        )
    return opener(root, spec=spec, preprocess=preprocess, class_names=names, strict=strict)


def _reason(exc: BaseException) -> str:
    """An OSError's reason without its file name (``strerror``), else the message; one line."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return show(text)


def _read_class_names(class_names: str | os.PathLike[str] | list[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, os.PathLike)):
        source = Path(class_names)
        shown = show(source)
        try:
            with open_regular(source) as handle:
                too_large = os.fstat(handle.fileno()).st_size > MAX_CLASS_NAMES_BYTES
                raw = b"" if too_large else handle.read(MAX_CLASS_NAMES_BYTES + 1)
            if too_large or len(raw) > MAX_CLASS_NAMES_BYTES:
                raise DataError(
                    f"the class names file {shown} is over {MAX_CLASS_NAMES_BYTES} bytes "
                    "(16 MiB) and was not read: write one class name per line"
                )
            text = raw.decode("utf-8-sig")
        except NotRegularFile as exc:
            raise DataError(
                f"the class names file {shown} is {exc}, not a regular file, and was not "
                "read: pass a text file with one class name per line"
            ) from None
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read the class names file {shown} ({_reason(exc)}): pass a UTF-8 "
                "text file with one class name per line"
            ) from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise DataError(f"the class names file {shown} is empty: write one class name per line")
        return names
    names = [str(name).strip() for name in class_names]
    if not names:
        raise DataError("the list of class names is empty")
    return names


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Relative posix paths of the images under root, sorted; some other suffixes (shown);
    and (shown relative path + "/", why) of the sub-folders that could not be listed.

    Every image file is examined (os.stat, following symlinks) but not opened: one that is
    a FIFO, socket or device, or a symlink to one, raises DataError, since opening or
    reading it could block forever. Files with other suffixes are never examined.
    """
    found: list[str] = []
    others: set[str] = set()
    seen: set[str] = set()
    unlisted: list[tuple[str, str]] = []

    def unreadable(error: OSError) -> None:
        where = Path(error.filename) if error.filename else root
        if where == root:
            raise DataError(
                f"cannot list the image folder {show(root)} ({_reason(error)}): check its "
                "permissions, or pass another folder"
            )
        unlisted.append((show(where.relative_to(root).as_posix()) + "/", _reason(error)))

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = PurePosixPath(Path(folder).relative_to(root).as_posix())
        for name in files:
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES:
                kind = special_kind(Path(folder) / name)
                if kind is not None:
                    raise DataError(
                        f"{show((relative / name).as_posix())} in {show(root)} is {kind}, "
                        "not an image file, and was not read: remove it from the folder"
                    )
                found.append((relative / name).as_posix())
            elif len(others) < 5:
                others.add(show(suffix or name))
    return sorted(found), sorted(others), sorted(unlisted)


def _folder_labels(
    paths: list[str], class_names: list[str] | None
) -> tuple[np.ndarray | None, str]:
    folders = [p.split("/")[0] if "/" in p else None for p in paths]
    used = sorted({f for f in folders if f is not None})
    if not used:
        return None, "none: the images are not in sub-folders"
    if class_names is None:
        if not all(_INTEGER_NAME.fullmatch(f) for f in used):
            return None, (
                "none: sub-folder names are not class indices; pass class names to use "
                "them as labels"
            )
        mapping = {f: int(f) for f in used}
        source = "integer sub-folder names"
    else:
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(class_names):
            positions.setdefault(name, []).append(i)
        mapping = {}
        unknown: list[str] = []
        for f in used:
            if f in positions:
                if len(positions[f]) > 1:
                    raise DataError(
                        f"sub-folder '{show(f)}' is ambiguous: the class names list it at "
                        "positions "
                        f"{', '.join(map(str, positions[f]))}; rename the folder to its index"
                    )
                mapping[f] = positions[f][0]
            elif _INTEGER_NAME.fullmatch(f) and int(f) < len(class_names):
                mapping[f] = int(f)
            else:
                unknown.append(f)
        if unknown:
            shown = ", ".join(f"'{show(u)}'" for u in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise DataError(
                f"{len(unknown)} sub-folder name(s) are not among the {len(class_names)} class "
                f"names nor a class index: {shown}{more}; rename the folders or fix the class names"
            )
        source = "sub-folder names looked up in the class names"
    labels = np.asarray([-1 if f is None else mapping[f] for f in folders], dtype=np.int64)
    return labels, source


def _open_folder(
    root: Path,
    *,
    spec: InputSpec,
    preprocess: Preprocess,
    class_names: list[str] | None,
    strict: bool,
) -> ImageSet:
    pre = preprocess.resolved(spec)
    height, width = pre.size
    if height * width > MAX_IMAGE_PIXELS:
        raise DataError(
            f"images cannot be prepared at {height}x{width}: that is {height * width} pixels, "
            f"over the limit of {MAX_IMAGE_PIXELS} (decompression-bomb guard): use a smaller "
            "input size"
        )
    files, others, unreadable = _scan_folder(root)
    if unreadable and strict:
        folder, why = unreadable[0]
        raise DataError(
            f"cannot list the sub-folder {folder} of {show(root)} ({why}): fix its "
            "permissions, or drop --strict to skip what cannot be read"
        )
    unlisted = [
        (folder, f"cannot list the sub-folder ({why}); the images in it were not read")
        for folder, why in unreadable
    ]
    if not files:
        hint = f" (found only {', '.join(others)} files)" if others else ""
        if unreadable:
            hint += (
                f" ({len(unreadable)} sub-folder(s) could not be listed, e.g. "
                f"{unreadable[0][0]}: {unreadable[0][1]})"
            )
        raise DataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {show(root)} or its "
            f"sub-folders{hint}: pass a folder that holds images, or a .npy/.npz array file"
        )
    paths = [show(p) for p in files]
    labels, source = _folder_labels(files, class_names)
    return ImageSet(
        source=show(root),
        kind="folder",
        paths=paths,
        labels=labels,
        class_names=class_names,
        label_source=source,
        preprocess=pre,
        spec=spec,
        strict=strict,
        files=[root / p for p in files],
        unlisted=unlisted,
    )


_OBJECTS_REFUSED = "arrays with Python objects are refused; save plain float arrays"


def _npy_header(handle: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, bytes of data the header claims) of the ``.npy`` data
    at the handle's position; the handle is left just after the header. Nothing else is
    read: the claim is checked against the file's size before any data is."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    if version not in readers:
        raise DataError(
            f"{where} is a .npy of format version {version[0]}.{version[1]}, which is not "
            "read here: save it with np.save as plain float arrays"
        )
    shape, fortran, dtype = readers[version](handle)
    if dtype.hasobject:
        raise DataError(f"{where}: {_OBJECTS_REFUSED}")
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: the header's shape {shape} is not valid: save the array again")
    return tuple(int(d) for d in shape), bool(fortran), dtype, math.prod(shape) * dtype.itemsize


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` whose data is all there (its header is not trusted)."""
    with open_regular(path) as handle:
        shape, fortran, dtype, claimed = _npy_header(handle, show(path))
        offset = handle.tell()
        held = os.fstat(handle.fileno()).st_size - offset
        if held < claimed:
            raise DataError(
                f"{show(path)} is cut short: its header says {shape} {dtype} values "
                f"({claimed} bytes) but it holds {held} bytes of data: save the array again"
            )
        if claimed == 0:
            return np.empty(shape, dtype=dtype)
        return np.memmap(
            handle, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
        )


def _npz_members(
    path: Path, archive: zipfile.ZipFile, keys: list[str | None], budget: int
) -> list[np.ndarray | None]:
    """Read the ``.npz`` members named by keys (None: none), after checking, from the
    archive's directory and each member's ``.npy`` header, that their data is what the
    header says and that together they fit ``budget`` bytes."""
    infos = {}
    claimed = 0
    for key in keys:
        if key is None:
            continue
        info = archive.getinfo(key + ".npy")
        where = f"array {key!r} of {show(path)}"
        with archive.open(info) as member:
            shape, _, dtype, size = _npy_header(member, where)
            held = info.file_size - member.tell()
        if held != size:
            raise DataError(
                f"{where} is corrupt: its header says {shape} {dtype} values ({size} bytes) "
                f"but the archive holds {held} bytes for them: save the file again (np.savez)"
            )
        claimed += size
        infos[key] = info
    if claimed > budget:
        raise DataError(
            f"{show(path)} would take {claimed} bytes of memory once inflated, over the "
            f"memory budget of {budget} bytes (--max-memory): save the inputs as a .npy "
            "file, which is read from disk as needed, or pass fewer images"
        )
    arrays: list[np.ndarray | None] = []
    for key in keys:
        if key is None:
            arrays.append(None)
            continue
        with archive.open(infos[key]) as member:
            arrays.append(np.lib.format.read_array(member, allow_pickle=False))
    return arrays


def _load_arrays(
    path: Path, max_memory: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(inputs, labels or None, description of where they came from)."""
    shown = show(path)
    try:
        if path.suffix.lower() == ".npy":
            return _load_npy(path), None, "none: a .npy file holds no labels"
        with open_regular(path) as handle, zipfile.ZipFile(handle) as archive:
            names = archive.namelist()
            keys = [n[:-4] for n in names if n.endswith(".npy")]
            if len(keys) != len(names):
                others = [n for n in names if not n.endswith(".npy")]
                raise DataError(
                    f"{shown} holds members that are not .npy arrays "
                    f"({', '.join(repr(show(n)) for n in others[:5])}): save it with "
                    "np.savez or np.savez_compressed"
                )
            input_key = next((k for k in _NPZ_INPUT_KEYS if k in keys), None)
            label_key = next((k for k in _NPZ_LABEL_KEYS if k in keys), None)
            if input_key is None:
                rest = [k for k in keys if k != label_key]
                if len(rest) != 1:
                    listed = ", ".join(show(k) for k in keys[:20]) or "(none)"
                    raise DataError(
                        f"{shown} holds arrays {listed}: name the inputs "
                        f"'images' (or {' or '.join(repr(k) for k in _NPZ_INPUT_KEYS[1:])}) "
                        "and the labels 'labels'"
                    )
                input_key = rest[0]
            budget = memory_budget(max_memory)
            inputs, labels = _npz_members(path, archive, [input_key, label_key], budget)
            assert inputs is not None
            source = (
                f"no labels in {show(path.name)}" if label_key is None else (f"array {label_key!r}")
            )
            return inputs, labels, source
    except NotRegularFile as exc:
        raise DataError(
            f"{shown} is {exc}, not a regular file, and was not read: pass a .npy/.npz file"
        ) from None
    except ValueError as exc:
        if "object" in str(exc).lower() or "pickle" in str(exc).lower():
            raise DataError(f"{shown}: {_OBJECTS_REFUSED}") from None
        raise DataError(f"cannot read {shown}: {show(str(exc))}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {shown}: {_reason(exc)}") from None
    except MemoryError:
        raise DataError(
            f"{shown} does not fit in memory: save the inputs as a .npy file, which is read "
            "from disk as needed, or pass fewer images"
        ) from None
    except Exception as exc:  # zipfile.BadZipFile and friends on corrupt files
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {shown}: {type(exc).__name__}: {show(str(exc))}") from None


def _check_array_shape(
    path: Path, inputs: np.ndarray, spec: InputSpec, layout: str
) -> tuple[int, int, int]:
    """Validate an input array against the model; return its (C, H, W)."""
    if inputs.dtype.hasobject:
        raise DataError(f"{show(path)}: {_OBJECTS_REFUSED}")
    if not np.issubdtype(inputs.dtype, np.floating):
        raise DataError(
            f"{show(path)} holds {inputs.dtype} values; arrays are used as given, so they must be "
            "preprocessed floats (float16/32/64): save float32 inputs, or pass a folder of images"
        )
    grey_ok = spec.channels in (None, 1)
    if inputs.ndim == 3 and grey_ok:
        n, height, width = inputs.shape
        channels = 1
    elif inputs.ndim == 4:
        if layout == "NCHW":
            n, channels, height, width = inputs.shape
        else:
            n, height, width, channels = inputs.shape
    else:
        expected = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
        extra = " or (N, H, W) for a 1-channel model" if grey_ok else ""
        raise DataError(
            f"{show(path)} holds a {inputs.ndim}-D array of shape {tuple(inputs.shape)}; "
            f"inputs must be {expected}{extra}, in the model's {layout} layout"
        )
    if n == 0:
        raise DataError(
            f"{show(path)} holds no inputs (shape {tuple(inputs.shape)}): save at least one"
        )
    if min(channels, height, width) < 1:
        raise DataError(f"{show(path)} holds inputs of empty shape {tuple(inputs.shape)}")
    model = (spec.channels, spec.height, spec.width)
    if any(m is not None and m != g for m, g in zip(model, (channels, height, width))):
        want = "x".join("?" if v is None else str(v) for v in model)
        got = f"{channels}x{height}x{width}"
        hint = ""
        if inputs.ndim == 4:  # would the other layout fit?
            _, a, b, c = inputs.shape
            other, name, axes = (
                ((c, a, b), "NHWC", "(0, 3, 1, 2)")
                if layout == "NCHW"
                else ((a, b, c), "NCHW", "(0, 2, 3, 1)")
            )
            if all(m is None or m == g for m, g in zip(model, other)):
                hint = f"; the array looks {name}: use np.transpose(x, {axes})"
        if not hint:
            hint = (
                f": save inputs of {want} (arrays are used as given, never resized), "
                "or pass a folder of images"
            )
        raise MismatchError(
            f"{show(path)} holds inputs of CxHxW {got} (shape {tuple(inputs.shape)}, read as "
            f"{layout}) but the model takes {want}{hint}"
        )
    return int(channels), int(height), int(width)


def _check_array_labels(
    path: Path, labels: np.ndarray, n: int, class_names: list[str] | None
) -> np.ndarray | None:
    labels = np.asarray(labels)
    if labels.dtype.hasobject or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{show(path)}: labels must be integers; got {labels.dtype}: save them as int64"
        )
    if labels.shape != (n,):
        raise DataError(
            f"{show(path)}: labels have shape {labels.shape} but there are {n} inputs: "
            "save (N,) labels"
        )
    labels = labels.astype(np.int64)
    if np.any(labels < -1):
        raise DataError(
            f"{show(path)}: labels must be class indices, or -1 where unknown; "
            f"found {int(labels.min())}"
        )
    if class_names is not None and labels.size and int(labels.max()) >= len(class_names):
        raise DataError(
            f"{show(path)}: label {int(labels.max())} is out of range for the "
            f"{len(class_names)} class names"
        )
    if np.all(labels == -1):
        return None
    return labels


def _open_array(
    path: Path,
    *,
    spec: InputSpec,
    preprocess: Preprocess,
    class_names: list[str] | None,
    strict: bool,
    max_memory: int | None = None,
) -> ImageSet:
    layout = preprocess.layout or spec.layout
    inputs, raw_labels, label_source = _load_arrays(path, max_memory)
    channels, height, width = _check_array_shape(path, inputs, spec, layout)
    if preprocess.center_crop:
        raise UsageError(
            "arrays are used as given, so centre crop cannot apply: drop --center-crop"
        )
    if preprocess.size is not None and preprocess.size != (height, width):
        raise UsageError(
            f"arrays are used as given: {show(path.name)} holds {height}x{width} inputs but the "
            f"size asked is {preprocess.size[0]}x{preprocess.size[1]}: drop --size"
        )
    if preprocess.bgr and channels != 3:
        raise UsageError(
            f"BGR order needs 3 channels; {show(path.name)} holds {channels}: drop --bgr"
        )
    scale, mean, std = _values(preprocess, channels)
    n = int(inputs.shape[0])
    labels = None if raw_labels is None else _check_array_labels(path, raw_labels, n, class_names)
    if raw_labels is not None and labels is None:
        label_source = f"none: every label in {label_source} is -1"
    pre = ResolvedPreprocess(
        preset=ARRAY_PRESET,
        size=(height, width),
        center_crop=False,
        scale=scale,
        mean=mean,
        std=std,
        bgr=preprocess.bgr,
        layout=layout,
        channels=channels,
    )
    return ImageSet(
        source=show(path),
        kind="array",
        paths=_RowNames(show(path.name), n),
        labels=labels,
        class_names=class_names,
        label_source=label_source,
        preprocess=pre,
        spec=spec,
        strict=strict,
        array=inputs,
        origin=path,
    )

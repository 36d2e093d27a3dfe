"""Results out: report.json, the text table, maps (.npz) and PNG overlays.

Files are written atomically (a temporary file in the same folder, then renamed), so an
interrupted run never leaves a half-written report.  This module chooses no exit code
and prints nothing: it returns strings and writes files.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from onnx_sp2ps.errors import ReportError
from onnx_sp2ps.files import (
    NotRegularFile,
    check_regular,
    open_regular,
    read_bounded,
    show,
    track_temporary,
    umask_mode,
    uninterruptible,
    untrack_temporary,
)
from onnx_sp2ps.gate import GateCheck, finite_or_none

__all__ = [
    "format_table",
    "load_report",
    "write_atomic",
    "write_json",
    "write_npz",
    "overlay_image",
    "write_png",
    "prepare_out_dir",
    "append_text",
    "check_target",
    "ReportSet",
    "written_by_us",
    "colormap",
]


# --------------------------------------------------------------------------- writing

#: Marks the PNGs, HTML and XML this tool writes, so that a later run can tell them from
#: files it must not replace (README "Supported and refused": files not ours).
GENERATOR = "onnx-sp2ps"
_SCAN_BYTES = 4096  # every mark sits in the first few hundred bytes
_HTML_MARK = f'<meta name="generator" content="{GENERATOR}">'
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_error(path: Path, exc: OSError, option: str = "--out") -> ReportError:
    """One line for a failed write: a full disk says what to do about it."""
    where = show(path)
    if exc.errno in _NO_SPACE:
        return ReportError(
            f"no space left on the device of {where}: free space or choose another {option}"
        )
    if exc.errno == errno.EROFS:
        return ReportError(f"{where} is on a read-only file system: choose another {option}")
    return ReportError(
        f"cannot write {where}: {exc.strerror or exc}: check the folder or choose another {option}"
    )


def prepare_out_dir(path: str | Path, *, option: str = "--out") -> Path:
    """Create ``path`` (and parents) and check it can be written, before a long run;
    ``option`` names where the path came from in messages."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            kind = "a file" if p.is_file() else "a special file"
            raise ReportError(f"{option} {show(p)} is {kind}, not a folder: choose a folder path")
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".sp2ps-write-test-"):
            pass
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _write_error(p, exc, option) from None
        raise ReportError(
            f"cannot write to {option} {show(p)}: {exc.strerror or exc}: "
            "choose a folder you can write to"
        ) from None
    return p


def write_atomic(
    path: str | Path, write: Callable[[io.BufferedWriter], object], *, option: str = "--out"
) -> Path:
    """Write a file through ``write(handle)`` (its result is ignored) into a temporary file
    beside it, then rename it into place; the file gets the mode the umask gives. A failed
    write (a full disk included) leaves no temporary file and raises :class:`ReportError`."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name[:64]}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(p, exc, option) from None
    track_temporary(tmp, lambda: os.unlink(tmp))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), umask_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(p, exc, option) from None
        raise
    finally:
        untrack_temporary(tmp)
    return p


def append_text(path: str | Path, text: str, *, option: str) -> Path:
    """Append ``text`` to a regular file (created when missing), never truncating what
    was there: CI step-summary files are shared by every step of a job. A write that
    fails part-way (a full disk) or is interrupted is cut back off, so the file holds
    the whole summary or none of it."""
    p = Path(path)
    if os.path.lexists(p):
        check_regular(p, f"{option} file", error=ReportError)
    data = text.encode("utf-8")
    try:
        fd = os.open(
            p,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0),
            0o666,
        )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ReportError(f"{option} {show(p)} is not a regular file: refused")
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                if len(view) < len(data):  # part of it was written: cut it back off
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, st.st_size)
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(p, exc, option) from None
    return p


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    return write_atomic(path, lambda h: h.write(text.encode("utf-8")))


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    # mypy matches **arrays against savez_compressed's allow_pickle: bool keyword; the
    # keys are map names, never "allow_pickle".
    return write_atomic(path, lambda h: np.savez_compressed(h, **arrays))  # type: ignore[arg-type]


def _png_is_ours(head: bytes) -> bool:
    """A PNG whose text chunks (before the image data) name this tool as its Software."""
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    pos = 8
    while pos + 8 <= len(head):
        length = int.from_bytes(head[pos : pos + 4], "big")
        kind = head[pos + 4 : pos + 8]
        if kind == b"tEXt":
            key, _, value = head[pos + 8 : pos + 8 + length].partition(b"\0")
            if key == b"Software" and value == GENERATOR.encode():
                return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length
    return False


def written_by_us(path: Path) -> bool:
    """Whether a regular file is one this tool writes (recognised by its content: the
    report's ``tool`` key, the samples.csv header, the HTML and XML generator marks,
    the PNG Software chunk, the keys of a maps file). Reads at most 4 KiB."""
    import zipfile

    name = path.name
    try:
        with open_regular(path) as handle:
            if name.endswith(".npz"):
                with zipfile.ZipFile(handle) as archive:
                    keys = set(archive.namelist())
                return {"paths.npy", "targets.npy", "raw.npy", "maps.npy"} <= keys or {
                    "format.npy",
                    "positions.npy",
                    "paths.npy",
                } <= keys  # a maps file, or a shard's records.npz
            head = handle.read(_SCAN_BYTES)
    except (OSError, NotRegularFile, zipfile.BadZipFile, ValueError):
        return False
    if name.endswith(".json"):
        return re.search(rb'"tool": *"onnx-sp2ps"', head[:4096]) is not None
    if name.endswith(".csv"):
        return head.split(b"\n", 1)[0].strip() == ",".join(SAMPLE_COLUMNS).encode()
    if name.endswith(".html"):
        return b"<title>onnx-sp2ps" in head[:1024] or _HTML_MARK.encode() in head[:1024]
    if name.endswith(".xml"):
        return b'<testsuites name="onnx-sp2ps"' in head[:1024]
    if name.endswith(".png"):
        return _png_is_ours(head)
    return False


def _check_replaceable(path: Path, option: str, force: bool) -> None:
    """Refuse to replace ``path`` when it is special (or links to a special file), or
    was not written by this tool and ``force`` is not given. Folders are checked whole."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ReportError(
            f"cannot check {show(path)}: {exc.strerror or exc}: choose another {option}"
        ) from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            target = None  # a dangling link: replacing it loses nothing of the user's
        if target is not None and not stat.S_ISREG(target.st_mode):
            raise ReportError(
                f"{show(path)} is a link to a special file or folder: refused "
                f"(it is never replaced); choose another {option}"
            )
        if force or target is None:
            return
        raise ReportError(
            f"{show(path)} is a link this tool did not write: refused; remove "
            f"it, choose another {option}, or pass --force to replace it"
        )
    if stat.S_ISDIR(st.st_mode):
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            raise ReportError(
                f"cannot read {show(path)}: {exc.strerror or exc}: choose another {option}"
            ) from None
        for entry in entries:
            _check_replaceable(Path(entry.path), option, force)
        return
    if not stat.S_ISREG(st.st_mode):
        raise ReportError(
            f"{show(path)} is a special file (FIFO, socket or device): refused "
            f"(it is never replaced); choose another {option}"
        )
    if not force and not written_by_us(path):
        raise ReportError(
            f"{show(path)} exists and was not written by onnx-sp2ps: choose "
            f"another {option}, or pass --force to replace it"
        )


def check_target(path: str | Path, *, option: str, force: bool = False) -> Path:
    """Check before a run that a single output file (``--junit``) can be replaced: its
    folder is writable, and an existing file there is ours (or ``force``)."""
    p = Path(path)
    prepare_out_dir(p.parent, option=f"{option} folder")
    _check_replaceable(p, option, force)
    if os.path.isdir(p):
        raise ReportError(f"{option} {show(p)} is a folder: name a file")
    return p


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (no lock file), so that two runs writing
    one --out swap their sets one after the other, never interleaved."""
    try:
        import fcntl
    except ImportError:  # Windows: renames only
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:  # the folder vanished or became unreadable meanwhile
        raise _write_error(folder, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ReportSet:
    """The files one run writes under an output folder, replaced as a whole.

    Construction checks that every member already there may be replaced (ours, or
    ``force``; special files never), then makes a hidden staging folder inside the
    output folder (so on the same file system). Writers write under :meth:`path`;
    :meth:`commit` swaps the new set in by renames: the old members are moved aside,
    the new ones moved in, with signals held for the few renames and every rename undone
    on failure, so the folder holds the complete previous set or the complete new one.
    Leaving the ``with`` block without a commit removes the staging folder. Staging
    folders of dead runs are removed when the next run starts.
    """

    PREFIX = ".sp2ps-staging-"

    def __init__(
        self,
        out: str | Path,
        members: tuple[str, ...],
        *,
        force: bool = False,
        option: str = "--out",
    ):
        self.out = prepare_out_dir(out, option=option)
        self.members = members
        self.option = option
        for name in members:
            _check_replaceable(self.out / name, option, force)
        self._remove_stale()
        try:
            self.staging = Path(
                tempfile.mkdtemp(dir=self.out, prefix=f"{self.PREFIX}{os.getpid()}-")
            )
        except OSError as exc:
            raise _write_error(self.out, exc, option) from None
        track_temporary(self.staging, self.discard)

    def _remove_stale(self) -> None:
        for entry in self.out.glob(self.PREFIX + "*"):
            pid = entry.name[len(self.PREFIX) :].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # a live run's staging folder
            except ProcessLookupError:
                shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue

    def path(self, name: str) -> Path:
        """Where member ``name`` (or a file inside a member folder) is written."""
        return self.staging / name

    def commit(self) -> None:
        staged = [m for m in self.members if os.path.lexists(self.staging / m)]
        for folder, _, _ in os.walk(self.staging):
            os.chmod(folder, umask_mode(directory=True))
        aside = self.staging / ".previous"
        moved: list[tuple[Path, Path]] = []
        with uninterruptible(), _folder_lock(self.out):
            try:
                aside.mkdir()
                for name in self.members:
                    if os.path.lexists(self.out / name):
                        os.rename(self.out / name, aside / name)
                        moved.append((self.out / name, aside / name))
                for name in staged:
                    os.rename(self.staging / name, self.out / name)
                    moved.append((self.staging / name, self.out / name))
            except OSError as exc:
                for source, target in reversed(moved):
                    try:
                        os.rename(target, source)
                    except OSError:
                        pass
                raise _write_error(self.out, exc, self.option) from None
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        untrack_temporary(self.staging)

    def __enter__(self) -> "ReportSet":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


# --------------------------------------------------------------------------- JSON


def _ranked(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates of a report dict, highest Sp2PS mean first, missing means last."""
    return sorted(
        candidates, key=lambda c: -(c["sp2ps"]["mean"] if c["sp2ps"]["mean"] is not None else -1.0)
    )


def versus_next(report: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """The ranked candidates (:func:`_ranked`), each with how it compares with the next
    one by the paired comparison of the report (``comparisons``): ``= next`` when their
    difference's interval holds 0 (not distinguishable), ``> next`` when it excludes 0,
    ``""`` for the last one and for reports without comparisons."""
    position = {id(c): i for i, c in enumerate(report["candidates"])}
    pairs = {}
    for comp in report.get("comparisons") or []:
        a, b = comp.get("positions") or (None, None)
        pairs[(a, b)] = pairs[(b, a)] = comp
    order = _ranked(report["candidates"])
    out = []
    for k, cand in enumerate(order):
        mark = ""
        if k + 1 < len(order):
            comp = pairs.get((position[id(cand)], position[id(order[k + 1])]))
            low, high = (comp or {}).get("ci") or (None, None)
            if low is not None and high is not None:
                mark = "> next" if (low > 0 or high < 0) else "= next"
        out.append((cand, mark))
    return out


def _mean_interval(cand: dict[str, Any]) -> tuple[float, float] | None:
    pair = ((cand.get("sp2ps") or {}).get("ci") or {}).get("mean")
    if not pair or pair[0] is None or pair[1] is None:
        return None
    return float(pair[0]), float(pair[1])


def _plus_minus(cand: dict[str, Any]) -> str:
    """``mean +-half-width`` (the interval's; BCa intervals need not be symmetric)."""
    ci = _mean_interval(cand)
    mean = _fmt(cand["sp2ps"]["mean"])
    return mean if ci is None else f"{mean} ±{_fmt((ci[1] - ci[0]) / 2)}"


def _interval_text(cand: dict[str, Any], key: str = "mean") -> str:
    pair = ((cand.get("sp2ps") or {}).get("ci") or {}).get(key)
    if not pair:
        return "-"
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def size_ratio(cand: dict[str, Any], original: dict[str, Any]) -> float | None:
    """A candidate's model size relative to the original's: file size, else parameters."""
    for key in ("size_bytes", "parameters"):
        a, b = cand["model"].get(key), original["model"].get(key)
        if a and b:
            return float(a) / float(b)
    return None


def placed_candidates(report: dict[str, Any]) -> list[tuple[float, float, dict[str, Any]]]:
    """(size relative to the original, Sp2PS mean, candidate) of the candidates that
    have both, ranked."""
    out = []
    for c in _ranked(report["candidates"]):
        size, mean = size_ratio(c, report["original"]), c["sp2ps"]["mean"]
        if size is not None and mean is not None:
            out.append((size, float(mean), c))
    return out


def pareto_front(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates that no other beats on both size (relative to the original,
    smaller is better) and Sp2PS mean (higher is better), smallest first; candidates
    without a size or a mean are left out."""
    known = placed_candidates(report)
    front = [
        (size, mean, c)
        for size, mean, c in known
        if not any(s2 <= size and m2 >= mean and (s2 < size or m2 > mean) for s2, m2, _ in known)
    ]
    return [c for _, _, c in sorted(front, key=lambda t: (t[0], -t[1]))]


#: The intervals of each candidate's ``sp2ps.ci`` (README, "Intervals").
INTERVAL_KEYS = ("mean", "class_balanced_mean", "p5")
#: report.json versions ``gate`` reads, and the largest report it reads.
KNOWN_SCHEMAS = (1,)
MAX_REPORT_BYTES = 256 << 20


def _schema_errors(data: object) -> str | None:
    """The first way ``data`` is not a report.json that ``gate`` can read, or None.
    Everything the gate reads is checked: types (a boolean is not a number, a string
    is not a score), ranges, a known ``schema_version``."""
    if not isinstance(data, dict) or data.get("tool") != "onnx-sp2ps":
        return 'it is not an onnx-sp2ps report.json (no "tool": "onnx-sp2ps")'
    version = data.get("schema_version")
    if (
        not (isinstance(version, int) and not isinstance(version, bool))
        or version not in KNOWN_SCHEMAS
    ):
        return (
            f"schema_version {json.dumps(version)[:40]} is not one this version reads "
            f"({', '.join(map(str, KNOWN_SCHEMAS))})"
        )

    def fraction(value: Any, where: str) -> str | None:
        if value is None or (finite_or_none(value) is not None and 0.0 <= value <= 1.0):
            return None
        return f"{where} is {json.dumps(value)[:40]}, not a number in [0, 1] or null"

    original = data.get("original")
    if not isinstance(original, dict) or not isinstance(original.get("model"), dict):
        return "original.model is missing or not an object"
    problem = fraction(original.get("accuracy"), "original.accuracy")
    if problem:
        return problem
    candidates = data.get("candidates")
    if not isinstance(candidates, list):
        return "candidates is not a list"
    for i, cand in enumerate(candidates):
        where = f"candidates[{i}]"
        if not isinstance(cand, dict):
            return f"{where} is not an object"
        model, sp2ps = cand.get("model"), cand.get("sp2ps")
        if (
            not isinstance(model, dict)
            or not isinstance(model.get("name"), str)
            or not model["name"]
        ):
            return f"{where}.model.name is missing or not a string"
        if model.get("path") is not None and not isinstance(model.get("path"), str):
            return f"{where}.model.path is not a string"
        if not isinstance(sp2ps, dict):
            return f"{where}.sp2ps is missing or not an object"
        for key, value in (
            ("sp2ps.mean", sp2ps.get("mean")),
            ("sp2ps.p5", sp2ps.get("p5")),
            ("agreement", cand.get("agreement")),
            ("accuracy", cand.get("accuracy")),
        ):
            problem = fraction(value, f"{where}.{key}")
            if problem:
                return problem
        problem = _ci_errors(sp2ps.get("ci"), f"{where}.sp2ps.ci", fraction)
        if problem:
            return problem
    return None


def _ci_errors(ci: object, where: str, fraction: Callable[[Any, str], str | None]) -> str | None:
    """The first problem of a candidate's ``sp2ps.ci`` (absent in reports of earlier
    versions: no problem), as :func:`_schema_errors` reads it."""
    if ci is None:
        return None
    if not isinstance(ci, dict):
        return f"{where} is not an object"
    confidence = finite_or_none(ci.get("confidence"))
    if confidence is None or not 0.0 < confidence < 1.0:
        return (
            f"{where}.confidence is {json.dumps(ci.get('confidence'))[:40]}, not a number in (0, 1)"
        )
    for key in INTERVAL_KEYS:
        pair = ci.get(key)
        if not isinstance(pair, list) or len(pair) != 2:
            return f"{where}.{key} is not a [low, high] pair"
        for value in pair:
            problem = fraction(value, f"{where}.{key}")
            if problem:
                return problem
        if None not in pair and pair[0] > pair[1]:
            return f"{where}.{key} has its low end above its high end"
    return None


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate a report.json written by ``audit`` (:class:`ReportError`, one
    line, for anything else: a special or oversized file, malformed or deeply nested
    JSON, NaN literals, wrong types or ranges, an unknown schema_version)."""
    p = Path(path)
    hint = "pass the report.json written by onnx-sp2ps audit --out"
    raw = read_bounded(p, "report", limit=MAX_REPORT_BYTES, error=ReportError)

    def no_constants(name: str) -> NoReturn:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise ReportError(f"cannot read report {show(p)}: nested too deeply: {hint}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:200]
        raise ReportError(f"cannot read report {show(p)}: {reason}: {hint}") from None
    problem = _schema_errors(data)
    if problem:
        raise ReportError(f"{show(p)} is not a valid onnx-sp2ps report: {problem}: {hint}")
    report: dict[str, Any] = data  # an object: _schema_errors checked
    return report


# --------------------------------------------------------------------------- text


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"


def format_table(report: dict[str, Any]) -> str:
    """The audit table printed on stdout, from the report dict."""
    orig = report["original"]
    lines = [
        f"original: {orig['model']['name']}  accuracy {_fmt(orig['accuracy'], 3)}  "
        f"images scored {report['images']['scored']}, skipped "
        f"{len(report['images']['skipped'])}  method {report['settings']['method']}, "
        f"target {report['settings']['target']}",
    ]
    header = [
        "candidate",
        "sp2ps",
        "vs next",
        "balanced",
        "median",
        "p5",
        "min",
        "S",
        "F",
        "flat o/c",
        "agree",
        "acc",
        "conf drop",
        "non-finite",
        "size",
        "params",
        "gate",
    ]
    rows = []

    def ratio(cand: dict[str, Any], key: str) -> str:
        a, b = cand["model"].get(key), orig["model"].get(key)
        return f"{a / b:.0%}" if a and b else "-"

    for c, mark in versus_next(report):
        s = c["sp2ps"]
        gate = c.get("gate")
        rows.append(
            [
                c["model"]["name"],
                _plus_minus(c),
                mark or "-",
                _fmt(s["class_balanced_mean"]),
                _fmt(s["median"]),
                _fmt(s["p5"]),
                _fmt(s["minimum"]),
                _fmt(s["spatial_mean"]),
                _fmt(s["spectral_mean"]),
                f"{s['flat_original']}/{s['flat_candidate']}",
                _fmt(c["agreement"], 3),
                _fmt(c["accuracy"], 3),
                _fmt(c["confidence_drop"], 4),
                str(s["non_finite"]),
                ratio(c, "size_bytes"),
                ratio(c, "parameters"),
                "-" if gate is None else ("pass" if gate["passed"] else "FAIL"),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append(
        "  ".join(
            h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)
        )
    )
    for r in rows:
        lines.append(
            "  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(r))
        )
    level = next(
        (c["sp2ps"]["ci"]["confidence"] for c in report["candidates"] if c["sp2ps"].get("ci")),
        None,
    )
    if level is not None:
        lines.append(
            f"sp2ps: mean ±half-width of its {level:.0%} interval (bootstrap over images); "
            "vs next: '= next' when the paired difference with the next one is not "
            "distinguishable from 0"
        )
    for c in report["candidates"]:
        if c["non_finite_images"]:
            names = ", ".join(c["non_finite_images"][:5])
            more = len(c["non_finite_images"]) - 5
            lines.append(
                f"non-finite for {c['model']['name']}: {names}"
                + (f" (+{more} more)" if more > 0 else "")
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- images

# Polynomial fit of matplotlib's viridis (perceptually uniform), coefficients c0..c6.
_VIRIDIS = np.array(
    [
        [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
        [0.1050930431085774, 1.404613529898575, 1.384590162594685],
        [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
        [-4.634230498983486, -5.799100973351585, -19.33244095627987],
        [6.228269936347081, 14.17993336680509, 56.69055260068105],
        [4.776384997670288, -13.74514537774601, -65.35303263337234],
        [-5.435455855934631, 4.645852612178535, 26.3124352495832],
    ]
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis colours ``(..., 3)`` uint8 for values in [0, 1] (NaN shown as grey)."""
    v = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(v)
    t = np.clip(np.where(bad, 0.0, v), 0.0, 1.0)[..., None]
    # Horner's rule in place (the same operations as rgb = rgb * t + coeff from zeros).
    rgb = np.empty(t.shape[:-1] + (3,))
    rgb[...] = _VIRIDIS[-1]
    for coeff in _VIRIDIS[-2::-1]:
        rgb *= t
        rgb += coeff
    np.clip(rgb, 0.0, 1.0, out=rgb)
    rgb[bad] = 0.5
    rgb *= 255
    return np.round(rgb, out=rgb).astype(np.uint8)


def overlay_image(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """The CAM ``(H, W)`` in [0, 1] over an image ``(H, W, 3)`` uint8."""
    mixed = image.astype(np.float64)
    mixed *= 1.0 - alpha
    colours = colormap(cam).astype(np.float64)
    colours *= alpha
    mixed += colours
    np.round(mixed, out=mixed)
    return np.clip(mixed, 0, 255, out=mixed).astype(np.uint8)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    data = png_bytes(rgb)
    return write_atomic(path, lambda handle: handle.write(data))


# --------------------------------------------------------------------------- CSV, JUnit, Markdown

#: Columns of samples.csv, one row per image and candidate.
SAMPLE_COLUMNS = (
    "candidate",
    "path",
    "label",
    "target",
    "target_original",
    "prediction_original",
    "prediction_candidate",
    "confidence_original",
    "confidence_candidate",
    "spatial",
    "spectral",
    "score",
    "finite",
    "flat_original",
    "flat_candidate",
)


def samples_csv(report: dict[str, Any]) -> str:
    """samples.csv: one row per image and candidate (empty cells for missing values)."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SAMPLE_COLUMNS)
    for cand in report["candidates"]:
        name = cand["model"]["name"]
        for row in cand["images"]:
            writer.writerow(
                [name] + ["" if row.get(k) is None else row[k] for k in SAMPLE_COLUMNS[1:]]
            )
    return buffer.getvalue()


def junit_xml(
    report: dict[str, Any], checks: list[GateCheck], *, timestamp: str | None = None
) -> str:
    """JUnit XML: one test case per candidate and criterion (a failed gate is a
    ``<failure>``); without criteria, one passing test case per candidate.
    ``timestamp`` (ISO 8601, default now in UTC) is the suite's; report.json itself has
    none, so that the same run gives the same report."""
    import datetime
    from xml.etree import ElementTree as ET

    if timestamp is None:
        timestamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")

    suites = ET.Element("testsuites", name="onnx-sp2ps")
    suite = ET.SubElement(
        suites, "testsuite", name="onnx-sp2ps audit", timestamp=timestamp, hostname="localhost"
    )
    props = ET.SubElement(suite, "properties")
    for key in ("method", "target"):
        ET.SubElement(
            props, "property", name=key, value=str((report.get("settings") or {}).get(key))
        )
    ET.SubElement(
        props, "property", name="original", value=str(report["original"]["model"]["name"])
    )
    cases = []
    if checks:
        for c in checks:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"onnx-sp2ps.{c.candidate}",
                name=f"{c.criterion} {c.op} {c.threshold:.6f}",
                time="0",
            )
            value = "missing" if c.value is None else f"{c.value:.6f}"
            if not c.passed:
                failure = ET.SubElement(
                    case,
                    "failure",
                    type="GateFailure",
                    message=f"{c.criterion} {value}, must be {c.op} {c.threshold:.6f}",
                )
                failure.text = f"{c.candidate}: {c.criterion} = {value}"
            ET.SubElement(case, "system-out").text = f"{c.criterion} = {value}"
            cases.append(c.passed)
    else:
        for cand in report["candidates"]:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"onnx-sp2ps.{cand['model']['name']}",
                name="audit",
                time="0",
            )
            ET.SubElement(
                case, "system-out"
            ).text = f"sp2ps mean = {_fmt(cand['sp2ps']['mean'], 6)}"
            cases.append(True)
    failures = str(sum(1 for ok in cases if not ok))
    for element in (suites, suite):
        element.set("tests", str(len(cases)))
        element.set("failures", failures)
        element.set("errors", "0")
        element.set("time", "0")
    suite.set("skipped", "0")
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )


def summary_markdown(report: dict[str, Any], checks: list[GateCheck]) -> str:
    """A short Markdown summary for pull-request comments or CI job summaries."""

    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")

    verdict = ""
    if checks:
        verdict = "**PASSED**" if all(c.passed for c in checks) else "**FAILED**"
    lines = [
        f"### onnx-sp2ps audit {verdict}".rstrip(),
        "",
        f"Original `{cell(report['original']['model']['name'])}`, accuracy "
        f"{_fmt(report['original']['accuracy'], 3)}; {report['images']['scored']} images "
        f"({len(report['images']['skipped'])} skipped); method "
        f"{cell(report['settings']['method'])}.",
        "",
        "| candidate | Sp2PS | interval | vs next | p5 | p5 interval | S | F | agreement "
        "| accuracy | gate |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    position = {id(c): i for i, c in enumerate(report["candidates"])}
    for c, mark in versus_next(report):
        name = c["model"]["name"]
        mine = [k for k in checks if k.index == position[id(c)]]
        gate = "-" if not mine else ("pass" if all(k.passed for k in mine) else "**fail**")
        s = c["sp2ps"]
        lines.append(
            f"| `{cell(name)}` | {_fmt(s['mean'])} | {_interval_text(c)} | {mark or '-'} | "
            f"{_fmt(s['p5'])} | {_interval_text(c, 'p5')} | "
            f"{_fmt(s['spatial_mean'])} | {_fmt(s['spectral_mean'])} | "
            f"{_fmt(c['agreement'], 3)} | {_fmt(c['accuracy'], 3)} | {gate} |"
        )
    front = pareto_front(report)
    if front:
        lines += [
            "",
            "Pareto front (no other candidate is both smaller and higher-scoring): "
            + ", ".join(
                f"`{cell(c['model']['name'])}` "
                f"({size_ratio(c, report['original']) or 0.0:.0%} size, "
                f"{_fmt(c['sp2ps']['mean'])})"
                for c in front
            )
            + ".",
        ]
    failed = [k for k in checks if not k.passed]
    if failed:
        lines += [""] + [
            f"- `{cell(k.candidate)}`: {k.describe()} (must be {k.op} {k.threshold:.6f})"
            for k in failed
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML


@dataclass(frozen=True)
class WorstImage:
    """One row of the report's worst-images section."""

    path: str
    image_png: bytes
    original_png: bytes
    candidate_png: bytes
    spatial: float | None
    spectral: float | None
    score: float | None
    prediction_original: int
    prediction_candidate: int
    label: int | None


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG bytes, with a Software text chunk that marks the file as this tool's."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", GENERATOR)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _histogram_svg(scores: list[float], threshold: float | None, bins: int = 20) -> str:
    counts, edges = np.histogram(
        np.clip(np.asarray(scores, dtype=float), 0, 1), bins=bins, range=(0.0, 1.0)
    )
    width, height, pad = 420, 160, 28
    top = max(int(counts.max()) if len(counts) else 0, 1)
    bar_w = (width - 2 * pad) / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of per-image Sp2PS">'
    ]
    for i, count in enumerate(counts):
        h = (height - 2 * pad) * count / top
        x = pad + i * bar_w
        parts.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar_w - 1:.1f}" '
            f'height="{h:.1f}" fill="#3b528b"><title>{edges[i]:.2f}-'
            f"{edges[i + 1]:.2f}: {int(count)}</title></rect>"
        )
    parts.append(
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" '
        f'y2="{height - pad}" stroke="#333"/>'
    )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + tick * (width - 2 * pad)
        parts.append(
            f'<text x="{x:.1f}" y="{height - pad + 14}" font-size="10" '
            f'text-anchor="middle">{tick:.2f}</text>'
        )
    parts.append(f'<text x="{pad}" y="{pad - 10}" font-size="10">{top} max</text>')
    if threshold is not None:
        x = pad + threshold * (width - 2 * pad)
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad - 4}" x2="{x:.1f}" y2="{height - pad}" '
            f'stroke="#c0392b" stroke-dasharray="4 2"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _per_class_rows(cand: dict[str, Any]) -> list[list[str]]:
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in cand["images"]:
        groups.setdefault(row["target_original"], []).append(row)
    rows = []
    for cls in sorted(groups):
        items = groups[cls]

        def mean(key: str, items: list[dict[str, Any]] = items) -> float | None:
            values = [r[key] for r in items if r[key] is not None]
            return float(np.mean(values)) if values else None

        agree = float(
            np.mean([r["prediction_candidate"] == r["prediction_original"] for r in items])
        )
        rows.append(
            [
                str(cls),
                str(len(items)),
                _fmt(mean("score")),
                _fmt(mean("spatial")),
                _fmt(mean("spectral")),
                _fmt(agree, 3),
            ]
        )
    return rows


_HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
    "th:first-child,td:first-child{text-align:left}"
    ".worst td{text-align:center}.verdict{font-size:1.4em;font-weight:bold}"
    ".PASSED{color:#1e7b34}.FAILED{color:#c0392b}img{image-rendering:pixelated}"
    ".ranking td{white-space:nowrap}"
    "code{font-size:.85em}"
)
_RANKING_HEADER = [
    "candidate",
    "Sp2PS",
    "interval",
    "",
    "vs next",
    "balanced",
    "p5",
    "S",
    "F",
    "agreement",
    "accuracy",
    "conf. drop",
    "gate",
]


def _e(x: object) -> str:
    from html import escape

    return escape(str(x), quote=True)


class _Markup(str):
    """A table cell that is already HTML (an inline SVG this module drew), not text."""


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{v if isinstance(v, _Markup) else _e(v)}</td>" for v in r) + "</tr>"
        for r in rows
    )
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html_img(data: bytes, alt: str) -> str:
    import base64

    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{src}" alt="{_e(alt)}" width="128" height="128">'


def _class_namer(class_names: list[str] | None) -> Callable[[int | str | None], str]:
    def name_of(cls: int | str | None) -> str:  # an index, or its digits
        if cls is None:
            return "-"
        if class_names and 0 <= int(cls) < len(class_names):
            return f"{cls} {class_names[int(cls)]}"
        return str(cls)

    return name_of


def _html_settings_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = [[k, json.dumps(v)] for k, v in report["settings"].items()]
    rows += [[f"preprocess.{k}", json.dumps(v)] for k, v in report["preprocess"].items()]
    rows += [
        ["providers", ", ".join(report["providers"]["used"])],
        [
            "images",
            f"{report['images']['source']}: {report['images']['scored']} "
            f"scored, {len(report['images']['skipped'])} skipped",
        ],
    ]
    rows += [[f"version.{k}", v] for k, v in report["versions"].items()]
    return rows


def _error_bar(start: tuple[float, float], end: tuple[float, float], cap: float) -> str:
    """SVG lines of an error bar from ``start`` to ``end`` (horizontal or vertical),
    with caps ``cap`` long on each side at both ends."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = (0.0, cap) if y0 == y1 else (cap, 0.0)
    line = '<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="#3b528b"/>'
    return (
        line.format(x0, y0, x1, y1)
        + line.format(x0 - dx, y0 - dy, x0 + dx, y0 + dy)
        + line.format(x1 - dx, y1 - dy, x1 + dx, y1 + dy)
    )


def _error_bar_svg(cand: dict[str, Any], low_end: float, width: int = 160) -> str:
    """The interval of the mean as an error bar on a shared axis [low_end, 1]."""
    ci = _mean_interval(cand)
    mean = cand["sp2ps"]["mean"]
    height, pad = 14, 4

    def x(v: float) -> float:
        return pad + (width - 2 * pad) * (min(max(v, low_end), 1.0) - low_end) / (1.0 - low_end)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="interval of the mean">',
        f'<line x1="{pad}" y1="{height - 2}" x2="{width - pad}" y2="{height - 2}" stroke="#ddd"/>',
    ]
    if ci is not None:
        parts.append(_error_bar((x(ci[0]), 7.0), (x(ci[1]), 7.0), 4.0))
    if mean is not None:
        parts.append(f'<circle cx="{x(mean):.1f}" cy="7" r="3" fill="#c0392b"/>')
    parts.append("</svg>")
    return "".join(parts)


def _axis_low(report: dict[str, Any]) -> float:
    """The lower end of the score axis shared by the ranking's bars and the chart: a
    tenth below the lowest interval end (or mean), at least 0."""
    ends = [
        v
        for c in report["candidates"]
        for v in ((_mean_interval(c) or (c["sp2ps"]["mean"],))[0], c["sp2ps"]["mean"])
        if v is not None
    ]
    low = min(ends, default=0.0)
    return max(0.0, min(0.9, math.floor(low * 10 - 0.5) / 10))


def _html_ranking_row(c: dict[str, Any], mark: str, low_end: float) -> list[str]:
    s = c["sp2ps"]
    gate = c.get("gate")
    return [
        c["model"]["name"],
        _fmt(s["mean"]),
        _interval_text(c),
        _Markup(_error_bar_svg(c, low_end)),
        mark or "-",
        _fmt(s["class_balanced_mean"]),
        _fmt(s["p5"]),
        _fmt(s["spatial_mean"]),
        _fmt(s["spectral_mean"]),
        _fmt(c["agreement"], 3),
        _fmt(c["accuracy"], 3),
        _fmt(c["confidence_drop"]),
        "-" if gate is None else ("pass" if gate["passed"] else "FAIL"),
    ]


def _html_worst(worst: list[WorstImage], name_of: Callable[[int | str | None], str]) -> str:
    rows = [
        "<tr>"
        f"<td>{_html_img(w.image_png, 'input ' + w.path)}<br><code>{_e(w.path)}</code></td>"
        f"<td>{_html_img(w.original_png, 'original map')}<br>pred "
        f"{_e(name_of(w.prediction_original))}</td>"
        f"<td>{_html_img(w.candidate_png, 'candidate map')}<br>pred "
        f"{_e(name_of(w.prediction_candidate))}</td>"
        f"<td>S {_e(_fmt(w.spatial))}<br>F {_e(_fmt(w.spectral))}<br>"
        f"<b>Sp2PS {_e(_fmt(w.score))}</b><br>label {_e(name_of(w.label))}</td>"
        "</tr>"
        for w in worst
    ]
    if not rows:
        return "<p>(no images)</p>"
    return (
        "<table class=worst><thead><tr><th>input</th><th>original's map</th>"
        "<th>candidate's map</th><th>scores</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _html_candidate(
    c: dict[str, Any],
    original: dict[str, Any],
    worst: list[WorstImage],
    threshold: float | None,
    name_of: Callable[[int | str | None], str],
) -> str:
    """One candidate's section: size relative to the original, histogram, per-class
    table and worst images."""
    name = c["model"]["name"]
    scores = [r["score"] if r["score"] is not None else 0.0 for r in c["images"]]
    params = c["model"].get("parameters")
    size = c["model"].get("size_bytes")
    rel = []
    if params and original["model"].get("parameters"):
        rel.append(f"{params / original['model']['parameters']:.1%} of the original's parameters")
    if size and original["model"].get("size_bytes"):
        rel.append(f"{size / original['model']['size_bytes']:.1%} of its file size")
    return (
        f'<section class="candidate"><h2>{_e(name)}</h2>'
        f"<p>{_e('; '.join(rel))}</p>"
        f"<h3>Per-image Sp2PS</h3>{_histogram_svg(scores, threshold)}"
        f"<h3>Per class (original's target)</h3>"
        + _html_table(
            ["class", "images", "Sp2PS", "S", "F", "agreement"],
            [[name_of(r[0])] + r[1:] for r in _per_class_rows(c)],
        )
        + f"<h3>Lowest-scoring images</h3>{_html_worst(worst, name_of)}</section>"
    )


def choice_svg(report: dict[str, Any], threshold: float | None, low_end: float = 0.0) -> str:
    """The choice, drawn: each candidate at (model size relative to the original, Sp2PS
    mean) with its interval as an error bar and its accuracy (or agreement) in its
    label, the gate threshold as a line, and the Pareto front (:func:`pareto_front`)
    joined and named.  Inline SVG, no script."""
    width, height = 820, 440
    left, right, top, bottom = 56, 24, 58, 46
    points = placed_candidates(report)
    x_high = max([1.0] + [r for r, _, _ in points]) * 1.08

    def px(r: float) -> float:
        return left + (width - left - right) * r / x_high

    def py(v: float) -> float:
        v = min(max(v, low_end), 1.0)
        return top + (height - top - bottom) * (1.0 - (v - low_end) / (1.0 - low_end))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="Sp2PS mean against model size" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="#fafafa" stroke="#999"/>',
    ]
    x_step = 0.25 if x_high <= 2.0 else 1.0
    for k in range(int(x_high / x_step) + 1):  # x ticks: 0 %, 25 %, ...
        r = k * x_step
        parts.append(
            f'<line x1="{px(r):.1f}" y1="{top}" x2="{px(r):.1f}" y2="{height - bottom}" '
            f'stroke="#eee"/><text x="{px(r):.1f}" y="{height - bottom + 14}" '
            f'text-anchor="middle">{r:.0%}</text>'
        )
    y_step = 0.1 if 1.0 - low_end <= 0.5 else 0.2
    for k in range(int(round((1.0 - low_end) / y_step * 1e6)) // 1_000_000 + 1):
        v = 1.0 - k * y_step  # y ticks down from 1 by round steps
        parts.append(
            f'<line x1="{left}" y1="{py(v):.1f}" x2="{width - right}" y2="{py(v):.1f}" '
            f'stroke="#eee"/><text x="{left - 6}" y="{py(v) + 4:.1f}" '
            f'text-anchor="end">{v:.2f}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 10}" text-anchor="middle">'
        "model size relative to the original (file size)</text>"
        f'<text x="14" y="{(top + height - bottom) / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">Sp2PS mean '
        "(bar: interval)</text>"
    )
    if threshold is not None and threshold >= low_end:
        y = py(threshold)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" '
            f'stroke="#c0392b" stroke-dasharray="5 3"/><text x="{width - right - 4}" '
            f'y="{y - 4:.1f}" text-anchor="end" fill="#c0392b">gate {threshold:.2f}</text>'
        )
    front = pareto_front(report)
    where = {id(c): (px(r), py(m)) for r, m, c in points}
    if len(front) > 1:
        path = " ".join(f"{where[id(c)][0]:.1f},{where[id(c)][1]:.1f}" for c in front)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="#1e7b34" stroke-width="2" '
            'stroke-opacity="0.6"/>'
        )
    names = " \u2192 ".join(c["model"]["name"] for c in front) or "-"
    parts.append(
        f'<text x="{left}" y="16" font-weight="bold" fill="#1e7b34">Pareto front: '
        f"{_e(names)}</text>"
        f'<text x="{left}" y="32" fill="#555">(green: no other candidate is both smaller '
        "and higher-scoring; bars: intervals of the mean; labels: accuracy, or agreement "
        "without labels)</text>"
    )
    on_front = {id(c) for c in front}
    labels: list[tuple[float, float, str, bool]] = []
    for _, _, c in points:
        x, y = where[id(c)]
        ci = _mean_interval(c)
        if ci is not None:
            parts.append(_error_bar((x, py(ci[0])), (x, py(ci[1])), 4.0))
        fill = "#1e7b34" if id(c) in on_front else "#3b528b"
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{fill}">'
            f"<title>{_e(c['model']['name'])}: {_e(_plus_minus(c))}</title></circle>"
        )
        figure = (
            f"acc {_fmt(c['accuracy'], 3)}"
            if c.get("accuracy") is not None
            else f"agree {_fmt(c['agreement'], 3)}"
        )
        labels.append((x, y, f"{c['model']['name']} ({figure})", id(c) in on_front))
    # Labels right of their point (left of it in the plot's right half), pushed down
    # past the labels already placed on the same side nearby.
    middle = (left + width - right) / 2
    placed: list[tuple[float, float]] = []
    for x, y, text, front_point in sorted(labels, key=lambda t: t[1]):
        ly = y + 4
        while any(abs(ly - py_) < 13 and abs(x - px_) < 60 for px_, py_ in placed):
            ly += 13
        placed.append((x, ly))
        weight = ' font-weight="bold"' if front_point else ""
        anchor = f'x="{x - 8:.1f}" text-anchor="end"' if x > middle else f'x="{x + 8:.1f}"'
        parts.append(f'<text {anchor} y="{ly:.1f}"{weight}>{_e(text)}</text>')
    missing = len(report["candidates"]) - len(points)
    if missing:
        parts.append(
            f'<text x="{width - right}" y="16" text-anchor="end" fill="#555">{missing} '
            "without a size or score: not drawn</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def html_report(
    report: dict[str, Any],
    worst: dict[str, list[WorstImage]],
    *,
    class_names: list[str] | None = None,
) -> str:
    """report.html: one self-contained page (no network, no JavaScript): settings,
    ranking, and per candidate a histogram, a per-class table and the worst images."""
    orig = report["original"]
    verdict = report.get("passed")
    status = "" if verdict is None else ("PASSED" if verdict else "FAILED")
    threshold = (report.get("gate_criteria") or {}).get("fail_under")
    name_of = _class_namer(class_names)
    order = _ranked(report["candidates"])
    low_end = _axis_low(report)
    ranking = [_html_ranking_row(c, mark, low_end) for c, mark in versus_next(report)]
    level = next(
        (c["sp2ps"]["ci"]["confidence"] for c in order if c["sp2ps"].get("ci")),
        None,
    )
    ranking_note = (
        ""
        if level is None
        else f"<p>Intervals: {level:.0%}, bootstrap over images (README, &quot;Intervals&quot;). "
        "<b>= next</b>: the paired difference with the next candidate is not "
        "distinguishable from 0 at that confidence.</p>"
    )
    sections = [
        _html_candidate(c, orig, worst.get(c["model"]["name"], []), threshold, name_of)
        for c in order
    ]
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>{_HTML_MARK}"
        f"<title>onnx-sp2ps audit of {_e(orig['model']['name'])}</title>"
        f"<style>{_HTML_STYLE}</style></head><body>"
        f"<h1>onnx-sp2ps audit of <code>{_e(orig['model']['name'])}</code></h1>"
        + (f'<p class="verdict {status}">{status}</p>' if status else "")
        + f"<p>Original accuracy {_e(_fmt(orig['accuracy'], 3))}; method "
        f"{_e(report['settings']['method'])}, target {_e(report['settings']['target'])}.</p>"
        "<h2>Ranking</h2>"
        + _html_table(_RANKING_HEADER, ranking, "ranking")
        + ranking_note
        + "<h2>Size against attention</h2>"
        + choice_svg(report, threshold, low_end)
        + "".join(sections)
        + "<h2>Settings</h2>"
        + _html_table(["setting", "value"], _html_settings_rows(report), "settings")
        + "</body></html>\n"
    )

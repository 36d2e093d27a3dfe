"""Files as hostile inputs: only regular files are opened, reads are bounded, and paths
are shown escaped on one line.

A path given to onnx-sp2ps may name a FIFO (a read blocks forever), a device
(``/dev/zero`` never ends), a socket, or a link to one of them; its size may change
while it is read. Every file the package reads goes through :func:`read_bounded`
(or :func:`check_regular` where a library reads it), which refuses all of these before
the file is opened. README "Supported and refused" lists the rules.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO

from onnx_sp2ps.errors import InputError, Interrupted

__all__ = [
    "MAX_TEXT_BYTES",
    "check_regular",
    "read_bounded",
    "show",
    "umask_mode",
    "NotRegularFile",
    "one_line",
    "file_kind",
    "special_kind",
    "open_regular",
    "human_bytes",
    "available_memory",
    "memory_budget",
    "FALLBACK_BUDGET",
    "interrupt",
    "uninterruptible",
    "install_signal_handlers",
    "SIGNALS",
    "track_temporary",
    "untrack_temporary",
    "announce_ending",
    "GRACE_SECONDS",
    "SUPERVISOR_FD",
]

#: Largest settings, class-names or report file read (16 MiB of text is far beyond any
#: real one; larger is a mistake or an attack).
MAX_TEXT_BYTES = 16 << 20

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def show(text: object) -> str:
    r"""A path (or name) as one printable line, for messages and display names.

    Backslash, newline, carriage return and tab become ``\\``, ``\n``, ``\r``, ``\t``;
    bytes that are not UTF-8 (``os.fsdecode``'s surrogate escapes) ``\xNN``; other
    control and unprintable characters ``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN``. Different
    names stay different; printable names are unchanged.
    """
    text = os.fsdecode(text) if isinstance(text, (str, bytes, os.PathLike)) else str(text)
    if text.isprintable() and "\\" not in text:
        return text
    parts = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            parts.append(_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
            parts.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            parts.append(char)
        elif code <= 0xFF:
            parts.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(f"\\U{code:08x}")
    return "".join(parts)


_NONBLOCK = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class NotRegularFile(Exception):
    """A path that is not a regular file; the message says what it is ("a FIFO")."""


def file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a special file"


def special_kind(path: str | os.PathLike[str]) -> str | None:
    """What path is (following symlinks) when it is not a regular file; None for a regular
    file, and for a path that cannot be examined (opening it will say why)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a regular file for reading, never blocking.

    The path is examined before it is opened, and what was opened again after (opened
    non-blocking, so that a FIFO put in its place meanwhile cannot block the open): a
    FIFO, socket, device or folder, or a symlink to one, raises :class:`NotRegularFile`.
    OSError as from :func:`open`.
    """
    kind = special_kind(path)
    if kind is not None:
        raise NotRegularFile(kind)
    handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | _NONBLOCK))
    try:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(file_kind(mode))
    except BaseException:
        handle.close()
        raise
    return handle


def one_line(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped, backslashes kept
    (for a message whose paths :func:`show` has escaped already)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\\" else show(ch) for ch in text)


def check_regular(
    path: str | os.PathLike[str],
    what: str,
    *,
    error: type[InputError] = InputError,
    limit: int | None = None,
) -> os.stat_result:
    """The ``os.stat`` of ``path`` (links followed) when it is a regular file of at most
    ``limit`` bytes; else ``error`` with one line naming the path and its kind. Nothing
    is opened."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} not found: {show(p)} (check the path)") from None
    except OSError as exc:
        raise error(
            f"cannot read {what} {show(p)}: {exc.strerror or exc}: check the path "
            "and its permissions"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        kind = file_kind(st.st_mode)
        raise error(
            f"{what} {show(p)} is {kind}, not a regular file: refused (only plain files are read)"
        )
    if limit is not None and st.st_size > limit:
        raise error(
            f"{what} {show(p)} is {st.st_size:,} bytes, over the limit of {limit:,}: refused"
        )
    return st


def read_bounded(
    path: str | os.PathLike[str],
    what: str,
    *,
    limit: int | None = None,
    error: type[InputError] = InputError,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. The file is opened without
    blocking (a FIFO swapped in after the check cannot hang the read) and at most
    ``limit + 1`` bytes are read, whatever size it claims (default limit:
    :data:`MAX_TEXT_BYTES`)."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    check_regular(path, what, error=error, limit=limit)
    try:
        with open_regular(path) as handle:
            data = handle.read(limit + 1)
    except NotRegularFile as exc:
        raise error(f"{what} {show(path)} changed into {exc} while being opened: refused") from None
    except OSError as exc:
        raise error(
            f"cannot read {what} {show(path)}: {exc.strerror or exc}: check the file's permissions"
        ) from None
    if len(data) > limit:
        raise error(
            f"{what} {show(path)} grew past the limit of {limit:,} bytes while being read: refused"
        )
    return data


#: The memory budget where the system says nothing of its memory.
FALLBACK_BUDGET = 4 << 30


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _read_meminfo(key: str) -> int | None:
    return _proc_field("/proc/meminfo", key)


def _proc_field(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file, in bytes (read as bytes: no codec needed)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as the system says: the least of
    MemAvailable (or free pages), the cgroup's limit less its use, and the address-space
    limit (``ulimit -v``) less what the process maps already.  None when none is known."""
    known = []
    avail = _read_meminfo("MemAvailable")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    if avail is not None:
        known.append(avail)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            known.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            mapped = _proc_field("/proc/self/status", "VmSize") or 0
            known.append(max(soft - mapped, 0))
    except (ImportError, OSError, ValueError):
        pass
    return min(known) if known else None


def memory_budget(max_memory: int | None = None) -> int:
    """The memory budget in bytes: ``max_memory`` when given, else half of what
    :func:`available_memory` finds (4 GiB when it finds nothing).  Models and input
    batches that declare more are refused before anything is allocated."""
    if max_memory is not None:
        return int(max_memory)
    avail = available_memory()
    return FALLBACK_BUDGET if avail is None else avail // 2


def umask_mode(directory: bool = False) -> int:
    """The mode the process umask gives a new file (0644 under umask 022) or folder."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


# --------------------------------------------------------------------------- signals
#
# A signal ends a run in two layers (README "Supported and refused": signals):
# * in the process that does the work, SIGINT/SIGTERM/SIGHUP raise Interrupted in the
#   main thread (held while a report set is swapped in), so ``finally`` blocks remove
#   what the run made and the CLI prints one line;
# * the command's entry point (``onnx_sp2ps.__main__``) forks that process and supervises
#   it: when the worker has not ended within GRACE_SECONDS of a signal (it may be inside
#   one long C call that holds the interpreter: an import, the ONNX checker), the
#   supervisor kills it, removes the temporary files and folders the worker announced
#   through a pipe, prints the line and exits 128 + signal. The worker announces its
#   report-set swaps too, and the supervisor lets a swap finish first.

#: Signals that end a run with one line and exit code 128 + signal number.
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
#: How long the worker has to end by itself after a signal.
GRACE_SECONDS = 0.6
#: The environment variable naming the pipe to the supervisor (a file descriptor).
SUPERVISOR_FD = "ONNX_SP2PS_SUPERVISOR_FD"

_held: list[int] = []
_depth = 0
_interrupted = False
_signal: int | None = None  # the signal this run was interrupted by
_temporaries: dict[str, Callable[[], None]] = {}


def _tell_supervisor(message: bytes) -> None:
    fd = os.environ.get(SUPERVISOR_FD)
    if not fd:
        return
    try:
        os.write(int(fd), message + b"\n")
    except (OSError, ValueError):
        pass


def track_temporary(path: str | os.PathLike[str], remove: Callable[[], None]) -> None:
    """Announce a temporary file or folder that a killed run must not leave behind."""
    key = os.fsencode(os.path.abspath(path))
    _temporaries[key.hex()] = remove
    _tell_supervisor(b"+" + key.hex().encode())


def untrack_temporary(path: str | os.PathLike[str]) -> None:
    key = os.fsencode(os.path.abspath(path)).hex()
    if _temporaries.pop(key, None) is not None:
        _tell_supervisor(b"-" + key.encode())


def announce_ending() -> None:
    """Tell the supervisor that this run is ending by itself and prints its own line."""
    _tell_supervisor(b"!")


def interrupt(signum: int) -> None:
    """What the signal handlers call: raise :class:`Interrupted` now, or when the current
    :func:`uninterruptible` block ends; later signals of the same run are ignored (the
    first one's clean-up must not be cut short)."""
    global _interrupted, _signal
    if _interrupted:
        return
    if _depth:
        _held.append(signum)
        return
    _interrupted, _signal = True, signum
    raise Interrupted(signum)


def signal_received() -> int | None:
    """The signal this run was interrupted by, if one was: whatever fails after it
    (an import it cut short, a file half written) is the interruption's doing."""
    return _signal


@contextmanager
def uninterruptible() -> Iterator[None]:
    """Hold signals (delivered through :func:`interrupt`) until the block ends; the
    supervisor waits for it too."""
    global _depth, _interrupted, _signal
    _depth += 1
    if _depth == 1:
        _tell_supervisor(b"[")
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            _tell_supervisor(b"]")
            if _held and not _interrupted:
                signum = _held[0]
                _held.clear()
                _interrupted, _signal = True, signum
                raise Interrupted(signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    interrupt(signum)


def install_signal_handlers() -> Callable[[], None]:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread;
    returns the function that restores the previous handlers. Only the command line
    calls this: a library leaves the host's signals alone."""
    import signal

    global _interrupted, _signal
    _interrupted, _signal = False, None
    _held.clear()
    previous = {}
    for name in SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread
            break

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore

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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from onnx_sp2ps.errors import InputError, Interrupted

__all__ = ["MAX_TEXT_BYTES", "check_regular", "read_bounded", "show", "umask_mode",
           "interrupt", "uninterruptible", "install_signal_handlers", "SIGNALS",
           "on_interrupt", "claim_exit"]

#: Largest settings, class-names or report file read (16 MiB of text is far beyond any
#: real one; larger is a mistake or an attack).
MAX_TEXT_BYTES = 16 << 20

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"))


def show(path: object) -> str:
    """``path`` as one printable line: bytes that are not UTF-8 (kept by Python as
    surrogate escapes) as ``\\xNN``, control characters (newlines included) as escapes."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def check_regular(path: str | os.PathLike[str], what: str, *,
                  error: type[InputError] = InputError,
                  limit: int | None = None) -> os.stat_result:
    """The ``os.stat`` of ``path`` (links followed) when it is a regular file of at most
    ``limit`` bytes; else ``error`` with one line naming the path and its kind. Nothing
    is opened."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} not found: {show(p)} (check the path)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {show(p)}: {exc.strerror or exc}: check the path "
                    "and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise error(f"{what} {show(p)} is {kind}, not a regular file: refused (only plain "
                    "files are read)")
    if limit is not None and st.st_size > limit:
        raise error(f"{what} {show(p)} is {st.st_size:,} bytes, over the limit of "
                    f"{limit:,}: refused")
    return st


def read_bounded(path: str | os.PathLike[str], what: str, *,
                 limit: int | None = None,
                 error: type[InputError] = InputError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. The file is opened without
    blocking (a FIFO swapped in after the check cannot hang the read) and at most
    ``limit + 1`` bytes are read, whatever size it claims (default limit:
    :data:`MAX_TEXT_BYTES`)."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    check_regular(path, what, error=error, limit=limit)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise error(f"{what} {show(path)} changed into a special file: refused")
            data = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {show(path)}: {exc.strerror or exc}: check the "
                    "file's permissions") from None
    if len(data) > limit:
        raise error(f"{what} {show(path)} grew past the limit of {limit:,} bytes while "
                    "being read: refused")
    return data


def umask_mode(directory: bool = False) -> int:
    """The mode the process umask gives a new file (0644 under umask 022) or folder."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


# Signals held while a few renames swap a report set in (see report.ReportSet.commit).
_held: list[int] = []
_depth = 0


def interrupt(signum: int) -> None:
    """What the CLI's signal handlers call: raise :class:`Interrupted` now, or when the
    current :func:`uninterruptible` block ends."""
    if _depth:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """Hold signals (delivered through :func:`interrupt`) until the block ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _held:
            signum = _held[0]
            _held.clear()
            raise Interrupted(signum)


#: Signals that end a run with one line and exit code 128 + signal number.
SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


#: How long the main thread has to act on a signal before the watchdog ends the process
#: itself (the main thread may be inside one long C call: an import, onnxruntime).
GRACE_SECONDS = 0.5
_cleanups: dict[int, Callable[[], None]] = {}
_exit_lock = threading.Lock()
_exiting = False


def _on_signal(signum, frame) -> None:
    interrupt(signum)


def on_interrupt(key: int, cleanup: Callable[[], None] | None) -> None:
    """Register (or with None, drop) what the watchdog must undo before it ends the
    process: a staging folder to remove."""
    if cleanup is None:
        _cleanups.pop(key, None)
    else:
        _cleanups[key] = cleanup


def claim_exit() -> bool:
    """True for the first caller only: the main thread or the watchdog, whichever ends
    the run, prints the one line."""
    global _exiting
    with _exit_lock:
        if _exiting:
            return False
        _exiting = True
        return True


def _watchdog(read_fd: int, signums: set[int]) -> None:
    """Ends the process when the main thread has not acted on a signal within
    :data:`GRACE_SECONDS`; waits for a report set's swap to finish first."""
    import time

    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        hits = [b for b in data if b in signums]
        if not hits:
            continue
        time.sleep(GRACE_SECONDS)
        while _depth:  # a swap in progress finishes first (a few renames)
            time.sleep(0.01)
        if not claim_exit():
            continue
        for cleanup in list(_cleanups.values()):
            try:
                cleanup()
            except Exception:
                pass
        error = Interrupted(hits[0])
        try:
            os.write(2, (error.message + "\n").encode())
        finally:
            os._exit(error.exit_code)


def install_signal_handlers() -> Callable[[], None]:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread
    (held inside :func:`uninterruptible`), with a watchdog thread that ends the process
    within :data:`GRACE_SECONDS` when the main thread is stuck in a C call. Returns the
    function that restores the previous state. Only the command line calls this: a
    library leaves the host's signals alone."""
    import signal

    global _exiting
    _exiting = False
    previous = {}
    for name in SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread: nothing to restore, no watchdog
            return lambda: None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read_fd, set(previous)), daemon=True,
                     name="onnx-sp2ps-signals").start()

    def restore() -> None:
        signal.set_wakeup_fd(old_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_fd)  # the watchdog reads end-of-file and stops

    return restore

"""``python -m onnx_sp2ps`` and the ``onnx-sp2ps`` command: a supervisor and a worker.

The process forks at once, before anything heavy is imported: the child (the worker)
runs the command line; the parent (the supervisor) only waits for it, passes its exit
code on, and makes the README's promises hold when the worker cannot keep them itself:

* a signal (SIGINT, SIGTERM, SIGHUP) is passed to the worker, which normally ends within
  a fraction of a second with its own line; when it has not ended after
  :data:`onnx_sp2ps.files.GRACE_SECONDS` (it is inside one long C call that holds the
  interpreter: an import, the ONNX checker), the supervisor lets a report-set swap in
  progress finish, kills the worker, removes the temporary files and folders it
  announced, prints the one line and exits 128 + signal;
* a worker that dies by a signal of its own (a crash in a native library) becomes exit 4
  with one line, and one killed outright (SIGKILL, e.g. by the out-of-memory killer)
  exit 137 with one line, after the same clean-up.

Where ``os.fork`` does not exist (Windows) the command runs in this process.
"""

import os
import sys

_SWAP_LIMIT = 10.0  # seconds a report-set swap (a few renames) may take at most


def main() -> None:
    if not hasattr(os, "fork") or os.environ.get("ONNX_SP2PS_NO_SUPERVISOR"):
        _run_here()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        from onnx_sp2ps.files import SUPERVISOR_FD

        os.environ[SUPERVISOR_FD] = str(write_fd)
        _run_here()
    os.close(write_fd)
    _supervise(pid, read_fd)


def _run_here() -> None:
    from onnx_sp2ps.errors import Interrupted
    from onnx_sp2ps.files import announce_ending, install_signal_handlers

    install_signal_handlers()
    try:
        from onnx_sp2ps.cli import main as run
    except Interrupted as exc:  # during the imports: nothing was read or written yet
        announce_ending()
        sys.stderr.write(exc.message + "\n")
        sys.stderr.flush()
        os._exit(exc.exit_code)
    run()


def _supervise(pid: int, read_fd: int) -> None:
    import select
    import signal
    import time

    from onnx_sp2ps.files import GRACE_SECONDS, SIGNALS

    received: list[int] = []

    def remember(signum: int, frame: object) -> None:
        received.append(signum)

    for name in SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), remember)
    temporaries: set[str] = set()
    swapping = ending = False
    buffer = b""
    deadline = None
    forwarded = 0
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        ready = select.select([read_fd], [], [], 0.02)[0] if read_fd >= 0 else []
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                os.close(read_fd)
                read_fd = -1
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                kind, body = line[:1], line[1:].decode("ascii", "replace")
                if kind == b"+":
                    temporaries.add(body)
                elif kind == b"-":
                    temporaries.discard(body)
                elif kind in (b"[", b"]"):
                    swapping = kind == b"["
                elif kind == b"!":
                    ending = True
        if done == pid:
            break
        while forwarded < len(received):
            try:
                os.kill(pid, received[forwarded])
            except ProcessLookupError:
                pass
            forwarded += 1
            if deadline is None:
                deadline = time.monotonic() + GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            if (swapping or ending) and time.monotonic() < deadline + _SWAP_LIMIT:
                continue  # a swap finishes first; a worker that printed its line ends
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            _clean(temporaries)
            if ending:
                os._exit(128 + received[0])
            from onnx_sp2ps.errors import Interrupted

            _exit(Interrupted(received[0]).message, 128 + received[0])
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    _clean(temporaries)
    signum = -code
    name = (
        signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
    )
    if received:
        from onnx_sp2ps.errors import Interrupted

        _exit(Interrupted(received[0]).message, 128 + received[0])
    if signum == signal.SIGKILL:
        _exit(
            f"error: the run was killed ({name}), perhaps by the out-of-memory killer: "
            "lower --batch-size or --max-memory, or use a machine with more memory",
            137,
        )
    _exit(
        f"internal error: the run crashed with {name} inside a native library (run with "
        "--debug for details, and please report it)",
        4,
    )


def _clean(temporaries: set[str]) -> None:
    import shutil

    for hexed in temporaries:
        path = os.fsdecode(bytes.fromhex(hexed))
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _exit(message: str, code: int) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()

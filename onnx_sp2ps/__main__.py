"""``python -m onnx_sp2ps`` and the ``onnx-sp2ps`` command.

Signal handlers are installed before the command line (and numpy, onnx, onnxruntime)
is imported, so that a signal at any moment after start-up ends the run with one line
and exit code 128 + signal.
"""

import os
import sys

from onnx_sp2ps.errors import Interrupted
from onnx_sp2ps.files import claim_exit, install_signal_handlers


def main() -> None:
    install_signal_handlers()
    try:
        from onnx_sp2ps.cli import main as run
    except Interrupted as exc:  # during the imports: nothing was read or written yet
        if claim_exit():
            sys.stderr.write(exc.message + "\n")
            sys.stderr.flush()
        os._exit(exc.exit_code)
    run()


if __name__ == "__main__":  # pragma: no cover
    main()

"""Exception types of onnx-sp2ps.

The library raises these; only :mod:`onnx_sp2ps.cli` turns them into messages and
exit codes.  Every message is one line that says what is wrong and what to do.

Exit codes used by the CLI (README, "Refused, with one line on stderr"):

* :class:`InputError` and subclasses -> 3 (the input is not usable)
* :class:`UsageError` -> 2 (the call itself is wrong)
* anything else -> 4 (internal error, a bug)
"""

from __future__ import annotations

__all__ = [
    "Sp2psError",
    "UsageError",
    "InputError",
    "ModelError",
    "DetectionError",
    "DataError",
    "MismatchError",
    "NonFiniteError",
    "ReportError",
    "Interrupted",
]


class Sp2psError(Exception):
    """Base class of every error onnx-sp2ps raises on purpose."""


class UsageError(Sp2psError):
    """Options that contradict each other or cannot apply (exit code 2)."""


class InputError(Sp2psError):
    """An input (model, images, report, output folder) is not usable (exit code 3)."""


class ModelError(InputError):
    """A model file is missing, unreadable, not ONNX, invalid or not runnable."""


class DetectionError(ModelError):
    """The feature map, the logits or the image input cannot be determined."""


class DataError(InputError):
    """Images or arrays are missing, unreadable or of the wrong shape or type."""


class MismatchError(InputError):
    """The original and a candidate disagree (input shape, layout, class count)."""


class NonFiniteError(InputError):
    """Every image gave non-finite logits or maps, so nothing can be scored."""


class ReportError(InputError):
    """A saved report cannot be read, or an output location cannot be written."""


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) ended the run; exit code 128 + ``signum``.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` keeps the
    run going; ``finally`` blocks still remove temporary files on the way out.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    @property
    def message(self) -> str:
        import signal

        name = signal.Signals(self.signum).name
        shown = {"SIGINT": "Ctrl-C"}.get(name, name)
        return (
            f"interrupted ({shown}): the run stopped before the end; the output folder "
            "holds its previous files and no temporary file was kept; run the command "
            "again for complete results"
        )

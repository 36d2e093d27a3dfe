"""Which class each map explains (README, "Commands": ``--target``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from onnx_sp2ps.errors import DataError, UsageError

__all__ = ["AUDIT_TARGETS", "select_targets", "parse_target", "top1"]

#: Choices of ``--target`` for audits.
AUDIT_TARGETS = ("original", "label", "own")

#: Logits ``(N, K)`` as the models give them, and class indices ``(N,)``.
Logits = npt.NDArray[np.floating[Any]]
Classes = npt.NDArray[np.int64]


def parse_target(text: str, *, allow_original: bool = True) -> str | int:
    """``original``/``label``/``own`` or a class index (single-model commands)."""
    text = str(text).strip()
    if text in AUDIT_TARGETS and (allow_original or text != "original"):
        return text
    try:
        index = int(text)
    except ValueError:
        choices = AUDIT_TARGETS if allow_original else ("own", "label")
        raise UsageError(
            f"--target must be one of {', '.join(choices)} or a class index, not {text!r}"
        ) from None
    if allow_original:
        raise UsageError("--target for audits is original, label or own")
    if index < 0:
        raise UsageError(f"--target class index must be >= 0, not {index}")
    return index


def top1(logits: Logits) -> Classes:
    """Each row's top-1 class ``(N,)`` int64; NaN logits never win."""
    best: npt.NDArray[np.intp] = np.argmax(np.nan_to_num(logits, nan=-np.inf), axis=1)
    return best.astype(np.int64)


def select_targets(
    target: str | int,
    *,
    logits: Logits,
    labels: npt.NDArray[np.integer[Any]] | None = None,
    reference_logits: Logits | None = None,
) -> Classes:
    """Target class per image, ``(N,)`` int64.

    Parameters
    ----------
    target
        ``"own"``: each model's own top-1 (``logits``); ``"original"``: the top-1 of
        ``reference_logits`` (the original model's), so both maps explain the same
        decision; ``"label"``: the ground truth; an int: that class for every image.
    """
    n, k = logits.shape
    if target == "own":
        return top1(logits)
    if target == "original":
        if reference_logits is None:
            raise UsageError("target 'original' needs the original model's logits")
        return top1(reference_logits)
    if target == "label":
        if labels is None:
            raise DataError(
                "--target label needs labels: put images in class folders "
                "(or pass labels in the .npz)"
            )
        classes = np.asarray(labels, dtype=np.int64)
        if (classes < 0).any():
            raise DataError(f"--target label: {(classes < 0).sum()} image(s) have no label")
        if (classes >= k).any():
            raise DataError(f"--target label: a label is >= the model's {k} classes")
        return classes
    if isinstance(target, (int, np.integer)):
        if not 0 <= int(target) < k:
            raise UsageError(f"--target {target} is not a class of a model with {k} classes")
        return np.full(n, int(target), dtype=np.int64)
    raise UsageError(f"unknown target {target!r}")

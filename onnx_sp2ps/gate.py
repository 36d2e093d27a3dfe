"""The release gate: criteria, one check per candidate and criterion, the verdict.

The one place that decides pass or fail (README "In release scripts"). ``audit`` checks
a fresh report once and every writer (table, JSON, JUnit, Markdown, HTML) shows those
checks; ``gate`` checks a saved report. A missing or non-finite figure fails its
criterion, and a report without candidates fails the gate (Polygraphy's rule).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GateCriteria",
    "GateCheck",
    "check_report",
    "apply_gate",
    "gate_lines",
    "finite_or_none",
]


def finite_or_none(x: object) -> float | None:
    """A JSON-safe float: None for anything missing, non-numeric or non-finite (in
    results and in reports read back from disk alike)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return None
    value = float(x)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class GateCriteria:
    """Thresholds a release gate checks; every one given must pass for every candidate.

    ``fail_under``: Sp2PS mean >= X; ``fail_under_p5``: its 5th percentile >= X;
    ``min_agreement``: top-1 agreement with the original >= X; ``max_accuracy_drop``:
    original accuracy minus candidate accuracy <= X (absolute; needs labels).
    """

    fail_under: float | None = None
    fail_under_p5: float | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in self.to_dict().values())

    def to_dict(self) -> dict[str, float | None]:
        return {
            "fail_under": self.fail_under,
            "fail_under_p5": self.fail_under_p5,
            "min_agreement": self.min_agreement,
            "max_accuracy_drop": self.max_accuracy_drop,
        }


@dataclass(frozen=True)
class GateCheck:
    """One candidate (its position among the candidates, and display name) against one
    criterion."""

    index: int
    candidate: str
    criterion: str
    value: float | None
    op: str
    threshold: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "value": finite_or_none(self.value),
            "op": self.op,
            "threshold": self.threshold,
            "passed": self.passed,
        }


def _accuracy_drop(report: dict[str, Any], cand: dict[str, Any]) -> float | None:
    original = finite_or_none((report.get("original") or {}).get("accuracy"))
    candidate = finite_or_none(cand.get("accuracy"))
    if original is None or candidate is None:
        return None
    return original - candidate


def check_report(report: dict[str, Any], criteria: GateCriteria) -> list[GateCheck]:
    """Every criterion for every candidate of a report dict; a missing or non-finite
    figure fails its criterion.  With no candidate at all, the gate fails."""
    # (criterion, threshold or None when not checked, op, the candidate's figure)
    table: list[tuple[str, float | None, str, Callable[[dict[str, Any]], object]]] = [
        ("sp2ps mean", criteria.fail_under, ">=", lambda c: (c.get("sp2ps") or {}).get("mean")),
        ("sp2ps p5", criteria.fail_under_p5, ">=", lambda c: (c.get("sp2ps") or {}).get("p5")),
        ("agreement", criteria.min_agreement, ">=", lambda c: c.get("agreement")),
        ("accuracy drop", criteria.max_accuracy_drop, "<=", lambda c: _accuracy_drop(report, c)),
    ]
    checks: list[GateCheck] = []
    candidates = report.get("candidates") or [{}]
    for index, cand in enumerate(candidates):
        name = (cand.get("model") or {}).get("name") or "(no candidate)"
        for label, threshold, op, get in table:
            if threshold is None:
                continue
            value = finite_or_none(get(cand)) if cand else None
            ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
            checks.append(GateCheck(index, name, label, value, op, float(threshold), bool(ok)))
    return checks


def gate_lines(checks: list[GateCheck]) -> list[str]:
    """One line per check, then the verdict: ``PASSED | ...`` or ``FAILED | ...``, with
    values and thresholds printed to six decimals."""
    lines = []
    for c in checks:
        value = "missing" if c.value is None else f"{c.value:.6f}"
        lines.append(
            f"  {'ok  ' if c.passed else 'FAIL'} {c.candidate}: {c.criterion} "
            f"{value} (must be {c.op} {c.threshold:.6f})"
        )
    failed = [c for c in checks if not c.passed]
    names = {c.index for c in checks}
    if failed:
        worst = "; ".join(
            f"{c.candidate} {c.criterion} "
            f"{'missing' if c.value is None else f'{c.value:.6f}'} {c.op} {c.threshold:.6f} fails"
            for c in failed
        )
        lines.append(
            f"FAILED | {len(failed)} of {len(checks)} checks on {len(names)} candidate(s) | {worst}"
        )
    else:
        lines.append(
            f"PASSED | {len(checks)} checks on {len(names)} candidate(s) | "
            + "; ".join(f"{c.candidate} {c.criterion} {c.value:.6f}" for c in checks)
        )
    return lines


def apply_gate(report: dict[str, Any], criteria: GateCriteria) -> list[GateCheck]:
    """Check ``criteria`` and record them in the report dict (``gate`` per candidate,
    ``passed`` and ``gate_criteria`` at the top level)."""
    checks = check_report(report, criteria)
    for index, cand in enumerate(report.get("candidates", [])):
        mine = [c for c in checks if c.index == index]
        cand["gate"] = {
            "passed": all(c.passed for c in mine),
            "checks": [c.to_dict() for c in mine],
        }
    report["gate_criteria"] = criteria.to_dict()
    report["passed"] = bool(checks) and all(c.passed for c in checks)
    return checks

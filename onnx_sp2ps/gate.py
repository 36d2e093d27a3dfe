"""The release gate: criteria, one check per candidate and criterion, the verdict.

The one place that decides pass or fail (README "In release scripts"). ``audit`` checks
a fresh report once and every writer (table, JSON, JUnit, Markdown, HTML) shows those
checks; ``gate`` checks a saved report. A missing or non-finite figure fails its
criterion, and a report without candidates fails the gate (Polygraphy's rule).

Gates that know their sample size (README, "Intervals"): with ``gate_on="lower"`` the
Sp2PS mean and 5th-percentile criteria compare the lower end of their confidence
interval, so a candidate passes only when the data show it is above the threshold at that
confidence; ``max_ci_width`` fails a candidate whose interval of the mean is wider than
the sample can decide with.  Both need a report with intervals (``sp2ps.ci``): a report
without them is a :class:`~onnx_sp2ps.errors.ReportError`, not a failed gate.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onnx_sp2ps.errors import ReportError, UsageError

__all__ = [
    "GateCriteria",
    "GateCheck",
    "check_report",
    "apply_gate",
    "gate_lines",
    "finite_or_none",
    "GATE_ON",
]

#: Choices of ``--gate-on``: the point estimate, or the lower end of its interval.
GATE_ON = ("mean", "lower")


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
    original accuracy minus candidate accuracy <= X (absolute; needs labels);
    ``max_ci_width``: the width of the interval of the Sp2PS mean <= X.  ``gate_on``:
    ``mean`` compares ``fail_under`` and ``fail_under_p5`` with the figures themselves,
    ``lower`` with the lower ends of their intervals (module docstring).
    """

    fail_under: float | None = None
    fail_under_p5: float | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    gate_on: str = "mean"
    max_ci_width: float | None = None

    def __post_init__(self) -> None:
        if self.gate_on not in GATE_ON:
            raise UsageError(f"gate_on must be one of {', '.join(GATE_ON)}; got {self.gate_on!r}")

    def thresholds(self) -> dict[str, float | None]:
        """The criteria with a threshold (None: not checked)."""
        return {
            "fail_under": self.fail_under,
            "fail_under_p5": self.fail_under_p5,
            "min_agreement": self.min_agreement,
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_ci_width": self.max_ci_width,
        }

    def any(self) -> bool:
        return any(v is not None for v in self.thresholds().values())

    def needs_intervals(self) -> bool:
        """Whether checking needs the report's intervals."""
        lower = self.gate_on == "lower" and (
            self.fail_under is not None or self.fail_under_p5 is not None
        )
        return lower or self.max_ci_width is not None

    def to_dict(self) -> dict[str, Any]:
        return {**self.thresholds(), "gate_on": self.gate_on}


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
    #: The figure's confidence interval, when the report has one (shown beside it).
    interval: tuple[float | None, float | None] | None = None
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "value": finite_or_none(self.value),
            "op": self.op,
            "threshold": self.threshold,
            "passed": self.passed,
            "interval": None if self.interval is None else list(self.interval),
        }

    def describe(self) -> str:
        """``criterion value`` (``missing`` for none), with the interval when known."""
        text = f"{self.criterion} {'missing' if self.value is None else f'{self.value:.6f}'}"
        if self.interval is not None:
            low, high = ("missing" if v is None else f"{v:.6f}" for v in self.interval)
            level = "" if self.confidence is None else f"{self.confidence:.0%} "
            text += f" ({level}interval [{low}, {high}])"
        return text


def _interval(cand: dict[str, Any], key: str) -> tuple[float | None, float | None] | None:
    """A candidate's ``sp2ps.ci[key]`` as (low, high), None when the report has none."""
    ci = (cand.get("sp2ps") or {}).get("ci")
    pair = ci.get(key) if isinstance(ci, dict) else None
    if not isinstance(pair, list) or len(pair) != 2:
        return None
    return finite_or_none(pair[0]), finite_or_none(pair[1])


def _width(pair: tuple[float | None, float | None] | None) -> float | None:
    if pair is None or pair[0] is None or pair[1] is None:
        return None
    return pair[1] - pair[0]


def _confidence(cand: dict[str, Any]) -> float | None:
    ci = (cand.get("sp2ps") or {}).get("ci")
    return finite_or_none(ci.get("confidence")) if isinstance(ci, dict) else None


def _accuracy_drop(report: dict[str, Any], cand: dict[str, Any]) -> float | None:
    original = finite_or_none((report.get("original") or {}).get("accuracy"))
    candidate = finite_or_none(cand.get("accuracy"))
    if original is None or candidate is None:
        return None
    return original - candidate


def check_report(report: dict[str, Any], criteria: GateCriteria) -> list[GateCheck]:
    """Every criterion for every candidate of a report dict; a missing or non-finite
    figure fails its criterion.  With no candidate at all, the gate fails.

    Raises
    ------
    ReportError
        The criteria need intervals (``gate_on="lower"``, ``max_ci_width``) and a
        candidate of the report has none (a report of an earlier version).
    """
    candidates = report.get("candidates") or [{}]
    if criteria.needs_intervals():
        for cand in candidates:
            if cand and not isinstance((cand.get("sp2ps") or {}).get("ci"), dict):
                name = (cand.get("model") or {}).get("name")
                raise ReportError(
                    f"the report has no confidence intervals (candidate {name}: no sp2ps.ci; "
                    "it was written before onnx-sp2ps had them): --gate-on lower and "
                    "--max-ci-width need them: re-run the audit with this version"
                )
    lower = criteria.gate_on == "lower"
    bound = " lower bound" if lower else ""
    Getter = Callable[[dict[str, Any]], object]
    # (criterion, threshold or None when not checked, op, the figure, its interval key)
    table: list[tuple[str, float | None, str, Getter, str | None]] = [
        (
            f"sp2ps mean{bound}",
            criteria.fail_under,
            ">=",
            (lambda c: (_interval(c, "mean") or (None,))[0])
            if lower
            else (lambda c: (c.get("sp2ps") or {}).get("mean")),
            "mean",
        ),
        (
            f"sp2ps p5{bound}",
            criteria.fail_under_p5,
            ">=",
            (lambda c: (_interval(c, "p5") or (None,))[0])
            if lower
            else (lambda c: (c.get("sp2ps") or {}).get("p5")),
            "p5",
        ),
        ("agreement", criteria.min_agreement, ">=", lambda c: c.get("agreement"), None),
        (
            "accuracy drop",
            criteria.max_accuracy_drop,
            "<=",
            lambda c: _accuracy_drop(report, c),
            None,
        ),
        (
            "sp2ps mean interval width",
            criteria.max_ci_width,
            "<=",
            lambda c: _width(_interval(c, "mean")),
            "mean",
        ),
    ]
    checks: list[GateCheck] = []
    for index, cand in enumerate(candidates):
        name = (cand.get("model") or {}).get("name") or "(no candidate)"
        for label, threshold, op, get, key in table:
            if threshold is None:
                continue
            value = finite_or_none(get(cand)) if cand else None
            ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
            interval = _interval(cand, key) if (cand and key) else None
            confidence = _confidence(cand) if interval is not None else None
            checks.append(
                GateCheck(
                    index, name, label, value, op, float(threshold), bool(ok), interval, confidence
                )
            )
    return checks


def gate_lines(checks: list[GateCheck]) -> list[str]:
    """One line per check, then the verdict: ``PASSED | ...`` or ``FAILED | ...``, with
    values and thresholds printed to six decimals."""
    lines = []
    for c in checks:
        lines.append(
            f"  {'ok  ' if c.passed else 'FAIL'} {c.candidate}: {c.describe()} "
            f"(must be {c.op} {c.threshold:.6f})"
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

"""Gate criteria on report dicts and the `gate` command on saved reports."""

from __future__ import annotations

import json
import math

import pytest

from onnx_sp2ps.gate import GateCriteria, apply_gate, check_report, gate_lines

from conftest import run_cli as run


def report(mean=0.9, p5=0.7, agreement=0.95, acc_orig=0.9, acc_cand=0.85, name="cand.onnx"):
    return {
        "schema_version": 1,
        "tool": "onnx-sp2ps",
        "original": {"accuracy": acc_orig, "model": {"name": "orig.onnx"}},
        "candidates": [
            {
                "model": {"name": name},
                "sp2ps": {"mean": mean, "p5": p5},
                "agreement": agreement,
                "accuracy": acc_cand,
            }
        ],
    }


@pytest.mark.parametrize(
    "criteria,passes",
    [
        (GateCriteria(fail_under=0.9), True),
        (GateCriteria(fail_under=0.9000001), False),
        (GateCriteria(fail_under_p5=0.7), True),
        (GateCriteria(fail_under_p5=0.71), False),
        (GateCriteria(min_agreement=0.95), True),
        (GateCriteria(min_agreement=0.96), False),
        (GateCriteria(max_accuracy_drop=0.06), True),
        (GateCriteria(max_accuracy_drop=0.04), False),
        (GateCriteria(fail_under=0.5, min_agreement=0.99), False),
    ],
)
def test_each_criterion_passes_and_fails(criteria, passes):
    checks = check_report(report(), criteria)
    assert all(c.passed for c in checks) is passes
    assert len(checks) == sum(v is not None for v in criteria.thresholds().values())


@pytest.mark.parametrize("field", ["mean", "p5"])
@pytest.mark.parametrize("bad", [None, math.nan])
def test_missing_or_nan_figures_fail(field, bad):
    r = report()
    r["candidates"][0]["sp2ps"][field] = bad
    crit = GateCriteria(fail_under=0.0) if field == "mean" else GateCriteria(fail_under_p5=0.0)
    (check,) = check_report(r, crit)
    assert not check.passed and check.value is None
    assert "missing" in gate_lines([check])[0]


def test_accuracy_drop_without_labels_fails():
    (check,) = check_report(
        report(acc_orig=None, acc_cand=None), GateCriteria(max_accuracy_drop=1.0)
    )
    assert not check.passed


def test_a_report_without_candidates_fails():
    r = report()
    r["candidates"] = []
    checks = check_report(r, GateCriteria(fail_under=0.0))
    assert checks and not any(c.passed for c in checks)


def test_verdict_line_tells_value_from_threshold():
    checks = check_report(report(mean=0.8999996), GateCriteria(fail_under=0.9))
    last = gate_lines(checks)[-1]
    assert last.startswith("FAILED | ") and "0.900000" in last and "0.900000 fails" in last
    checks = check_report(report(mean=0.95), GateCriteria(fail_under=0.9))
    assert gate_lines(checks)[-1].startswith("PASSED | ")


def test_apply_gate_records_checks_in_the_report():
    r = report()
    apply_gate(r, GateCriteria(fail_under=0.5, min_agreement=0.99))
    assert r["passed"] is False
    assert r["gate_criteria"]["min_agreement"] == 0.99
    gate = r["candidates"][0]["gate"]
    assert gate["passed"] is False and len(gate["checks"]) == 2


@pytest.mark.parametrize(
    "option,value,code",
    [
        ("--fail-under", "0.85", 0),
        ("--fail-under", "0.95", 1),
        ("--fail-under-p5", "0.6", 0),
        ("--fail-under-p5", "0.8", 1),
        ("--min-agreement", "0.9", 0),
        ("--min-agreement", "0.99", 1),
        ("--max-accuracy-drop", "0.1", 0),
        ("--max-accuracy-drop", "0.01", 1),
    ],
)
def test_gate_command_checks_each_criterion(capsys, tmp_path, option, value, code):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report()))
    got, out, _ = run(capsys, "gate", path, option, value)
    assert got == code
    assert out.strip().splitlines()[-1].startswith("PASSED | " if code == 0 else "FAILED | ")


def test_gate_command_needs_a_criterion(capsys, tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report()))
    code, _, err = run(capsys, "gate", path)
    assert code == 2 and "criterion" in err
    code, _, err = run(capsys, "gate", path, "--min-agreement", "2")
    assert code == 2 and "between 0 and 1" in err

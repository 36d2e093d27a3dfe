"""Golden reports (docs/architecture.md, "Golden reports"): the audits of tests/golden.py
give the report.json, overlays and saved maps that the commit which reshaped the audit
into map, merge and summarise started from (tests/fixtures/golden/, written by
scripts/make_golden.py before that change).

On a machine with the golden files' fingerprint (CPU instruction sets and ONNX Runtime
version, which choose the kernels) everything must be bit-identical; elsewhere floats may
differ in their last bits, so they are compared to 1e-9 relative and hashes of maps are
skipped (their sums are compared instead)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import FIXTURES
from golden import CASES, fingerprint, run_case, split_added


def _compare(got, want, where: str, exact: bool) -> None:
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if exact:
            assert got == want, f"{where}: {got!r} != {want!r}"
        else:
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {got} vs {want}"
        return
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            if k == "sha256" and not exact:
                continue
            _compare(got[k], want[k], f"{where}.{k}", exact)
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}[{i}]", exact)
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_audit_reproduces_the_golden_report(name, tmp_path):
    want = json.loads((FIXTURES / "golden" / f"{name}.json").read_text())
    exact = want.pop("fingerprint") == fingerprint()
    got = run_case(name, tmp_path)
    # Options added since the golden files were written (e.g. --engine) appear in
    # setting_sources; left at their defaults they change nothing else.
    added = set(got["setting_sources"]) - set(want["setting_sources"])
    assert {got["setting_sources"].pop(k) for k in added} <= {"default"}
    # Fields added later (the intervals of issue 14) are compared with their own file,
    # written when they were added; every field the golden file had is compared with it.
    got, got_added = split_added(got)
    _compare(got, want, name, exact)
    want_added = json.loads((FIXTURES / "golden" / f"{name}.added.json").read_text())
    _compare(got_added, want_added, f"{name}.added", exact)


def test_the_comparison_notices_a_changed_last_bit():
    """The check above is strict: one ulp in one per-image score fails it on this machine."""
    want = json.loads((FIXTURES / "golden" / "gap_gradcam.json").read_text())
    got = json.loads(json.dumps(want))
    score = got["candidates"][0]["images"][0]["score"]
    got["candidates"][0]["images"][0]["score"] = math.nextafter(score, 2.0)
    with pytest.raises(AssertionError, match=r"images\[0\]\.score"):
        _compare(got, want, "gap_gradcam", exact=True)
    got["candidates"][0]["images"][0]["score"] = score * (1 + 1e-6)
    with pytest.raises(AssertionError, match=r"images\[0\]\.score"):
        _compare(got, want, "gap_gradcam", exact=False)

"""Confidence intervals and paired comparisons (onnx_sp2ps.intervals; README,
"Intervals"): exactness, determinism, the bootstrap shortcuts against plain resampling,
coverage on synthetic scores (a small, seeded version of
benchmarks/coverage_intervals.py), and the sample models."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from onnx_sp2ps import audit
from onnx_sp2ps.errors import UsageError
from onnx_sp2ps.intervals import (
    IntervalSettings,
    _percentile_jackknife,
    _percentile_replicates,
    audit_intervals,
    images_for_half_width,
    seed_key,
)

from conftest import run_cli as run

KEY = seed_key(np.arange(10))


def skewed(rng, n):
    return rng.beta(8.0, 2.0, n)


def test_fewer_than_two_images_or_equal_scores_give_the_point_and_say_so():
    one = audit_intervals([[0.4]], [0], key=KEY).candidates[0]
    assert one.method == "exact" and one.mean.low == one.mean.high == 0.4
    assert "fewer than 2 images" in one.to_dict()["note"]
    same = audit_intervals([np.full(30, 0.7)], np.arange(30) % 3, key=KEY).candidates[0]
    assert same.method == "exact" and "all 30 values are equal" in same.to_dict()["note"]
    for interval in (same.mean, same.class_balanced_mean, same.p5):
        assert interval.exact and interval.low == interval.high
    assert same.mean.low == float(np.full(30, 0.7).mean())  # the point, to the bit
    ones = audit_intervals([np.ones(50)], np.zeros(50, np.int64), key=KEY).candidates[0]
    assert ones.to_dict()["mean"] == [1.0, 1.0]


def test_same_inputs_same_intervals_bit_for_bit_and_the_key_decides():
    rng = np.random.default_rng(0)
    x, y = skewed(rng, 80), skewed(rng, 80)
    cls = rng.integers(0, 4, 80)
    a = audit_intervals([x, y], cls, key=KEY)
    b = audit_intervals([x, y], cls, key=KEY)
    assert a == b
    assert audit_intervals([x, y], cls, key=seed_key(np.arange(1, 11))) != a
    # A candidate's intervals do not depend on the other candidates audited with it.
    alone = audit_intervals([x], cls, key=KEY).candidates[0]
    assert alone == a.candidates[0]


def test_the_interval_holds_the_point_and_shrinks_as_one_over_root_n():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (100, 400, 1600):
        x = skewed(rng, n)
        ci = audit_intervals([x], np.zeros(n, np.int64), key=seed_key(np.arange(n)))
        c = ci.candidates[0]
        for interval, point in ((c.mean, x.mean()), (c.p5, np.percentile(x, 5))):
            assert interval.low <= point <= interval.high and 0 <= interval.low
        widths[n] = c.mean.width
    assert widths[100] / widths[400] == pytest.approx(2.0, rel=0.15)
    assert widths[400] / widths[1600] == pytest.approx(2.0, rel=0.15)


def test_percentile_replicates_match_plain_resampling():
    """The order-statistic shortcut draws the 5th percentile of a resample from its
    exact distribution: compare with resampling the images."""
    rng = np.random.default_rng(2)
    x = np.sort(skewed(rng, 57))
    shortcut = _percentile_replicates([x], 20000, np.random.default_rng(3))[0]
    rows = np.random.default_rng(4).integers(0, x.size, size=(20000, x.size))
    plain = np.percentile(x[rows], 5, axis=1)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert np.quantile(shortcut, q) == pytest.approx(np.quantile(plain, q), abs=0.01)
    assert shortcut.mean() == pytest.approx(plain.mean(), abs=0.003)


@pytest.mark.parametrize("n", [2, 3, 20, 21, 57])
def test_percentile_jackknife_matches_leaving_each_image_out(n):
    x = np.sort(np.random.default_rng(n).random(n))
    direct = [np.percentile(np.delete(x, i), 5) for i in range(n)]
    np.testing.assert_allclose(_percentile_jackknife(x), direct, rtol=0, atol=1e-15)


def test_class_balanced_interval_resamples_within_each_class():
    """Scores constant within each class: the stratified resamples all have the same
    class means, so the class-balanced interval is its point (while the mean's, which
    resamples across classes, is not)."""
    cls = np.repeat([0, 1, 2], 20)
    x = np.repeat([0.2, 0.6, 0.9], 20)
    c = audit_intervals([x], cls, key=KEY).candidates[0]
    assert c.class_balanced_mean.low == pytest.approx(c.class_balanced_mean.high, abs=1e-12)
    assert c.class_balanced_mean.low == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert c.mean.width > 0.05


def test_paired_comparison_sees_what_overlapping_intervals_hide():
    rng = np.random.default_rng(5)
    x = skewed(rng, 60)
    y = np.clip(x - 0.02 + rng.normal(0, 0.005, 60), 0, 1)  # the same images, a bit lower
    out = audit_intervals([x, y], np.zeros(60, np.int64), key=KEY)
    a, b = out.candidates
    assert a.mean.low < b.mean.high  # the two intervals overlap...
    (comp,) = out.comparisons
    assert comp.difference == pytest.approx(x.mean() - y.mean())
    assert comp.ci.low > 0 and comp.better == 0  # ...but the paired difference excludes 0
    assert out.comparison(1, 0).difference == -comp.difference
    assert out.comparison(1, 0).ci.high == -comp.ci.low
    shifted = audit_intervals([x, x - 0.01], np.zeros(60, np.int64), key=KEY).comparisons[0]
    assert shifted.ci.exact and shifted.ci.low == shifted.ci.high == shifted.difference
    assert shifted.better == 0
    same = audit_intervals([x, x.copy()], np.zeros(60, np.int64), key=KEY).comparisons[0]
    assert same.ci.to_list() == [0.0, 0.0] and same.better is None


def test_non_finite_scores_give_no_interval_as_they_give_no_mean():
    x = np.array([0.5, np.nan, 0.7, 0.8])
    c = audit_intervals([x], np.zeros(4, np.int64), key=KEY).candidates[0]
    assert c.to_dict()["mean"] == [None, None]


def test_bad_calls_are_usage_errors():
    with pytest.raises(UsageError):
        audit_intervals([[0.1, 0.2], [0.3]], [0, 0])
    with pytest.raises(UsageError):
        audit_intervals([[0.1, 0.2]], [0.5, 1.5])
    with pytest.raises(UsageError):
        IntervalSettings(confidence=1.0)
    with pytest.raises(UsageError):
        IntervalSettings(resamples=10)


def test_images_for_half_width_from_the_observed_variance():
    x = np.random.default_rng(6).beta(8, 2, 400)
    z = 1.959963984540054
    assert images_for_half_width(x, 0.01, 0.95) == math.ceil((z * x.std(ddof=1) / 0.01) ** 2)
    assert images_for_half_width([0.5], 0.01, 0.95) is None


def test_coverage_of_the_mean_on_skewed_bounded_scores():
    """A small version of benchmarks/coverage_intervals.py (README, "Intervals"):
    the 95 % interval of the mean of beta(8, 2) scores (mean 0.8) covers it in about
    95 % of seeded trials."""
    trials, n = 300, 100
    settings = IntervalSettings(resamples=1000)
    covered = 0
    for t in range(trials):
        x = np.random.default_rng([14, t]).beta(8.0, 2.0, n)
        ci = audit_intervals(
            [x], np.zeros(n, np.int64), settings=settings, key=bytes([t % 256, t // 256])
        )
        covered += ci.candidates[0].mean.low <= 0.8 <= ci.candidates[0].mean.high
    assert 0.91 <= covered / trials <= 0.985  # 3 binomial standard errors around 0.95


# --------------------------------------------------------------------------- sample models


@pytest.fixture(scope="module")
def sample_audits(tmp_path_factory):
    """The sample models on all 50 images and on 25 of them (every other one of each
    class)."""
    from conftest import SAMPLES

    half = tmp_path_factory.mktemp("half")
    files = sorted((SAMPLES / "images").rglob("*.png"))
    for f in files[::2]:
        (half / f.parent.name).mkdir(exist_ok=True)
        shutil.copy2(f, half / f.parent.name / f.name)
    models = [SAMPLES / m for m in ("gap_original.onnx", "gap_l1_30_ft.onnx", "gap_l1_60.onnx")]
    return {
        n: audit(SAMPLES / "gap_original.onnx", models, images)
        for n, images in ((50, SAMPLES / "images"), (25, half))
    }


def test_sample_models_intervals(sample_audits):
    full, half = sample_audits[50], sample_audits[25]
    assert len(full.indices) == 50 and len(half.indices) == 25
    copy = full.candidates[0].intervals
    assert copy is not None and copy.method == "exact" and copy.to_dict()["mean"] == [1.0, 1.0]
    ratios = []
    for a, b in zip(half.candidates[1:], full.candidates[1:]):
        assert a.intervals is not None and b.intervals is not None
        ratios.append(a.intervals.mean.width / b.intervals.mean.width)
    # about sqrt(2) = 1.41 from 25 to 50 images (the variances of two samples differ)
    assert 1.1 < float(np.mean(ratios)) < 1.8, ratios
    comp = [c for c in full.comparisons if (c.a, c.b) == (1, 2)][0]  # l1_30_ft vs l1_60
    assert comp.ci.low > 0 and comp.better == 1
    report = full.to_dict()
    entry = [c for c in report["comparisons"] if c["positions"] == [1, 2]][0]
    assert entry["better"] == entry["a"] and entry["a"].endswith("gap_l1_30_ft.onnx")
    ci = report["candidates"][1]["sp2ps"]["ci"]
    assert ci["method"] == "bca" and ci["confidence"] == 0.95 and ci["resamples"] == 2000
    assert ci["mean"][0] < report["candidates"][1]["sp2ps"]["mean"] < ci["mean"][1]


# --------------------------------------------------------------------------- CLI and gate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One audit's report set (two candidates), written by the CLI."""
    from conftest import SAMPLES

    out = tmp_path_factory.mktemp("ci") / "audit"
    args = [
        "audit",
        SAMPLES / "gap_original.onnx",
        SAMPLES / "gap_l1_30_ft.onnx",
        SAMPLES / "gap_l1_60_ft.onnx",
        "--images",
        SAMPLES / "images",
        "--out",
        out,
        "--worst",
        "1",
        "-q",
    ]
    from onnx_sp2ps.cli import main

    with pytest.raises(SystemExit):
        main([str(a) for a in args])
    return out


def test_gate_on_lower_compares_the_lower_end(capsys, saved):
    report = json.loads((saved / "report.json").read_text())
    cand = report["candidates"][0]  # gap_l1_30_ft
    mean, (low, high) = cand["sp2ps"]["mean"], cand["sp2ps"]["ci"]["mean"]
    between = f"{(low + mean) / 2:.6f}"  # above the lower end, below the mean

    def line(out):
        return [t for t in out.splitlines() if "gap_l1_30_ft" in t][0]

    _, out, _ = run(capsys, "gate", saved / "report.json", "--fail-under", between)
    assert line(out).startswith("  ok") and "(95% interval [" in line(out)
    code, out, _ = run(
        capsys, "gate", saved / "report.json", "--fail-under", between, "--gate-on", "lower"
    )
    assert code == 1
    assert line(out).startswith("  FAIL") and f"lower bound {low:.6f}" in line(out)
    assert f"[{low:.6f}, {high:.6f}]" in line(out)


def test_max_ci_width_fails_a_sample_too_small_to_decide(capsys, saved):
    report = json.loads((saved / "report.json").read_text())
    widths = [
        c["sp2ps"]["ci"]["mean"][1] - c["sp2ps"]["ci"]["mean"][0] for c in report["candidates"]
    ]
    code, out, _ = run(
        capsys, "gate", saved / "report.json", "--max-ci-width", f"{max(widths) + 1e-6:.6f}"
    )
    assert code == 0 and "interval width" in out
    code, out, _ = run(capsys, "gate", saved / "report.json", "--max-ci-width", "0.01")
    assert code == 1 and out.count("FAIL ") == 2 and "sp2ps mean interval width" in out


def test_reports_without_intervals_refuse_what_needs_them(capsys, saved, tmp_path):
    report = json.loads((saved / "report.json").read_text())
    for cand in report["candidates"]:
        del cand["sp2ps"]["ci"]  # as an earlier version wrote it
    report.pop("comparisons")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report))
    code, out, _ = run(capsys, "gate", old, "--fail-under", "0.5")
    assert code == 0  # the mean gate reads old reports as before
    for option in (["--fail-under", "0.5", "--gate-on", "lower"], ["--max-ci-width", "0.5"]):
        code, _, err = run(capsys, "gate", old, *option)
        assert code == 3 and "no confidence intervals" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "ci,problem",
    [
        ("bad", "is not an object"),
        ({"confidence": 1.5}, "confidence"),
        (
            {"confidence": 0.95, "mean": [0.9, 0.1], "class_balanced_mean": [0, 1], "p5": [0, 1]},
            "low end above",
        ),
        (
            {"confidence": 0.95, "mean": [0.1, "x"], "class_balanced_mean": [0, 1], "p5": [0, 1]},
            "not a number",
        ),
    ],
)
def test_damaged_intervals_in_a_saved_report_are_refused(capsys, saved, tmp_path, ci, problem):
    report = json.loads((saved / "report.json").read_text())
    report["candidates"][0]["sp2ps"]["ci"] = ci
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    code, _, err = run(capsys, "gate", bad, "--fail-under", "0.5")
    assert code == 3 and problem in err


def test_wide_interval_note_on_stderr_but_not_with_quiet(capsys, samples, tmp_path):
    args = ["audit", samples / "gap_original.onnx", samples / "gap_l1_60.onnx"]
    args += ["--images", samples / "images"]
    code, _, err = run(capsys, *args)
    note = [t for t in err.splitlines() if "would give ±0.01" in t]
    assert code == 0 and len(note) == 1 and "50 images" in note[0]
    code, _, err = run(capsys, *args, "-q", "--confidence", "0.9", "--resamples", "500")
    assert code == 0 and "would give" not in err


def test_table_html_and_markdown_show_intervals_ties_and_the_front(
    saved, capsys, samples, tmp_path
):
    report = json.loads((saved / "report.json").read_text())
    html = (saved / "report.html").read_text()
    assert "Size against attention" in html and "<polyline" in html and "Pareto front" in html
    assert "<script" not in html.lower()
    (comp,) = report["comparisons"]
    mark = "= next" if comp["better"] is None else "&gt; next"
    assert mark in html
    from onnx_sp2ps.report import format_table, summary_markdown

    table = format_table(report)
    half = (
        report["candidates"][0]["sp2ps"]["ci"]["mean"][1]
        - report["candidates"][0]["sp2ps"]["ci"]["mean"][0]
    ) / 2
    assert f"±{half:.4f}" in table and "vs next" in table
    md = summary_markdown(report, [])
    assert "Pareto front" in md and md.count("Pareto front") == 1
    assert "[" in md.split("gap_l1_30_ft.onnx")[1].splitlines()[0]

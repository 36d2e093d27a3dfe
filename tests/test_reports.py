"""report.html, samples.csv, JUnit XML, Markdown summary, overlays, config files and the
Python API, on small built models and generated images (one file name holds <script>)."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
import xmlschema
from onnx import numpy_helper
from PIL import Image

from onnx_sp2ps import AuditResult, GateCriteria, audit, compute_cams
from onnx_sp2ps.cli import main
from onnx_sp2ps.report import SAMPLE_COLUMNS

from conftest import FIXTURES
from conftest import run_cli as run
from onnx_builders import build_cnn

EVIL = '<script>alert("x")&amp;'


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    built = build_cnn(head="gap_gemm", final="Softmax", size=32, num_classes=3, seed=0)
    onnx.save(built.model, root / "orig.onnx")
    model = built.model
    rng = np.random.default_rng(1)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 4:
            noisy = a * (1 + 0.5 * rng.normal(size=a.shape))
            t.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), t.name))
    onnx.save(model, root / "cand.onnx")
    for c in range(3):
        folder = root / "images" / str(c)
        folder.mkdir(parents=True)
        for i in range(4):
            name = f"{EVIL}{i}.png" if (c, i) == (1, 2) else f"img{i}.png"
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
    return root


@pytest.fixture(scope="module")
def audited(workspace):
    out = workspace / "out"
    args = [
        "audit",
        workspace / "orig.onnx",
        workspace / "cand.onnx",
        workspace / "orig.onnx",
        "--images",
        workspace / "images",
        "--out",
        out,
        "--worst",
        "5",
        "--junit",
        out / "junit.xml",
        "--summary-md",
        out / "summary.md",
        "--fail-under",
        "0.9",
        "-q",
    ]
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    return out, info.value.code


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.text: list[str] = []
        self.imgs: list[str] = []
        self.headings: list[str] = []
        self._heading = False

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._heading = tag in ("h1", "h2", "h3")

    def handle_data(self, data):
        self.text.append(data)
        if self._heading:
            self.headings.append(data.strip())

    def handle_endtag(self, tag):
        self._heading = False


def test_html_report_has_its_parts(audited):
    out, code = audited
    assert code == 1  # the perturbed candidate is below 0.9
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert "Ranking" in page.headings and "Settings" in page.headings
    # The original listed again as a candidate is named apart from it.
    assert "cand.onnx" in page.headings and "orig.onnx (candidate 2)" in page.headings
    assert page.headings.count("Per-image Sp2PS") == 2
    # a histogram per candidate, an error bar per ranking row, the size-vs-score chart
    assert page.tags.get("svg") == 2 + 2 + 1 and page.tags.get("rect", 0) >= 40
    assert "Size against attention" in page.headings
    # 5 worst images per candidate, each: input, original's map, candidate's map
    assert len(page.imgs) == 2 * 5 * 3
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert "FAILED" in "".join(page.text)


def test_html_report_escapes_file_names_and_runs_no_script(audited):
    out, _ = audited
    html = (out / "report.html").read_text(encoding="utf-8")
    rows = json.loads((out / "report.json").read_text())["candidates"][0]["images"]
    assert any(EVIL in r["path"] for r in rows)
    assert "<script" not in html.lower()  # no script at all: not ours, not the file's
    assert "&lt;script&gt;alert(&quot;x&quot;)&amp;amp;" in html  # the name, escaped
    page = _Page()
    page.feed(html)
    assert any(EVIL in t for t in page.text)  # and read back as the original text
    external = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in external and "https://" not in external  # self-contained


def test_samples_csv_has_one_row_per_image_and_candidate(audited):
    out, _ = audited
    with open(out / "samples.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == SAMPLE_COLUMNS
    assert len(rows) == 2 * 12
    assert {r["candidate"] for r in rows} == {"cand.onnx", "orig.onnx (candidate 2)"}
    assert any(EVIL in r["path"] for r in rows)
    same = [float(r["score"]) for r in rows if r["candidate"] == "orig.onnx (candidate 2)"]
    assert same == pytest.approx([1.0] * 12)


def test_junit_xml_is_valid_and_reports_each_candidate_and_criterion(audited):
    out, _ = audited
    schema = xmlschema.XMLSchema(FIXTURES / "junit.xsd")
    schema.validate(out / "junit.xml")
    data = schema.to_dict(out / "junit.xml")
    suite = data["testsuite"][0]
    assert suite["@tests"] == 2 and suite["@failures"] == 1
    names = {case["@classname"]: case for case in suite["testcase"]}
    assert "failure" in names["onnx-sp2ps.cand.onnx"]
    assert "failure" not in names["onnx-sp2ps.orig.onnx (candidate 2)"]


def test_summary_markdown_lists_candidates_and_the_failure(audited):
    out, _ = audited
    text = (out / "summary.md").read_text()
    assert text.startswith("### onnx-sp2ps audit **FAILED**")
    assert "| `cand.onnx` |" in text and "**fail**" in text
    assert "sp2ps mean" in text and "0.900000" in text


def test_worst_overlays_are_written_for_each_model(audited):
    out, _ = audited
    assert len(list((out / "overlays" / "cand").rglob("*.png"))) == 5
    assert len(list((out / "overlays" / "orig").rglob("*.png"))) >= 5
    image = Image.open(next((out / "overlays" / "cand").rglob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"


def test_worst_overlays_of_array_rows_get_one_file_each(capsys, workspace, tmp_path):
    # Rows of an .npy are named "x.npy[i]": each overlay needs its own file.
    rng = np.random.default_rng(3)
    np.save(tmp_path / "x.npy", rng.random((6, 3, 32, 32), dtype=np.float32))
    code, _, _ = run(
        capsys,
        "audit",
        workspace / "orig.onnx",
        workspace / "cand.onnx",
        "--images",
        tmp_path / "x.npy",
        "--out",
        tmp_path / "out",
        "--worst",
        "4",
        "-q",
    )
    assert code == 0
    for model in ("orig", "cand"):
        names = sorted(p.name for p in (tmp_path / "out" / "overlays" / model).glob("*.png"))
        assert len(names) == 4 and all(n.startswith("x.npy[") for n in names)


def test_overlays_all_writes_every_image(capsys, workspace, tmp_path):
    code, _, _ = run(
        capsys,
        "audit",
        workspace / "orig.onnx",
        workspace / "cand.onnx",
        "--images",
        workspace / "images",
        "--out",
        tmp_path,
        "--overlays",
        "all",
        "-q",
    )
    assert code == 0
    assert len(list((tmp_path / "overlays" / "cand").rglob("*.png"))) == 12
    assert len(list((tmp_path / "overlays" / "orig").rglob("*.png"))) == 12


def test_config_file_and_pyproject_settings_with_command_line_winning(
    capsys, workspace, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.onnx-sp2ps]\nmethod = "eigencam"\nfail-under = 0.0\n'
    )
    config = tmp_path / "gate.toml"
    config.write_text("[tool.onnx-sp2ps]\nmin-agreement = 0.5\nbatch-size = 5\n")
    code, out, _ = run(
        capsys,
        "audit",
        workspace / "orig.onnx",
        workspace / "cand.onnx",
        "--images",
        workspace / "images",
        "--config",
        config,
        "--batch-size",
        "7",
        "--format",
        "json",
        "-q",
    )
    report = json.loads(out)
    assert report["settings"]["method"] == "eigencam"  # pyproject.toml
    assert report["settings"]["batch_size"] == 7  # command line beats gate.toml
    assert report["gate_criteria"]["min_agreement"] == 0.5  # gate.toml
    assert report["gate_criteria"]["fail_under"] == 0.0
    sources = report["setting_sources"]
    assert sources["method"] == "pyproject.toml + " + str(config)
    assert sources["batch-size"] == "command line"
    assert sources["threads"] == "default"
    assert code == 0


def test_unknown_config_keys_are_usage_errors(capsys, workspace, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("fail_undr = 0.5\n")
    code, _, err = run(
        capsys,
        "audit",
        workspace / "orig.onnx",
        workspace / "cand.onnx",
        "--images",
        workspace / "images",
        "--config",
        config,
    )
    assert code == 2 and "fail_undr" in err
    code, _, err = run(
        capsys,
        "audit",
        workspace / "orig.onnx",
        workspace / "cand.onnx",
        "--images",
        workspace / "images",
        "--config",
        tmp_path / "none.toml",
    )
    assert code == 3 and "not found" in err


def test_python_api_returns_typed_results(workspace):
    result = audit(workspace / "orig.onnx", [workspace / "cand.onnx"], workspace / "images")
    assert isinstance(result, AuditResult)
    records = result.records(0)
    assert len(records) == 12 and all(0 <= r.score <= 1 for r in records)
    assert np.mean([r.score for r in records]) == pytest.approx(result.candidates[0].summary.mean)
    data = json.loads(result.to_json(GateCriteria(fail_under=0.0)))
    assert data["passed"] is True and data["schema_version"] == 1
    maps, info, images = compute_cams(
        workspace / "orig.onnx", workspace / "images", method="gradcam++"
    )
    assert maps.maps.shape == (12, 32, 32) and info.gradient == "exact"
    assert Path(images.source).name == "images"

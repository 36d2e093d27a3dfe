"""An audit split into shards (``audit --shard K/N``) and merged (``merge``) writes what
one ``audit --out`` of the same inputs writes (README, "At scale"); the merge refuses
shards that do not make one whole audit, with exit 3 and one line naming them."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

#: Two candidates, 50 images in batches of 8 (7 batches): shards of 3, 1 and 9 (two
#: empty), a gate that fails for one candidate.
MODELS = ("gap_original.onnx", "gap_l1_30.onnx", "gap_l1_60.onnx")
COMMON = ("--batch-size", "8", "--worst", "4")
GATES = ("--fail-under", "0.5", "--min-agreement", "0.5")


def models(samples: Path, names=MODELS) -> list[Path]:
    return [samples / n for n in names]


@pytest.fixture(scope="module")
def work(samples, tmp_path_factory):
    """One audit of everything (with gates, JUnit and a Markdown summary), and shards
    of it for N = 3, 1 and 9."""
    root = tmp_path_factory.mktemp("shards")
    capsys = _Capture()
    one = root / "one"
    code, out, err = capsys.run(
        "audit",
        *models(samples),
        "--images",
        samples / "images",
        "--out",
        one,
        *COMMON,
        *GATES,
        "--junit",
        root / "one.xml",
        "--summary-md",
        root / "one.md",
    )
    assert code == 1, err  # gap_l1_60 fails the gate
    shards = {}
    for n in (3, 1, 9):
        for k in range(1, n + 1):
            folder = root / f"n{n}" / f"shard{k}"
            c, o, e = capsys.run(
                "audit",
                *models(samples),
                "--images",
                samples / "images",
                "--out",
                folder,
                "--shard",
                f"{k}/{n}",
                *COMMON,
            )
            assert c == 0, e
            assert f"shard {k}/{n}" in o
            shards[n, k] = folder
    return {"root": root, "one": one, "stdout": out, "shards": shards}


class _Capture:
    """run_cli for module-scoped fixtures (capsys is function-scoped)."""

    def run(self, *args):
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with pytest.raises(SystemExit) as info:
                from onnx_sp2ps.cli import main

                main([str(a) for a in args])
        return info.value.code, out.getvalue(), err.getvalue()


def _report(path: Path) -> dict:
    report = json.loads((path / "report.json").read_text())
    report.pop("shards", None)  # the field naming the shards
    return report


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _merge(capsys, work, folders, name, *extra):
    root = work["root"]
    out = root / name
    code, stdout, err = run_cli(
        capsys,
        "merge",
        *folders,
        "--out",
        out,
        *GATES,
        "--junit",
        root / f"{name}.xml",
        "--summary-md",
        root / f"{name}.md",
        *extra,
    )
    return code, stdout, err, out


def _junit(path: Path) -> str:
    """A JUnit file without its suite's timestamp (the time it was written)."""
    return re.sub(r'timestamp="[^"]*"', "", path.read_text())


def _assert_same_as_one_audit(work, code, stdout, out, name):
    root, one = work["root"], work["one"]
    assert code == 1  # the same gate verdict
    assert stdout == work["stdout"]  # the table and the gate lines
    assert _report(out) == _report(one)
    merged, single = _files(out), _files(one)
    assert sorted(merged) == sorted(single)
    for key in single:
        if key != "report.json":  # samples.csv, report.html (worst images), overlays
            assert merged[key] == single[key], key
    assert _junit(root / f"{name}.xml") == _junit(root / "one.xml")
    assert (root / f"{name}.md").read_bytes() == (root / "one.md").read_bytes()


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2), (2, 3, 1)])
def test_shards_merged_in_any_order_equal_one_audit(capsys, work, order):
    folders = [work["shards"][3, k] for k in order]
    name = "merged" + "".join(map(str, order))
    code, stdout, err, out = _merge(capsys, work, folders, name)
    _assert_same_as_one_audit(work, code, stdout, out, name)
    report = json.loads((out / "report.json").read_text())
    assert report["shards"]["count"] == 3
    assert "shard" not in report["setting_sources"]


@pytest.mark.parametrize("n", [1, 9])
def test_one_shard_and_more_shards_than_batches_equal_one_audit(capsys, work, n):
    folders = [work["shards"][n, k] for k in range(n, 0, -1)]
    if n == 9:  # 7 batches: two shards score nothing
        rows = [json.loads((f / "shard.json").read_text())["shard"]["rows"] for f in folders]
        assert rows.count(0) == 2 and sum(rows) == 50
    code, stdout, err, out = _merge(capsys, work, folders, f"merged_n{n}")
    _assert_same_as_one_audit(work, code, stdout, out, f"merged_n{n}")


def test_merge_with_fewer_worst_images_than_kept_and_the_images_moved(capsys, work, samples):
    """--worst below what the shards kept; images found by --images (a copy keeping
    modification times), the report still naming the source the shards read."""
    images = work["root"] / "moved_images"
    shutil.copytree(samples / "images", images)  # copy2: times kept
    folders = [work["shards"][3, k] for k in (1, 2, 3)]
    code, _, err = run_cli(
        capsys, "merge", *folders, "--out", work["root"] / "w2", "--worst", "2", "--images", images
    )
    assert code == 0, err
    report = json.loads((work["root"] / "w2" / "report.json").read_text())
    assert report["images"]["source"] == _report(work["one"])["images"]["source"]
    html = (work["root"] / "w2" / "report.html").read_text()
    assert html.count("<figure") == 0 or html.count("<figure") <= 2 * 3 * 2
    pngs = list((work["root"] / "w2" / "overlays").rglob("*.png"))
    assert 0 < len(pngs) <= 3 * 2 * 2
    # a file touched since: not the set the shards read
    touched = next(images.rglob("*.png"))
    os.utime(touched, ns=(1, 1))
    code, _, err = run_cli(
        capsys, "merge", *folders, "--out", work["root"] / "w3", "--images", images
    )
    assert code == 3 and "not the set the shards read" in err


def test_worst_above_what_the_shards_kept_is_a_usage_error(capsys, work):
    folders = [work["shards"][3, k] for k in (1, 2, 3)]
    code, _, err = run_cli(capsys, "merge", *folders, "--out", work["root"] / "w", "--worst", "5")
    assert code == 2
    assert "re-run the shards with --worst 5" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- refusals


def _copy(work, n, k, name) -> Path:
    target = work["root"] / "copies" / name
    shutil.copytree(work["shards"][n, k], target)
    return target


def _refused(capsys, work, folders, *words):
    code, out, err = run_cli(capsys, "merge", *folders, "--out", work["root"] / "refused")
    assert code == 3, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    assert not (work["root"] / "refused" / "report.json").exists()
    return err


def test_a_missing_shard_is_refused(capsys, work):
    s = work["shards"]
    _refused(capsys, work, [s[3, 1], s[3, 3]], "shard 2/3", "missing", str(s[3, 1]))


def test_a_shard_given_twice_is_refused(capsys, work):
    s = work["shards"]
    twin = _copy(work, 3, 2, "twin")
    _refused(capsys, work, [s[3, 1], s[3, 2], twin, s[3, 3]], "both shard 2/3", str(twin))


def test_shards_of_different_splits_are_refused(capsys, work):
    s = work["shards"]
    _refused(capsys, work, [s[3, 1], s[3, 2], s[1, 1]], "different splits")


def _other_shard(capsys, work, samples, name, *args, images=None, names=MODELS):
    folder = work["root"] / "others" / name
    code, _, err = run_cli(
        capsys,
        "audit",
        *models(samples, names),
        "--images",
        images or samples / "images",
        "--out",
        folder,
        "--shard",
        "2/3",
        *COMMON,
        *args,
    )
    assert code == 0, err
    return folder


def test_shards_of_other_models_settings_or_images_are_refused(capsys, work, samples):
    s = work["shards"]
    other = _other_shard(
        capsys,
        work,
        samples,
        "models",
        names=("gap_original.onnx", "gap_l1_30_ft.onnx", "gap_l1_60.onnx"),
    )
    _refused(capsys, work, [s[3, 1], other, s[3, 3]], "different models", str(other))
    other = _other_shard(capsys, work, samples, "settings", "--target", "label")
    _refused(capsys, work, [s[3, 1], other, s[3, 3]], "different settings", "target")
    images = work["root"] / "fewer_images"
    shutil.copytree(samples / "images", images)
    next(images.rglob("*.png")).unlink()
    other = _other_shard(capsys, work, samples, "images", images=images)
    _refused(capsys, work, [s[3, 1], other, s[3, 3]], "different image sets")


def test_a_shard_of_another_tool_version_is_refused(capsys, work):
    s = work["shards"]
    other = _copy(work, 3, 2, "version")
    identity = json.loads((other / "shard.json").read_text())
    identity["version"] = "0.0.1"
    (other / "shard.json").write_text(json.dumps(identity))
    _refused(capsys, work, [s[3, 1], other, s[3, 3]], "different tool versions", "0.0.1")


def test_an_interrupted_shard_is_refused(capsys, work):
    s = work["shards"]
    # killed before its set was swapped in: a staging folder, no shard.json
    other = work["root"] / "copies" / "interrupted"
    (other / ".sp2ps-staging-999999-x").mkdir(parents=True)
    shutil.copy(s[3, 2] / "records.npz", other / ".sp2ps-staging-999999-x")
    _refused(capsys, work, [s[3, 1], other, s[3, 3]], "incomplete", "no shard.json")
    # a set mixed by a kill -9 inside the swap: records of another run
    mixed = _copy(work, 3, 2, "mixed")
    shutil.copy(s[3, 1] / "records.npz", mixed / "records.npz")
    _refused(capsys, work, [s[3, 1], mixed, s[3, 3]], "damaged or from another run", str(mixed))
    # records missing
    gone = _copy(work, 3, 2, "gone")
    (gone / "records.npz").unlink()
    _refused(capsys, work, [s[3, 1], gone, s[3, 3]], "incomplete", "no records.npz")


def test_damaged_files_are_refused(capsys, work):
    s = work["shards"]
    damaged = _copy(work, 3, 2, "damaged")
    data = bytearray((damaged / "records.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "records.npz").write_bytes(bytes(data))
    _refused(capsys, work, [s[3, 1], damaged, s[3, 3]], "damaged", str(damaged))
    garbage = _copy(work, 3, 2, "garbage")
    (garbage / "shard.json").write_text("{not json")
    _refused(capsys, work, [s[3, 1], garbage, s[3, 3]], "not valid JSON")
    for key, value in (
        ("models", [{"path": 1}]),
        ("shard", {"index": 5, "count": 3, "start": 0, "stop": 0, "rows": 0}),
        ("report", {"worst": -1, "save_maps": False, "overlays": "worst"}),
        ("settings", "gradcam"),
    ):
        edited = _copy(work, 3, 2, f"edited_{key}")
        identity = json.loads((edited / "shard.json").read_text())
        identity[key] = value
        (edited / "shard.json").write_text(json.dumps(identity))
        _refused(capsys, work, [s[3, 1], edited, s[3, 3]], "not a shard identity", key)


def test_special_files_in_a_shard_folder_are_refused(capsys, work):
    s = work["shards"]
    fifo = _copy(work, 3, 2, "fifo")
    (fifo / "records.npz").unlink()
    os.mkfifo(fifo / "records.npz")
    _refused(capsys, work, [s[3, 1], fifo, s[3, 3]], "FIFO")
    link = _copy(work, 3, 2, "link")
    (link / "shard.json").unlink()
    (link / "shard.json").symlink_to("/dev/zero")
    _refused(capsys, work, [s[3, 1], link, s[3, 3]], "not a regular file")


def test_records_over_the_memory_budget_are_refused(capsys, work):
    folders = [work["shards"][3, k] for k in (1, 2, 3)]
    code, _, err = run_cli(
        capsys, "merge", *folders, "--out", work["root"] / "budget", "--max-memory", "1K"
    )
    assert code == 3 and "memory budget" in err


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "gate",
    [("--fail-under", "0.5"), ("--junit", "x.xml"), ("--gate-on", "lower"), ("--resamples", "500")],
)
def test_gate_options_with_shard_are_a_usage_error(capsys, samples, tmp_path, gate):
    code, _, err = run_cli(
        capsys,
        "audit",
        *models(samples),
        "--images",
        samples / "images",
        "--out",
        tmp_path / "s",
        "--shard",
        "1/2",
        *gate,
    )
    assert code == 2 and "gates belong to the merge" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("text", ["0/3", "4/3", "a/b", "3", "1/0"])
def test_bad_shard_text_is_a_usage_error(capsys, samples, tmp_path, text):
    code, _, err = run_cli(
        capsys,
        "audit",
        *models(samples),
        "--images",
        samples / "images",
        "--out",
        tmp_path / "s",
        "--shard",
        text,
    )
    assert code == 2 and "--shard" in err and err.count("\n") == 1


def test_shard_without_out_is_a_usage_error(capsys, samples):
    code, _, err = run_cli(
        capsys, "audit", *models(samples), "--images", samples / "images", "--shard", "1/2"
    )
    assert code == 2 and "--shard needs --out" in err


def test_a_shard_run_again_replaces_its_own_set(capsys, samples, work):
    folder = _copy(work, 3, 3, "again")
    code, _, err = run_cli(
        capsys,
        "audit",
        *models(samples),
        "--images",
        samples / "images",
        "--out",
        folder,
        "--shard",
        "3/3",
        *COMMON,
    )
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["records.npz", "shard.json"]


def test_every_overlay_from_shards_that_kept_every_map(capsys, samples, tmp_path, work):
    """--overlays all: the shards keep every map, the merge draws every overlay."""
    args = (*models(samples, MODELS[:2]), "--images", samples / "images", *COMMON)
    code, out, err = run_cli(capsys, "audit", *args, "--out", tmp_path / "one", "--overlays", "all")
    assert code == 0, err
    for k in (1, 2):
        shard = ("--shard", f"{k}/2", "--overlays", "all")
        code, _, err = run_cli(capsys, "audit", *args, "--out", tmp_path / f"s{k}", *shard)
        assert code == 0, err
    code, merged_out, err = run_cli(
        capsys, "merge", tmp_path / "s2", tmp_path / "s1", "--out", tmp_path / "merged"
    )
    assert code == 0, err
    assert merged_out == out
    assert _report(tmp_path / "merged") == _report(tmp_path / "one")
    assert _files(tmp_path / "merged") == {
        k: v for k, v in _files(tmp_path / "one").items() if k != "report.json"
    } | {"report.json": (tmp_path / "merged" / "report.json").read_bytes()}
    assert len(list((tmp_path / "merged" / "overlays").rglob("*.png"))) == 2 * 50
    # shards that kept only the worst maps cannot give every overlay
    folders = [work["shards"][3, k] for k in (1, 2, 3)]
    code, _, err = run_cli(capsys, "merge", *folders, "--out", tmp_path / "x", "--overlays", "all")
    assert code == 2 and "re-run the shards with --overlays all" in err


def test_shards_fill_and_use_the_original_cache(capsys, work, samples, tmp_path, monkeypatch):
    """--original-cache with --shard: the shards store the original's results, a second
    round of shards never opens the original's session, and the merge is unchanged."""
    import onnx_sp2ps.pipeline as pipeline

    cache = tmp_path / "cache"
    base = [*models(samples), "--images", samples / "images", *COMMON]
    for k in (1, 2, 3):
        args = [*base, "--out", tmp_path / f"cold{k}", "--shard", f"{k}/3"]
        code, _, err = run_cli(capsys, "audit", *args, "--original-cache", cache)
        assert code == 0, err
    assert len(list(cache.rglob("*.npz"))) == 7  # one entry per batch, over three shards

    opened = []

    class Counting(pipeline.ModelRunner):
        def __init__(self, prepared, *args, **kwargs):
            opened.append(Path(prepared.path).name)
            super().__init__(prepared, *args, **kwargs)

    monkeypatch.setattr(pipeline, "ModelRunner", Counting)
    for k in (1, 2, 3):
        args = [*base, "--out", tmp_path / f"warm{k}", "--shard", f"{k}/3"]
        code, _, err = run_cli(capsys, "audit", *args, "--original-cache", cache)
        assert code == 0, err
    assert opened and "gap_original.onnx" not in opened  # candidates' runners only
    code, stdout, err, out = _merge(
        capsys, work, [tmp_path / f"warm{k}" for k in (3, 1, 2)], "merged_cached"
    )
    _assert_same_as_one_audit(work, code, stdout, out, "merged_cached")


def test_shards_of_models_differing_only_in_external_weights_are_refused(capsys, samples, tmp_path):
    """The shards' model digest covers weights in external data files: the same .onnx
    file with other weights beside it is another model."""
    from conftest import save_with_external_data

    model = save_with_external_data(samples / "gap_l1_30.onnx", tmp_path / "ext")
    base = [samples / "gap_original.onnx", model, "--images", samples / "images", *COMMON]
    code, _, err = run_cli(capsys, "audit", *base, "--out", tmp_path / "s1", "--shard", "1/2")
    assert code == 0, err
    onnx_bytes = model.read_bytes()
    blob = bytearray((tmp_path / "ext" / "weights.bin").read_bytes())
    blob[:64] = bytes(64)  # other weights, same .onnx file
    (tmp_path / "ext" / "weights.bin").write_bytes(bytes(blob))
    assert model.read_bytes() == onnx_bytes
    code, _, err = run_cli(capsys, "audit", *base, "--out", tmp_path / "s2", "--shard", "2/2")
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "merge", tmp_path / "s1", tmp_path / "s2", "--out", tmp_path / "m"
    )
    assert code == 3 and "different models" in err, err

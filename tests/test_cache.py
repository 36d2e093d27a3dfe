"""--original-cache (README "Commands"): a later audit with the same original, images and
settings reads the original's results instead of running it, and writes the same
report set bit for bit; any other key recomputes; damaged or hostile entries are
recomputed with one note; shards share one cache."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import onnx_sp2ps.pipeline as pipeline
from onnx_sp2ps.cache import CacheNote
from onnx_sp2ps.pipeline import AuditSettings, audit_records, merge, summarise
from onnx_sp2ps.runtime import ModelRunner

from conftest import run_cli

BATCH = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory, samples) -> Path:
    """24 sample images (6 per class): three batches of 8."""
    out = tmp_path_factory.mktemp("images")
    for folder in sorted((samples / "images").iterdir()):
        (out / folder.name).mkdir()
        for f in sorted(folder.iterdir())[:6]:
            shutil.copy2(f, out / folder.name / f.name)
    return out


@pytest.fixture
def opened(monkeypatch):
    """Paths of the models whose sessions were opened (one entry per runner)."""
    paths: list[str] = []

    class Counting(ModelRunner):
        def __init__(self, prepared, **kwargs):
            paths.append(Path(prepared.path).name)
            super().__init__(prepared, **kwargs)

    monkeypatch.setattr(pipeline, "ModelRunner", Counting)
    return paths


def _audit(samples, images, out: Path, cache: Path | None, *extra) -> tuple[int, str]:
    args = [
        "audit",
        samples / "gap_original.onnx",
        samples / "gap_l1_30.onnx",
        samples / "gap_l1_60.onnx",
        "--images",
        images,
        "--batch-size",
        BATCH,
        "--out",
        out,
        "--save-maps",
        "--worst",
        4,
        "-q",
        *extra,
    ]
    if cache is not None:
        args += ["--original-cache", cache]
    return args


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/b*.npz"))


def test_a_warm_audit_never_opens_the_original_and_writes_the_same_set(
    samples, images, tmp_path, capsys, opened
):
    """Cold and warm runs with the cache write the report set (report.json, samples.csv,
    report.html, worst overlays, saved maps) of a run without it, bit for bit; the warm
    run opens no session of the original."""
    cache = tmp_path / "cache"
    code, _, err = run_cli(capsys, *_audit(samples, images, tmp_path / "fresh", None))
    assert code == 0, err
    code, _, err = run_cli(capsys, *_audit(samples, images, tmp_path / "cold", cache))
    assert code == 0 and err == "", err
    assert len(_entries(cache)) == 3 and "gap_original.onnx" in opened
    opened.clear()
    code, _, err = run_cli(capsys, *_audit(samples, images, tmp_path / "warm", cache))
    assert code == 0 and err == "", err
    assert "gap_original.onnx" not in opened and len(opened) == 2
    fresh = _files(tmp_path / "fresh")
    assert {"report.json", "samples.csv", "report.html"} <= set(fresh)
    assert any(k.startswith("overlays/") for k in fresh)
    assert any(k.startswith("maps/") for k in fresh)
    assert _files(tmp_path / "cold") == fresh
    assert _files(tmp_path / "warm") == fresh


@pytest.mark.parametrize("target", ["label", "own"])
def test_other_targets_give_the_records_of_a_fresh_audit(samples, images, tmp_path, target):
    models = [samples / "gap_original.onnx", [samples / "gap_l1_60.onnx"]]
    plain = AuditSettings(batch_size=BATCH, target=target)
    cached = AuditSettings(batch_size=BATCH, target=target, original_cache=str(tmp_path))
    fresh = summarise(*audit_records(*models, images, settings=plain, worst=3, keep_maps=True))
    for _ in range(2):  # cold, then warm
        got = summarise(*audit_records(*models, images, settings=cached, worst=3, keep_maps=True))
        assert got.to_json() == fresh.to_json()
        assert got.original_maps is not None and fresh.original_maps is not None
        assert got.original_maps.maps.tobytes() == fresh.original_maps.maps.tobytes()
        worst, fresh_worst = got.candidates[0].worst, fresh.candidates[0].worst
        assert worst is not None and fresh_worst is not None
        assert worst.original_maps is not None and fresh_worst.original_maps is not None
        assert worst.original_maps.tobytes() == fresh_worst.original_maps.tobytes()
    assert len(list(tmp_path.iterdir())) == 1


def test_any_other_key_recomputes_and_stores_anew(samples, images, tmp_path, opened):
    """Other settings, other original bytes (same weights) and other images each make a
    new key: the original runs again and its results are stored beside the others."""
    cache = tmp_path / "cache"
    original = tmp_path / "original.onnx"
    shutil.copy2(samples / "gap_original.onnx", original)
    cands = [samples / "gap_l1_30.onnx"]
    base = AuditSettings(batch_size=BATCH, original_cache=str(cache))

    def run(settings=base, model=original, imgs=images) -> bool:
        """Whether the original ran."""
        opened.clear()
        audit_records(model, cands, imgs, settings=settings)
        return "original.onnx" in opened

    assert run()
    assert not run()
    keys = 1
    for settings in (
        AuditSettings(batch_size=4, original_cache=str(cache)),
        AuditSettings(batch_size=BATCH, method="xgradcam", original_cache=str(cache)),
        AuditSettings(batch_size=BATCH, target="own", original_cache=str(cache)),
    ):
        assert run(settings), settings
        keys += 1
        assert len(list(cache.iterdir())) == keys
        assert not run(settings)
    import onnx

    model = onnx.load(str(original))
    model.producer_version += "-resaved"
    onnx.save(model, str(original))
    assert run() and not run()
    other = tmp_path / "other"
    shutil.copytree(images, other)
    os.unlink(next((other / "0").iterdir()))
    assert run(imgs=other) and not run(imgs=other)
    assert len(list(cache.iterdir())) == keys + 2


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _symlink_to_device(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip" * 50)


def _wrong_shapes(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["raw"] = arrays["raw"][:, :2, :]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _missing_array(path: Path) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "logits"}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _inflation_bomb(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("raw.npy", b"\0" * (64 << 20))


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _garbage,
        _wrong_shapes,
        _missing_array,
        _fifo,
        _symlink_to_device,
        _inflation_bomb,
    ],
)
def test_a_damaged_entry_is_recomputed_with_one_note(samples, images, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    models = [samples / "gap_original.onnx", [samples / "gap_l1_30.onnx"]]
    settings = AuditSettings(batch_size=BATCH, original_cache=str(cache))
    fresh = summarise(*audit_records(*models, images, settings=settings, worst=2)).to_json()
    entry = _entries(cache)[1]
    damage(entry)
    with pytest.warns(CacheNote) as notes:
        got = summarise(*audit_records(*models, images, settings=settings, worst=2)).to_json()
    assert got == fresh
    assert len(notes) == 1 and entry.name in str(notes[0].message)
    assert "\n" not in str(notes[0].message)
    assert entry.is_file() and not entry.is_symlink()  # replaced by a good entry
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheNote)
        again = summarise(*audit_records(*models, images, settings=settings, worst=2)).to_json()
    assert again == fresh


def test_the_command_line_prints_the_note_on_one_line(samples, images, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = _audit(samples, images, tmp_path / "a", cache)
    assert run_cli(capsys, *args)[0] == 0
    _garbage(_entries(cache)[0])
    code, _, err = run_cli(capsys, *_audit(samples, images, tmp_path / "b", cache))
    assert code == 0
    assert err.startswith("note: original cache entry ") and err.count("\n") == 1
    assert "recomputed" in err
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_a_cache_folder_that_cannot_be_one_is_exit_3(samples, images, tmp_path, capsys, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cache = blocker if kind == "file" else blocker / "cache"
    code, _, err = run_cli(capsys, *_audit(samples, images, tmp_path / "out", cache))
    assert code == 3
    assert err.startswith("error: --original-cache ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_failed_write_warns_once_and_the_audit_goes_on(samples, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    models = [samples / "gap_original.onnx", [samples / "gap_l1_30.onnx"]]
    fresh = summarise(*audit_records(*models, images, settings=AuditSettings(batch_size=BATCH)))

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    settings = AuditSettings(batch_size=BATCH, original_cache=str(cache))
    with pytest.warns(CacheNote) as notes:
        got = summarise(*audit_records(*models, images, settings=settings))
    assert len(notes) == 1 and "No space left" in str(notes[0].message)
    assert got.to_json() == fresh.to_json()
    assert not _entries(cache) and not list(cache.glob("*/.tmp-*"))


def test_shards_share_one_cache(samples, images, tmp_path, opened):
    """Two shards fill the cache; the whole audit then runs only the candidates and
    equals the merged shards; shards of a later run hit too."""
    cache = tmp_path / "cache"
    models = [samples / "gap_original.onnx", [samples / "gap_l1_60.onnx"]]
    settings = AuditSettings(batch_size=BATCH, original_cache=str(cache))
    parts = [
        audit_records(*models, images, settings=settings, worst=3, shard=(k, 2)) for k in (1, 2)
    ]
    assert len(_entries(cache)) == 3
    opened.clear()
    whole, context = audit_records(*models, images, settings=settings, worst=3)
    assert "gap_original.onnx" not in opened
    merged = merge([p[0] for p in parts])
    assert summarise(merged, parts[0][1]).to_json() == summarise(whole, context).to_json()
    plain = AuditSettings(batch_size=BATCH)
    fresh = summarise(*audit_records(*models, images, settings=plain, worst=3))
    assert summarise(whole, context).to_json() == fresh.to_json()
    opened.clear()
    second = audit_records(*models, images, settings=settings, worst=3, shard=(2, 2))
    assert "gap_original.onnx" not in opened
    assert json.dumps(summarise(*second).to_dict()) == json.dumps(summarise(*parts[1]).to_dict())


def test_leftover_temporary_files_are_never_read(samples, images, tmp_path, opened):
    """A killed writer's temporary file (a half entry) is not an entry: the batch is
    recomputed without a note, and the temporary file left alone."""
    cache = tmp_path / "cache"
    models = [samples / "gap_original.onnx", [samples / "gap_l1_30.onnx"]]
    settings = AuditSettings(batch_size=BATCH, original_cache=str(cache))
    audit_records(*models, images, settings=settings)
    entry = _entries(cache)[0]
    half = entry.parent / ".tmp-99999-000000000000"
    half.write_bytes(entry.read_bytes()[:100])
    entry.unlink()
    opened.clear()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheNote)
        audit_records(*models, images, settings=settings)
    assert "gap_original.onnx" in opened and entry.is_file() and half.is_file()

"""Fast JPEG decoding (issue 12, section 4): the draft plan, the exact path unchanged bit
for bit, the fast path within the bounds README "Images and preprocessing" documents,
other formats unaffected, the guards still first, the setting in report.json, and the
decode pool's size."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from onnx_sp2ps.data import InputSpec, Preprocess, decode, open_images, sources
from onnx_sp2ps.data.decode import DRAFTED, _to_model_mode
from onnx_sp2ps.data.preprocess import (
    DRAFT_MARGIN,
    _draft_request,
    _normalise,
    _resize_plan,
    draft_scale,
)

from conftest import run_cli

#: Documented bounds (README): 0..255 units, fast against exact, after preprocessing.
MAX_ABS = 20
MEAN_ABS = 0.6


def _field(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: a smooth random field (bilinear-enlarged coarse noise), a few
    hard-edged rectangles and noise: what the benchmark's synthetic images hold."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (9, 16, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    pixels = smooth.astype(np.float32)
    for _ in range(6):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        w, h = rng.integers(20, width // 3), rng.integers(20, height // 3)
        pixels[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(path, height, width, seed=0, **kwargs):
    Image.fromarray(_field(height, width, seed)).save(path, quality=90, **kwargs)
    return path


def _inputs(folder, size=224, **options):
    images = open_images(
        folder, spec=InputSpec("NHWC", 3, size, size), preprocess=Preprocess(**options)
    )
    batches = list(images.iter_batches(8))
    return images, np.concatenate([b.inputs for b in batches])


def _previous(path, pre):
    """The preprocessing as it was before fast decoding existed (commit 74a5020)."""
    with Image.open(path) as image:
        image.load()
        image = _to_model_mode(image, pre.channels)
    resized, box = _resize_plan(image.size, pre)
    image = image.resize(resized, Image.Resampling.BILINEAR, reducing_gap=None)
    image = image if box is None else image.crop(box)
    return _normalise(np.asarray(image), pre)


# --------------------------------------------------------------------------- the plan


def test_draft_scale_keeps_twice_the_resize_target():
    assert draft_scale((1920, 1080), (455, 256)) == 2  # --center-crop 224: 960x540
    assert draft_scale((1920, 1080), (224, 224)) == 2  # 960x540: 480x270 < 448x448
    assert draft_scale((1920, 1080), (112, 112)) == 4  # 480x270
    assert draft_scale((1920, 1080), (64, 64)) == 8  # 240x135
    assert draft_scale((1920, 1080), (961, 256)) == 1  # 960 < 2 x 961
    assert draft_scale((640, 480), (455, 341)) == 1
    assert draft_scale((224, 224), (224, 224)) == 1
    rng = np.random.default_rng(0)
    for _ in range(2000):
        size = tuple(int(v) for v in rng.integers(1, 5000, 2))
        resized = tuple(int(v) for v in rng.integers(1, 800, 2))
        scale = draft_scale(size, resized)
        decoded = [-(-v // scale) for v in size]
        if scale > 1:  # never below the margin ...
            assert all(d >= DRAFT_MARGIN * r for d, r in zip(decoded, resized))
        if scale < 8:  # ... and the largest scale that keeps it
            larger = [-(-v // (2 * scale)) for v in size]
            assert not all(d >= DRAFT_MARGIN * r for d, r in zip(larger, resized))


@pytest.mark.parametrize("size", [(1920, 1080), (1333, 1001), (907, 613)])
def test_pillow_decodes_at_the_planned_scale(tmp_path, size):
    path = _jpeg(tmp_path / "a.jpg", size[1], size[0])
    pre = Preprocess(center_crop=True, fast_decode=True).resolved(InputSpec("NCHW", 3, 64, 64))
    resized, _ = _resize_plan(size, pre)
    scale = draft_scale(size, resized)
    assert scale > 1
    image = decode._open_image(path, 3, lambda s: None, functools.partial(_draft_request, pre=pre))
    assert image.size == tuple(-(-v // scale) for v in size)
    assert image.info[DRAFTED] == (size, (0.0, 0.0, size[0] / scale, size[1] / scale))


# --------------------------------------------------------------------------- the paths


@pytest.mark.parametrize("center_crop", [True, False])
def test_the_exact_path_is_the_previous_one_bit_for_bit(tmp_path, center_crop):
    _jpeg(tmp_path / "a.jpg", 1080, 1920, seed=1)
    _jpeg(tmp_path / "b.jpg", 481, 643, seed=2)
    _jpeg(tmp_path / "c.jpg", 300, 200, seed=3, subsampling=0)
    images, got = _inputs(tmp_path, center_crop=center_crop)
    assert images.preprocess.fast_decode is False
    for path, inputs in zip(sorted(tmp_path.iterdir()), got):
        np.testing.assert_array_equal(inputs, _previous(path, images.preprocess))


@pytest.mark.parametrize(("size", "center_crop"), [(224, True), (224, False), (64, False)])
def test_the_fast_path_stays_within_the_documented_bounds(tmp_path, size, center_crop):
    for seed in range(2):
        _jpeg(tmp_path / f"{seed}.jpg", 1080, 1920, seed=seed)
    _, exact = _inputs(tmp_path, size, center_crop=center_crop)
    images, fast = _inputs(tmp_path, size, center_crop=center_crop, fast_decode=True)
    assert images.preprocess.fast_decode is True
    diff = np.abs(fast.astype(np.float64) - exact) * 255.0
    assert 0 < diff.max() <= MAX_ABS
    assert diff.mean() <= MEAN_ABS


def test_small_jpegs_and_other_formats_are_decoded_exactly(tmp_path):
    pixels = _field(1080, 1920, 4)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.webp", lossless=True)
    Image.fromarray(pixels).save(tmp_path / "c.bmp")
    _jpeg(tmp_path / "d.jpg", 300, 400)  # too small to reduce for 224
    _jpeg(tmp_path / "e.jpg", 1080, 1920, progressive=True)
    _, exact = _inputs(tmp_path, center_crop=True)
    _, fast = _inputs(tmp_path, center_crop=True, fast_decode=True)
    np.testing.assert_array_equal(fast[:4], exact[:4])
    assert np.abs(fast[4] - exact[4]).max() * 255 <= MAX_ABS  # progressive: libjpeg scales too


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("size", [(1920, 1080), (1333, 1001)])
def test_exif_orientation_is_followed(tmp_path, orientation, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_field(size[1], size[0], 5)).save(
        tmp_path / "a.jpg", quality=90, exif=exif.tobytes()
    )
    _, exact = _inputs(tmp_path, 224, center_crop=True)
    _, fast = _inputs(tmp_path, 224, center_crop=True, fast_decode=True)
    if size[0] % 2 or size[1] % 2:  # reduced size not exact: decoded at full size
        np.testing.assert_array_equal(fast, exact)
    else:
        diff = np.abs(fast.astype(np.float64) - exact) * 255.0
        assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS
    with Image.open(tmp_path / "a.jpg") as image:
        oriented = ImageOps.exif_transpose(image)
        assert oriented.size != image.size or orientation == 3


def test_the_guards_run_before_fast_decoding(tmp_path, monkeypatch):
    _jpeg(tmp_path / "a.jpg", 1080, 1920)
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    images = open_images(
        tmp_path, spec=InputSpec("NCHW", 3, 16, 16), preprocess=Preprocess(fast_decode=True)
    )
    assert list(images.iter_batches(1)) == []
    assert "decompression-bomb guard" in images.skipped[0][1]


# --------------------------------------------------------------------------- the setting


def test_the_setting_is_recorded_in_report_json(capsys, samples, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        _jpeg(folder / f"{seed}.jpg", 540, 960, seed=seed)
    for flag, expected in (("--fast-decode", True), ("--exact-decode", False)):
        out = tmp_path / flag.strip("-")
        code, _, err = run_cli(
            capsys,
            "audit",
            samples / "gap_original.onnx",
            samples / "gap_l1_60.onnx",
            "--images",
            folder,
            "--out",
            out,
            flag,
            "-q",
        )
        assert code in (0, 1), err
        report = json.loads((out / "report.json").read_text())
        assert report["preprocess"]["fast_decode"] is expected


def test_arrays_record_exact_decoding(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 4), np.float32))
    images = open_images(tmp_path / "x.npy", spec=InputSpec("NCHW", 3, 4, 4))
    assert images.preprocess.to_dict()["fast_decode"] is False


# --------------------------------------------------------------------------- the pool


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 2), (6, 6), (64, 8)])
def test_decode_pool_follows_the_cpu_affinity(monkeypatch, cpus, workers):
    monkeypatch.setattr(sources.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert sources._decode_workers() == workers

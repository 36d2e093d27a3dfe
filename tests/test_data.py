"""Tests of onnx_sp2ps.data: images and arrays -> float32 batches with labels."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from onnx_sp2ps import data
from onnx_sp2ps.data import (
    InputSpec,
    Preprocess,
    ResolvedPreprocess,
    decode,
    display_image,
    open_images,
    parse_size,
    preprocess_image,
)
from onnx_sp2ps.errors import DataError, MismatchError, UsageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
COLOUR = (10, 128, 250)


def spec(layout="NCHW", channels=3, height=4, width=4, batch=None):
    return InputSpec(layout, channels, height, width, batch)


def solid(colour=COLOUR, size=(4, 4), mode="RGB"):
    return Image.new(mode, size, colour)


def save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def all_inputs(images, batch_size=3):
    batches = list(images.iter_batches(batch_size))
    return np.concatenate([b.indices for b in batches]), np.concatenate([b.inputs for b in batches])


# --------------------------------------------------------------------------- sizes, presets


@pytest.mark.parametrize(
    "text, size",
    [("224x224", (224, 224)), ("224", (224, 224)), (" 64X32 ", (64, 32)), ("7 x 9", (7, 9))],
)
def test_parse_size_accepts_hxw_and_square(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "0x4", "4x", "4x4x4", "-4", "2.5x3"])
def test_parse_size_refuses_bad_text(text):
    with pytest.raises(UsageError, match="HxW"):
        parse_size(text)


def test_resolved_fills_from_preset_and_model():
    pre = Preprocess(preset="imagenet").resolved(spec(height=8, width=6))
    assert pre.size == (8, 6)
    assert pre.scale == 1 / 255
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert pre.layout == "NCHW" and pre.channels == 3 and pre.applied


def test_resolved_expands_single_mean_and_takes_overrides():
    pre = Preprocess(scale=0.5, mean=(0.25,), std=2, layout="NHWC").resolved(spec())
    assert pre.mean == (0.25, 0.25, 0.25) and pre.std == (2.0, 2.0, 2.0)
    assert pre.scale == 0.5 and pre.layout == "NHWC"


def test_symbolic_channels_means_rgb():
    assert Preprocess().resolved(spec(channels=None)).channels == 3


def test_dynamic_size_needs_size():
    with pytest.raises(UsageError, match="--size"):
        Preprocess().resolved(spec(height=None, width=None))
    assert Preprocess(size=(5, 7)).resolved(spec(height=None, width=None)).size == (5, 7)


def test_size_differing_from_static_size_is_a_mismatch():
    with pytest.raises(MismatchError, match="4x4.*8x8"):
        Preprocess(size=(8, 8)).resolved(spec())
    with pytest.raises(MismatchError):  # height static, width dynamic
        Preprocess(size=(8, 8)).resolved(spec(height=4, width=None))


def test_unsupported_channel_count_is_data_error():
    with pytest.raises(DataError, match="4-channel"):
        Preprocess().resolved(spec(channels=4))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(preset="caffe"),
        dict(layout="CHW"),
        dict(std=(1.0, 0.0, 1.0)),
        dict(scale=0.0),
        dict(scale=float("nan")),
        dict(size=(0, 4)),
        dict(mean="0.5"),
    ],
)
def test_bad_options_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        Preprocess(**kwargs)


def test_mean_must_have_one_value_or_one_per_channel():
    with pytest.raises(UsageError, match="give 1 value or 3"):
        Preprocess(mean=(0.1, 0.2)).resolved(spec())
    with pytest.raises(UsageError, match="1 channel"):
        Preprocess(preset="imagenet").resolved(spec(channels=1))


def test_bgr_with_grey_model_is_usage_error():
    with pytest.raises(UsageError, match="bgr"):
        Preprocess(bgr=True).resolved(spec(channels=1))


def test_options_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        Preprocess("unit")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Preprocess().bgr = True  # type: ignore[misc]


def test_describe_and_to_dict():
    pre = Preprocess().resolved(spec(height=64, width=64))
    assert pre.describe() == "unit: 64x64 RGB NCHW, x*0.00392157, mean 0 std 1"
    crop = Preprocess(preset="imagenet", center_crop=True, bgr=True, layout="NHWC")
    text = crop.resolved(spec(height=224, width=224)).describe()
    assert text == (
        "imagenet: 224x224 BGR NHWC, resize 256 + centre crop, x*0.00392157, "
        "mean 0.485,0.456,0.406 std 0.229,0.224,0.225"
    )
    as_dict = json.loads(json.dumps(pre.to_dict()))
    assert as_dict["size"] == [64, 64] and as_dict["mean"] == [0.0, 0.0, 0.0]
    assert as_dict["applied"] is True and as_dict["resize_shorter"] is None
    assert ResolvedPreprocess(**{k: v for k, v in vars(pre).items()}) == pre


# --------------------------------------------------------------------------- pixel values


def test_unit_preset_value():
    x = preprocess_image(solid(), Preprocess().resolved(spec()))
    assert x.shape == (3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = np.array(COLOUR, dtype=np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(x[:, 2, 1], expected)


def test_division_by_255_is_bit_exact_for_every_level():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pre = Preprocess().resolved(spec(channels=1, height=16, width=16))
    x = preprocess_image(Image.fromarray(levels), pre)
    np.testing.assert_array_equal(x[0], levels.astype(np.float32) / np.float32(255.0))
    # The multiplication would not be exact for all levels: the division matters.
    assert np.any(levels.astype(np.float32) * np.float32(1 / 255) != x[0])


def test_imagenet_preset_value():
    x = preprocess_image(solid(), Preprocess(preset="imagenet").resolved(spec()))
    unit = np.array(COLOUR, dtype=np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(x[:, 0, 0], (unit - IMAGENET_MEAN) / IMAGENET_STD)


def test_raw_preset_and_custom_scale():
    x = preprocess_image(solid(), Preprocess(preset="raw").resolved(spec()))
    np.testing.assert_array_equal(x[:, 3, 3], np.array(COLOUR, dtype=np.float32))
    y = preprocess_image(solid(), Preprocess(scale=0.5, mean=(1.0,), std=(4.0,)).resolved(spec()))
    np.testing.assert_array_equal(y[:, 0, 0], (np.array(COLOUR, dtype=np.float32) * 0.5 - 1) / 4)


@pytest.mark.parametrize("preset", ["unit", "imagenet"])
def test_bgr_reverses_channels_after_normalising_in_rgb_order(preset):
    rgb = preprocess_image(solid(), Preprocess(preset=preset).resolved(spec()))
    bgr = preprocess_image(solid(), Preprocess(preset=preset, bgr=True).resolved(spec()))
    np.testing.assert_array_equal(bgr, rgb[::-1])


def test_nhwc_is_the_transpose_of_nchw():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    nchw = preprocess_image(image, Preprocess(preset="imagenet").resolved(spec(height=4, width=3)))
    nhwc = preprocess_image(
        image, Preprocess(preset="imagenet", layout="NHWC").resolved(spec(height=4, width=3))
    )
    assert nchw.shape == (3, 4, 3) and nhwc.shape == (4, 3, 3) and nhwc.flags.c_contiguous
    np.testing.assert_array_equal(nhwc, nchw.transpose(1, 2, 0))


def test_resize_is_pil_bilinear():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    x = preprocess_image(image, Preprocess(preset="raw").resolved(spec(height=8, width=6)))
    expected = np.asarray(image.resize((6, 8), Image.Resampling.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(x, expected.transpose(2, 0, 1).astype(np.float32))


def test_center_crop_picks_the_centre():
    # Shorter side 5 == round(4 / 0.875): no resize, so the crop is exact columns 5..8.
    columns = np.tile(np.arange(14, dtype=np.uint8) * 10, (5, 1))
    pre = Preprocess(preset="raw", center_crop=True).resolved(spec(channels=1))
    assert pre.resize_shorter == 5
    x = preprocess_image(Image.fromarray(columns), pre)
    np.testing.assert_array_equal(x[0], np.tile([50.0, 60.0, 70.0, 80.0], (4, 1)))


def test_center_crop_of_a_portrait_image_keeps_the_middle():
    pixels = np.zeros((300, 100, 3), dtype=np.uint8)
    pixels[100:200] = 255  # a white band across the middle third
    pre = Preprocess(preset="raw", center_crop=True).resolved(spec(height=32, width=32))
    x = preprocess_image(Image.fromarray(pixels), pre)
    assert x.shape == (3, 32, 32)
    # resized to 37x111; the central 32 rows (39..70) lie inside the band (37..74).
    assert x.min() == 255.0


def test_grey_model_converts_colour_to_luma():
    x = preprocess_image(solid(), Preprocess(preset="raw").resolved(spec(channels=1)))
    assert x.shape == (1, 4, 4)
    assert x[0, 0, 0] == float(solid().convert("L").getpixel((0, 0)))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 8), dtype=np.uint8)
    pixels[:, 4:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path / "img" / "rotated.png", Image.fromarray(pixels), exif=exif)
    pre = Preprocess(preset="raw").resolved(spec(channels=1, height=8, width=4))
    images = open_images(tmp_path / "img", spec=spec(channels=1, height=8, width=4))
    (batch,) = images.iter_batches(4)
    with Image.open(path) as image:
        direct = preprocess_image(image, pre)
    assert batch.inputs.shape == (1, 1, 8, 4)
    column = batch.inputs[0, 0, :, 0] * 255
    assert column[0] == 0 and column[-1] == 255  # left edge went to the top
    np.testing.assert_array_equal(batch.inputs[0] * 255, direct)


# --------------------------------------------------------------------------- formats and modes


def _write_formats(root):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    save(root / "a_rgb.png", rgb)
    save(root / "b_grey.png", rgb.convert("L"))
    save(root / "c_rgba.png", rgb.convert("RGBA"))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    save(root / "d_palette.png", palette, transparency=0)
    save(root / "e_photo.jpg", rgb, quality=100, subsampling=0)
    save(root / "f_bitmap.bmp", rgb)
    save(root / "g_lossless.webp", rgb, lossless=True)
    save(root / "h_cmyk.jpeg", Image.new("CMYK", (7, 9), (0, 255, 255, 0)))  # red
    save(root / "i_deep.png", Image.fromarray(np.full((9, 7), 257 * 100, dtype=np.uint16)))
    save(root / "j_white.png", Image.fromarray(np.full((9, 7), 65535, dtype=np.uint16)))
    save(root / "k_scan.TIFF", rgb, compression="tiff_lzw")
    save(root / "l_deep.tif", Image.fromarray(np.full((9, 7), 257 * 50, dtype=np.uint16)))
    return rgb


@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_and_mode_decodes(tmp_path, channels):
    rgb = _write_formats(tmp_path)
    images = open_images(
        tmp_path,
        spec=spec(channels=channels, height=9, width=7),
        preprocess=Preprocess(preset="raw"),
    )
    assert images.kind == "folder" and len(images) == 12
    indices, x = all_inputs(images, batch_size=4)
    assert images.skipped == []
    np.testing.assert_array_equal(indices, np.arange(12))
    assert x.shape == (12, channels, 9, 7) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255
    reference = np.asarray(rgb if channels == 3 else rgb.convert("L"), dtype=np.float32)
    reference = reference.transpose(2, 0, 1) if channels == 3 else reference[None]
    for name in ("a_rgb.png", "c_rgba.png", "f_bitmap.bmp", "g_lossless.webp", "k_scan.TIFF"):
        np.testing.assert_array_equal(x[images.paths.index(name)], reference, err_msg=name)
    assert np.abs(x[images.paths.index("e_photo.jpg")] - reference).mean() < 8
    assert x[images.paths.index("i_deep.png")].max() == 100  # 16-bit scaled to 0..255
    assert x[images.paths.index("j_white.png")].min() == 255
    assert x[images.paths.index("l_deep.tif")].max() == 50  # 16-bit TIFF, as 16-bit PNG
    if channels == 3:
        red = x[images.paths.index("h_cmyk.jpeg")].mean(axis=(1, 2))
        assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_float_and_32bit_greys_are_scaled():
    pre = Preprocess(preset="raw").resolved(spec(channels=1, height=2, width=2))
    unit_float = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert preprocess_image(unit_float, pre)[0, 0, 0] == 128
    wide = Image.fromarray(np.full((2, 2), 65535, dtype=np.int32))
    assert wide.mode == "I" and preprocess_image(wide, pre)[0, 0, 0] == 255


# --------------------------------------------------------------------------- folders and labels


def test_folder_scan_is_recursive_sorted_and_ignores_hidden_and_other_files(tmp_path):
    for name in [
        "b/z.png",
        "a/y.PNG",
        "a/deep/x.jpg",
        "root.bmp",
        ".hidden.png",
        ".cache/a.png",
        "notes.txt",
        "a/image.gif",
    ]:
        save(tmp_path / name, solid(), format="PNG")
    images = open_images(tmp_path, spec=spec())
    assert images.paths == ["a/deep/x.jpg", "a/y.PNG", "b/z.png", "root.bmp"]
    assert images.labels is None and "not class indices" in images.label_source


def test_labels_from_integer_folders(tmp_path):
    for name in ["0/a.png", "2/b.png", "10/c.png", "loose.png", "002/d.png"]:
        save(tmp_path / name, solid())
    images = open_images(tmp_path, spec=spec())
    assert images.paths == ["0/a.png", "002/d.png", "10/c.png", "2/b.png", "loose.png"]
    np.testing.assert_array_equal(images.labels, [0, 2, 10, 2, -1])
    assert images.labels.dtype == np.int64 and images.class_names is None


def test_images_only_in_root_have_no_labels(tmp_path):
    save(tmp_path / "a.png", solid())
    images = open_images(tmp_path, spec=spec())
    assert images.labels is None and images.label_source.startswith("none")


def test_labels_from_class_names_file(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("cat\n\n  dog  \nbird\n", encoding="utf-8")
    for name in ["dog/1.png", "cat/2.png", "2/3.png"]:
        save(tmp_path / "img" / name, solid())
    images = open_images(tmp_path / "img", spec=spec(), class_names=names)
    assert images.class_names == ["cat", "dog", "bird"]
    assert images.paths == ["2/3.png", "cat/2.png", "dog/1.png"]
    np.testing.assert_array_equal(images.labels, [2, 0, 1])


def test_labels_from_class_names_list(tmp_path):
    save(tmp_path / "dog" / "1.png", solid())
    images = open_images(tmp_path, spec=spec(), class_names=["cat", "dog"])
    np.testing.assert_array_equal(images.labels, [1])


def test_unknown_folder_names_are_listed(tmp_path):
    for name in ["cat/1.png", "horse/2.png", "7/3.png"]:
        save(tmp_path / name, solid())
    with pytest.raises(DataError, match=r"2 sub-folder.*'7', 'horse'"):
        open_images(tmp_path, spec=spec(), class_names=["cat", "dog"])


def test_ambiguous_class_name_is_refused(tmp_path):
    save(tmp_path / "crane" / "1.png", solid())
    with pytest.raises(DataError, match="ambiguous"):
        open_images(tmp_path, spec=spec(), class_names=["crane", "dog", "crane"])


def test_missing_or_empty_class_names_file(tmp_path):
    save(tmp_path / "img" / "a.png", solid())
    with pytest.raises(DataError, match="class names"):
        open_images(tmp_path / "img", spec=spec(), class_names=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        open_images(tmp_path / "img", spec=spec(), class_names=tmp_path / "empty.txt")


def test_other_file_is_refused(tmp_path):
    path = save(tmp_path / "one.png", solid())
    with pytest.raises(DataError, match="neither a folder"):
        open_images(path, spec=spec())


def test_preprocess_problems_surface_at_open(tmp_path):
    save(tmp_path / "a.png", solid())
    with pytest.raises(UsageError, match="dynamic"):
        open_images(tmp_path, spec=spec(height=None, width=None))
    with pytest.raises(MismatchError):
        open_images(tmp_path, spec=spec(), preprocess=Preprocess(size=(8, 8)))


# --------------------------------------------------------------------------- decode failures


def _folder_with_bad_files(root):
    for i in range(5):
        save(root / f"{i}.png", solid((i * 40, 0, 0)))
    (root / "2.png").write_bytes(b"this is not an image")
    good = root / "good.jpg"
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    save(good, Image.fromarray(noise))
    (root / "4_truncated.jpg").write_bytes(good.read_bytes()[:300])
    good.unlink()


def test_corrupt_and_truncated_files_are_skipped_and_recorded(tmp_path):
    _folder_with_bad_files(tmp_path)
    images = open_images(tmp_path, spec=spec(), preprocess=Preprocess(preset="raw"))
    assert images.paths == ["0.png", "1.png", "2.png", "3.png", "4.png", "4_truncated.jpg"]
    assert images.skipped == []  # filled as batches are read
    indices, x = all_inputs(images, batch_size=2)
    np.testing.assert_array_equal(indices, [0, 1, 3, 4])
    np.testing.assert_array_equal(x[:, 0, 0, 0], [0, 40, 120, 160])
    assert [p for p, _ in images.skipped] == ["2.png", "4_truncated.jpg"]
    assert all("cannot decode" in reason for _, reason in images.skipped)
    all_inputs(images, batch_size=4)  # a second pass does not duplicate the record
    assert len(images.skipped) == 2


def test_batch_with_only_bad_images_is_not_yielded(tmp_path):
    _folder_with_bad_files(tmp_path)
    images = open_images(tmp_path, spec=spec())
    batches = list(images.iter_batches(1))
    assert [int(b.indices[0]) for b in batches] == [0, 1, 3, 4]


def test_oversized_images_are_refused_before_decoding(tmp_path, monkeypatch):
    save(tmp_path / "small.png", solid(size=(4, 4)))
    save(tmp_path / "large.png", solid(size=(20, 20)))
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 100)  # where _open_image reads it
    images = open_images(tmp_path, spec=spec())
    indices, _ = all_inputs(images)
    np.testing.assert_array_equal(indices, [1])
    assert images.skipped[0][0] == "large.png" and "decompression" in images.skipped[0][1]


def test_pillow_bomb_warning_is_a_decode_failure_not_a_warning(tmp_path, monkeypatch, recwarn):
    save(tmp_path / "a.png", solid(size=(20, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: Pillow warns
    images = open_images(tmp_path, spec=spec())
    assert list(images.iter_batches(1)) == []
    assert "decompression bomb" in images.skipped[0][1]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --------------------------------------------------------------------------- batches


def test_batches_keep_order_and_cover_everything(tmp_path):
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        save(tmp_path / f"{i:02d}.png", Image.fromarray(p))
    images = open_images(tmp_path, spec=spec(layout="NHWC"), preprocess=Preprocess(preset="raw"))
    batches = list(images.iter_batches(4))
    assert [len(b.indices) for b in batches] == [4, 4, 3]
    for b in batches:
        assert b.indices.dtype == np.int64 and b.inputs.dtype == np.float32
        assert b.inputs.flags.c_contiguous
    inputs = np.concatenate([b.inputs for b in batches])
    np.testing.assert_array_equal(inputs, pixels.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(11))


def test_stopping_early_and_bad_batch_size(tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}.png", solid())
    images = open_images(tmp_path, spec=spec(batch=1))
    first = next(iter(images.iter_batches(2)))
    assert first.inputs.shape == (2, 3, 4, 4)
    assert images.spec.batch == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError):
            images.iter_batches(bad)


def test_next_batch_is_decoded_while_the_caller_works(tmp_path, monkeypatch):
    for i in range(6):
        save(tmp_path / f"{i}.png", solid())
    loaded: list[int] = []
    second_batch_done = threading.Event()
    original = data.ImageSet._load

    def recording_load(self, index):
        result = original(self, index)
        loaded.append(index)
        if {2, 3} <= set(loaded):
            second_batch_done.set()
        return result

    monkeypatch.setattr(data.ImageSet, "_load", recording_load)
    batches = open_images(tmp_path, spec=spec()).iter_batches(2)
    first = next(batches)
    np.testing.assert_array_equal(first.indices, [0, 1])
    assert second_batch_done.wait(5)  # decoded without being asked for
    assert not {4, 5} & set(loaded)  # but only one batch ahead
    assert [list(b.indices) for b in batches] == [[2, 3], [4, 5]]


@pytest.mark.parametrize(
    "kwargs, channels, layout",
    [
        (dict(preset="imagenet", bgr=True, center_crop=True), 3, "NHWC"),
        (dict(preset="unit"), 1, "NCHW"),
    ],
)
def test_folder_batches_and_display_are_the_library_functions(tmp_path, kwargs, channels, layout):
    # One path: what ImageSet yields and shows is what preprocess_image and display_image
    # make of the same file, decoded.
    rng = np.random.default_rng(6)
    save(tmp_path / "a.png", Image.fromarray(rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)))
    save(tmp_path / "b.png", Image.fromarray(rng.integers(0, 256, (14, 6), dtype=np.uint8)))
    model = spec(layout=layout, channels=channels, height=5, width=4)
    images = open_images(tmp_path, spec=model, preprocess=Preprocess(**kwargs))
    (batch,) = images.iter_batches(2)
    for i, name in enumerate(("a.png", "b.png")):
        with Image.open(tmp_path / name) as image:
            direct = preprocess_image(image, images.preprocess)
            shown = display_image(image, images.preprocess)
        np.testing.assert_array_equal(batch.inputs[i], direct)
        np.testing.assert_array_equal(images.display_image(i), shown)


def test_display_image_of_folder_matches_resize(tmp_path):
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    save(tmp_path / "a.png", image)
    pre_kw = dict(preset="imagenet", bgr=True)
    images = open_images(tmp_path, spec=spec(height=5, width=6), preprocess=Preprocess(**pre_kw))
    shown = images.display_image(0)
    expected = np.asarray(image.resize((6, 5), Image.Resampling.BILINEAR, reducing_gap=None))
    assert shown.dtype == np.uint8 and shown.shape == (5, 6, 3)
    np.testing.assert_array_equal(shown, expected)
    np.testing.assert_array_equal(display_image(image, images.preprocess), expected)
    grey = open_images(tmp_path, spec=spec(channels=1, height=5, width=6)).display_image(-1)
    assert grey.shape == (5, 6, 3) and np.all(grey[..., 0] == grey[..., 2])
    with pytest.raises(IndexError):
        images.display_image(1)


# --------------------------------------------------------------------------- arrays


def _imagenet_array(pixels, bgr=False):
    x = (pixels.astype(np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    if bgr:
        x = x[..., ::-1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def test_npy_is_used_as_given(tmp_path):
    x = np.random.default_rng(6).normal(size=(5, 3, 4, 4)).astype(np.float64)
    x[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    images = open_images(tmp_path / "x.npy", spec=spec())
    assert images.kind == "array" and len(images) == 5 and images.labels is None
    assert images.paths[3] == "x.npy[3]"
    assert images.preprocess.preset == "array" and not images.preprocess.applied
    assert "no preprocessing" in images.preprocess.describe()
    assert images.preprocess.to_dict()["applied"] is False
    indices, got = all_inputs(images, batch_size=2)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, x.astype(np.float32))
    np.testing.assert_array_equal(indices, np.arange(5))


def test_npy_float16_and_grey_3d(tmp_path):
    x = np.random.default_rng(7).random((3, 4, 4)).astype(np.float16)
    np.save(tmp_path / "g.npy", x)
    for layout, shape in (("NCHW", (3, 1, 4, 4)), ("NHWC", (3, 4, 4, 1))):
        images = open_images(tmp_path / "g.npy", spec=spec(layout=layout, channels=1))
        (batch,) = images.iter_batches(8)
        assert batch.inputs.shape == shape and batch.inputs.dtype == np.float32
        np.testing.assert_array_equal(batch.inputs.reshape(3, 4, 4), x.astype(np.float32))


@pytest.mark.parametrize(
    "input_key, label_key", [("images", "labels"), ("x", "y"), ("data", "labels")]
)
def test_npz_inputs_and_labels(tmp_path, input_key, label_key):
    x = np.zeros((4, 4, 4, 3), dtype=np.float32)
    np.savez(tmp_path / "d.npz", **{input_key: x, label_key: np.array([3, -1, 0, 1])})
    names = ["a", "b", "c", "d"]
    images = open_images(tmp_path / "d.npz", spec=spec(layout="NHWC"), class_names=names)
    np.testing.assert_array_equal(images.labels, [3, -1, 0, 1])
    assert images.labels.dtype == np.int64 and images.class_names == ["a", "b", "c", "d"]
    assert next(images.iter_batches(10)).inputs.shape == (4, 4, 4, 3)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(images=np.zeros((2, 3, 4, 4)), labels=np.array([0.0, 1.0])), "integers"),
        (dict(images=np.zeros((2, 3, 4, 4)), labels=np.array([0, 1, 2])), "shape"),
        (dict(images=np.zeros((2, 3, 4, 4)), labels=np.array([0, -2])), "-1"),
        (dict(a=np.zeros((2, 3, 4, 4)), b=np.zeros((2, 3, 4, 4))), "name the inputs"),
    ],
)
def test_npz_problems(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        open_images(tmp_path / "d.npz", spec=spec())


def test_integer_and_empty_arrays_are_refused(tmp_path):
    np.save(tmp_path / "u8.npy", np.zeros((2, 3, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="uint8"):
        open_images(tmp_path / "u8.npy", spec=spec())
    np.save(tmp_path / "none.npy", np.zeros((0, 3, 4, 4), dtype=np.float32))
    with pytest.raises(DataError, match="no inputs"):
        open_images(tmp_path / "none.npy", spec=spec())
    np.save(tmp_path / "flat.npy", np.zeros((2, 48), dtype=np.float32))
    with pytest.raises(DataError, match="2-D"):
        open_images(tmp_path / "flat.npy", spec=spec())


def test_array_shape_must_fit_the_model(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(MismatchError, match="3x8x8.*3x4x4"):
        open_images(tmp_path / "x.npy", spec=spec())
    np.save(tmp_path / "hwc.npy", np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(MismatchError, match="looks NHWC.*transpose"):
        open_images(tmp_path / "hwc.npy", spec=spec())
    images = open_images(tmp_path / "x.npy", spec=spec(height=None, width=None))
    assert images.preprocess.size == (8, 8)  # dynamic model: size from the array


def test_array_refuses_resizing_options(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(UsageError, match="--size"):
        open_images(tmp_path / "x.npy", spec=spec(), preprocess=Preprocess(size=(8, 8)))
    with pytest.raises(UsageError, match="centre crop"):
        open_images(tmp_path / "x.npy", spec=spec(), preprocess=Preprocess(center_crop=True))
    same = open_images(tmp_path / "x.npy", spec=spec(), preprocess=Preprocess(size=(4, 4)))
    assert same.preprocess.size == (4, 4)


@pytest.mark.parametrize("bgr", [False, True])
def test_array_display_round_trip(tmp_path, bgr):
    pixels = np.random.default_rng(8).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", _imagenet_array(pixels, bgr=bgr))
    pre = Preprocess(preset="imagenet", bgr=bgr)
    images = open_images(tmp_path / "x.npy", spec=spec(), preprocess=pre)
    for i in range(3):
        shown = images.display_image(i)
        assert shown.dtype == np.uint8 and shown.shape == (4, 4, 3)
        np.testing.assert_array_equal(shown, pixels[i])


def test_array_display_of_grey_and_nan(tmp_path):
    x = np.array([[[0.0, 0.5], [1.0, np.nan]]], dtype=np.float32)  # (1, 2, 2)
    np.save(tmp_path / "g.npy", x)
    images = open_images(tmp_path / "g.npy", spec=spec(channels=1, height=2, width=2))
    shown = images.display_image(0)
    assert shown.shape == (2, 2, 3)
    np.testing.assert_array_equal(shown[..., 1], [[0, 128], [255, 0]])
    assert np.all(shown[..., 0] == shown[..., 2])


def test_folder_batches_equal_array_of_the_same_images(tmp_path):
    pixels = np.random.default_rng(9).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        save(tmp_path / "img" / f"{i}.png", Image.fromarray(p))
    np.save(tmp_path / "x.npy", _imagenet_array(pixels))
    pre = Preprocess(preset="imagenet")
    _, from_folder = all_inputs(open_images(tmp_path / "img", spec=spec(), preprocess=pre))
    _, from_array = all_inputs(open_images(tmp_path / "x.npy", spec=spec(), preprocess=pre))
    np.testing.assert_array_equal(from_folder, from_array)


@settings(max_examples=25, deadline=None)
@given(
    pixels=st.binary(min_size=2 * 3 * 3 * 3, max_size=2 * 3 * 3 * 3),
    preset=st.sampled_from(sorted(data.PRESETS)),
    bgr=st.booleans(),
    layout=st.sampled_from(data.LAYOUTS),
)
def test_array_display_inverts_preprocessing(tmp_path_factory, pixels, preset, bgr, layout):
    pixels = np.frombuffer(pixels, dtype=np.uint8).reshape(2, 3, 3, 3)
    pre = Preprocess(preset=preset, bgr=bgr, layout=layout)
    resolved = pre.resolved(spec(layout=layout, height=3, width=3))
    x = np.stack([preprocess_image(Image.fromarray(p), resolved) for p in pixels])
    path = tmp_path_factory.mktemp("arrays") / "x.npy"
    np.save(path, x)
    images = open_images(path, spec=spec(layout=layout, height=3, width=3), preprocess=pre)
    for i in range(2):
        np.testing.assert_array_equal(images.display_image(i), pixels[i])


def test_array_with_other_channel_count_shows_their_mean(tmp_path):
    x = np.stack([np.full((2, 2), v, dtype=np.float32) for v in (0.0, 0.2, 0.4, 0.6)])[None]
    np.save(tmp_path / "four.npy", x)
    images = open_images(tmp_path / "four.npy", spec=spec(channels=4, height=2, width=2))
    assert next(images.iter_batches(1)).inputs.shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(images.display_image(0), np.full((2, 2, 3), 76, dtype=np.uint8))


def test_unsupported_image_mode_is_data_error():
    with pytest.raises(DataError, match="unsupported image mode 'La'"):
        preprocess_image(Image.new("La", (4, 4)), Preprocess().resolved(spec()))


def test_npy_has_no_labels_and_says_so(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 4, 4), dtype=np.float32))
    images = open_images(tmp_path / "x.npy", spec=spec(), class_names=["a"])
    assert images.labels is None and images.label_source.startswith("none")
    assert images.class_names == ["a"]


def test_fingerprint_tells_changed_image_sets_apart(tmp_path):
    """Same files -> same fingerprint; a file added, grown or touched, other labels or
    another array -> another."""
    import os
    import shutil

    from onnx_sp2ps.data import InputSpec, open_images

    from conftest import SAMPLES

    spec = InputSpec(layout="NCHW", channels=3, height=64, width=64)
    folder = tmp_path / "imgs"
    shutil.copytree(SAMPLES / "images", folder)

    def fp(path=folder, **kw):
        return open_images(path, spec=spec, **kw).fingerprint()

    first = fp()
    assert fp() == first
    one = sorted(folder.rglob("*.png"))[0]
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 10**9))
    touched = fp()
    assert touched != first
    with open(one, "ab") as f:
        f.write(b"\0")
    assert fp() != touched
    assert fp(class_names=["a", "b", "c", "d", "e"]) != fp()
    arr = tmp_path / "x.npy"
    np.save(arr, np.zeros((3, 3, 64, 64), np.float32))
    a = fp(arr)
    assert fp(arr) == a
    np.save(arr, np.zeros((4, 3, 64, 64), np.float32))
    assert fp(arr) != a

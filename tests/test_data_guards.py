"""Guards of onnx_sp2ps.data against inputs made to hang, crash or exhaust the audit
(issue 10, the data side).

Each case runs through the command line in-process (``run_cli``), or through
:func:`open_images` where the library is the point: a refusal is exit 3 with exactly one
line on stderr, naming the file, and no traceback. The bombs also run in a child process
whose address space is limited to 1 GB, and the cases that could block (FIFOs) in a child
with a timeout, or with a watchdog that unblocks the FIFO, so that a regression fails
instead of hanging the suite.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_sp2ps import data, files
from onnx_sp2ps.data import InputSpec, Preprocess, open_images, preprocess_image
from onnx_sp2ps.errors import DataError

from conftest import ROOT, SAMPLES, run_cli

MODELS = (SAMPLES / "gap_original.onnx", SAMPLES / "gap_l1_60.onnx")  # 3x64x64, NCHW
SIZE = 64
GB = 1 << 30

needs_posix = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, devices, uids")


# --------------------------------------------------------------------------- inputs


def _image(path: Path, value: int = 120, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(path)
    return path


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A grey PNG header claiming width x height pixels, with no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b""))
    return path


def _zeros_deflated(size: int, compressor=None) -> bytes:
    """The rest of a raw deflate stream: ``size`` zero bytes, mostly one compressed 16 MiB
    block repeated (each ends with a full flush, so each is the same): gigabytes of zeros
    in a few megabytes, without compressing them all."""
    block = 1 << 24
    compressor = compressor or zlib.compressobj(9, zlib.DEFLATED, -15)
    one = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return one * (size // block) + compressor.compress(bytes(size % block)) + compressor.flush()


def _zlib_zeros(size: int) -> bytes:
    """``size`` zero bytes as a zlib stream, checksum included."""
    adler = ((size % 65521) << 16) | 1  # Adler-32 of zeros: a stays 1, b counts them
    return b"\x78\xda" + _zeros_deflated(size) + struct.pack(">I", adler)


def _png_with_chunks(path: Path, chunks: bytes) -> Path:
    """A valid 8x8 PNG with extra chunks before its pixel data."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buffer, format="PNG")
    png = buffer.getvalue()
    at = png.index(b"IDAT") - 4
    path.write_bytes(png[:at] + chunks + png[at:])
    return path


def _tiff(path: Path, frames: list[tuple[int, int, bytes]]) -> Path:
    """A little-endian grey TIFF, one uncompressed strip per frame: (width, height, data);
    a frame may claim far more pixels than its data holds."""
    out = bytearray(b"II*\0\0\0\0\0")
    links = [4]
    for width, height, pixels in frames:
        strip = len(out)
        out += pixels
        struct.pack_into("<I", out, links[-1], len(out))
        tags = [
            (256, 4, width),
            (257, 4, height),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, strip),
            (277, 3, 1),
            (278, 4, height),
            (279, 4, len(pixels)),
        ]
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            out += struct.pack("<HHII", tag, kind, 1, value)
        links.append(len(out))
        out += b"\0\0\0\0"
    path.write_bytes(bytes(out))
    return path


def _npy_header(shape, dtype="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    )
    return buffer.getvalue()


def _zip_bomb_npz(path: Path, inflated: int) -> Path:
    """An .npz (zip64) whose 'images' member inflates to ``inflated`` bytes of float32
    zeros, as its .npy header and the archive's directory both say, from about 1/1000 of
    that. Its CRC is not the data's: the guard refuses the member before reading it."""
    rows = inflated // (3 * SIZE * SIZE * 4)
    header = _npy_header((rows, 3, SIZE, SIZE))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    body += _zeros_deflated(rows * 3 * SIZE * SIZE * 4, compressor)  # the same stream
    size = len(header) + rows * 3 * SIZE * SIZE * 4
    name = b"images.npy"
    zip64 = struct.pack("<HHQQ", 1, 16, size, len(body))
    local = struct.pack(
        "<4s2B4HL2L2H",
        b"PK\x03\x04",
        45,
        0,
        0,
        8,
        0,
        0x21,
        0,
        0xFFFFFFFF,
        0xFFFFFFFF,
        len(name),
        len(zip64),
    )
    central = struct.pack(
        "<4s4B4HL2L5H2L",
        b"PK\x01\x02",
        45,
        3,
        45,
        0,
        0,
        8,
        0,
        0x21,
        0,
        0xFFFFFFFF,
        0xFFFFFFFF,
        len(name),
        len(zip64),
        0,
        0,
        0,
        0o644 << 16,
        0,
    )
    records = local + name + zip64 + body
    directory = central + name + zip64
    end64 = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, len(directory), len(records)
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(records) + len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(records), 0)
    path.write_bytes(records + directory + end64 + locator + end)
    return path


def _audit(capsys, images, *extra):
    return run_cli(capsys, "audit", *MODELS, "--images", images, "-q", *extra)


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    return lines[0]


def _refused(capsys, images, *extra) -> str:
    code, out, err = _audit(capsys, images, *extra)
    line = _one_line(err)
    assert code == 3, err
    assert line.startswith("error: "), line
    assert out == ""
    return line


@contextmanager
def _watchdog(fifo: Path, seconds: float = 5.0):
    """Should the code under test block on the FIFO, open its other end after ``seconds``
    (then close it) so that the read ends and the test fails on its time instead of
    hanging; the body must take well under ``seconds``."""
    done = threading.Event()

    def unblock() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():  # opens once a reader waits, and lets it read nothing
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        yield
    finally:
        done.set()
        thread.join()
    assert time.monotonic() - start < seconds, "blocked on the FIFO"


def _child(script: str, *args, timeout: float):
    """Run a Python child from the repository root; fail (not hang) past the timeout."""
    try:
        return subprocess.run(
            [sys.executable, "-c", script, *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish in {timeout} s")


# --------------------------------------------------------------------------- images


def test_centre_crop_of_an_elongated_image_is_refused_before_resizing(tmp_path, capsys):
    """1 x 20,000 pixels would be resized to 73 x 1,460,000 (over the limit) before the
    crop; small enough that a regression costs 0.4 GB here, not the 1 x 1,000,000 image's
    21 GB (that one runs in a 1 GB child below)."""
    folder = tmp_path / "imgs"
    _image(folder / "good.png")
    Image.new("L", (1, 20_000), 7).save(folder / "long.png")
    code, _, err = _audit(capsys, folder, "--center-crop", "--out", tmp_path / "out")
    assert code == 0
    assert _one_line(err).startswith("skipped 1 unreadable image(s) or folder(s), e.g. long.png")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (skipped,) = report["images"]["skipped"]
    assert "decompression-bomb guard" in skipped["reason"]
    assert "73x1460000 = 106580000 pixels" in skipped["reason"]
    assert "over the limit of 89478485" in skipped["reason"]
    line = _refused(capsys, folder, "--center-crop", "--strict")
    assert "long.png" in line and "decompression-bomb guard" in line
    # the same image straight to the library, already decoded
    pre = Preprocess(center_crop=True).resolved(InputSpec("NCHW", 3, SIZE, SIZE))
    with pytest.raises(DataError, match="1460000x73"):
        preprocess_image(Image.new("L", (20_000, 1)), pre)


def test_the_pixel_limit_enforced_is_the_documented_one(tmp_path):
    limit = data.MAX_IMAGE_PIXELS
    assert limit == 89_478_485 == 5 * 17_895_697
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own global is left alone
    _png_header_only(tmp_path / "a_at_limit.png", 5, limit // 5)
    _png_header_only(tmp_path / "b_one_over.png", 2, 44_739_243)  # limit + 1
    _png_header_only(tmp_path / "c_far_over.png", 30_000, 30_000)  # over Pillow's 2x
    images = open_images(tmp_path, spec=InputSpec("NCHW", 1, 4, 4))
    assert list(images.iter_batches(3)) == []
    reasons = dict(images.skipped)
    assert "decompression" not in reasons["a_at_limit.png"]  # no pixel data: cannot decode
    assert "cannot decode" in reasons["a_at_limit.png"]
    for name, pixels in (("b_one_over.png", limit + 1), ("c_far_over.png", 900_000_000)):
        assert reasons[name] == (
            "refused before decoding (decompression-bomb guard): image "
            f"is {pixels} pixels, over the limit of {limit}"
        ), name


def test_input_size_over_the_pixel_limit_is_refused_at_open(tmp_path):
    _image(tmp_path / "a.png")
    with pytest.raises(DataError, match="10000x10000.*over the limit of 89478485"):
        open_images(
            tmp_path,
            spec=InputSpec("NCHW", 3, None, None),
            preprocess=Preprocess(size=(10_000, 10_000)),
        )


def _bombs(folder: Path) -> dict[str, str]:
    """Image bombs (name -> what the reason for skipping it says), a good image, and a TIFF
    whose first frame is good and whose second claims 10^10 pixels: only the first frame is
    read, and that file is scored."""
    _image(folder / "good.png")
    Image.new("L", (1, 1_000_000), 7).save(folder / "long.png")
    bomb = _zlib_zeros(2 * GB)  # 2 GiB of zeros, about 2 MB
    _png_with_chunks(folder / "ztxt.png", _chunk(b"zTXt", b"Comment\0\0" + bomb))
    _png_with_chunks(folder / "iccp.png", _chunk(b"iCCP", b"icc\0\0" + bomb))
    _png_with_chunks(folder / "itxt.png", _chunk(b"iTXt", b"Comment\0\1\0\0\0" + bomb))
    small = zlib.compress(bytes(900 << 10), 9)
    _png_with_chunks(
        folder / "many_chunks.png",
        b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + small) for i in range(100)),
    )
    _tiff(folder / "huge_frame.tif", [(100_000, 100_000, bytes(64))])
    _tiff(folder / "frames.tif", [(8, 8, bytes(range(64))), (100_000, 100_000, bytes(64))])
    return {
        "long.png": "73x73000000",
        "ztxt.png": "MAX_TEXT_CHUNK",
        "iccp.png": "MAX_TEXT_CHUNK",
        "itxt.png": "MAX_TEXT_CHUNK",
        "many_chunks.png": "MAX_TEXT_MEMORY",
        "huge_frame.tif": "over the limit of 89478485",
    }


# Runs the CLI once per argument list given (as JSON); prints one JSON line per run,
# [exit code, stderr, seconds], after "results:". Before the runs, what _SETUP holds.
_RUNS = """
import contextlib, io, json, os, sys, time
from onnx_sp2ps.cli import main
def run(args):
    err = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    return [code, err.getvalue(), time.monotonic() - start]
_SETUP
print("results:", flush=True)
for args in json.loads(sys.argv[1]):
    print(json.dumps(run(args)), flush=True)
"""


def _runs(setup: str, runs: list[list], seconds: float = 10) -> list[tuple[int, str]]:
    """(exit code, stderr) of each run, in a child; each run must take under ``seconds``.
    The child as a whole gets 60 s (starting Python and importing the CLI takes seconds,
    more on a busy machine): past that, a run that blocks fails the test."""
    child = _child(
        _RUNS.replace("_SETUP", setup),
        json.dumps([[str(a) for a in args] for args in runs]),
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    results = [json.loads(line) for line in child.stdout.split("results:\n", 1)[1].splitlines()]
    assert len(results) == len(runs), child.stdout
    for code, err, took in results:
        assert took < seconds, (took, code, err)
    return [(code, err) for code, err, _ in results]


@needs_posix
def test_bombs_in_a_1gb_address_space_are_refused_or_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    expected = _bombs(folder)
    liar = tmp_path / "liar.npy"  # claims 10^12 images, holds 100 bytes
    liar.write_bytes(_npy_header((10**12, 3, SIZE, SIZE)) + bytes(100))
    npz = _zip_bomb_npz(tmp_path / "bomb.npz", 10 * GB)
    assert npz.stat().st_size < 11_000_000
    common = ["audit", *MODELS, "-q", "--images"]
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))"
    (folder_code, folder_err), (liar_code, liar_err), (npz_code, npz_err) = _runs(
        limit,
        [
            common + [folder, "--center-crop", "--out", tmp_path / "out"],
            common + [liar],
            common + [npz],
        ],
    )
    assert folder_code == 0, folder_err
    assert _one_line(folder_err).startswith(
        f"skipped {len(expected)} unreadable image(s) or folder(s)"
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = {row["path"]: row["reason"] for row in report["images"]["skipped"]}
    assert sorted(skipped) == sorted(expected)
    for name, says in expected.items():
        assert says in skipped[name], (name, skipped[name])
    assert report["images"]["scored"] == 2  # good.png and the first frame of frames.tif
    assert (
        liar_code == 3
        and f"error: {liar} is cut short" == _one_line(liar_err)[: len(str(liar)) + 20]
    ), liar_err
    assert npz_code == 3, npz_err
    line = _one_line(npz_err)
    assert line.startswith("error: ") and "bomb.npz" in line
    assert "memory budget" in line and ".npy" in line


# --------------------------------------------------------------------------- arrays


def test_npy_whose_header_claims_more_than_the_file_holds(tmp_path, capsys):
    path = tmp_path / "liar.npy"
    path.write_bytes(_npy_header((10**12, 3, SIZE, SIZE)) + bytes(100))
    line = _refused(capsys, path)
    assert "liar.npy is cut short" in line and "holds 100 bytes" in line
    assert "save the array again" in line
    path.write_bytes(_npy_header((2, 3, SIZE, SIZE)) + bytes(3 * SIZE * SIZE * 4))
    assert "cut short" in _refused(capsys, path)


def test_array_row_names_are_made_when_asked(tmp_path):
    """A legitimate .npy of 20 million 3x4x4 inputs (a sparse 3.8 GB file): opening it
    builds no name per row."""
    rows = 20_000_000
    path = tmp_path / "many.npy"
    header = _npy_header((rows, 3, 4, 4))
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + rows * 3 * 4 * 4 * 4)
    start = time.monotonic()
    images = open_images(path, spec=InputSpec("NCHW", 3, 4, 4))
    assert time.monotonic() - start < 2
    assert len(images) == len(images.paths) == rows
    assert images.paths[0] == "many.npy[0]" and images.paths[-1] == f"many.npy[{rows - 1}]"
    assert images.paths[np.int64(7)] == "many.npy[7]"
    assert images.paths[2:4] == ["many.npy[2]", "many.npy[3]"]
    assert images.paths.index("many.npy[123456]") == 123456
    with pytest.raises(IndexError):
        images.paths[rows]
    batch = next(images.iter_batches(2))
    assert batch.inputs.shape == (2, 3, 4, 4) and not batch.inputs.any()


def test_npz_members_are_checked_before_they_are_inflated(tmp_path, capsys, monkeypatch):
    x = np.zeros((4, 3, SIZE, SIZE), np.float32)
    good = tmp_path / "good.npz"
    np.savez_compressed(good, images=x, labels=np.arange(4))
    assert _audit(capsys, good)[0] == 0
    # a header that claims more than the member holds, in inputs or in labels
    for key, header, payload in (
        ("images", _npy_header((10**9, 3, SIZE, SIZE)), x.tobytes()),
        ("labels", _npy_header((10**12,), "<i8"), bytes(32)),
    ):
        lying = tmp_path / f"lying_{key}.npz"
        with zipfile.ZipFile(lying, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(
                "images.npy" if key == "labels" else "x.npy", _npy_header(x.shape) + x.tobytes()
            )
            archive.writestr(f"{key}.npy", header + payload)
        line = _refused(capsys, lying)
        assert f"array '{key}' of {lying} is corrupt" in line and "save the file" in line
    # inputs and labels together over the memory budget (--max-memory's; through the
    # library, since on the command line the models' own check would refuse it first)
    with pytest.raises(DataError) as info:
        open_images(good, spec=InputSpec("NCHW", 3, SIZE, SIZE), max_memory=x.nbytes + 16)
    line = str(info.value)
    assert f"would take {x.nbytes + 32} bytes" in line and f"budget of {x.nbytes + 16}" in line
    # a member that is not an array is never read
    other = tmp_path / "other.npz"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("images.npy", _npy_header(x.shape) + x.tobytes())
        archive.writestr("notes.txt", "hello")
    assert "not .npy arrays ('notes.txt')" in _refused(capsys, other)


def test_memory_budget_defaults_to_half_the_available_memory():
    budget = files.memory_budget(None)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = next(
            int(line.split()[1])
            for line in meminfo.read_text().splitlines()
            if line.startswith("MemAvailable:")
        )
        assert abs(budget - kb * 1024 // 2) < 2**28  # MemAvailable moves a little
    assert files.memory_budget(12345) == 12345


# --------------------------------------------------------------------------- special files


@needs_posix
def test_a_fifo_among_the_images_is_refused_in_seconds(tmp_path):
    folder = tmp_path / "imgs"
    _image(folder / "b.png")
    os.mkfifo(folder / "a.png")
    ((code, err),) = _runs("", [["audit", *MODELS, "--images", folder, "-q"]])
    assert code == 3, err
    line = _one_line(err)
    assert line.startswith("error: a.png in ") and "is a FIFO (named pipe)" in line
    assert "remove it" in line


@needs_posix
def test_special_files_are_refused_before_they_are_opened(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _image(folder / "0" / "good.png")
    (folder / "0" / "x.png").symlink_to("/dev/zero")
    line = _refused(capsys, folder)
    assert "0/x.png in " in line and "is a character device" in line
    (folder / "0" / "x.png").unlink()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(folder / "s.jpg"))
        line = _refused(capsys, folder)
    assert "s.jpg in " in line and "is a socket" in line
    (folder / "s.jpg").unlink()
    # the --images path itself, and the class names file
    fifo = tmp_path / "inputs.npy"
    os.mkfifo(fifo)
    with _watchdog(fifo):
        line = _refused(capsys, fifo)
    assert "image path " in line and "inputs.npy is a FIFO" in line
    names = tmp_path / "names.txt"
    os.mkfifo(names)
    with _watchdog(names):
        line = _refused(capsys, folder, "--class-names", names)
    assert "class names file " in line and "names.txt is a FIFO" in line
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    line = _refused(capsys, folder, "--class-names", zero)
    assert "zero.txt is a character device" in line
    # a non-UTF-8 name in the message is escaped, and the line stays one line
    weird = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"\xff\nw.png")))
    os.mkfifo(weird)
    assert "\\xff\\nw.png in " in _refused(capsys, folder)


@needs_posix
def test_a_file_swapped_for_a_fifo_after_the_scan_is_skipped_unread(tmp_path):
    good = _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    images = open_images(tmp_path, spec=InputSpec("NCHW", 3, 4, 4))
    good.unlink()
    os.mkfifo(good)
    with _watchdog(good):
        batches = list(images.iter_batches(2))
    assert [int(i) for b in batches for i in b.indices] == [1]
    ((path, reason),) = images.skipped
    assert path == "a.png" and "FIFO" in reason and "not a regular file" in reason


def test_class_names_file_over_16_mib_is_refused_unread(tmp_path, capsys):
    _image(tmp_path / "imgs" / "cat" / "a.png")
    names = tmp_path / "names.txt"
    with open(names, "wb") as handle:
        handle.write(b"cat\n")
        handle.truncate(16 * 1024 * 1024 + 1)
    line = _refused(capsys, tmp_path / "imgs", "--class-names", names)
    assert "names.txt is over 16777216 bytes (16 MiB)" in line
    names.write_bytes(b"cat\n" + b" " * (16 * 1024 * 1024 - 4))  # exactly the limit
    assert _audit(capsys, tmp_path / "imgs", "--class-names", names)[0] == 0


# --------------------------------------------------------------------------- folders


@needs_posix
def test_unreadable_sub_folders_are_listed_as_skipped(open_tmp):
    from conftest import run_as_nobody

    folder = open_tmp / "imgs"
    for k in range(2):
        _image(folder / str(k) / f"good{k}.png", value=40 + k)
    _image(folder / "1" / "locked" / "hidden.png")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (folder / "1" / "locked").chmod(0)
    models = []  # copies the user can read (the checkout may be private to root)
    for model in MODELS:
        models.append(open_tmp / model.name)
        shutil.copy(model, models[-1])
        models[-1].chmod(0o644)
    args = ["audit", *models, "--images", folder, "-q"]
    code, _, err = run_as_nobody(open_tmp, *args)
    strict_code, _, strict_err = run_as_nobody(open_tmp, *args, "--strict")
    assert code == 0, err
    line = _one_line(err)
    assert line.startswith(
        "skipped 1 unreadable image(s) or folder(s), e.g. 1/locked/: "
        "cannot list the sub-folder (Permission denied)"
    ), line
    assert strict_code == 3, strict_err
    line = _one_line(strict_err)
    assert "cannot list the sub-folder 1/locked/ of " in line and "--strict" in line


def test_unreadable_sub_folders_in_the_library(tmp_path, monkeypatch):
    """The same, without another uid: os.walk reports the folder it cannot list."""
    _image(tmp_path / "0" / "a.png")
    _image(tmp_path / "1" / "b.png")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith(os.sep + "1"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    images = open_images(tmp_path, spec=InputSpec("NCHW", 3, 4, 4))
    assert images.paths == ["0/a.png"]
    reason = "cannot list the sub-folder (Permission denied); the images in it were not read"
    assert images.skipped == [("1/", reason)]
    with pytest.raises(DataError, match="cannot list the sub-folder 1/ of .*--strict"):
        open_images(tmp_path, spec=InputSpec("NCHW", 3, 4, 4), strict=True)


# --------------------------------------------------------------------------- names


@needs_posix
def test_file_names_with_control_characters_and_non_utf8_bytes(tmp_path, capsys):
    folder = os.fsencode(tmp_path / "imgs") + b"\xfa\n"  # the folder's name too
    os.mkdir(folder)
    names = {
        b"a\nb.png": "a\\nb.png",
        b"\xff.png": "\\xff.png",
        b"e\x1b[31m.png": "e\\x1b[31m.png",
        b"back\\slash.png": "back\\\\slash.png",
        b"caf\xc3\xa9.png": "café.png",
        b"ok.png": "ok.png",
    }
    for k, name in enumerate(names):
        _image(Path(os.fsdecode(os.path.join(folder, name))), value=30 * k)
    out = tmp_path / "out"
    code, _, err = _audit(
        capsys,
        os.fsdecode(folder),
        "--out",
        out,
        "--summary-md",
        out / "summary.md",
        "--junit",
        out / "junit.xml",
    )
    assert code == 0 and err == "", err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["images"]["source"] == str(tmp_path / "imgs") + "\\xfa\\n"
    assert sorted(row["path"] for row in report["candidates"][0]["images"]) == sorted(
        names.values()
    )
    images = open_images(os.fsdecode(folder), spec=InputSpec("NCHW", 3, 4, 4))
    assert sorted(images.paths) == sorted(names.values())
    assert all(p.isprintable() for p in images.paths)
    # a bad image with such a name: skipped on one line, or refused on one line
    Path(os.fsdecode(os.path.join(folder, b"bad\n\xfe.png"))).write_bytes(b"not an image")
    code, _, err = _audit(capsys, os.fsdecode(folder))
    assert code == 0
    assert _one_line(err).startswith(
        "skipped 1 unreadable image(s) or folder(s), e.g. bad\\n\\xfe.png: "
    )
    assert "bad\\n\\xfe.png" in _refused(capsys, os.fsdecode(folder), "--strict")
    # and a folder path with them, in the message for a folder without images
    empty = os.path.join(folder, b"empty\n\xfd")
    os.mkdir(empty)
    assert "empty\\n\\xfd" in _refused(capsys, os.fsdecode(empty))


def test_escaping_keeps_names_apart():
    names = ["a\nb", "a\\nb", os.fsdecode(b"\xff"), "\\xff", "\xff", "\x7f", "\u2028", "\t"]
    escaped = [files.show(n) for n in names]
    assert escaped == ["a\\nb", "a\\\\nb", "\\xff", "\\\\xff", "ÿ", "\\x7f", "\\u2028", "\\t"]
    assert files.show("plain name.png") == "plain name.png"

"""Resource bombs (issue 10): inputs that declare far more data than they hold, or that
inflate when decoded, run through the command line in a subprocess limited to 1 GiB of
address space (RLIMIT_AS) and 10 seconds.  Each must be refused the ordinary way: exit 3
and one line on stderr, well within the limits; never a MemoryError turned into exit 4,
a signal, or a run the timeout has to kill.

Every input is built small: the sparse, Constant and initializer bombs hold a few bytes;
the .npz zip bomb is 4.3 MB on disk and 4.4 GB inflated, written block by block so that
this test never holds (or deflates) the inflated data itself.
"""

from __future__ import annotations

import io
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzing  # noqa: E402

LIMIT_S = 10.0
MEMORY = 1 << 30
SAMPLES = fuzzing.SAMPLES
ORIGINAL = SAMPLES / "gap_original.onnx"


# --------------------------------------------------------------------------- bombs


def sparse_30000(path: Path) -> Path:
    """gap_sparse_80.onnx with its first sparse weight declaring 30000 x 30000 dense
    (3.6 GB as float32); its 922 values and indices unchanged."""
    model = onnx.load(str(SAMPLES / "compressed" / "gap_sparse_80.onnx"))
    model.graph.sparse_initializer[0].dims[:] = [30000, 30000]
    onnx.save(model, str(path))
    return path


def raw_data_short(path: Path) -> Path:
    """The first conv weight keeps its dims (16x3x5x5) but holds half its bytes."""
    model = onnx.load(str(ORIGINAL))
    t = next(t for t in model.graph.initializer if len(t.dims) == 4)
    t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    onnx.save(model, str(path))
    return path


def raw_data_huge_dims(path: Path) -> Path:
    """The first conv weight declares 100000x100000x3x3 (9e10 elements) over its 4.8 KB."""
    model = onnx.load(str(ORIGINAL))
    t = next(t for t in model.graph.initializer if len(t.dims) == 4)
    t.dims[:] = [100000, 100000, 3, 3]
    onnx.save(model, str(path))
    return path


def constant_1e10(path: Path) -> Path:
    """The classifier's weight as a Constant node whose value declares 10^5 x 10^5 = 10^10
    float32 elements (40 GB) and holds 16 bytes."""
    model = onnx.load(str(ORIGINAL))
    g = model.graph
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    weight = next(t for t in g.initializer if t.name == gemm.input[1])
    g.initializer.remove(weight)
    value = onnx.TensorProto()
    value.name = weight.name
    value.data_type = onnx.TensorProto.FLOAT
    value.dims.extend([100000, 100000])
    value.raw_data = b"\x00" * 16
    g.node.insert(0, helper.make_node("Constant", [], [weight.name], value=value))
    onnx.save(model, str(path))
    return path


def input_100000(path: Path) -> Path:
    """The image input declared 1 x 3 x 100000 x 100000."""
    model = onnx.load(str(ORIGINAL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, [1, 3, 100000, 100000]):
        d.dim_value = v
    onnx.save(model, str(path))
    return path


def long_png(path: Path, width: int, height: int) -> Path:
    """A real width x height RGB PNG (10^6 pixels: under the decompression-bomb limit), which
    --center-crop would scale to about 73 x 73,000,000 before cropping."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def _gf2_times(mat, vec):
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat):
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC-32 of A + B from crc(A), crc(B) and len(B)."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def npz_zip_bomb(path: Path, rows: int = 256 * 350) -> Path:
    """An .npz whose ``images`` member is a valid .npy of float32 zeros, rows x 3 x 64 x 64
    (4.4 GB inflated; 4.3 MB on disk), readable by zipfile and numpy (CRC included).

    The deflate stream is made the way a streaming ZIP_DEFLATED writer makes it, without
    feeding it 4.4 GB (which takes zlib 10-20 s here): after a full flush the compressor's
    history is empty, so each 12 MiB block of zeros deflates to the same bytes, compressed
    once and written ``rows / 256`` times; the CRC-32 of the whole is combined from the
    block's (zlib's crc32_combine).  The zip64 headers are written by hand for that reason.
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 64, 64)}
    )
    header = buf.getvalue()
    chunk = bytes(256 * 3 * 64 * 64 * 4)
    if rows % 256:
        raise ValueError("rows must be a multiple of 256")
    n = rows // 256
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush()
    size = len(header) + n * len(chunk)
    acc_crc, acc_len, k, zeros_crc, zeros_len = zlib.crc32(chunk), len(chunk), n, None, 0
    while k:  # crc of n blocks, by doubling
        if k & 1:
            zeros_crc = acc_crc if zeros_crc is None else crc32_combine(zeros_crc, acc_crc, acc_len)
            zeros_len += acc_len
        acc_crc = crc32_combine(acc_crc, acc_crc, acc_len)
        acc_len *= 2
        k >>= 1
    crc = crc32_combine(zlib.crc32(header), zeros_crc, zeros_len)
    name = b"images.npy"
    csize = len(head) + n * len(block) + len(tail)
    extra = struct.pack("<HHQQ", 1, 16, size, csize)  # zip64: sizes over 4 GiB
    with open(path, "wb") as f:
        f.write(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                45,
                0,
                8,
                0,
                0x21,
                crc,
                0xFFFFFFFF,
                0xFFFFFFFF,
                len(name),
                len(extra),
            )
            + name
            + extra
        )
        f.write(head)
        for _ in range(n):
            f.write(block)
        f.write(tail)
        cd_offset = f.tell()
        cd = struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            45,
            45,
            0,
            8,
            0,
            0x21,
            crc,
            0xFFFFFFFF,
            0xFFFFFFFF,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            0,
        )
        f.write(cd + name + extra)
        z64 = f.tell()
        cd_size = z64 - cd_offset
        f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, cd_size, cd_offset))
        f.write(struct.pack("<IIQI", 0x07064B50, 0, z64, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, cd_size, cd_offset, 0))
    return path


def npy_short(path: Path) -> Path:
    """An .npy whose header claims 1,000,000 x 3 x 64 x 64 float32 (49 GB) and that holds
    one row."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 3, 64, 64)}
        )
        f.write(np.zeros((1, 3, 64, 64), np.float32).tobytes())
    return path


MODEL_BOMBS = {
    "sparse-initializer-30000x30000": sparse_30000,
    "raw-data-shorter-than-dims": raw_data_short,
    "raw-data-of-4KB-dims-9e10": raw_data_huge_dims,
    "constant-node-1e10-elements": constant_1e10,
    "input-1x3x100000x100000": input_100000,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bombs")


@pytest.fixture(scope="module")
def images(folder) -> Path:
    """4 sample images, one per class."""
    out = folder / "images"
    for sub in sorted((SAMPLES / "images").iterdir()):
        (out / sub.name).mkdir(parents=True)
        shutil.copy(sorted(sub.glob("*.png"))[0], out / sub.name)
    return out


def check(args, expected=(3,)):
    outcome = fuzzing.run_cli(args, timeout=LIMIT_S, memory=MEMORY)
    site = fuzzing.traceback_site(args) if outcome.returncode == 4 else ""
    message = (
        f"command: PYTHONPATH=. python -m onnx_sp2ps {' '.join(map(str, args))}\n"
        f"exit {outcome.returncode} ({outcome.category}) after {outcome.seconds:.1f} s"
        + (f", raised at {site}" if site else "")
        + "\nstderr:\n"
        + outcome.stderr[-3000:]
    )
    if outcome.hung:
        pytest.fail(f"not finished within {LIMIT_S:.0f} s\n{message}", pytrace=False)
    if outcome.returncode < 0:
        pytest.fail(f"killed by a signal\n{message}", pytrace=False)
    if outcome.returncode not in expected:
        pytest.fail(f"exit {outcome.returncode}, expected {expected}\n{message}", pytrace=False)
    if outcome.returncode in (2, 3) and len(outcome.stderr_lines()) != 1:
        pytest.fail(
            f"{len(outcome.stderr_lines())} lines on stderr, not one\n{message}", pytrace=False
        )
    return outcome


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODEL_BOMBS))
def test_model_bomb_is_refused_by_audit(name, folder, images):
    # the bomb as the original too: a candidate-mismatch check must not be what refuses it
    model = MODEL_BOMBS[name](folder / f"{name}.onnx")
    check(["audit", model, model, "--images", images, "--batch-size", "4", "-q"])


@pytest.mark.parametrize("name", list(MODEL_BOMBS))
def test_model_bomb_is_refused_by_inspect(name, folder):
    model = folder / f"{name}.onnx"
    if not model.exists():
        MODEL_BOMBS[name](model)
    # a huge declared input is a model inspect may describe: only the limits must hold
    check(["inspect", model], expected=(0, 3) if name.startswith("input-") else (3,))


@pytest.mark.parametrize(
    "width,height", [(1, 1_000_000), (1_000_000, 1)], ids=["1x1000000", "1000000x1"]
)
def test_long_png_with_center_crop_is_refused_with_strict(width, height, folder, images):
    data = folder / f"long-{width}x{height}"
    shutil.copytree(images, data)
    long_png(data / "0" / "long.png", width, height)
    check(
        [
            "audit",
            ORIGINAL,
            ORIGINAL,
            "--images",
            data,
            "--center-crop",
            "--strict",
            "--batch-size",
            "4",
            "-q",
        ]
    )


def test_long_png_with_center_crop_is_skipped_without_strict(folder, images):
    data = folder / "long-skipped"
    shutil.copytree(images, data)
    long_png(data / "0" / "long.png", 1_000_000, 1)
    check(
        ["audit", ORIGINAL, ORIGINAL, "--images", data, "--center-crop", "--batch-size", "4", "-q"],
        expected=(0,),
    )


def test_npz_zip_bomb_is_refused(folder):
    bomb = npz_zip_bomb(folder / "bomb.npz")
    with zipfile.ZipFile(bomb) as z:  # what it is: a small file holding a 4.4 GB member
        assert z.getinfo("images.npy").file_size > 4 << 30 and bomb.stat().st_size < 8 << 20
        with z.open("images.npy") as member:
            assert np.lib.format.read_array_header_1_0(
                (np.lib.format.read_magic(member), member)[1]
            )[0] == (256 * 350, 3, 64, 64)
    check(["audit", ORIGINAL, ORIGINAL, "--images", bomb, "--batch-size", "4", "-q"])


def test_npy_whose_header_claims_more_rows_than_it_holds_is_refused(folder):
    short = npy_short(folder / "short.npy")
    check(["audit", ORIGINAL, ORIGINAL, "--images", short, "--batch-size", "4", "-q"])

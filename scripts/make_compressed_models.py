#!/usr/bin/env python
"""Make the compressed sample models of ``sample_models/compressed/`` from the originals.

Dev-only (needs onnxruntime's quantization tools, no PyTorch). For ``gap_original`` and
``fc_original`` it writes:

* ``{stem}_qdq_int8.onnx``: static int8 quantization in QDQ form
  (``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``, int8 activations and
  weights, per-tensor, MinMax calibration on the 50 images of ``sample_models/images``);
* ``{stem}_qop_int8.onnx``: the same in QOperator form (``QuantFormat.QOperator``:
  QLinearConv, QLinearGlobalAveragePool, QGemm, QLinearSoftmax);
* ``{stem}_unstructured_50.onnx``: unstructured magnitude pruning, the 50 % smallest
  |weights| of every Conv/Gemm weight but the first Conv's set to zero (same shapes);
* ``{stem}_sparse_80.onnx``: the same pruning at 80 %, every pruned weight stored in
  ``graph.sparse_initializer`` (values + int64 linear indices; at 80 % zeros this is
  smaller than the dense tensor, at 50 % it would be larger).

Deterministic: two runs give byte-identical files (checked by ``--check``).

Usage (from the repository root)::

    python scripts/make_compressed_models.py [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from onnx_sp2ps.data import InputSpec, open_images  # noqa: E402

SAMPLES = REPO / "sample_models"
OUT = SAMPLES / "compressed"
STEMS = ("gap_original", "fc_original")
CALIBRATION_BATCH = 10
UNSTRUCTURED = 0.5
SPARSE = 0.8


def calibration_inputs() -> list[np.ndarray]:
    """The sample images as the models take them (NCHW, /255), in batches."""
    images = open_images(SAMPLES / "images", spec=InputSpec("NCHW", 3, 64, 64))
    return [b.inputs for b in images.iter_batches(CALIBRATION_BATCH)]


class ImageReader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._feeds = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def quantize(src: Path, dst: Path, fmt: QuantFormat, batches: list[np.ndarray]) -> None:
    name = onnx.load(src).graph.input[0].name
    quantize_static(
        str(src),
        str(dst),
        ImageReader(name, batches),
        quant_format=fmt,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )


def _pruned_weights(model: onnx.ModelProto, ratio: float) -> dict[str, np.ndarray]:
    """Conv/Gemm/MatMul weights (all but the first Conv's) with the ``ratio`` smallest
    |values| of each tensor set to zero (ties broken by position: deterministic)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = [
        n.input[1]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits
    ][1:]
    out = {}
    for name in names:
        w = numpy_helper.to_array(inits[name]).copy()
        order = np.argsort(np.abs(w).ravel(), kind="stable")
        w.ravel()[order[: int(round(ratio * w.size))]] = 0
        out[name] = w
    return out


def prune_unstructured(src: Path, dst: Path, ratio: float) -> None:
    model = onnx.load(src)
    for name, w in _pruned_weights(model, ratio).items():
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, dst)


def prune_sparse(src: Path, dst: Path, ratio: float) -> None:
    model = onnx.load(src)
    pruned = _pruned_weights(model, ratio)
    keep = [t for t in model.graph.initializer if t.name not in pruned]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for name, w in pruned.items():
        flat = w.ravel()
        idx = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[idx], name)
        indices = numpy_helper.from_array(idx, "")
        model.graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, indices, list(w.shape))
        )
    onnx.save(model, dst)


def check(path: Path, reference: Path, batches: list[np.ndarray]) -> str:
    """ONNX checker + onnxruntime run; returns a line with size and top-1 agreement."""
    onnx.checker.check_model(onnx.load(path))  # (full_check types sparse weights as
    # sparse_tensor, which Conv/Gemm refuse; onnxruntime densifies them when loading)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    runs = []
    for p in (path, reference):
        s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        runs.append(np.concatenate([s.run(None, {s.get_inputs()[0].name: b})[0] for b in batches]))
    agree = float(np.mean(runs[0].argmax(1) == runs[1].argmax(1)))
    return f"{path.name:32s} {path.stat().st_size / 1024:7.1f} KB  top-1 agreement {agree:.2f}"


def build(out: Path, batches: list[np.ndarray]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for stem in STEMS:
        src = SAMPLES / f"{stem}.onnx"
        kind = stem.split("_")[0]
        made = {
            f"{kind}_qdq_int8.onnx": lambda d: quantize(src, d, QuantFormat.QDQ, batches),
            f"{kind}_qop_int8.onnx": lambda d: quantize(src, d, QuantFormat.QOperator, batches),
            f"{kind}_unstructured_50.onnx": lambda d: prune_unstructured(src, d, UNSTRUCTURED),
            f"{kind}_sparse_80.onnx": lambda d: prune_sparse(src, d, SPARSE),
        }
        for name, make in made.items():
            make(out / name)
            lines.append(check(out / name, src, batches))
    return lines


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.onnx"))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="build twice (the second time in a temporary folder) and "
        "fail unless the files are byte-identical",
    )
    args = parser.parse_args()
    batches = calibration_inputs()
    for line in build(OUT, batches):
        print(line)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), batches)
            if digests(Path(tmp)) != digests(OUT):
                print("NOT deterministic: a second run gave different bytes", file=sys.stderr)
                return 1
        print("deterministic: a second run gave byte-identical files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

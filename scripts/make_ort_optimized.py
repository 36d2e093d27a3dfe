#!/usr/bin/env python
"""ViTs as onnxruntime's transformer optimizer writes them, for the tests.

Dev-only (needs sympy, which the optimizer's shape inference imports; no torch:
``opt_level=0`` runs the optimizer's Python fusions only). From
``tests/fixtures/tokens/vit_cls.onnx`` (a timm ViT, scripts/make_token_models.py) it writes

- ``vit_cls_ort.onnx``: ``onnxruntime.transformers.optimizer.optimize_model(...,
  model_type="vit", num_heads=3, hidden_size=48, opt_level=0)``: com.microsoft
  SkipLayerNormalization (with its residual-sum output) and BiasGelu fused in, as edge
  deployments prepare ViTs;
- ``vit_cls_ort16.onnx``: the same, then ``convert_float_to_float16(keep_io_types=True)``.

Usage (from the repository root)::

    pip install sympy && python scripts/make_ort_optimized.py
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.transformers import optimizer

TOKENS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokens"


def main() -> None:
    logging.disable(logging.WARNING)
    for name, fp16 in (("vit_cls_ort", False), ("vit_cls_ort16", True)):
        opt = optimizer.optimize_model(
            str(TOKENS / "vit_cls.onnx"),
            model_type="vit",
            num_heads=3,
            hidden_size=48,
            opt_level=0,
        )
        if fp16:
            opt.convert_float_to_float16(keep_io_types=True)
        path = TOKENS / f"{name}.onnx"
        opt.save_model_to_file(str(path))
        ops = sorted({n.op_type for n in onnx.load(path).graph.node if n.domain})
        print(f"{path.name}: {path.stat().st_size} bytes, com.microsoft ops {ops}")


if __name__ == "__main__":
    main()

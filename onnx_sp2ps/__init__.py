"""onnx-sp2ps: compare class activation maps of an ONNX model and its compressed copy."""

__version__ = "0.1.0"

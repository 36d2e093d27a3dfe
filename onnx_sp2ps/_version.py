"""The version of onnx-sp2ps (read by pyproject.toml and the report)."""

__version__ = "0.2.0"

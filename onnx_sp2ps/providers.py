"""Execution provider names: the ``--provider`` choices and onnxruntime's names for the
CPU and CUDA providers.  Kept apart from :mod:`onnx_sp2ps.runtime` (which imports onnx
and the model layer) so that the command line can offer the choices without loading
them at start-up."""

#: ``--provider``: CUDA when onnxruntime offers it, the CPU, or CUDA with a note when not.
PROVIDERS = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

"""Images and arrays -> float32 batches in a model's layout, with labels.

Two sources are accepted: a **folder** of images (searched recursively), decoded and
preprocessed (EXIF orientation, colour mode, resize or resize + centre crop, scale,
mean/std, optional BGR order, channels-first or channels-last), or a **preprocessed array
file** (``.npy`` or ``.npz``) whose values are used as given. Labels come from the
first-level sub-folder of each image (integer folder names, or folder names looked up in a
list of class names), or from the ``labels`` array of an ``.npz`` file. This package only
re-exports: :mod:`~onnx_sp2ps.data.decode` turns image files into Pillow images behind
their guards, :mod:`~onnx_sp2ps.data.preprocess` holds the settings and the maths from an
image to a model input, and :mod:`~onnx_sp2ps.data.sources` opens folders and array files
and yields their batches. Nothing here prints; problems raise
:class:`~onnx_sp2ps.errors.DataError`, :class:`~onnx_sp2ps.errors.UsageError` or
:class:`~onnx_sp2ps.errors.MismatchError`.
"""

from onnx_sp2ps.data.decode import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS
from onnx_sp2ps.data.preprocess import (
    LAYOUTS,
    PRESETS,
    InputSpec,
    Preprocess,
    ResolvedPreprocess,
    display_image,
    parse_size,
    preprocess_image,
)
from onnx_sp2ps.data.sources import (
    ARRAY_SUFFIXES,
    MAX_CLASS_NAMES_BYTES,
    Batch,
    ImageSet,
    open_images,
)

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "IMAGE_SUFFIXES",
    "ARRAY_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MAX_CLASS_NAMES_BYTES",
    "InputSpec",
    "Preprocess",
    "ResolvedPreprocess",
    "Batch",
    "ImageSet",
    "parse_size",
    "preprocess_image",
    "display_image",
    "open_images",
]

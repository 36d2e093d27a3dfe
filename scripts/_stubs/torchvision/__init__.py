"""A stand-in for torchvision, which has no build for the torch pinned here.

pytorch-grad-cam (PyPI ``grad-cam``) imports a few torchvision names at import time
(``torchvision.transforms.Compose/Normalize/ToTensor`` in ``utils/image.py``,
``torchvision.transforms.functional.resize`` in ``sess.py``, bare ``import torchvision``
in ``utils/model_targets.py``).  None of them is used by the CAM methods that
``scripts/make_reference_cams.py`` runs; this package only makes the import work.
``scripts/make_reference_cams.py`` puts ``scripts/_stubs`` first on ``sys.path`` for itself
only.  Never install it.
"""

__version__ = "0.0.0+stub"

from . import transforms  # noqa: E402,F401

"""Stand-in for ``torchvision.datasets``: the names ``timm.data.dataset_factory`` imports
at import time.  None is usable (timm's models never need them)."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision datasets are not available (scripts/_stubs stand-in)")


class CIFAR10(_Unavailable): ...


class CIFAR100(_Unavailable): ...


class MNIST(_Unavailable): ...


class KMNIST(_Unavailable): ...


class FashionMNIST(_Unavailable): ...


class ImageFolder(_Unavailable): ...

"""Stand-in for ``torchvision.datasets``: timm imports dataset classes at import time;
the dev scripts use none of them.  Every name is a placeholder that refuses to be built."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    class Placeholder:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(f"torchvision stand-in: datasets.{name}")

    Placeholder.__name__ = name
    return Placeholder

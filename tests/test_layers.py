"""The package's imports run one way (docs/architecture.md, "Layers"): no module imports
a module of a higher layer, none imports the package root, and the root only re-exports.

Layers, lowest first (a module may import its own layer and those below):
errors, files, _version, providers -> model, backward -> runtime -> cams -> similarity, targets,
data, gate, records, cache, intervals -> pipeline -> ray_engine -> report, shards -> cli, __main__.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_sp2ps"
LAYERS = [
    {"errors", "files", "_version", "providers"},
    {"model", "backward"},
    {"runtime"},
    {"cams"},
    {"similarity", "targets", "data", "gate", "records", "cache", "intervals"},
    {"pipeline"},
    {"ray_engine"},
    {"report", "shards"},
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports() -> dict[str, set[str]]:
    """Module (relative to the package) -> modules of the package it imports, at any
    depth of its code (imports inside functions count)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found.update(n for n in names if n == "onnx_sp2ps" or n.startswith("onnx_sp2ps."))
        out[name] = found
    return out


def test_every_module_has_a_layer():
    modules = [m for m in _imports() if m != "__init__"]
    assert modules and all(_layer(m) >= 0 for m in modules)


def test_no_module_imports_a_higher_layer_or_the_package_root():
    back_edges = []
    for module, imported in _imports().items():
        if module == "__init__":
            continue
        for target in imported:
            if target == "onnx_sp2ps":
                back_edges.append(f"{module} -> onnx_sp2ps (the package root)")
                continue
            inner = target.removeprefix("onnx_sp2ps.")
            if _layer(inner) > _layer(module):
                back_edges.append(f"{module} -> {inner}")
    assert back_edges == []


def test_the_package_root_only_re_exports():
    imported = _imports()["__init__"]
    assert imported == {"onnx_sp2ps._version"}  # the API itself is imported on first use
    import onnx_sp2ps

    for name in onnx_sp2ps.__all__:
        assert getattr(onnx_sp2ps, name) is not None


def test_cam_methods_see_only_what_the_runner_hands_out():
    """CAM methods work on activations, logits and the runner's public methods: none
    imports the model layer or reads the runner's prepared model."""
    reaching = []
    for path in sorted((PACKAGE / "cams").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("onnx_sp2ps.model", "onnx_sp2ps.backward")
            ):
                reaching.append(f"{path.name} imports {node.module}")
            if isinstance(node, ast.Attribute) and node.attr == "prepared":
                reaching.append(f"{path.name}:{node.lineno} reads .prepared")
    assert reaching == []


def test_the_architecture_page_maps_every_module():
    """docs/architecture.md's module map names each module of the package (its line
    counts are refreshed with scripts/module_map.py)."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        str(p.relative_to(PACKAGE.parent))
        for p in sorted(PACKAGE.rglob("*.py"))
        if f"`{p.relative_to(PACKAGE.parent).as_posix()}`" not in page
    ]
    assert missing == []

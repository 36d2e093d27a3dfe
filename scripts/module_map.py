"""Print the package's module map (lines per module), its import graph and its longest
functions, for the working tree or for a git revision (docs/architecture.md's tables).

    python scripts/module_map.py [--rev REV] [--longest N] [--imports]
    python scripts/module_map.py --docs     # refresh docs/architecture.md's module map
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sources(rev: str | None) -> dict[str, str]:
    """Module path (relative to the repository) -> source text."""
    if rev is None:
        return {
            str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for p in sorted((ROOT / "onnx_sp2ps").rglob("*.py"))
        }
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "onnx_sp2ps"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return {
        n: subprocess.run(
            ["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        for n in sorted(names)
        if n.endswith(".py")
    }


def job(text: str) -> str:
    """The first sentence of a module's docstring."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    first = first.split(". ")[0].rstrip(".")
    if len(first) > 110:
        first = first[:110].rsplit(" ", 1)[0].rstrip(",:;") + " …"
    return first.replace("|", "\\|")


def functions(path: str, text: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
    return out


def imports(path: str, text: str) -> set[str]:
    """Package modules imported by a module (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("onnx_sp2ps")
        ):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("onnx_sp2ps")}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    parser.add_argument("--longest", type=int, default=10, help="longest functions shown")
    parser.add_argument("--imports", action="store_true", help="also print the import graph")
    parser.add_argument(
        "--docs", action="store_true", help="rewrite the module map ending docs/architecture.md"
    )
    args = parser.parse_args()
    src = sources(args.rev)
    table = "| module | lines | job |\n|---|---:|---|\n"
    for path, text in src.items():
        table += f"| `{path}` | {len(text.splitlines())} | {job(text)} |\n"
    table += f"| total | {sum(len(t.splitlines()) for t in src.values())} | |\n"
    if args.docs:
        page = ROOT / "docs" / "architecture.md"
        text = page.read_text(encoding="utf-8")
        page.write_text(text[: text.index("| module | lines | job |")] + table, encoding="utf-8")
        return
    print(table, end="")
    print(f"\nLongest functions ({args.longest}):\n")
    longest = sorted((f for p, t in src.items() for f in functions(p, t)), reverse=True)
    for lines, name in longest[: args.longest]:
        print(f"- `{name}`: {lines} lines")
    if args.imports:
        print("\nImport graph (module -> package modules it imports):\n")
        for path, text in src.items():
            module = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            deps = sorted(d.removeprefix("onnx_sp2ps.") for d in imports(path, text))
            if deps:
                print(f"- `{module.removeprefix('onnx_sp2ps.')}` -> {', '.join(deps)}")


if __name__ == "__main__":
    main()

"""The tree keeps reading like the algorithm: no import cycle between the library's modules, a few
top-level modules beside the stage packages, and short functions in the library core."""

from __future__ import annotations

import ast
from pathlib import Path

import dpspeed

ROOT = Path(dpspeed.__file__).parent
CORE_EXCLUDES = ("apps", "bench")  # the command line and the study are applications of the library


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The dpspeed modules `path` imports, at load time or inside functions (not those imported for
    type checking only)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    anchor = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in sub.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
            elif isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names)
    return {m for m in found if m in MODULES and m != _module_name(path)}


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {_module_name(p) for p in FILES}


def test_no_import_cycle():
    graph = {_module_name(p): _imports(p) for p in FILES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_at_most_twelve_top_level_modules():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 12, top


def test_no_function_of_the_core_over_sixty_lines():
    long = []
    for path in FILES:
        if path.relative_to(ROOT).parts[0] in CORE_EXCLUDES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, long

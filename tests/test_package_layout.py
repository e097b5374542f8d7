"""The package's shape: stage sub-packages, no import cycles, one home for graph state and for torch.ao imports.

These tests read the source (``ast``), so they fail on the change that breaks a rule, not later.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qdiff_ao"
ROOT_MODULES = {"__init__", "_compat", "config", "primitives", "qconfig", "workflow"}
# Function-level imports that stay function-level, with the reason (anything else is imported at module level).
LAZY_IMPORTS = {
    ("qdiff_ao.deploy.checkpoint.archive", "qdiff_ao"): "reads qdiff_ao.__version__; the root package imports "
    "this module, so a module-level import would be a cycle",
    ("qdiff_ao.testing.pytest_plugin", "qdiff_ao.testing"): "a pytest plugin registers before hypothesis is "
    "configured; the kit loads when a test asks for it",
    ("qdiff_ao.testing", "qdiff_ao.testing"): "the kit's names load on first use (PEP 562 __getattr__)",
    ("qdiff_ao.passes.sampler_runs", "qdiff_ao.deploy"): "lowers a copy of the graph for the passes that fit on "
    "or judge the quantized model; "
    "deploy imports the x86 backend, which imports the passes package, so a module-level import would be a cycle",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, tree: ast.Module, known: set[str]) -> list[tuple[str, bool]]:
    """(imported qdiff_ao module, imported inside a function) for every import statement of ``module``."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(
        node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            names = [names[0], *(n for n in names[1:] if n in known)]
        for name in names:
            if name == "qdiff_ao" or name.startswith("qdiff_ao."):
                found.append((name, id(node) in inside))
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]  # qdiff_ao.x, qdiff_ao.x.y, ... (not the root)


def test_no_import_cycles() -> None:
    """Module-level imports, with the package __init__ each import runs, form no cycle (the root excluded)."""
    sources = _sources()
    known = set(sources)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, tree in sources.items():
        for name, lazy in _imports(module, tree, known):
            if not lazy:
                graph[module].update(p for p in _parents(name) if p in known and p != module
                                     and not module.startswith(p + "."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_function_level_imports_only_where_they_guard_something() -> None:
    sources = _sources()
    lazy = {(m, name) for m, tree in sources.items() for name, inside in _imports(m, tree, set(sources)) if inside}
    unexplained = sorted(pair for pair in lazy if pair not in LAZY_IMPORTS
                         and (pair[0], pair[1].rsplit(".", 1)[0]) not in LAZY_IMPORTS)
    assert not unexplained, f"function-level imports with no reason in LAZY_IMPORTS: {unexplained}"


def test_root_holds_only_the_core_modules() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == ROOT_MODULES, f"root modules {sorted(modules - ROOT_MODULES)} belong in a stage sub-package"


def test_graph_meta_keys_live_in_the_graph_info_module() -> None:
    literal = re.compile(r"""\.meta(\[|\.get\(|\.setdefault\(|\.pop\()\s*["']qdiff_""")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "graph_state.py" and literal.search(p.read_text())]
    assert not offenders, f"meta keys written as string literals outside capture/graph_state.py: {offenders}"


def test_nodes_are_found_by_identity_not_by_name() -> None:
    pattern = re.compile(r"""__name__["']?,\s*["'][^"']*["']\)\s*==|__name__\s*==\s*["'](?!__main__)""")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_torch_ao_quantization_is_imported_only_by_compat() -> None:
    importers = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "_compat.py"
                 and re.search(r"^\s*(from|import) torch\.ao\.quantization", p.read_text(), re.MULTILINE)]
    assert not importers, importers


@pytest.mark.parametrize("package", ["qdiff_ao", "qdiff_ao.passes", "qdiff_ao.capture", "qdiff_ao.calibration",
                                     "qdiff_ao.backends", "qdiff_ao.deploy.checkpoint", "qdiff_ao.deploy.onnx",
                                     "qdiff_ao.passes.reconstruction"])
def test_no_function_shadows_a_module_of_its_package(package: str) -> None:
    """``qdiff_ao.passes.reconstruct`` is the function; no module may carry the name of an exported function."""
    pkg = importlib.import_module(package)
    directory = Path(inspect.getfile(pkg)).parent
    submodules = {p.stem for p in directory.glob("*.py")} | {p.name for p in directory.iterdir() if p.is_dir()}
    shadowing = [name for name in pkg.__all__ if callable(getattr(pkg, name)) and not inspect.isclass(
        getattr(pkg, name)) and name in submodules]
    assert not shadowing, f"{package}: functions named like a submodule: {shadowing}"

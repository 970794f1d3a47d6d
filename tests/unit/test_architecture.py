"""The house's walls, checked on the source: every import of the package (module level and inside
functions) is walked; there are no circles, no pass imports another pass (even through other
modules), each room imports only the rooms its floor allows, and the rooms that run on edge
devices never reach torch."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import diffquant

ROOT = Path(diffquant.__file__).parent
SHARED = {"errors", "_check", "_io", "_digest", "_groups", "_png", "_plot", "artifacts", "targets"}
# room -> the rooms it may import (besides the shared floor and itself)
ALLOWED = {
    "zoo": set(),
    "models": {"zoo"},
    "calib_data": {"models"},
    "quant": set(),
    "passes": {"quant", "calib_data", "models"},
    "exporters": {"quant", "models"},
    "engines": {"exporters"},  # the pure-ONNX linter and FP16 up-cast only (checked below)
    "eval": {"engines", "models", "quant", "zoo"},
    "jobs": {"zoo", "models", "calib_data", "quant", "passes", "exporters", "engines", "eval"},
    "serve": {"engines"},
    "cli": {
        "zoo",
        "models",
        "calib_data",
        "quant",
        "passes",
        "exporters",
        "engines",
        "eval",
        "jobs",
        "serve",
        "__init__",
    },
    "__init__": {"passes", "exporters"},
}
TORCH = ("torch", "diffusers", "transformers")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(diffquant modules imported anywhere, those imported at module level, third-party roots)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    ours, ours_top, theirs = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            found = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for f in found:
            if f.split(".")[0] == "diffquant":
                ours.add(f)
                if id(node) in top:
                    ours_top.add(f)
            else:
                theirs.add(f.split(".")[0])
    return frozenset(ours - {module}), frozenset(ours_top - {module}), frozenset(theirs)


def _closure(module: str, *, top_only: bool = False) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        for dep in imports(m)[1 if top_only else 0]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circles():
    """Depth-first over the whole graph; a back edge is a circle, printed as its path."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(imports(m)[0]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def _registers_a_pass(path: Path) -> bool:
    """A function decorated with ``@register_pass(...)``."""
    funcs = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
    calls = [d.func for f in funcs for d in f.decorator_list if isinstance(d, ast.Call)]
    return any(isinstance(c, ast.Name) and c.id == "register_pass" for c in calls)


def test_no_pass_imports_another_pass():
    passes = {m for m, p in MODULES.items() if _registers_a_pass(p)}
    assert {"diffquant.passes.minmax", "diffquant.passes.les", "diffquant.passes.qua2sedimo.assignment"} <= passes
    for m in sorted(passes):
        others = _closure(m) & (passes - {m})
        assert not others, f"pass {m} imports the pass(es) {sorted(others)}"
    # the floor below the passes imports no pass, and no paper's wing
    for m in sorted(x for x in MODULES if x.startswith("diffquant.passes.observe")):
        wrong = {d for d in _closure(m) if d.startswith("diffquant.passes.qua2sedimo")} | (_closure(m) & passes)
        assert not wrong, f"{m} (the observe floor) imports {sorted(wrong)}"


def test_rooms_import_only_the_rooms_below():
    for m in sorted(MODULES):
        room = _room(m)
        if room in SHARED:  # the shared floor imports only itself
            wrong = {d for d in imports(m)[0] if _room(d) not in SHARED}
        else:
            allowed = ALLOWED[room] | SHARED | {room}
            wrong = {d for d in imports(m)[0] if _room(d) not in allowed}
        assert not wrong, f"{m} ({room}) imports {sorted(wrong)}"
    engines_exporters = {d for m in MODULES if _room(m) == "engines" for d in imports(m)[0] if _room(d) == "exporters"}
    assert engines_exporters <= {"diffquant.exporters.linter", "diffquant.exporters.fp16"}, engines_exporters


def test_edge_rooms_never_reach_torch():
    """Engines, the typed artifacts, the targets and `serve` run on devices without torch: nothing
    they import, at any depth, imports torch, diffusers or transformers; nor does the `diffquant`
    command before a subcommand's own imports (what `generate` and `build` run with)."""
    edge = [m for m in MODULES if _room(m) in ("engines", "artifacts", "targets", "serve")]
    for m in sorted(edge):
        heavy = {d for d in {m} | _closure(m) if imports(d)[2] & set(TORCH)}
        assert not heavy, f"{m} reaches torch through {sorted(heavy)}"
    for m in ("diffquant.cli", "diffquant.cli.deploy"):
        heavy = {d for d in {m} | _closure(m, top_only=True) if imports(d)[2] & set(TORCH)}
        assert not heavy, f"{m} imports torch at load through {sorted(heavy)}"

"""The layering, read from the source: core/ and hookspecs/ never import a plugin
(inside functions too), and the module import graph of tunesmith/ has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "tunesmith"


def modules(root: Path = PKG) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every tunesmith module ``name`` imports, at module level or inside functions."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                mod = ".".join(parts + ([mod] if mod else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    # a dotted name also imports its parents (``import tunesmith.plugins.x``)
    closed = set(found)
    for f in found:
        parts = f.split(".")
        closed |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return {m for m in closed if m in known and m != name}


def graph(root: Path = PKG) -> dict[str, set[str]]:
    mods = modules(root)
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def forbidden(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {i}" for m, ii in g.items() for i in ii
                  if m.startswith(("tunesmith.core", "tunesmith.hookspecs")) and i.startswith("tunesmith.plugins"))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan); a package
    importing its own children is not a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w.startswith(v + "."):
                continue
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
                out.append(sorted(comp))

    for v in list(g):
        if v not in index:
            visit(v)
    return out


def test_core_and_hookspecs_never_import_plugins() -> None:
    assert forbidden(graph()) == []


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_scan_sees_imports_inside_functions_and_cycles(tmp_path: Path) -> None:
    """The checks above can fail: a fake package with a function-level plugin import
    from core and a two-module cycle is caught."""
    root = tmp_path / "tunesmith"
    (root / "core").mkdir(parents=True)
    (root / "plugins").mkdir()
    for d in (root, root / "core", root / "plugins"):
        (d / "__init__.py").write_text("", encoding="utf-8")
    (root / "plugins" / "lora.py").write_text("X = 1\n", encoding="utf-8")
    (root / "core" / "a.py").write_text("def f():\n    from tunesmith.plugins.lora import X\n    from . import b\n", encoding="utf-8")
    (root / "core" / "b.py").write_text("def g():\n    import tunesmith.core.a\n", encoding="utf-8")
    g = graph(root)
    assert forbidden(g) == ["tunesmith.core.a -> tunesmith.plugins", "tunesmith.core.a -> tunesmith.plugins.lora"]
    assert cycles(g) == [["tunesmith.core.a", "tunesmith.core.b"]]


@pytest.mark.parametrize("area", ["objectives", "losses", "peft_methods"])
def test_every_area_protocol_declares_what_core_reads(area: str) -> None:
    from tunesmith.core.registry import AREAS, member

    with pytest.raises(AttributeError, match="not declared"):
        member(object(), area, "no_such_member")

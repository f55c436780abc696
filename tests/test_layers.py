"""The package layout is layered: each layer imports only the layers below it, and no
module imports itself back through others (no import cycles).

Layers, lowest first (``docs/architecture.md``)::

    errors < core < expr < io, ops < plan < runtime < runners < api < ui < testing
        < millstream (the public names) < cli

``io`` and ``ops`` are peers: neither imports the other. Imports inside ``if
TYPE_CHECKING:`` blocks are annotations only and do not count.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "millstream"

#: layer of each top-level part of the package (higher may import lower)
LAYERS = {
    "errors": 0,
    "core": 1,
    "expr": 2,
    "io": 3,
    "ops": 3,
    "plan": 4,
    "runtime": 5,
    "runners": 6,
    "api": 7,
    "sql": 7.2,  # millstream.sql: SQL over the API (builds Datasets; the API never imports it)
    "cli": 8,
    "ui": 7.2,  # the dashboard, on top of the API; ms.ui_url and the CLI use it
    "testing": 7.4,  # millstream.testing: the streaming test kit, on top of the API
    "__init__": 7.5,  # the public API (``import millstream as ms``): api, session, runners
    "__main__": 9,
}
#: same-rank parts that must not import each other
PEERS = {("io", "ops"), ("ops", "io")}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported millstream module, line) for every runtime import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "millstream":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                # "from millstream.io import fs" imports a module
                target = full if (SRC.parent / (full.replace(".", "/") + ".py")).exists() \
                    or (SRC.parent / full.replace(".", "/")).is_dir() else node.module
                out.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "millstream":
                    out.append((alias.name, node.lineno))
    return out


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def layer_violations() -> list[str]:
    bad = []
    for mod, path in sorted(all_modules().items()):
        src_part = part_of(mod)
        if src_part not in LAYERS:
            bad.append(f"{path}: the package part {src_part!r} has no layer; add it to LAYERS")
            continue
        for target, line in imports_of(path):
            if target == "millstream":
                dst_part = "__init__"
            else:
                dst_part = part_of(target)
            if dst_part == src_part or dst_part not in LAYERS:
                continue
            if LAYERS[dst_part] > LAYERS[src_part] or (src_part, dst_part) in PEERS or \
                    (LAYERS[dst_part] == LAYERS[src_part]):
                bad.append(f"{path.relative_to(SRC.parent.parent)}:{line}: {mod} ({src_part}) "
                           f"imports {target} ({dst_part}), which is not below it")
    return bad


def import_cycles() -> list[list[str]]:
    """Cycles in the module import graph (each found once)."""
    mods = all_modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for target, _ in imports_of(path):
            # an import of a package's name runs its __init__ only
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target != mod and target != "millstream":
                deps.add(target)
        graph[mod] = deps
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return cycles


def test_no_module_imports_a_layer_above_its_own():
    bad = layer_violations()
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_layer_check_fails_on_an_upward_import(tmp_path, monkeypatch):
    """A deliberate upward import (core importing the runtime) is reported with its file and line."""
    global SRC
    fake = tmp_path / "millstream"
    (fake / "core").mkdir(parents=True)
    (fake / "runtime").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "runtime" / "__init__.py").write_text("")
    (fake / "runtime" / "session.py").write_text("X = 1\n")
    (fake / "core" / "bad.py").write_text("import os\nfrom millstream.runtime.session import X\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    bad = layer_violations()
    assert len(bad) == 1 and "core/bad.py:2" in bad[0] and "millstream.runtime.session" in bad[0]
    (fake / "runtime" / "session.py").write_text("from millstream.core import bad\n")
    assert import_cycles() == [["millstream.core.bad", "millstream.runtime.session"]]


@pytest.mark.parametrize("limit", [600])
def test_modules_stay_small(limit):
    """No module over about ``limit`` lines unless listed here as one cohesive thing."""
    cohesive: set[str] = set()
    big = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in SRC.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > limit * 1.1
           and module_name(p) not in cohesive]
    assert not big, "split these modules by concept:\n" + "\n".join(sorted(big))


if __name__ == "__main__":  # pragma: no cover
    print("\n".join(layer_violations()))
    for c in import_cycles():
        print(" <-> ".join(c))
    os._exit(0)

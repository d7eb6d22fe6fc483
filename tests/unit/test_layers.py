"""The layer contract: which part of the package may import which, and no import cycle anywhere.

Calls run one way: ``cli`` -> ``api``/``demo``/``report`` -> ``service`` -> ``cycle`` -> stages (``publish``, ``ingest`` over
``train``, ``dataset``; ``notify``)
-> leaves (``state``, ``settings``, ``log``, ``faults``, ``codec``, ``proc``). ``trainer``
(the scripts the trainer's interpreter runs) imports nothing of ours. A module may import anything inside its own
part; across parts only the edges in :data:`ALLOWED`. Function-level imports count: they are edges too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "daemon"

LEAVES = {"codec", "cron", "disk", "faults", "log", "settings", "proc", "state"}
STAGES = {"ingest", "dataset", "train", "publish", "notify"}
# part -> the other parts it may import. Leaves import only lower leaves.
ALLOWED: dict[str, set[str]] = {
    "__main__": {"cli"},
    "cli": {"api", "demo", "service", "report", "cycle", *STAGES, *LEAVES},
    "report": {"cycle", *STAGES, *LEAVES},  # the report verb's page: reads state and job files, draws, writes
    "api": {"demo", "service", "cycle", *STAGES, *LEAVES},
    "demo": {"service", "cycle", *STAGES, *LEAVES},
    "service": {"cycle", *STAGES, *LEAVES},
    "cycle": {*STAGES, *LEAVES},
    "publish": {"train", *LEAVES},
    "ingest": {"dataset", *LEAVES},
    "train": set(LEAVES),
    "dataset": set(LEAVES),
    "notify": set(LEAVES),  # the notifiers: the cycle hands them its summary (a dict), they import no stage
    "state": {"codec", "faults", "log"},
    "proc": {"faults", "log"},
    "settings": {"cron"},
    "cron": set(),
    "disk": set(),
    "log": set(),
    "faults": set(),
    "codec": set(),
    "trainer": set(),
    "__init__": set(),
    "py": set(),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """``daemon.ingest.tail`` -> ``ingest``; ``daemon.settings`` -> ``settings``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """Every module of the package -> the modules of the package it imports (``from daemon.x import y`` counts as
    an import of ``daemon.x.y`` when that is a module, else of ``daemon.x``)."""
    files = {module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != name and t.split(".")[0] == "daemon":
                    deps.add(t)
        graph[name] = deps
    return graph


def layer_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    out = []
    for src, deps in sorted(graph.items()):
        for dst in sorted(deps):
            a, b = part_of(src), part_of(dst)
            if b == "__init__" or a == b:
                continue
            if b not in ALLOWED.get(a, set()):
                out.append(f"{src} -> {dst} ({a} may not import {b})")
    return out


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_is_in_the_table() -> None:
    parts = {part_of(m) for m in import_graph()}
    assert parts <= set(ALLOWED), sorted(parts - set(ALLOWED))


def test_no_import_crosses_the_layers() -> None:
    assert layer_violations(import_graph()) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_contract_fails_on_a_planted_back_edge() -> None:
    """The checks can fail: a leaf importing a stage, and a stage importing the cycle, are caught; so is a cycle."""
    graph = import_graph()
    planted = {k: set(v) for k, v in graph.items()}
    planted["daemon.state"].add("daemon.cycle.pipeline")
    planted["daemon.train.runner"].add("daemon.service.lifecycle")
    found = layer_violations(planted)
    assert any(v.startswith("daemon.state -> daemon.cycle.pipeline") for v in found), found
    assert any(v.startswith("daemon.train.runner -> daemon.service.lifecycle") for v in found), found
    twin = {k: set(v) for k, v in graph.items()}
    twin["daemon.cycle.pipeline"].add("daemon.cycle.pipeline_twin")
    twin["daemon.cycle.pipeline_twin"] = {"daemon.cycle.pipeline"}
    assert cycles(twin) == [["daemon.cycle.pipeline", "daemon.cycle.pipeline_twin"]]


def test_the_graph_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "daemon"
    (pkg / "ingest").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "state.py").write_text("def f():\n    from daemon.ingest import tail\n")
    (pkg / "ingest" / "__init__.py").write_text("")
    (pkg / "ingest" / "tail.py").write_text("from ..state import f\n")
    global PKG
    saved, PKG = PKG, pkg
    try:
        graph = import_graph(pkg)
    finally:
        PKG = saved
    assert graph["daemon.state"] == {"daemon.ingest.tail"}
    assert graph["daemon.ingest.tail"] == {"daemon.state"}
    assert cycles(graph) == [["daemon.ingest.tail", "daemon.state"]]

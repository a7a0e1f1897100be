"""The package layering (docs/architecture.md, "Layers"), checked on the source text.

* ``samplers`` is the bottom layer: no samplers file imports ``difftools``, anywhere in the file,
  and every samplers module imports (and samples) in a process where ``difftools`` cannot be imported.
* Imports point down the layers (``LAYERS``, as in docs/architecture.md), and there are no import
  cycles between the parts of ``difftools``: every ``difftools/<sub>/`` package and every
  ``difftools/<module>.py`` is one node, ``samplers/<sub>/`` and ``samplers/<module>.py`` likewise,
  and an import anywhere in a file (module level, inside a function, under ``TYPE_CHECKING``) is an
  edge: a function-local import runs later but still needs the other part, which is how cycles hide.

The import graph comes from an AST walk of the files (nothing is imported), so the test sees the
imports of code paths no other test runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("difftools", "samplers")

# Edges allowed to close a cycle for now, as (importing file, imported node) -> why. Each entry is in a
# file another change owns; the lead removes it when that file stops importing upwards. A new cycle,
# or a new upward import from another file, fails the test; an entry that no longer closes a cycle
# fails too, so the list only shrinks.
KNOWN_CYCLES: dict[tuple[str, str], str] = {}


# The layers, bottom to top (docs/architecture.md): a node imports nodes of its own layer or below.
# Every samplers module is in the bottom layer; difftools.process re-exports samplers.process.
LAYERS: list[tuple[str, ...]] = [
    ("samplers", "difftools.process"),
    ("difftools.device", "difftools.config", "difftools.files", "difftools.images", "difftools.nn",
     "difftools.models"),
    ("difftools.data",),
    ("difftools.losses",),
    ("difftools.loaded", "difftools.generate", "difftools.graphed_sampling"),  # a loaded run's API; sampling
    ("difftools.training", "difftools.checkpoint"),
    ("difftools.interop",),  # conversions from / to other code bases: above models and checkpoint
    ("difftools.metrics",),
    ("difftools.rl", "difftools.discrete", "difftools.editing"),
    ("difftools.testing", "difftools.benchmark"),  # tiny models for tests and smoke modes; bench harness
    ("difftools",),  # the package root: difftools.load
]


@dataclass(frozen=True)
class Edge:
    source: str  # importing node
    target: str  # imported node
    file: str  # importing file, relative to the repository
    line: int
    local: bool  # inside a function

    def __str__(self) -> str:
        where = "function-local" if self.local else "module level"
        return f"{self.source} -> {self.target}  ({self.file}:{self.line}, {where})"


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the two packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


def node_of(module: str) -> str:
    """``difftools.models.dit`` -> ``difftools.models``; ``difftools`` (the package root) stays itself."""
    return ".".join(module.split(".")[:2])


def imported_modules(tree: ast.Module, module: str, is_package: bool, known: set[str]):
    """(line, imported module, inside a function) for every import statement in the tree."""
    in_functions = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_functions.update(id(n) for n in ast.walk(fn) if n is not fn)
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:  # relative: resolve against the importing module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub when there is one
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in n.names]
        else:
            continue
        for name in names:
            yield n.lineno, name, id(n) in in_functions


def import_edges(root: Path = REPO) -> list[Edge]:
    """Every import between two different nodes of the packages under ``root`` (one edge per
    statement and imported node)."""
    mods = module_files(root)
    known = set(mods)
    edges = set()
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for line, name, local in imported_modules(tree, module, is_package, known):
            if name.split(".")[0] not in PACKAGES:
                continue
            source, target = node_of(module), node_of(name)
            if source != target:
                rel = path.relative_to(root).as_posix()
                edges.add(Edge(source, target, rel, line, local))
    return sorted(edges, key=str)


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    graph = defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(component: list[str], edges: list[Edge]) -> list[Edge]:
    """One shortest closed path through the component's first node (breadth-first), as edges."""
    start = component[0]
    inside = [e for e in edges if e.source in component and e.target in component]
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in inside:
                if e.source != v:
                    continue
                if e.target == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if e.target not in came_from:
                    came_from[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def describe(component: list[str], edges: list[Edge]) -> str:
    inside = [e for e in edges if e.source in component and e.target in component]
    path = shortest_cycle(component, edges)
    return (
        " <-> ".join(component)
        + "\n  for example:\n"
        + "\n".join(f"    {e}" for e in path)
        + "\n  all imports inside the cycle:\n"
        + "\n".join(f"    {e}" for e in inside)
    )


def allowed(e: Edge) -> bool:
    return (e.file, e.target) in KNOWN_CYCLES


def layer_of(node: str) -> int | None:
    if node.split(".")[0] == "samplers":
        return 0
    return next((i for i, layer in enumerate(LAYERS) if node in layer), None)


# ------------------------------------------------------------------------------------------ tests
def test_samplers_import_nothing_from_difftools():
    bad = [e for e in import_edges() if e.source.startswith("samplers") and e.target.startswith("difftools")]
    assert not bad, "samplers is the bottom layer and must not import difftools:\n" + "\n".join(map(str, bad))


def test_no_import_cycles_beyond_the_known_ones():
    edges = import_edges()
    remaining = [e for e in edges if not allowed(e)]
    found = cycles(remaining)
    assert not found, (
        "import cycles (move the shared code down a layer, or import the other way round):\n"
        + "\n".join(describe(c, remaining) for c in found)
    )


def test_every_part_has_a_layer():
    nodes = {node_of(m) for m in module_files()}
    missing = sorted(n for n in nodes if layer_of(n) is None)
    assert not missing, f"put {missing} into LAYERS in {__file__} (and into docs/architecture.md)"


def test_imports_point_down_the_layers():
    edges = [e for e in import_edges() if not allowed(e)]
    upward = [e for e in edges if (layer_of(e.target) or 0) > (layer_of(e.source) or 0)]
    assert not upward, "imports from a higher layer (see LAYERS):\n" + "\n".join(map(str, upward))


# First-party imports inside functions, each with its reason: a function-local import hides what a
# module needs, so it is kept only where importing at module level would cost an optional dependency
# or weight that most users never load.
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    ("difftools/__init__.py", "difftools.checkpoint"): "`import difftools` stays light (difftools.load)",
    ("difftools/nn/fused.py", "difftools.nn.adaln_triton"): "needs triton, which CPU installs lack",
}


def test_first_party_imports_are_module_level_unless_listed():
    mods = module_files(REPO)
    known = set(mods)
    found = set()
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for _line, name, local in imported_modules(tree, module, path.name == "__init__.py", known):
            if local and name.split(".")[0] in PACKAGES:
                found.add((path.relative_to(REPO).as_posix(), name))
    assert found == set(LOCAL_IMPORTS_ALLOWED), (
        f"new function-local imports: {sorted(found - set(LOCAL_IMPORTS_ALLOWED))}; "
        f"listed but gone: {sorted(set(LOCAL_IMPORTS_ALLOWED) - found)}")


def test_known_cycles_are_still_cycles():
    """An allow-list entry whose import is gone, or no longer closes a cycle, must be deleted."""
    edges = import_edges()
    in_cycle = {n for c in cycles(edges) for n in c}
    stale = [
        key
        for key in KNOWN_CYCLES
        if not any(allowed(e) and (e.file, e.target) == key and e.source in in_cycle for e in edges)
    ]
    assert not stale, f"remove these entries from KNOWN_CYCLES in {__file__}: {stale}"


def test_the_graph_sees_function_local_imports_and_cycles(tmp_path):
    """The walker on a small tree: a function-local import is an edge, a relative import resolves,
    and the cycle it closes is reported with file and line."""
    files = {
        "difftools/__init__.py": "",
        "difftools/low/__init__.py": "from .core import f\n",
        "difftools/low/core.py": "def f():\n    from difftools.high import g\n    return g\n",
        "difftools/high.py": "from difftools.low import core\n",
        "samplers/__init__.py": "",
        "samplers/model.py": "import torch\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = import_edges(tmp_path)
    assert sorted(map(str, edges)) == [
        "difftools.high -> difftools.low  (difftools/high.py:1, module level)",
        "difftools.low -> difftools.high  (difftools/low/core.py:2, function-local)",
    ]
    assert cycles(edges) == [["difftools.high", "difftools.low"]]
    assert [str(e) for e in shortest_cycle(["difftools.high", "difftools.low"], edges)] == [
        "difftools.high -> difftools.low  (difftools/high.py:1, module level)",
        "difftools.low -> difftools.high  (difftools/low/core.py:2, function-local)",
    ]


BLOCKER = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class NoDifftools(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "difftools" or name.startswith("difftools."):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, NoDifftools())
    import samplers
    names = [m.name for m in pkgutil.walk_packages(samplers.__path__, "samplers.")]
    for name in names:
        importlib.import_module(name)
    assert "diffusers" not in sys.modules, "samplers imported diffusers at import time"

    import torch
    from samplers import ModelFn, sample
    from samplers.process import VP
    from samplers.search import SolverSchedule, baseline_schedule

    net = lambda x, t: 0.1 * x  # a denoiser that predicts eps = 0.1 x
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for solver in ("dpmpp_2m", "unipc_bh2", "heun"):
        x = sample(ModelFn(net, VP(), prediction="eps"), x_T, solver=solver, steps=4)
        assert torch.isfinite(x).all() and not torch.equal(x, x_T), solver
    sched = baseline_schedule(VP(), "dpmpp_2m", 4)
    path = sys.argv[1] + "/schedule.json"
    assert SolverSchedule.load(sched.save(path)).to_dict() == sched.to_dict()
    print(len(names), "modules", sorted(m for m in sys.modules if m.startswith("difftools")))
    """
)


def test_every_samplers_module_works_without_difftools(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = int(proc.stdout.split()[0])
    assert count == len([m for m in module_files() if m.startswith("samplers.")]), proc.stdout
    assert proc.stdout.strip().endswith("modules []")


@pytest.mark.parametrize("name", ["VP", "Flow", "EDM", "DiscreteVP", "process_from_config", "scalar_at"])
def test_difftools_process_is_samplers_process(name):
    """The re-export keeps old imports and Hydra targets (``difftools.process.VP``) working, with one
    truth: the same objects, so an isinstance check or the memoised ``scalar_at`` cache is shared."""
    import difftools.process
    import samplers.process

    assert getattr(difftools.process, name) is getattr(samplers.process, name)
    assert set(difftools.process.__all__) == set(samplers.process.__all__)


def test_old_hydra_process_targets_still_instantiate():
    from hydra.utils import instantiate

    import samplers.process

    vp = instantiate({"_target_": "difftools.process.VP", "schedule": "cosine"})
    assert isinstance(vp, samplers.process.VP) and vp.config()["schedule"] == "cosine"
    edm = instantiate({"_target_": "samplers.process.EDM", "sigma_max": 40.0})
    assert edm.config() == {"kind": "EDM", "sigma_min": 0.002, "sigma_max": 40.0, "sigma_data": 0.5}

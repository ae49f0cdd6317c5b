"""The package layout has no import circles: every ``import`` / ``from ... import`` in ``causal_attn/`` and
``benchmarks/`` (function-level ones included), read with ``ast``, gives an edge between modules; the graph
must have no cycle. Imports by string (``importlib.import_module``) are not seen."""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> file, for causal_attn (dotted names; kernels/ is causal_attn.kernels) and benchmarks
    (top-level names: the scripts put their folder on sys.path and import each other by bare name)."""
    mods = {}
    for path in (ROOT / "causal_attn").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        mods[f"causal_attn.kernels.{path.stem}"] = path
    for path in (ROOT / "benchmarks").glob("*.py"):
        mods[path.stem] = path
    return mods


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = _package_of(name, path).split(".")
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_known_edges():
    """The parser finds module-level, relative, function-level and bare-name (benchmarks) imports."""
    g = import_graph()
    assert "causal_attn.ops.graph" in g["causal_attn.hf.patch"]  # from .graph import ...
    assert "causal_attn.hf.trainer" in g["causal_attn.cli.train"]  # function-level: from .trainer import CATTrainer
    assert "bench_kernels" in g["runner"]  # import bench_kernels (folder on sys.path)
    assert "causal_attn.data.capt.intervention" in g["causal_attn.data.capt.estimation"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_setup_lists_every_subpackage():
    """setup.py names its packages by hand: a new subpackage (e.g. causal_attn.data.capt) must be listed, or
    wheels and sdists ship without it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "packages" for t in node.targets))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "causal_attn").rglob("__init__.py")}
    assert found <= set(listed), f"missing from setup.py packages: {sorted(found - set(listed))}"

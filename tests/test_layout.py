"""The package's layout, read with ``ast`` (nothing is imported):

* the import graph of ``causal_attn/``, ``kernels/`` (``causal_attn.kernels``) and ``benchmarks/``
  (``causal_attn.benchmarks``) has no cycle. Its edges are every ``import`` / ``from ... import`` (function-level
  ones included) and every import by name: ``importlib.import_module`` / ``__import__`` of a string literal, or of
  an f-string whose constant prefix (``f"causal_attn.{mod}"``, ``f".{_EXPORTS[name]}"`` with ``__name__`` as the
  package) is completed by the string values of the module's own module-level dicts (the CLI's ``COMMANDS``);
  a name computed otherwise must be listed in :data:`DYNAMIC_IMPORTS` with the reason;
* the layers: a module imports only its own layer or lower ones (:data:`LAYERS`), and the op layer never reaches
  transformers, directly or through another module;
* no file edits ``sys.path``.
"""
from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# modules that import a module whose name is computed at run time, and what they import that way
DYNAMIC_IMPORTS = {
    "causal_attn.demo.runner": "the part modules (demo.stg, demo.capt, demo.pretrained) that hand it their own "
                               "__name__ in a Plan: imported back by name in spawned worker processes",
    "causal_attn.utils.versions": "check_stack imports the third-party stack (torch, transformers ...) by name to "
                                  "report the first that fails; called by the CLI and the test suite, not by a layer",
}

# low -> high: a module may import its own layer and lower ones. kernels sit beside ops; benchmarks beside cli (the
# bench and gpu-check commands import them); causal_attn/__init__, __main__ and testing (test helpers no library
# module imports) at the top. benchmarks and testing may import any layer, the top included.
LAYERS = ("utils", "ops", "data", "hf", "demo", "cli", "top")
LAYER_OF_SUBPACKAGE = {"kernels": "ops", "benchmarks": "cli", "testing": "top", "__main__": "top"}
IMPORT_ANY_LAYER = ("benchmarks", "testing")
NO_TRANSFORMERS = ("ops",)  # layers that must not reach transformers


@dataclass
class Imports:
    edges: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {module it imports: line}
    external: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {top-level package: line}
    unresolved: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, call) by computed name

    def graph(self) -> dict[str, set[str]]:
        return {name: set(targets) for name, targets in self.edges.items()}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file: causal_attn (dotted names), kernels/ as causal_attn.kernels, benchmarks/ as
    causal_attn.benchmarks (a checkout attaches both folders under those names, installs carry them there)."""
    mods = {}
    for path in (root / "causal_attn").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for folder in ("kernels", "benchmarks"):
        for path in (root / folder).glob("*.py"):
            mods[f"causal_attn.{folder}" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _absolute(relative: str, level: int, package: str) -> str:
    """``from <level dots><relative> import`` in ``package`` -> the absolute module name."""
    parts = package.split(".")
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([relative] if relative else []))


def _dict_strings(tree: ast.Module) -> list[str]:
    """The string values of the module-level dict literals (``COMMANDS = {"train": "cli.train", ...}``)."""
    values = []
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Dict):
            values += [v.value for v in value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return values


def _is_import_call(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module" and getattr(f.value, "id", None) == "importlib"
            ) or (isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


def _names_by_string(node: ast.Call, name: str, path: Path, tree: ast.Module, mods) -> list[str] | None:
    """The module names an import-by-name call can load; None when the name is computed otherwise."""
    if not node.args:
        return None
    arg = node.args[0]
    literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    if literal:
        names = [arg.value]
    elif (isinstance(arg, ast.JoinedStr) and len(arg.values) in (2, 3) and isinstance(arg.values[0], ast.Constant)
          and isinstance(arg.values[1], ast.FormattedValue)
          and all(isinstance(v, ast.Constant) for v in arg.values[2:])):
        prefix, suffix = arg.values[0].value, "".join(v.value for v in arg.values[2:])
        names = [prefix + s + suffix for s in _dict_strings(tree)]
    else:
        return None
    package = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "package"),
                                                           None)
    if package is not None:
        if not (isinstance(package, ast.Name) and package.id in ("__name__", "__package__")):
            return None
        base = name if package.id == "__name__" and path.name == "__init__.py" else _package_of(name, path)
        names = [_absolute(n.lstrip("."), len(n) - len(n.lstrip(".")), base) if n.startswith(".") else n
                 for n in names]
    found = names if literal else [n for n in names if n in mods]  # an f-string: the completions that are modules
    return found or None


def read_imports(root: Path = ROOT) -> Imports:
    mods = modules(root)
    result = Imports(edges={name: {} for name in mods}, external={name: {} for name in mods})

    def add(name: str, target: str, line: int):
        if not target.startswith("causal_attn"):
            result.external[name].setdefault(target.split(".")[0], line)
            return
        while target and target not in mods:  # `import a.b.c` of a non-module attribute: its module
            target = target.rpartition(".")[0]
        if target and target != name:
            result.edges[name].setdefault(target, line)

    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(name, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module or "", node.level, _package_of(name, path)) if node.level else node.module
                for alias in node.names:  # `from pkg import sub` imports the submodule when there is one
                    add(name, f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base, node.lineno)
            elif isinstance(node, ast.Call) and _is_import_call(node):
                targets = _names_by_string(node, name, path, tree, mods)
                if targets is None:
                    result.unresolved.append((name, node.lineno, ast.unparse(node)))
                for target in targets or ():
                    add(name, target, node.lineno)
    return result


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


def layer_of(module: str) -> str:
    """The layer a module of the graph belongs to; ValueError for one outside every layer."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    layer = LAYER_OF_SUBPACKAGE.get(parts[1], parts[1])
    if layer not in LAYERS:
        raise ValueError(f"{module} is in no layer: add its subpackage to LAYERS or LAYER_OF_SUBPACKAGE")
    return layer


def layer_violations(imports: Imports) -> list[str]:
    """Each edge from a layer to a higher one, as 'a -> b (line n): layer a imports layer b'."""
    bad = []
    for src, targets in sorted(imports.edges.items()):
        parts = src.split(".")
        if len(parts) > 1 and parts[1] in IMPORT_ANY_LAYER:
            continue
        for dst, line in sorted(targets.items()):
            if LAYERS.index(layer_of(dst)) > LAYERS.index(layer_of(src)):
                bad.append(f"{src} -> {dst} (line {line}): layer {layer_of(src)} imports layer {layer_of(dst)}")
    return bad


def paths_to_external(imports: Imports, package: str, layers=NO_TRANSFORMERS) -> list[str]:
    """For each module of ``layers`` that reaches ``package``: the shortest chain of imports that does."""
    found = []
    for start in sorted(m for m in imports.edges if layer_of(m) in layers):
        parent, queue = {start: None}, deque([start])
        while queue:
            mod = queue.popleft()
            if package in imports.external[mod]:
                chain = [mod]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                found.append(" -> ".join(reversed(chain)) + f" imports {package}")
                break
            for nxt in sorted(imports.edges[mod]):
                if nxt not in parent:
                    parent[nxt] = mod
                    queue.append(nxt)
    return found


# --- the parser itself -----------------------------------------------------------------------------------------

FAKE = {
    "causal_attn/__init__.py": "from .ops import core\n",
    "causal_attn/ops/__init__.py": "",
    "causal_attn/ops/core.py": "import torch\n",
    "causal_attn/ops/leaky.py": "def f():\n    from ..hf import patch\n",
    "causal_attn/hf/__init__.py": "",
    "causal_attn/hf/patch.py": "import transformers\nfrom ..ops.core import x\n",
    "causal_attn/cli/__init__.py": ("import importlib\nCOMMANDS = {'a': 'cli.train', 'b': 'hf.patch'}\n"
                                    "def build():\n    for m in COMMANDS.values():\n"
                                    "        importlib.import_module(f'causal_attn.{m}')\n"),
    "causal_attn/cli/train.py": "__import__('causal_attn.ops.core')\n",
    "causal_attn/data/__init__.py": ("import importlib\n_EXPORTS = {'g': 'graph'}\ndef __getattr__(n):\n"
                                     "    return importlib.import_module(f'.{_EXPORTS[n]}', __name__)\n"),
    "causal_attn/data/graph.py": "from importlib import import_module\nimport_module(NAME)\n",
    "kernels/flash_mass.py": "import triton\n",
    "benchmarks/__init__.py": "",
    "benchmarks/runner.py": "from . import common\nimport causal_attn\n",
    "benchmarks/common.py": "from causal_attn.kernels import flash_mass\n",
}


@pytest.fixture
def fake_tree(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_graph_sees_every_kind_of_import(fake_tree):
    imports = read_imports(fake_tree)
    g = imports.graph()
    assert g["causal_attn"] == {"causal_attn.ops.core"}  # from .ops import core (a submodule)
    assert g["causal_attn.ops.leaky"] == {"causal_attn.hf.patch"}  # function-level, relative
    assert g["causal_attn.cli"] == {"causal_attn.cli.train", "causal_attn.hf.patch"}  # f-string over COMMANDS
    assert g["causal_attn.cli.train"] == {"causal_attn.ops.core"}  # __import__ of a literal
    assert g["causal_attn.data"] == {"causal_attn.data.graph"}  # relative f-string against __name__
    assert g["causal_attn.benchmarks.runner"] == {"causal_attn.benchmarks.common", "causal_attn"}
    assert g["causal_attn.benchmarks.common"] == {"causal_attn.kernels.flash_mass"}
    assert imports.external["causal_attn.hf.patch"] == {"transformers": 1}
    assert [(m, line) for m, line, _ in imports.unresolved] == [("causal_attn.data.graph", 2)]  # a computed name
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layer_check_names_each_upward_edge_and_each_path_to_transformers(fake_tree):
    imports = read_imports(fake_tree)
    assert layer_violations(imports) == [
        "causal_attn.ops.leaky -> causal_attn.hf.patch (line 2): layer ops imports layer hf"]
    assert paths_to_external(imports, "transformers") == [
        "causal_attn.ops.leaky -> causal_attn.hf.patch imports transformers"]
    assert paths_to_external(imports, "triton") == ["causal_attn.kernels.flash_mass imports triton"]


# --- the package -----------------------------------------------------------------------------------------------

def test_graph_sees_known_edges():
    g = read_imports().graph()
    assert "causal_attn.ops.graph" in g["causal_attn.hf.patch"]  # from ..ops.graph import ...
    assert "causal_attn.hf.trainer" in g["causal_attn.cli.train"]  # function-level
    assert "causal_attn.cli.train" in g["causal_attn.cli"]  # only by name, through COMMANDS
    assert "causal_attn.benchmarks.runner" in g["causal_attn.cli.bench"]
    assert "causal_attn.benchmarks.bench_kernels" in g["causal_attn.benchmarks.runner"]  # from . import ...
    assert "causal_attn.testing.oracle" in g["causal_attn.benchmarks.accuracy"]
    assert "causal_attn.data.capt.intervention" in g["causal_attn.data.capt.estimation"]


def test_no_import_cycles():
    cycle = find_cycle(read_imports().graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_import_by_name_is_resolved_or_known():
    unknown = [f"{m}:{line}: {call}" for m, line, call in read_imports().unresolved if m not in DYNAMIC_IMPORTS]
    assert not unknown, ("imports by a computed name the layout cannot see; import a literal name, or list the "
                         "module in DYNAMIC_IMPORTS with what it imports:\n" + "\n".join(unknown))


def test_layers_import_only_their_own_or_lower_ones():
    bad = layer_violations(read_imports())
    assert not bad, f"imports from a lower layer into a higher one ({' < '.join(LAYERS)}):\n" + "\n".join(bad)


def test_op_layer_never_reaches_transformers():
    chains = paths_to_external(read_imports(), "transformers")
    assert not chains, "the op layer (ops, kernels) must import without transformers:\n" + "\n".join(chains)


def test_setup_lists_every_subpackage():
    """setup.py names its packages by hand: a new subpackage (e.g. causal_attn.data.capt) must be listed, or
    wheels and sdists ship without it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "packages" for t in node.targets))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "causal_attn").rglob("__init__.py")}
    assert found <= set(listed), f"missing from setup.py packages: {sorted(found - set(listed))}"


# --- sys.path --------------------------------------------------------------------------------------------------

PATH_MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "reverse", "sort", "__setitem__",
                 "__delitem__", "__iadd__"}


def sys_path_edits(source: str, filename: str = "<string>") -> list[int]:
    """Lines that change ``sys.path``: a mutating method call, an assignment, augmented assignment or ``del`` of
    it or of its items, ``site.addsitedir``; through ``import sys as s``, ``from sys import path as p`` and
    ``p = sys.path`` aliases too."""
    tree = ast.parse(source, filename)
    sys_names, path_names = {"sys"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sys_names |= {a.asname for a in node.names if a.name == "sys" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            path_names |= {a.asname or a.name for a in node.names if a.name == "path"}

    def is_path(e) -> bool:
        return (isinstance(e, ast.Attribute) and e.attr == "path" and getattr(e.value, "id", None) in sys_names) or (
            isinstance(e, ast.Name) and e.id in path_names)

    for node in ast.walk(tree):  # aliases: p = sys.path
        if isinstance(node, ast.Assign) and is_path(node.value):
            path_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Delete) or (isinstance(node, ast.Assign) and not is_path(node.value)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if (node.func.attr in PATH_MUTATORS and is_path(node.func.value)) or (
                    node.func.attr == "addsitedir" and getattr(node.func.value, "id", None) == "site"):
                lines.append(node.lineno)
        for t in targets:
            if is_path(t) or (isinstance(t, ast.Subscript) and is_path(t.value)):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_sys_path_edit_finder_sees_each_form():
    edits = ["import sys\nsys.path.insert(0, 'x')", "import sys\nsys.path.append('x')",
             "import sys\nsys.path[:0] = ['x']", "import sys\nsys.path = ['x']", "import sys\nsys.path += ['x']", "import sys\ndel sys.path[0]",
             "import sys as s\ns.path.extend(['x'])", "from sys import path\npath.insert(0, 'x')",
             "import sys\np = sys.path\np.append('x')", "import site\nsite.addsitedir('x')"]
    for source in edits:
        assert sys_path_edits(source), source
    assert not sys_path_edits("import sys\nprint(sys.path, 'x' in sys.path)\npath = []\npath.append(1)\n"
                              "paths = sys.path\nprint(paths)")


def test_no_file_edits_sys_path():
    """Modules are imported by their package name (``causal_attn.benchmarks.runner``, ``causal_attn.testing``):
    no folder is put on ``sys.path``, where its modules would shadow a user's (``runner``, ``common`` ...)."""
    files = [ROOT / "setup.py"] + [p for folder in ("causal_attn", "kernels", "benchmarks", "tests", "docs")
                                   for p in (ROOT / folder).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{line}" for p in files for line in sys_path_edits(p.read_text(), str(p))]
    assert not found, "sys.path edited at: " + ", ".join(found)

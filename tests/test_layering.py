"""The package's layering: every module imports on its own, and no two modules import each other.

The import graph is read from the source (every ``import ddpm_fast...`` and ``from ddpm_fast... import``,
at module level or inside a function: a lazy import is a dependency too). An import of a submodule is an
edge to that submodule only, so a package's ``__init__`` may re-export its submodules without forming a
cycle with them.
"""

import ast
import os
import subprocess
import sys

import pytest

import ddpm_fast

PACKAGE_DIR = os.path.dirname(ddpm_fast.__file__)
EXTENSIONS = {"ddpm_fast.ops._C"}  # compiled modules: leaves of the graph


def _modules() -> dict[str, str]:
    """Module name -> file, for every .py file of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE_DIR))[:-3]
            parts = rel.split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = os.path.join(root, name)
    return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    graph = {}
    modules_set = set(modules)
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # from X import Y: the submodule X.Y where there is one (the compiled extension too), else X
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules_set | EXTENSIONS else base
                           for a in node.names]
            deps.update(t for t in targets if t in modules and t != mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _python(code: str) -> str:
    """The stdout of ``code`` run by a fresh interpreter, which must succeed."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    # A package re-exporting its submodule is no cycle; the submodule importing the package back is.
    mods = {"p": "p/__init__.py", "p.x": "p/x.py"}
    assert find_cycle({"p": {"p.x"}, "p.x": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p", "p.x", "p"]
    assert set(mods) == {"p", "p.x"}


def test_no_import_cycles():
    graph = import_graph(_modules())
    assert "ddpm_fast.ops.registry" in graph["ddpm_fast.ops.group_norm_silu"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_bottom_layers_import_nothing_above_them():
    """fileio, base and config sit below the model stack: logging and I/O never pull in the U-Net or the ops."""
    graph = import_graph(_modules())
    assert graph["ddpm_fast.fileio"] == set()
    assert graph["ddpm_fast.base"] == set()
    for mod in ("ddpm_fast.metrics", "ddpm_fast.images"):
        assert graph[mod] <= {"ddpm_fast.fileio", "ddpm_fast.base"}, (mod, graph[mod])


# The package's layers, bottom first: a module imports only from its own layer or those below it.
LAYERS = (
    ("files, devices and numbers", ("base", "fileio", "distributed", "data", "schedule")),
    ("small helpers", ("noise", "images", "metrics", "config")),
    ("ops", ("ops", "ops.*")),
    ("model families", ("fast", "unet", "adm", "classifier", "families")),
    ("weights in and out", ("checkpoint", "openai")),
    ("sampling, likelihood and losses", ("plan", "samplers", "solvers", "likelihood", "losses", "engine")),
    ("library services", ("loading", "trainer", "distillation")),
    ("commands", ("cli", "sample", "train", "nll", "fid", "distill")),
)


def _layer_of(module: str) -> int:
    name = module.removeprefix("ddpm_fast").lstrip(".")
    if not name:
        return len(LAYERS)  # the package itself re-exports everything
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if name == m or (m.endswith(".*") and name.startswith(m[:-1])):
                return i
    raise AssertionError(f"{module} belongs to no layer: place it in tests/test_layering.py's LAYERS")


def test_no_module_imports_from_a_layer_above_its_own():
    graph = import_graph(_modules())
    upward = [f"{mod} ({LAYERS[_layer_of(mod)][0]}) imports {dep} ({LAYERS[_layer_of(dep)][0]})"
              for mod, deps in graph.items() for dep in deps
              if _layer_of(dep) > _layer_of(mod)]
    assert not upward, "\n".join(upward)
    # The compiled extension is the ops layer's own: nothing outside ops/ loads it.
    loaders = [mod for mod, path in _modules().items()
               if "import _C" in open(path).read() or 'import_module("ddpm_fast.ops._C")' in open(path).read()]
    assert loaders == ["ddpm_fast.ops.registry"], loaders


def test_the_layer_check_catches_an_upward_import():
    assert _layer_of("ddpm_fast.ops.conv3x3") < _layer_of("ddpm_fast.unet") < _layer_of("ddpm_fast.sample")
    with pytest.raises(AssertionError, match="belongs to no layer"):
        _layer_of("ddpm_fast.somewhere_new")


def test_every_module_imports_alone():
    """Each module imported first, into a process that holds no part of the package, works (no hidden
    order dependence). One process imports torch once and forks a child per module."""
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = (
        "import importlib, os, sys, torch\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as exc:\n"
        "            sys.stderr.write(f'{name}: {type(exc).__name__}: {exc}\\n')\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1]:\n"
        "        failed.append(name)\n"
        "print('imported alone:', len(names) - len(failed), 'of', len(names))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    assert f"imported alone: {len(names)} of {len(names)}" in _python(code)


def test_loading_and_sampling_the_embedded_model_imports_no_compiler():
    """The default command's path (import, load, fast form, a sampling step, the PNG and .npz) stays clear of
    torch._dynamo and sympy: importing them is over a second of every CLI start on a small CPU. (Building a
    model on the meta device, for one, imports both the first time an nn.Embedding draws its weights.)"""
    code = (
        "import sys, torch, tempfile\n"
        "from ddpm_fast import sample\n"
        "sample.main(['--fp16', '--num-samples', '2', '--steps', '2', '--allow-few-steps', '--no-progress',\n"
        "             '--out', tempfile.mkdtemp()])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'sympy' or m.startswith('torch._dynamo'))\n"
        "print('heavy:', heavy[:5])\n"
    )
    out = _python(code)
    assert "heavy: []" in out, out

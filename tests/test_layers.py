"""The layers of gradsae import only downward, with no circle (docs/design.md, "Layers").

Every module of the package (``kernels/`` as ``gradsae.kernels``) is parsed with ``ast`` and
every import it makes, at module level or inside a function, is checked against the layer
table below: a module may import from its own layer and the layers below it, never above.
The built-in backends are loaded by the op's dispatcher by name (``importlib``), a plugin load
that this test checks separately. Then every module is imported on its own in a fresh
interpreter state.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the layer of the longest entry that is its name or a
# package above it ("gradsae", the package's public face, matches itself only).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("shared leaves", ("gradsae.errors", "gradsae.fsutil", "gradsae.stats", "gradsae.version")),
    ("sae", ("gradsae.sae",)),
    ("op", ("gradsae.op",)),
    ("backends", ("gradsae.backends", "gradsae.kernels", "gradsae._C")),
    ("loading", ("gradsae.loading",)),
    ("model", ("gradsae.model",)),
    ("runs", ("gradsae.corpus", "gradsae.experiments", "gradsae.recipes", "gradsae.demo")),
    ("commands", ("gradsae.commands", "gradsae.cli", "gradsae.__main__", "gradsae.benchmark", "gradsae")),
]

# Imports that go up, each with why it is there. The test fails when one is no longer made,
# so the list cannot go stale.
EXCEPTIONS: dict[tuple[str, str], str] = {}

# The only modules that load modules by computed name, and what they may load.
PLUGIN_LOADERS = {
    "gradsae.op.dispatch": "the built-in backends named in PRIORITY",
    "gradsae.cli": "the subcommand modules of gradsae.commands",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "gradsae").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[:2] == ["gradsae", "data"]:  # the demo's bundled files
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "gradsae.kernels" if path.stem == "__init__" else f"gradsae.kernels.{path.stem}"
        out[name] = path
    return out


MODULES = _modules()
KNOWN = set(MODULES) | {"gradsae._C"}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for e in entries:
            hit = module == e or (e != "gradsae" and module.startswith(e + "."))
            if hit and len(e) > best_len:
                best, best_len = i, len(e)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _imports(module: str, path: Path) -> set[str]:
    """The gradsae modules ``module`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in KNOWN else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "gradsae" or name.startswith("gradsae."):
                while name not in KNOWN and "." in name:  # an attribute import: its module
                    name = name.rpartition(".")[0]
                deps.add(name)
    deps.discard(module)
    return deps


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in KNOWN:
        layer_of(m)


def test_imports_only_go_down():
    up = []
    used = set()
    for m, deps in GRAPH.items():
        for d in deps:
            if layer_of(d) > layer_of(m):
                if (m, d) in EXCEPTIONS:
                    used.add((m, d))
                    continue
                up.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not up, "imports that go up a layer:\n" + "\n".join(sorted(up))
    assert used == set(EXCEPTIONS), f"exceptions no longer needed: {set(EXCEPTIONS) - used}"


def test_no_import_circles():
    graph = {m: {d for d in deps if (m, d) not in EXCEPTIONS and d in GRAPH} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_sae_is_the_bottom_of_the_maths():
    """The SAE data type imports nothing of gradsae but the errors (it is served by the layers
    above through gradsae.sae.provide)."""
    assert GRAPH["gradsae.sae"] == {"gradsae.errors"}


def _loads_by_name(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                return True
    return False


def test_plugin_loads_are_the_dispatchers_and_the_clis():
    from gradsae.op.dispatch import PRIORITY

    loaders = {m for m, p in MODULES.items() if _loads_by_name(p)}
    assert loaders == set(PLUGIN_LOADERS), loaders
    # the backends the op loads by name are modules of the backends layer, above the op
    for name, module in PRIORITY:
        assert module in MODULES, module
        assert LAYERS[layer_of(module)][0] == "backends"
        assert layer_of(module) > layer_of("gradsae.op.dispatch")


ISOLATED = textwrap.dedent("""
    import importlib, sys, traceback
    failed = []
    for name in sys.argv[1:]:
        for m in [m for m in sys.modules if m == "gradsae" or m.startswith("gradsae.")]:
            del sys.modules[m]
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name + ": " + traceback.format_exc(limit=3))
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh state of gradsae (torch stays loaded)."""
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    names = sorted(m for m in MODULES if m != "gradsae.__main__")
    res = subprocess.run([sys.executable, "-c", ISOLATED, *names], capture_output=True, text=True, cwd=ROOT / "tests",
                         env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

"""No import cycle inside the bsn_cuda package.

The graph: one node per module of ``bsn_cuda/`` (a package is its
``__init__``), one edge per import of another module of the package
(``import bsn_cuda.x``, ``from . import x``, ``from .x import name``;
``from .. import name`` of a non-module name is an edge to that package's
``__init__``). Every import statement counts, also one inside a function
(stricter than needed: such an import runs after loading, but a cycle through
it still ties the two modules together). The implicit import of a module's
parent packages is not an edge (Python always loads them first).
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "bsn_cuda"
COMPILED = "bsn_cuda._C"  # the extension: imports nothing of the package


def _modules():
    """{dotted name: path} of every module under bsn_cuda/; the compiled ``_C`` (built or not) has no path."""
    found = {COMPILED: None}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        for f in filenames:
            if f.endswith(".py"):
                name = rel if f == "__init__.py" else f"{rel}.{f[:-3]}"
                found[name] = os.path.join(dirpath, f)

    return found


def _edges(name, path, modules):
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        out.update(t for t in targets if t in modules and t != name)
    return out


def _find_cycle(graph):
    state = {}  # node -> 1 (on the stack) or 2 (done)
    stack = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph():
    modules = _modules()
    return {name: _edges(name, path, modules) if path else set() for name, path in modules.items()}


def test_graph_sees_the_package():
    graph = import_graph()
    assert "bsn_cuda._ops" in graph["bsn_cuda.nn.legacy"]
    assert "bsn_cuda._library" in graph["bsn_cuda._ops"]
    assert "bsn_cuda" not in graph["bsn_cuda._library"]  # `from . import _C` names a module
    assert "bsn_cuda.nn.registration" in graph["bsn_cuda.nn"]


def test_no_import_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)

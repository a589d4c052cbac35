"""The package's import structure: no module imports a private name from another module, the
import graph between the package's modules has no cycle, and no code writes a private attribute of
an object other than its own (``self``/``cls``): a ``GeometricWeight`` is built whole by its
constructor and ``bind``. Read from the source (AST), so a planted violation fails here without
importing anything."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "georeparam"


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(root: Path = PACKAGE) -> Dict[str, List[Tuple[str, str, int]]]:
    """``{module: [(imported module, name or '', line)]}`` for every import inside the package,
    also those inside functions (a lazy import is still a dependency)."""
    names = {_module_name(p, root) for p in root.rglob("*.py")}
    out: Dict[str, List[Tuple[str, str, int]]] = {}
    for path in sorted(root.rglob("*.py")):
        mod = _module_name(path, root)
        is_pkg = path.name == "__init__.py"
        found = out.setdefault(mod, [])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "georeparam"]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node.level, node.module)
                if target.split(".")[0] != "georeparam":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in names:  # ``from . import plot``: the module itself
                        found.append((sub, "", node.lineno))
                    else:
                        found.append((target, a.name, node.lineno))
    return out


def private_imports(graph) -> List[str]:
    """``from .x import _y`` where ``_y`` is private to ``x`` (a dunder or ``__version__`` is fine)."""
    bad = []
    for mod, deps in graph.items():
        for target, name, line in deps:
            if name.startswith("_") and not name.startswith("__") and target != mod:
                bad.append(f"{mod}:{line} imports {name} from {target}")
    return bad


def cycles(graph) -> List[List[str]]:
    """Every cycle of the module graph (modules importing modules), found by depth-first search."""
    edges: Dict[str, Set[str]] = {m: set() for m in graph}
    for mod, deps in graph.items():
        for target, _, _ in deps:
            t = target
            while t not in graph and "." in t:
                t = t.rsplit(".", 1)[0]
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if t in graph and t != mod and not t.startswith(mod + "."):
                edges[mod].add(t)
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


# the cast guard installs itself on torch's own Module class (Note [An atomic cast])
_ALLOWED_WRITES = {("georeparam.parametrization", "nn.Module._apply")}


def private_writes(root: Path = PACKAGE) -> List[str]:
    """``x._y = …`` (also augmented) and ``object.__setattr__(x, "_y", …)`` where ``x`` is not
    ``self`` or ``cls``: code setting another object's private state."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = _module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            written = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    written += [
                        (e.value, e.attr)
                        for e in ast.walk(target)
                        if isinstance(e, ast.Attribute) and isinstance(e.ctx, ast.Store)
                    ]
            elif (
                isinstance(node, ast.Call) and ast.unparse(node.func) == "object.__setattr__" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
            ):  # fmt: skip
                written.append((node.args[0], node.args[1].value))
            for owner, attr in written:
                if (
                    not attr.startswith("_")
                    or attr.startswith("__")
                    or (isinstance(owner, ast.Name) and owner.id in ("self", "cls"))
                ):
                    continue
                where = f"{ast.unparse(owner)}.{attr}"
                if (mod, where) not in _ALLOWED_WRITES:
                    bad.append(f"{mod}:{node.lineno} writes {where}")
    return bad


def test_no_code_writes_another_objects_private_attribute():
    assert private_writes() == []


def test_no_module_imports_a_private_name_from_another():
    assert private_imports(imports()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(imports()) == []


def test_the_checks_catch_planted_violations(tmp_path):
    pkg = tmp_path / "georeparam"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom ..a import __doc__\n")
    graph = imports(pkg)
    assert private_imports(graph) == ["georeparam.a:1 imports _hidden from georeparam.b"]
    assert cycles(graph) == [["georeparam.a", "georeparam.b", "georeparam.sub.c", "georeparam.a"]]
    (pkg / "d.py").write_text(
        "def bind(p, q):\n    p._weight_name = 'w'\n    object.__setattr__(q, '_layer', p)\n    p.public = 1\n"
        "class C:\n    def f(self):\n        self._own = 1\n        object.__setattr__(self, '_own', 2)\n"
    )
    assert private_writes(pkg) == ["georeparam.d:2 writes p._weight_name", "georeparam.d:3 writes q._layer"]

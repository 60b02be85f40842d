"""Static checks of the code's structure, read from the AST (nothing is imported or run).

- :func:`import_graph` / :func:`find_cycle`: the module import graph of a set of top-level packages, counting
  every import statement wherever it stands (module level, inside functions, under ``TYPE_CHECKING``).
  ``import a.b.c`` and ``from a.b import c`` are edges to the module named (``a.b.c``); ``from a.b import name``
  for a name that is no submodule is an edge to ``a.b`` (its ``__init__``). The implicit import of parent
  packages' ``__init__`` files is not counted.
- :func:`private_uses`: places where a module uses another module's ``_private`` name: ``from m import _x``,
  ``m._x`` on an imported module, and ``obj._x`` (or ``getattr(obj, "_x")``) where ``_x`` is a private name
  that some other module of the tree defines (a ``def``/class, a module or class variable, or a ``self._x``
  assignment) and the using module does not define itself. ``self._x``/``cls._x``/``super()._x`` are a class's
  own business and not counted.
- :func:`feature_probes`: ``hasattr(obj, "name")`` and three-argument ``getattr(obj, "name", default)`` calls.
- :func:`long_functions`: functions (and methods) longer than a limit, counted as ``end_lineno - lineno + 1``.
- :func:`reachable` / :func:`third_party_imports`: what a set of modules imports, transitively, and which packages
  from outside the tree and the standard library they import.
- :func:`calls_named`: where a function or method of a given name is called.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("specdit", "workers", "cluster", "cli")


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "workers.ray_pool.actors" ("workers.ray_pool" for its __init__)
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def load_modules(root: Path, packages=PACKAGES) -> dict[str, Module]:
    """Every ``.py`` file under ``root/<package>`` parsed, by dotted module name."""
    out = {}
    for pkg in packages:
        for path in sorted((Path(root) / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = Module(".".join(parts), path, ast.parse(path.read_text(), str(path)))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _closest_module(name: str, modules) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """``{module: {internal modules it imports}}`` (self-imports dropped)."""
    graph = {name: set() for name in modules}
    for mod in modules.values():
        for node in ast.walk(mod.tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_closest_module(a.name, modules) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _closest_module(base, modules)
                           for a in node.names]
            graph[mod.name].update(t for t in targets if t and t != mod.name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _defined_private_names(mod: Module) -> set[str]:
    names = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


def _module_bindings(mod: Module, modules) -> dict[str, str]:
    """Local names bound to internal modules by import statements anywhere in ``mod`` (one flat namespace)."""
    bound = {}
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in modules:
                    bound[a.asname] = a.name
                elif not a.asname:
                    top = a.name.split(".")[0]
                    if top in modules:
                        bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(mod, node)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{base}.{a.name}"
    return bound


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _module_of(node: ast.AST, bound, modules) -> str | None:
    """The internal module an expression like ``m`` or ``pkg.sub`` names, if any."""
    dotted = _dotted(node)
    if not dotted:
        return None
    head, _, rest = dotted.partition(".")
    if head not in bound:
        return None
    full = bound[head] + ("." + rest if rest else "")
    return full if full in modules else None


def _own_object(node: ast.AST) -> bool:
    if isinstance(node, ast.Name) and node.id in ("self", "cls"):
        return True
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def private_uses(modules: dict[str, Module]) -> list[str]:
    """``"path:line: what"`` for each use of another module's private name (see the module docstring)."""
    defined = {name: _defined_private_names(m) for name, m in modules.items()}
    anywhere = set().union(*defined.values()) if defined else set()
    out = []
    for mod in modules.values():
        bound = _module_bindings(mod, modules)
        where = lambda n: f"{mod.path}:{n.lineno}"  # noqa: E731
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                if _closest_module(base, modules) is None:
                    continue
                for a in node.names:
                    if _is_private(a.name) and f"{base}.{a.name}" not in modules:
                        out.append(f"{where(node)}: from {base} import {a.name}")
                continue
            attr, obj = None, None
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                attr, obj = node.attr, node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                  and _is_private(node.args[1].value)):
                attr, obj = node.args[1].value, node.args[0]
            if attr is None or _own_object(obj):
                continue
            target = _module_of(obj, bound, modules)
            if target is not None:
                if target != mod.name:
                    out.append(f"{where(node)}: {target}.{attr}")
            elif attr in anywhere and attr not in defined[mod.name]:
                owners = sorted(n for n, d in defined.items() if attr in d)
                out.append(f"{where(node)}: {ast.unparse(obj)}.{attr} (private to {', '.join(owners)})")
    return out


def feature_probes(modules: dict[str, Module]) -> list[tuple[str, str, str]]:
    """``(module, call text, attribute)`` for each ``hasattr(x, "a")`` or ``getattr(x, "a", default)``."""
    out = []
    for mod in modules.values():
        for node in ast.walk(mod.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            probe = (node.func.id == "hasattr" and len(node.args) == 2) or (
                node.func.id == "getattr" and len(node.args) + len(node.keywords) == 3)
            if probe:
                name = node.args[1].value if isinstance(node.args[1], ast.Constant) else ast.unparse(node.args[1])
                out.append((mod.name, ast.unparse(node), name))
    return out


def long_functions(modules: dict[str, Module], limit: int = 60) -> dict[str, int]:
    """``{"module.qualname": lines}`` for every function or method longer than ``limit`` lines."""
    out = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > limit:
                    out[name] = child.end_lineno - child.lineno + 1
                visit(child, name)
            else:
                visit(child, prefix)

    for mod in modules.values():
        visit(mod.tree, mod.name)
    return out


def _names_in(body) -> dict[str, ast.AST]:
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def defined_name(modules: dict[str, Module], dotted: str) -> bool:
    """Whether ``dotted`` (``pkg.module[.Class][.name]``) is a module of ``modules`` or a top-level function,
    class or constant of one (then a method or class attribute of such a class), read from the AST."""
    module = _closest_module(dotted, modules)
    if module is None:
        return False
    rest = dotted[len(module) + 1:].split(".") if dotted != module else []
    body = modules[module].tree.body
    for part in rest:
        node = _names_in(body).get(part)
        if node is None:
            return False
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


def reachable(graph: dict[str, set[str]], roots) -> set[str]:
    """The modules ``roots`` import, directly or not (the roots included), following :func:`import_graph`."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def third_party_imports(modules: dict[str, Module], names) -> dict[str, set[str]]:
    """``{top-level package: {modules of names importing it}}`` for every absolute import (wherever it stands)
    of a package that is neither in the standard library (``sys.stdlib_module_names``) nor one of the tree's
    own packages."""
    import sys

    own = {n.split(".")[0] for n in modules} | {"__future__"}
    out: dict[str, set[str]] = {}
    for name in names:
        for node in ast.walk(modules[name].tree):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for top in {f.split(".")[0] for f in found} - own - set(sys.stdlib_module_names):
                out.setdefault(top, set()).add(name)
    return out


def calls_named(modules: dict[str, Module], attr: str) -> dict[str, int]:
    """``{module: number of calls}`` of a function or method called ``attr`` (``f(...)`` or ``obj.f(...)``)."""
    out: dict[str, int] = {}
    for mod in modules.values():
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if called == attr:
                    out[mod.name] = out.get(mod.name, 0) + 1
    return out

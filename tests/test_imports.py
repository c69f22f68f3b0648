"""The package's layering: module-level imports between its modules form no cycle, and no module imports
another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import hybrid_distill

ROOT = Path(hybrid_distill.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _package_imports():
    """{module: [(imported module, names, lineno, at module level)]} for imports inside the package."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in tree.body:  # `if TYPE_CHECKING:` blocks are not imports at run time
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                top |= {id(n) for n in ast.walk(node)}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                if target.startswith("hybrid_distill"):
                    for alias in node.names:  # `from . import x` imports the submodule x
                        sub = f"{target}.{alias.name}"
                        mod = sub if sub in modules else target
                        edges.append((mod, alias.name, node.lineno, id(node) in top and "TYPE_CHECKING" not in ast.dump(node)))
        graph[name] = edges
    return modules, graph


def test_module_level_imports_form_no_cycle():
    modules, graph = _package_imports()
    deps = {m: {t for t, _, _, top in edges if top and t in modules and t != m} for m, edges in graph.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a layering cycle
    deps = {m: {t for t in ts if not t.startswith(m + ".") or not modules[m].name == "__init__.py"} for m, ts in deps.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(deps.get(m, ())):
            parents = [p for p in (t.rsplit(".", i)[0] for i in range(1, t.count(".") + 1)) if p in modules]
            for dep in [*parents, t]:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                if dep == m or m.startswith(dep + "."):
                    continue
                if state.get(dep) == 1:
                    return stack[stack.index(dep):] + [dep]
                if dep not in state:
                    cycle = visit(dep)
                    if cycle:
                        return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(deps):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    _, graph = _package_imports()
    private = [f"{m}:{line} imports {name} from {target}" for m, edges in graph.items()
               for target, name, line, _ in edges if name.startswith("_") and not name.startswith("__")]
    assert not private, private


def test_package_imports_are_at_module_top():
    # lazy imports are kept for optional heavy dependencies only, which are not package modules
    _, graph = _package_imports()
    inner = [f"{m}:{line} imports {target}" for m, edges in graph.items() for target, _, line, top in edges if not top]
    assert not inner, inner

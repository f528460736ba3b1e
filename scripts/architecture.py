"""Architecture figures of the library's own packages (rl/, rollouts/, rewards/), read from the source:

    python scripts/architecture.py [--json]

- the longest functions and classes (lines, decorators and docstrings included);
- import cycles between modules, counting imports inside functions as well as top-level ones;
- private names (`_x`) imported from another module;
- imports that break the layering (rl.core.layers: which layer may import which).

tests/unit/test_architecture.py holds the library to these: no cycle, no private import across
modules, no layering break, no function of 80 lines or more.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rl", "rollouts", "rewards")


def modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the library's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str, int]]:
    """(importer, imported module, imported name or '', line) for every import of our modules."""
    out = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(module, a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, module, path.name == "__init__.py")
                if target.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.append((module, sub, "", node.lineno) if sub in mods else (module, target, alias.name, node.lineno))
    return out


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for importer, target, _, _ in imports(mods):
        owner = _owner(target, mods)
        if owner and owner != importer:
            edges[importer].add(owner)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def private_imports(mods: dict[str, Path]) -> list[str]:
    out = []
    for importer, target, name, line in imports(mods):
        leaf = name or target.rsplit(".", 1)[-1]
        if leaf.startswith("_") and not leaf.startswith("__") and _owner(target, mods) != importer:
            out.append(f"{mods[importer].relative_to(ROOT)}:{line} imports {target}{'.' + name if name else ''}")
    return out


def layer_breaks(mods: dict[str, Path]) -> list[str]:
    """Imports from a module to one its layer may not import (rl.layers)."""
    sys.path.insert(0, str(ROOT))
    from rl.core.layers import allowed, layer_of

    out = []
    for importer, target, name, line in imports(mods):
        owner = _owner(target, mods)
        if owner is None or owner == importer:
            continue
        if not allowed(layer_of(importer), layer_of(owner)):
            out.append(f"{mods[importer].relative_to(ROOT)}:{line} ({layer_of(importer)}) imports {owner} ({layer_of(owner)})")
    return out


def longest(mods: dict[str, Path], kind: type, n: int = 5) -> list[tuple[int, str]]:
    sizes = []
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind) or (kind is ast.FunctionDef and isinstance(node, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                sizes.append((node.end_lineno - start + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(sizes, reverse=True)[:n]


def report() -> dict:
    mods = modules()
    try:
        breaks = layer_breaks(mods)
    except ImportError:  # a tree without rl.core.layers (before the layering was declared)
        breaks = None
    return {
        "modules": len(mods),
        "longest_functions": longest(mods, ast.FunctionDef),
        "longest_classes": longest(mods, ast.ClassDef),
        "import_cycles": cycles(graph(mods)),
        "private_imports": private_imports(mods),
        "layer_breaks": breaks,
    }


def main() -> int:
    result = report()
    if "--json" in sys.argv:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['modules']} modules")
    for title in ("longest_functions", "longest_classes"):
        print(title.replace("_", " ") + ":")
        for lines, where in result[title]:
            print(f"  {lines:4d} lines  {where}")
    print(f"import cycles (imports inside functions included): {len(result['import_cycles'])}")
    for component in result["import_cycles"]:
        print("  " + " <-> ".join(component))
    print(f"private names imported across modules: {len(result['private_imports'])}")
    for line in result["private_imports"]:
        print("  " + line)
    breaks = result["layer_breaks"]
    print("layering breaks: " + ("(no rl.core.layers yet)" if breaks is None else str(len(breaks))))
    for line in breaks or []:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Report import cycles (imports inside functions included), functions over 60 lines and imports inside
functions that do not say why they are deferred (a ``# deferred: <why>`` comment on the import's line or
the line above) in src/noisesearch.

    python tools/check_layers.py            # prints problems, exit 1 if any
Used by tests/test_structure.py.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PKG = "noisesearch"
MAX_LINES = 60


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PKG).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> internal modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for n in names:
                if n == PKG or n.startswith(PKG + "."):
                    r = _resolve(n, mods)
                    if r and r != mod and r != PKG:
                        targets.add(r)
        graph[mod] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


def module_cycles(graph) -> list[list[str]]:
    # a package's __init__ re-exporting its own modules is not a cycle with them
    pruned = {m: {t for t in ts if not (m.count(".") < t.count(".") and t.startswith(m + "."))}
              for m, ts in graph.items()}
    return _cycles(pruned)


def layer_cycles(graph) -> list[list[str]]:
    lg: dict[str, set[str]] = {}
    for m, ts in graph.items():
        lg.setdefault(layer(m), set()).update(layer(t) for t in ts if layer(t) != layer(m))
    return _cycles(lg)


def long_functions(mods: dict[str, Path], limit: int = MAX_LINES) -> list[str]:
    out = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} {n} lines")
    return out


DEFERRED = "# deferred:"


def undeclared_local_imports(source: str, name: str = "<source>") -> list[str]:
    """``name:line import ...`` for every import inside a function of ``source`` without a
    ``# deferred: <why>`` comment on its line or on the line just above (an import belongs at the top
    of its module, unless it defers a heavy optional dependency or keeps the CLI's start light)."""
    lines = source.splitlines()
    tree = ast.parse(source, name)
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            line = lines[node.lineno - 1]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if DEFERRED not in line and not above.startswith(DEFERRED):
                out.append(f"{name}:{node.lineno} {line.strip()}")
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1].split()[0])))


def local_imports(mods: dict[str, Path]) -> list[str]:
    """Imports inside functions without a ``# deferred:`` comment, over all modules."""
    out = []
    for path in mods.values():
        out += undeclared_local_imports(path.read_text(), str(path.relative_to(ROOT.parent)))
    return out


def main() -> int:
    mods = modules()
    graph = imports(mods)
    problems = [f"layer cycle: {' <-> '.join(c)}" for c in layer_cycles(graph)]
    problems += [f"module cycle: {' <-> '.join(c)}" for c in module_cycles(graph)]
    problems += [f"long function: {f}" for f in long_functions(mods)]
    problems += [f"import inside a function without '{DEFERRED} <why>': {f}" for f in local_imports(mods)]
    print("\n".join(problems) or "no import cycle, no function over 60 lines, every import inside a function says why")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

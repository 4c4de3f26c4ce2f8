"""Every dualfuse module imports on its own in a fresh interpreter, and the package has no import cycle: neither
at module level (the graph of top-level imports between dualfuse modules, read from the source with ``ast``) nor
counting the imports deferred into function bodies, so that no deferred import hides a cycle between layers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "dualfuse"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level_imports(node):
    """Import statements executed when the module is imported: the module body, including its ``if`` / ``try``
    blocks, not function or class bodies."""
    for stmt in node.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
            blocks = [stmt.body, getattr(stmt, "orelse", [])]
            blocks += [h.body for h in getattr(stmt, "handlers", [])] + [getattr(stmt, "finalbody", [])]
            for b in blocks:
                yield from _top_level_imports(ast.Module(body=b, type_ignores=[]))


def _all_imports(node):
    """Every import statement in the module, function and class bodies included."""
    return (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """dualfuse module -> the dualfuse modules its top-level imports name (a ``from pkg import name`` names
    ``pkg.name`` when that is a module, else ``pkg``); ``deferred``: imports inside functions count too."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        walk = _all_imports if deferred else _top_level_imports
        for stmt in walk(ast.parse(path.read_text(), str(path))):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                if stmt.level:
                    base = package.split(".")
                    base = base[: len(base) - (stmt.level - 1)]
                    base = ".".join(base + ([stmt.module] if stmt.module else []))
                else:
                    base = stmt.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in stmt.names]
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_among_dualfuse_modules():
    graph = import_graph()
    assert len(graph) > 50 and "dualfuse.executors.fused.executor" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_even_counting_imports_inside_functions():
    top, every = import_graph(), import_graph(deferred=True)
    assert sum(map(len, every.values())) > sum(map(len, top.values()))  # the deferred imports were read
    cycle = find_cycle(every)
    assert cycle is None, "import cycle through a deferred import: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow  # a fresh interpreter imports torch, triton and every module: ~30 s on a loaded 2-core machine
def test_every_module_imports_in_a_fresh_interpreter():
    # optional extras (ONNX Runtime, TensorRT, plotting) may be missing: only dualfuse's own names must resolve
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        f"for m in {sorted(m for m in _modules() if not m.endswith('__main__'))!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if (e.name or '').startswith('dualfuse'):\n"
        "            bad.append(f'{m}: {e}')\n"
        "    except ImportError as e:\n"
        "        bad.append(f'{m}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

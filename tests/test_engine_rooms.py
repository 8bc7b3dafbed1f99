"""The engine's rooms import only the ground and the rooms before them (see engine/__init__.py):
no arrow runs back up, so there is no circle between rooms, hidden in a function or not."""

import ast
from pathlib import Path

import napari_hdn.engine as engine

ROOT = Path(engine.__file__).parent
ORDER = ["ground", "files", "data", "noise", "network", "prediction", "training", "bmz"]
GROUND = {"errors", "config", "options", "events", "threads", "device", "heap", "metrics",
          "__init__"}
#: the conveniences that call the prediction room from a model (engine/__init__.py says so)
ALLOWED_UP = {("network.model", "prediction.run"), ("network.model", "prediction.sampling"),
              ("network.multichannel", "prediction.run")}


def _room(module: str) -> str:
    first = module.split(".")[0]
    return "ground" if first in GROUND else first


def _imports():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        me = ".".join(rel.parts)
        pkg = list(rel.parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and node.level - 1 <= len(pkg):
                base = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if target:
                    yield me, target, node.lineno
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "napari_hdn.engine."):
                yield me, node.module[len("napari_hdn.engine."):], node.lineno


def test_no_import_runs_back_up_to_a_later_room():
    up = []
    for me, target, line in _imports():
        if me == "__init__" or (me, target) in ALLOWED_UP:
            continue
        a, b = _room(me), _room(target)
        if ORDER.index(b) > ORDER.index(a):
            up.append(f"{me}:{line} -> {target}")
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_no_file_in_the_engine_is_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 700}
    assert not long, long


def test_no_circle_between_modules_even_through_imports_inside_functions():
    graph: dict[str, set] = {}
    for me, target, _ in _imports():
        if (me, target) in ALLOWED_UP or me.endswith("__init__") or target == me:
            continue
        if (ROOT / Path(*target.split("."))).is_dir():
            continue  # a package's __init__ re-exports: not a module of its own here
        graph.setdefault(me, set()).add(target)
    seen, stack, circles = set(), [], []

    def visit(node):
        if node in stack:
            circles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not circles, "\n".join(circles)

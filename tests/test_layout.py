"""The package's shape: one sub-package per pipeline stage, imports only from earlier stages, no cycle,
no module too long to read in one sitting. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgehebb"
MOST_LINES = 450

# A module may import from its own stage and the stages before it. "root" is the shared modules at the
# top of the package (data, io, errors, threads, ...); "camera" the image perturbations that training
# and evaluation share; the cli sits on top of everything.
STAGES = ["root", "camera", "learn", "nnl", "evaluate", "deploy", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else "root"


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """edgehebb modules ``path`` imports (``from edgehebb.x import y`` counts y when it is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("edgehebb")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgehebb") and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    modules = _modules()
    return {m for m in found if m in modules}


def test_no_module_is_too_long_to_read():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MOST_LINES}
    assert not long, f"modules over {MOST_LINES} lines: {long}"


def test_every_stage_imports_only_from_itself_and_earlier_stages():
    wrong = []
    for name, path in _modules().items():
        here = STAGES.index(_stage(name))
        for target in _imports(path):
            if STAGES.index(_stage(target)) > here:
                wrong.append(f"{name} ({_stage(name)}) imports {target} ({_stage(target)})")
    assert not wrong, "imports from a later stage:\n" + "\n".join(wrong)


def test_no_import_cycle_at_module_level():
    graph = {name: _imports(path, module_level_only=True) - {name} for name, path in _modules().items()}
    # a package's __init__ importing its own modules is how a package exposes its API, not a cycle
    graph = {n: {t for t in ts if not (t.startswith(n + ".") and _modules()[n].name == "__init__.py")}
             for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if nxt not in state and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for node in graph:
        if node not in state and visit(node, []):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_the_stages_are_the_folders():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(STAGES) - {"root"}, "a sub-package that is no stage (or a stage without one)"


def test_the_layout_checks_would_catch_an_upward_import(tmp_path):
    # the checks read real files: make sure the stage of a module and an import are what they look like
    assert _stage("edgehebb.learn.loop") == "learn" and _stage("edgehebb.io") == "root"
    assert _stage("edgehebb.deploy.backends.base") == "deploy" and _stage("edgehebb.cli") == "cli"
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from edgehebb.deploy.runtime import Runtime\n")
    assert "edgehebb.deploy.runtime" in _imports(probe)
    assert _imports(probe, module_level_only=True) == set()

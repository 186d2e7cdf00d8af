"""Imports inside mmdist flow one way: settings -> models -> data -> training -> commands, and never in a cycle.

Every import of an mmdist module counts, at module level and inside functions
alike, so a function-local import can hide neither a cycle nor an upward tie.
``import a.b.c`` and ``from a.b import c`` are edges to the module they name
(``from a.b import name`` to ``a.b`` when ``name`` is not a module); a
package's ``__init__`` is a module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmdist"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The mmdist modules ``path`` (module ``name``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
        else:
            continue
        for target in targets:
            # `import mmdist.a.b` names mmdist.a.b (and executes its parents' __init__, which are edges of their own).
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    names = set(modules)
    return {name: imported_modules(path, name, names) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


# The package order: a module may import its own tier or a lower one.
TIERS = ("core", "models", "data", "training", "commands")
CORE = {"mmdist", "mmdist.settings", "mmdist.atomic", "mmdist.console", "mmdist.hardware", "mmdist.precision", "mmdist.configs",
        "mmdist.distributed"}
MODELS = {"mmdist.export", "mmdist.materialize"}


def tier(module: str) -> int:
    """0 core, 1 models, 2 data, 3 training (and the library above the trainer), 4 commands."""
    if (module in CORE or module == "mmdist.config" or module.startswith(("mmdist.config.", "mmdist.stages"))
            or module.endswith(".settings")):
        return 0
    if module.startswith("mmdist.models.") or module == "mmdist.models" or module in MODELS:
        return 1
    if module.startswith("mmdist.data.") or module == "mmdist.data":
        return 2
    if module.startswith("mmdist.commands.") or module in ("mmdist.commands", "mmdist.__main__"):
        return 4
    return 3  # mmdist.training.*, evaluation, generate, hf_export, plan, the demo library


# (importer, imported) -> why this upward import is allowed.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    **{("mmdist.models.settings", f"mmdist.models.{part}"): (
        "ModelConfig composes the part settings that live beside their code (house habit 4); "
        f"mmdist/models/{part}.py imports torch/transformers only inside functions where it matters")
       for part in ("llm", "vision", "text", "connectors")},
}

# Modules outside mmdist.commands that still parse argv, with the reason.
ARGPARSE_OUTSIDE_COMMANDS: dict[str, str] = {}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({TIERS[tier(a)]}) -> {b} ({TIERS[tier(b)]})" for a, deps in graph.items() for b in deps
                  if tier(b) > tier(a) and (a, b) not in ALLOWED_UPWARD)


def test_the_walker_sees_module_level_and_function_local_imports():
    graph = import_graph()
    assert "mmdist.settings" in graph["mmdist.data.settings"]  # module level
    assert "mmdist.data.loader" in graph["mmdist.data"]  # inside a function (the lazy __getattr__)
    assert graph["mmdist.settings"] == set()  # the leaf
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_tiers_are_what_the_layout_says():
    assert [tier(m) for m in ("mmdist.config.run", "mmdist.training.settings", "mmdist.data.settings", "mmdist.precision")] == [0] * 4
    assert [tier(m) for m in ("mmdist.models.fused", "mmdist.export", "mmdist.materialize")] == [1] * 3
    assert tier("mmdist.data.loader") == 2
    assert [tier(m) for m in ("mmdist.training.loop", "mmdist.evaluation", "mmdist.generate", "mmdist.plan", "mmdist.demo.state")] == [3] * 5
    assert [tier(m) for m in ("mmdist.commands.cli", "mmdist.__main__")] == [4, 4]
    assert upward_imports({"mmdist.data.loader": {"mmdist.training.dist"}}) == [
        "mmdist.data.loader (data) -> mmdist.training.dist (training)"]


def test_imports_only_go_to_the_same_or_a_lower_tier():
    offenders = upward_imports(import_graph())
    assert not offenders, "upward imports (move the shared piece down, or name the exception in ALLOWED_UPWARD):\n  " + "\n  ".join(offenders)


def test_every_allowed_exception_is_still_needed():
    graph = import_graph()
    stale = [pair for pair in ALLOWED_UPWARD if pair[1] not in graph.get(pair[0], set())]
    assert not stale, f"ALLOWED_UPWARD names imports that no longer exist: {stale}"


def test_no_import_cycle_inside_mmdist():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_never_import_the_run_config():
    graph = import_graph()
    offenders = {name: sorted(d for d in deps if d == "mmdist.config.run")
                 for name, deps in graph.items() if name.startswith("mmdist.models")}
    assert not any(offenders.values()), f"mmdist.models imports the run config: {offenders}"


def test_only_commands_parse_arguments():
    """The library never parses argv (house habit 16): argparse and ``cli_main`` live in mmdist.commands."""
    found = {}
    for name, path in all_modules().items():
        if name.startswith("mmdist.commands") or name in ARGPARSE_OUTSIDE_COMMANDS:
            continue
        text = path.read_text()
        if re.search(r"^\s*(import argparse|from argparse import)|def cli_main\(", text, re.M):
            found[name] = str(path)
    assert not found, f"argument parsing outside mmdist/commands: {found}"

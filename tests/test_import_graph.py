"""Imports inside mmdist flow one way: core -> config -> models -> data -> library -> training -> commands, no cycle.

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
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
            ]
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
#   core      leaves every other tier uses: the settings machinery, atomic writes, the console, hardware detection,
#             where this process sits in a job and its process group (launch_env, distributed)
#   config    every settings dataclass (a `*.settings` module belongs here whatever its package: settings sit beside
#             the code they configure, and mmdist.config.run composes them into the RunConfig), the stages, the
#             config's own rules (mmdist.config.*) and precision resolution over the config
#   models    the models and the one place that builds them (materialize) and reads/writes their exports
#   data      the data pipeline
#   library   what runs over a model and its data without training it: evaluation, generation, the llava-hf
#             conversion, the planner, the demo's pieces; the trainer evaluates and plans, so they sit below it
#   training  the engine, the trainer and what it checkpoints
#   commands  argument parsing, printing and exit codes
TIERS = ("core", "config", "models", "data", "library", "training", "commands")
CORE = {"mmdist", "mmdist.settings", "mmdist.atomic", "mmdist.console", "mmdist.hardware", "mmdist.configs",
        "mmdist.distributed", "mmdist.launch_env", "mmdist.oom"}
CONFIG_PACKAGES = ("mmdist.config", "mmdist.stages")
MODELS = {"mmdist.export", "mmdist.materialize"}
LIBRARY_PACKAGES = ("mmdist.evaluation", "mmdist.plan", "mmdist.demo")
LIBRARY = {"mmdist.generate", "mmdist.hf_export"}


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def tier(module: str) -> int:
    """The index in TIERS of ``module``."""
    if module in CORE:
        return 0
    if _in(module, CONFIG_PACKAGES) or module.endswith(".settings") or module == "mmdist.precision":
        return 1
    if _in(module, ("mmdist.models",)) or module in MODELS:
        return 2
    if _in(module, ("mmdist.data",)):
        return 3
    if _in(module, LIBRARY_PACKAGES) or module in LIBRARY:
        return 4
    if _in(module, ("mmdist.training",)):
        return 5
    if _in(module, ("mmdist.commands",)) or module == "mmdist.__main__":
        return 6
    raise AssertionError(f"{module}: no tier; add it to one in tests/test_import_graph.py")


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
    assert "mmdist.data.loader" in graph["mmdist.training.run_setup"]  # inside a function (default_loader_builder)
    assert graph["mmdist.settings"] == set()  # the leaf
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_tiers_are_what_the_layout_says():
    def tiers(*modules: str) -> list[str]:
        return [TIERS[tier(m)] for m in modules]

    assert tiers("mmdist.settings", "mmdist.distributed", "mmdist.launch_env") == ["core"] * 3
    assert tiers("mmdist.config.run", "mmdist.training.settings", "mmdist.data.settings", "mmdist.stages.fuse",
                 "mmdist.precision") == ["config"] * 5
    assert tiers("mmdist.models.fused", "mmdist.export", "mmdist.materialize") == ["models"] * 3
    assert tiers("mmdist.data.loader") == ["data"]
    assert tiers("mmdist.evaluation", "mmdist.generate", "mmdist.plan.auto", "mmdist.demo.state",
                 "mmdist.hf_export") == ["library"] * 5
    assert tiers("mmdist.training.loop", "mmdist.training.engine") == ["training"] * 2
    assert tiers("mmdist.commands.cli", "mmdist.__main__") == ["commands"] * 2
    assert all(isinstance(tier(m), int) for m in all_modules())  # every module has a tier
    assert upward_imports({"mmdist.data.loader": {"mmdist.training.step"}}) == [
        "mmdist.data.loader (data) -> mmdist.training.step (training)"]
    assert upward_imports({"mmdist.plan.auto": {"mmdist.training.engine"}}) == [
        "mmdist.plan.auto (library) -> mmdist.training.engine (training)"]


def test_no_package_init_resolves_names_lazily():
    """A package imports eagerly what it offers (or nothing: callers import the submodule); no module __getattr__."""
    def lazy_getattr(path: Path) -> bool:
        return any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(path.read_text()).body)

    lazy = [name for name, path in all_modules().items() if path.name == "__init__.py" and lazy_getattr(path)]
    assert not lazy, f"module-level __getattr__ in {lazy}"


def test_imports_only_go_to_the_same_or_a_lower_tier():
    offenders = upward_imports(import_graph())
    assert not offenders, (
        "upward imports (move the shared piece down, or name the exception in ALLOWED_UPWARD):\n  "
        + "\n  ".join(offenders)
    )


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

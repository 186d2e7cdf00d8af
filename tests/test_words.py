"""Comments and docs say why, in the present tense, and name paths that exist.

History belongs in git: no issue numbers and no "as before" in the shipped files, and no words about the machinery
the project was developed on. Every file path (``mmdist/training/loop.py``) and module path
(``mmdist.training.loop.train``) a comment, a docstring or a document names must exist, so that a reader who
follows it finds the code.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("mmdist", "benchmarks", "tests", "configs", "launch", "slurm", "docker", ".ci")
TEXT_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".md", ".cfg", ".toml", ".txt", ""}

# Built from pieces so that this file does not match itself.
HISTORY = [
    ("an issue number", re.compile(r"\b" + "issue" + r"s?\s+#?\d+\b", re.I)),
    ("an issue number", re.compile(r"\b" + "issue" + r"s?\s*#\d+\b", re.I)),
    ("'as before'", re.compile(r"\bas " + "before" + r"\b", re.I)),
]
MACHINERY = [
    ("the development machinery", re.compile(r"\b" + w + r"\b", re.I))
    for w in ("device tool", "lent " + "GPU", "lent to", "this " + "session", "the " + "brief", "CEO")
]

# Module paths that are not files under mmdist/, with where they live.
MODULE_ALIASES = {
    "mmdist.configs": "configs",  # the top-level recipes, shipped as this package (setup.cfg package_dir)
}
# Module paths named as examples of a form, with the reason.
EXAMPLE_MODULES = {
    "mmdist.a.b": "tests/test_import_graph.py's example of what `import mmdist.a.b` names",
}
PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_]*\.")  # configs/NAME.yaml: a pattern, not a file

FILE_PATH = re.compile(r"(?<![\w./~-])((?:mmdist|tests|benchmarks|launch|slurm|docker|configs|docs)/[\w./-]*?"
                       r"\.(?:py|sh|yaml|yml|md|cfg|toml))\b")
MODULE_PATH = re.compile(r"(?<![\w./~-])mmdist(?:\.[A-Za-z_]\w*)+")


def _files(roots=SHIPPED) -> list[Path]:
    out = []
    for root in roots:
        base = REPO / root
        for path in sorted(base.rglob("*")) if base.is_dir() else []:
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                if path.suffix or path.name in ("Dockerfile", "setup", "run"):
                    out.append(path)
    return out


def _docs() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


@functools.cache
def _prose(path: Path) -> str:
    """What a reader reads as words: a Python file's comments and docstrings, a document's whole text."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return text
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(parts)


def _hits(patterns, paths) -> list[str]:
    found = []
    for path in paths:
        if path.resolve() == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for what, pattern in patterns:
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()[:100]}")
    return found


def test_no_issue_numbers_or_as_before():
    found = _hits(HISTORY, _files() + _docs())
    assert not found, "say why in the present tense (history goes into the commit message):\n" + "\n".join(found)


def test_no_words_about_the_development_machinery():
    found = _hits(MACHINERY, _files() + _docs())
    assert not found, "speak of the project's users and machines:\n" + "\n".join(found)


def _named(pattern: re.Pattern, group: int = 0) -> dict[str, set[str]]:
    named: dict[str, set[str]] = {}
    for path in [p for p in _files(("mmdist", "benchmarks", "tests", "launch")) if p.suffix == ".py"] + _docs():
        for match in pattern.finditer(_prose(path)):
            named.setdefault(match.group(group).rstrip("."), set()).add(str(path.relative_to(REPO)))
    return named


def test_every_named_file_exists():
    named = _named(FILE_PATH, 1)
    assert len(named) > 50, f"the scan found only {len(named)} paths: the pattern no longer matches how files are named"
    missing = {p: sorted(where) for p, where in named.items() if not (REPO / p).exists() and not PLACEHOLDER.search(p)}
    assert not missing, "\n".join(f"{p} (named in {', '.join(where)})" for p, where in sorted(missing.items()))


def _module_file(parts: list[str]) -> tuple[Path | None, list[str]]:
    """The longest prefix of ``parts`` that is a module or package, and the names after it."""
    for end in range(len(parts), 0, -1):
        dotted = ".".join(parts[:end])
        if dotted in MODULE_ALIASES:
            return REPO / MODULE_ALIASES[dotted], parts[end:]
        base = REPO.joinpath(*parts[:end])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[end:]
    return None, parts


@functools.cache
def _nodes(module: Path) -> list[ast.AST]:
    return list(ast.walk(ast.parse(module.read_text())))


def _defines(module: Path, name: str) -> bool:
    """``name`` is defined or imported in ``module``, or served by name (``__all__``, a lazy table)."""
    if name.startswith("__") or module.is_dir():
        return True
    for node in _nodes(module):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name).split(".")[0] == name
                                                                  for a in node.names):
            return True
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
            return True
        if isinstance(node, ast.Constant) and node.value == name:
            return True
    return False


def test_every_named_module_and_name_exists():
    named = _named(MODULE_PATH)
    assert len(named) > 50, f"the scan found only {len(named)} module paths"
    missing = {}
    for dotted, where in named.items():
        if dotted in EXAMPLE_MODULES:
            continue
        module, rest = _module_file(dotted.split("."))
        if module is None or (rest and not _defines(module, rest[0])):
            missing[dotted] = sorted(where)
    assert not missing, "\n".join(f"{d} (named in {', '.join(w)})" for d, w in sorted(missing.items()))


@pytest.mark.parametrize("text,expected", [
    ("# the model menu of " + "issue 21", True), ("see " + "issues #4", True), ("it runs, as " + "before", True),
    ("a tissue 3 mm thick", False), ("before the step", False),
])
def test_the_history_patterns_catch_what_they_should(text, expected):
    assert any(p.search(text) for _, p in HISTORY) is expected

"""Where a recipe comes from: the YAML file a user names, or a recipe that ships with mmdist.

The recipes live in the repository's top-level ``configs/`` and ship inside the
installed package as ``mmdist.configs`` (package data, see setup.cfg and
setup.py; ``configs/__init__.py`` makes it a regular package, which an editable
install needs to map it), read through ``importlib.resources``. So ``mmdist demo`` and
``mmdist config --config configs/demo_fuse.yaml`` work after a non-editable
``pip install .`` (the Docker image), from any folder, not only from a checkout.

A path that exists (relative to the working directory, or absolute) always
wins. Only a path that names a recipe the way the docs do (``configs/NAME.yaml``
or a bare ``NAME.yaml``) falls back to the packaged recipe of that name; any
other missing path is an error, so a typo in a path of one's own never trains a
shipped recipe instead.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import mmdist
from mmdist.settings import ConfigError, Problem

PACKAGE = "mmdist.configs"


def packaged_recipes() -> Path:
    """The folder of the recipes that ship with the imported mmdist.

    An install (editable or not) maps the package ``mmdist.configs`` onto them.
    A source checkout used through ``PYTHONPATH`` without being installed has no
    such package; its recipes are then the checkout's own ``configs/`` folder.
    """
    try:
        folder = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        return Path(mmdist.__file__).resolve().parent.parent / "configs"
    return Path(os.fspath(folder))  # pip installs packages unpacked: the recipes are files on disk


def recipe_path(path: str | os.PathLike) -> Path:
    """``path`` if it is a file; else the packaged recipe it names (``configs/NAME.yaml`` or ``NAME.yaml``).

    Raises ConfigError naming both places looked at when neither exists.
    """
    given = Path(path)
    if given.is_file():
        return given
    names_a_recipe = not given.is_absolute() and given.parent in (Path("."), Path("configs"))
    packaged = packaged_recipes() / given.name
    if names_a_recipe and packaged.is_file():
        return packaged
    if names_a_recipe:
        shipped = sorted(p.name for p in packaged_recipes().glob("*.yaml"))
        message = (
            f"config file not found: {given} (relative to {Path.cwd()}), and mmdist ships no recipe {given.name} "
            f"(the packaged recipes in {packaged.parent}: {', '.join(shipped) or 'none'})"
        )
    else:
        message = f"config file not found: {given}" + ("" if given.is_absolute() else f" (relative to {Path.cwd()})")
    raise ConfigError([Problem("", message, str(given))])

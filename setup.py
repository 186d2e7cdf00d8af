"""Shim for pip/setuptools; all metadata lives in setup.cfg except the package list.

The package list is here because setup.cfg's ``find:`` only finds packages in
their own folder: the recipes in the top-level configs/ ship as the package
mmdist.configs (``package_dir`` and ``package_data`` in setup.cfg), which
``find:`` cannot name.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["mmdist", "mmdist.*"]) + ["mmdist.configs"])

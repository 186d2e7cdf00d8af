"""The shipped recipes (YAML). An install maps this folder onto the package mmdist.configs, so
mmdist.config.recipes finds them through importlib.resources wherever mmdist is installed."""

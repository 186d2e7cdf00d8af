"""Every ``mmdist ...`` command: parse its arguments, call the library, print for a person, return an exit code.

One module per command, each with ``main(argv) -> int``; ``cli.py`` dispatches.
The library below never parses argv and reports through logging; this layer
imports from every other one and nothing imports it.
"""

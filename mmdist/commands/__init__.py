"""The `mmdist ...` commands: argument parsing, printing and exit codes (mmdist/cli.py dispatches)."""

"""The ``fastserve`` command. Thin: parse, call the library, render.

Each command family lives in its own module and registers itself on :data:`cli` (or on the
``bench`` group); :func:`main` turns every FastServe error into one line and its exit code.
"""

from __future__ import annotations

import sys

import click

from fastserve.cli.app import bench, cli, run_cli

# importing registers the commands
from fastserve.cli import graph as _graph  # noqa: F401,E402

for _name in ("partition", "engine", "resources"):
    try:
        __import__(f"fastserve.cli.{_name}")
    except ModuleNotFoundError as _e:  # a command family not built yet
        if _e.name != f"fastserve.cli.{_name}":
            raise


def main() -> None:
    sys.exit(run_cli(sys.argv[1:]))


__all__ = ["bench", "cli", "click", "main"]

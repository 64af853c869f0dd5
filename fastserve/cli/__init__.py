"""The ``fastserve`` command. Thin: parse, call the library, render.

Each command family lives in its own module and registers itself on :data:`cli` (or on the
``bench`` group); :func:`main` turns every FastServe error into one line and its exit code.
"""

from __future__ import annotations

import sys

import click

from fastserve.cli.app import bench, cli, run_cli

# importing registers the commands
from fastserve.cli import (engine, generate, graph, hosts, partition, resources,  # noqa: F401,E402
                           service)


def main() -> None:
    sys.exit(run_cli(sys.argv[1:]))


__all__ = ["bench", "cli", "click", "main"]

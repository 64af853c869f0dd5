"""Bounds on the work any input file may cause, so that a hostile or mistaken file fails in well
under a second with a clear error instead of running for minutes or exhausting memory.

One small value, passed down explicitly (``load_spec(path, limits=Limits(max_repeat=50_000))``);
there are no environment variables. The defaults are generous: every shipped spec, including
GPT-3 175B and the 10,000-node synthetic chain, is far inside them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What a spec, inventory or other input file may ask of the loader."""

    max_file_bytes: int = 2 * 2**20  # refused before it is read (YAML loads at ~0.5 MB/s)
    max_depth: int = 64  # nesting of YAML mappings/sequences (a spec needs about 6)
    max_aliases: int = 1_000  # YAML ``*alias`` uses in one document
    max_yaml_nodes: int = 1_000_000  # values after expanding YAML aliases and $parameters
    max_nodes: int = 100_000  # graph nodes after unrolling every ``repeat``
    max_repeat: int = 10_000  # iterations of one ``repeat`` block
    max_expression_chars: int = 500  # length of one ``${...}`` expression
    max_expression_nodes: int = 200  # syntax-tree nodes of one ``${...}`` expression
    max_int: int = 2**53  # magnitude of any number in a spec or computed by an expression


DEFAULT_LIMITS = Limits()


# torch threads per rank: past the cores of any host (OpenMP aborts a process that asks for
# more threads than it can make, so a plan file asking 100,000 killed its ranks)
MAX_THREADS = 1024

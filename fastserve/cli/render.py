"""Plain-text rendering shared by the commands: tables and human-readable units."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import click

from fastserve.units import format_bytes


human_bytes = format_bytes  # the one byte formatter (fastserve.units)


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or unit == "P":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          align: str | None = None) -> str:
    """A left/right aligned text table; ``align`` is one char per column, 'l' or 'r'."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(row, widths, align)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


@contextmanager
def step(message: str) -> Iterator[None]:
    """Print ``message ...`` to stderr, then the seconds it took."""
    click.echo(f"{message} ...", err=True, nl=False)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        click.echo(" failed", err=True)
        raise
    click.echo(f" done ({time.perf_counter() - t0:.2f} s)", err=True)

"""Quantities as people write them: byte sizes (``2GB``, ``512MiB``, ``1.5 GiB``) and back, and
``HOST:PORT`` addresses.

Decimal units are powers of 1000 (``GB``), binary units powers of 1024 (``GiB``), as in the SI
and IEC standards; a bare number is bytes. Units are case-insensitive (``2gb`` is ``2GB``) except
that a lone ``b`` is always bytes, never bits.
"""

from __future__ import annotations

import math
import re

from fastserve.errors import SizeError

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4, "pb": 1000 ** 5,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4, "pib": 1024 ** 5,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*\Z")


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """``"2GB"`` -> 2_000_000_000, ``"512MiB"`` -> 536_870_912, ``1024`` -> 1024.

    Raises :class:`SizeError` naming ``what`` and the accepted forms for anything else
    (negative, zero, unknown unit, not a number).
    """
    if isinstance(text, bool):
        raise SizeError(f"{what}: expected a size such as 2GB or 512MiB, got {text!r}")
    if isinstance(text, (int, float)):
        if isinstance(text, int) and text.bit_length() > 100:  # float() would overflow
            raise SizeError(f"{what}: {text} is too large to be a size")
        value, unit = float(text), ""
    else:
        if len(str(text)) > 64:  # also keeps the regex's backtracking short
            raise SizeError(f"{what}: {str(text)[:20]!r}... is too long to be a size")
        m = _SIZE.match(str(text))
        if not m:
            raise SizeError(f"{what}: cannot read {text!r} as a size; write a number with "
                                 f"an optional unit, e.g. 2GB, 512MiB, 1.5GiB or 1000000")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit not in _UNITS:
            known = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
            raise SizeError(f"{what}: unknown unit '{m.group(2)}' in {text!r}; use one of "
                                 f"{known}")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise SizeError(f"{what}: {text!r} is not a positive size")
    return int(size)


def format_bytes(n: float) -> str:
    """Binary units with one decimal: ``format_bytes(1.2 * 2**30)`` -> ``'1.2 GiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} B" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port), the port an ASCII number from 0 to 65535 (0: the kernel
    picks one); ValueError otherwise. The host is not checked: callers decide which they bind."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or \
            not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {text!r}")
    return host, int(port)

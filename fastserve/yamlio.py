"""Safe YAML that remembers lines, shared by every file format FastServe reads (graph specs, host
inventories), so that each error can name the file, the line and the key.

Mappings load as :class:`Located` (a dict with ``line`` and ``lines[key]``), sequences as
:class:`LocatedList` (``line`` and ``lines[i]``). Loading uses a ``yaml.SafeLoader`` subclass:
no Python objects are ever constructed from a document.
"""

from __future__ import annotations

from typing import Any

import yaml

from fastserve.errors import FileError, SpecError


class Located(dict):
    """A mapping with the line it starts on and the line of each key."""

    line: int | None = None
    lines: dict


class LocatedList(list):
    """A sequence with the line it starts on and the line of each item."""

    line: int | None = None
    lines: list


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key and sequence item."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    out = Located()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise SpecError("mapping keys must be plain scalars", line=key_node.start_mark.line + 1)
        if key in out:
            raise SpecError(f"duplicate key '{key}'", line=key_node.start_mark.line + 1,
                            key=str(key))
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> LocatedList:
    out = LocatedList(loader.construct_object(v, deep=True) for v in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [v.start_mark.line + 1 for v in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def read_yaml(text: str, file: str | None = None, error: type[FileError] = SpecError) -> Any:
    """Parse YAML text safely, keeping lines; syntax errors become ``error`` with file and
    line."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except FileError as e:
        raise error(e.reason, file=file, line=e.line, key=e.key) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        lines = text.splitlines()
        bad_line = lines[mark.line] if mark and mark.line < len(lines) else ""
        if "${" in bad_line:
            problem += " (quote ${...} expressions inside {...} mappings: \"${4 * d}\")"
        raise error(f"invalid YAML: {problem}", file=file,
                    line=mark.line + 1 if mark else None) from None


def line_of(container: Any, key: Any = None) -> int | None:
    """The line of ``container[key]`` (or of the container itself), if it was read from YAML."""
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict) and key in lines:
        return lines[key]
    if isinstance(lines, list) and isinstance(key, int) and 0 <= key < len(lines):
        return lines[key]
    return getattr(container, "line", None)


def located_like(src: Any, data: dict) -> dict:
    """Rebuild a mapping with ``src``'s line information."""
    if isinstance(src, Located):
        out = Located(data)
        out.line, out.lines = src.line, src.lines
        return out
    return data

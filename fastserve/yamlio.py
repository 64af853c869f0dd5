"""Safe YAML that remembers lines, shared by every file format FastServe reads (graph specs, host
inventories), so that each error can name the file, the line and the key.

Mappings load as :class:`Located` (a dict with ``line`` and ``lines[key]``), sequences as
:class:`LocatedList` (``line`` and ``lines[i]``). Loading uses a ``yaml.SafeLoader`` subclass:
no Python objects are ever constructed from a document. The work a document may cause is bounded
by :class:`fastserve.limits.Limits`: file size, nesting depth, alias uses and the number of values
after expanding aliases (so an alias bomb is refused while it is being read, not after).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fastserve.errors import FileError, SpecError
from fastserve.limits import DEFAULT_LIMITS, Limits

# an integer literal longer than this is refused before int() runs: Python's int() of a long
# sexagesimal literal (1:2:3:...) is quadratic, and no size a spec needs has more than 20 digits
_MAX_INT_LITERAL = 100


def read_head(path: str | Path, size: int, what: str, error: type[FileError]) -> bytes:
    """At most ``size`` bytes from the start of a file, or ``error`` saying why it cannot be
    read (missing, a directory, no permission)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} '{path}' is a directory, not a file") from None
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e.strerror or e}") from None


def read_text(path: str | Path, what: str, error: type[FileError] = SpecError,
              limits: Limits | None = None) -> str:
    """The text of a UTF-8 file, or ``error`` naming the file (and the line of a bad byte).

    Reads at most ``limits.max_file_bytes`` + 1 bytes, so ``/dev/zero`` or a huge file cannot
    stall the reader; binary and non-UTF-8 files are refused with the line of the first bad byte.
    """
    limits = limits or DEFAULT_LIMITS
    p = Path(path)
    data = read_head(p, limits.max_file_bytes + 1, what, error)
    if len(data) > limits.max_file_bytes:
        raise error(f"{what} is larger than {limits.max_file_bytes} bytes (Limits.max_file_bytes)"
                    f"; is this the right file?", file=str(p))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error(f"{what} is UTF-16 text; save it as UTF-8", file=str(p), line=1)
    nul = data.find(b"\0")
    if nul >= 0:
        raise error(f"{what} is a binary file (NUL byte at offset {nul}), not text",
                    file=str(p), line=data.count(b"\n", 0, nul) + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start});"
                    f" save it as UTF-8", file=str(p),
                    line=data.count(b"\n", 0, e.start) + 1) from None


class Located(dict):
    """A mapping with the line it starts on and the line of each key."""

    line: int | None = None
    lines: dict


class LocatedList(list):
    """A sequence with the line it starts on and the line of each item."""

    line: int | None = None
    lines: list


# Events come from libyaml when PyYAML was built with it (about 5x faster than the pure-Python
# scanner and parser, which keeps a large file's load in seconds); nodes are always composed by
# PyYAML's Python composer, whose compose_node is where the limits are enforced, and objects by
# the safe constructor: no Python object is ever built from a tag.
_Parser = yaml.cyaml.CParser if yaml.__with_libyaml__ else yaml.parser.Parser
_Scanning = () if _Parser is not yaml.parser.Parser else (yaml.reader.Reader, yaml.scanner.Scanner)


class _LineLoader(yaml.composer.Composer, _Parser, *_Scanning,  # type: ignore[misc]
                  yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """A safe loader that records the line of every mapping key and sequence item, and refuses
    documents that nest too deeply or expand too much through aliases."""

    def __init__(self, stream: str, limits: Limits) -> None:
        if _Scanning:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        else:
            _Parser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.limits = limits
        self.depth = 0
        self.aliases = 0
        self.expanded = 0  # values composed so far, an alias counting as everything it names
        self.anchor_sizes: dict[str, int] = {}

    def _refuse(self, message: str, mark: Any) -> None:
        raise SpecError(message, line=mark.line + 1 if mark else None)

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        # counted here, while composing: an alias is one event but stands for a whole subtree,
        # and a later walk over the expanded document would be exponential in the alias levels
        event = self.peek_event()
        lim = self.limits
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > lim.max_aliases:
                self._refuse(f"more than {lim.max_aliases} YAML aliases (Limits.max_aliases)",
                             event.start_mark)
            self._count(self.anchor_sizes.get(event.anchor, 1), event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > lim.max_depth:
            self._refuse(f"nested more than {lim.max_depth} levels deep (Limits.max_depth)",
                         event.start_mark)
        before = self.expanded
        self._count(1, event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self.anchor_sizes[anchor] = self.expanded - before
        return node

    def _count(self, n: int, mark: Any) -> None:
        self.expanded += n
        if self.expanded > self.limits.max_yaml_nodes:
            self._refuse(f"the document expands to more than {self.limits.max_yaml_nodes} "
                         f"values (Limits.max_yaml_nodes); are aliases (*name) repeating a "
                         f"large part of it?", mark)


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int:
    if len(node.value) > _MAX_INT_LITERAL:
        raise SpecError(f"integer literal of {len(node.value)} characters is too long",
                        line=node.start_mark.line + 1)
    return loader.construct_yaml_int(node)


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
_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def read_yaml(text: str, file: str | None = None, error: type[FileError] = SpecError,
              limits: Limits | None = None) -> Any:
    """Parse one YAML document safely, keeping lines; every problem (syntax, an empty file, a
    limit) becomes ``error`` with file and line."""
    loader = _LineLoader(text, limits or DEFAULT_LIMITS)
    try:
        doc = loader.get_single_data()
    except FileError as e:
        raise error(e.reason, file=file, line=e.line, key=e.key) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "nesting depth" in problem:  # libyaml's own bound (1000) met before ours
            lim = loader.limits.max_depth
            raise error(f"nested more than {lim} levels deep (Limits.max_depth)", file=file,
                        line=mark.line + 1 if mark else None) from None
        lines = text.splitlines()
        bad_line = lines[mark.line] if mark and mark.line < len(lines) else ""
        if "${" in bad_line:
            problem += " (quote ${...} expressions inside {...} mappings: \"${4 * d}\")"
        raise error(f"invalid YAML: {problem}", file=file,
                    line=mark.line + 1 if mark else None) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # a scalar the safe constructors could not convert (a bad date, a huge float...)
        raise error(f"invalid YAML: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    file=file) from None
    finally:
        loader.dispose()
    if doc is None:
        raise error("the file holds no YAML document (it is empty or only comments)", file=file)
    return doc


def describe(value: Any) -> str:
    """A value's kind and a short excerpt for a message: ``a list ([1, 2, 3])``; never the
    thousands of characters a hostile value may hold."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             type(None): "nothing (null)"}
    kind = "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) \
        else kinds.get(type(value), f"a {type(value).__name__}")
    text = repr(_plain(value)) if isinstance(value, (dict, list)) else repr(value)
    return f"{kind} ({text if len(text) <= 60 else text[:57] + '...'})"


def _plain(value: Any, depth: int = 0) -> Any:
    # only a prefix is shown: stop early instead of walking a huge (or aliased) structure
    if depth > 3:
        return ...
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1) for k, v in list(value.items())[:8]}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value[:8]]
    return value


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

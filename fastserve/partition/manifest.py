"""Reading an export directory safely: :func:`load_manifest` and verified file reads.

An export directory may come from elsewhere (copied, downloaded, edited by hand), so nothing in
it is trusted until checked, and nothing is parsed or run before it is:

* ``manifest.json`` is refused above :data:`MANIFEST_MAX_BYTES` before it is parsed, parsed as
  strict JSON (no NaN, no duplicate keys) and validated field by field. A malformed manifest is a
  :class:`ManifestError` naming the manifest, the key path (``shards[1].nodes``) and what was
  expected, never a KeyError or TypeError later on.
* Every file the manifest names stays inside the directory: no absolute path, no ``..``
  component, and its real path (every symlink followed) must lie under the directory's real
  path. Only regular files are opened (a FIFO or a device would hang or never end).
* Every sha256 the manifest records is checked before :func:`load_manifest` returns, the spec's
  included: a graph spec can name a Python factory that is imported and run, so a replaced spec
  must be refused before anything parses it.

Time of check and time of use: a file is read once and hashed on the bytes that are then used.
The spec's verified text is returned in the manifest (``manifest["spec"]["text"]``) and
:func:`exported_spec` parses that text, never the file again. Shard files are large, so the driver
only streams them through the hash (to fail before any rank starts), and each rank's
:func:`~fastserve.partition.export.load_shard` reads its file into memory, hashes those bytes and
parses them: a file swapped after the driver's check is still caught. What remains is a race
between resolving a path and opening it (a directory swapped in between): the bytes read must
still match the recorded sha256, so nothing unverified is used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from fastserve.errors import FileError, WeightsError

if TYPE_CHECKING:
    from fastserve.graph.spec import GraphSpec
    from fastserve.limits import Limits

FORMAT = "fastserve-shards/1"
MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 16 << 20  # a manifest of a few thousand shards is well under 1 MiB
SPEC_MAX_BYTES = 16 << 20  # graph specs are YAML of a few KiB; a larger file is not one
MAX_SHARD_BYTES = 1 << 50  # 1 PiB: a sanity bound on the recorded size, not a policy
MAX_DIM = 1 << 31  # a dim larger than this would overflow the shapes the compiler builds
MAX_SEED = 1 << 64  # torch.manual_seed takes seeds below 2**64
_CHUNK = 1 << 20  # bytes hashed per read when streaming
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ManifestError(FileError, WeightsError):
    """A malformed or unsafe export manifest: names the manifest, the key path and what was
    expected. A :class:`WeightsError` too (exit code 4), as every other unusable export is."""


def load_manifest(directory: str | Path, *, verify_shards: bool = True) -> dict[str, Any]:
    """Read, validate and verify ``manifest.json`` of an export directory.

    Returns the manifest as written by :func:`~fastserve.partition.export.export`, with every
    path checked and every hash verified, plus:

    * ``"directory"``: the export directory's real absolute path;
    * ``spec["path"]``: the spec copy's real absolute path, and ``spec["text"]``: its verified
      text; parse that (:func:`exported_spec`) rather than reading the path again;
    * ``shards[i]["path"]``: each shard file's real absolute path.

    ``verify_shards=False`` skips hashing the shard files, for a caller that verifies the one it
    reads (a rank). Example::

        manifest = load_manifest("out/gpt2-4")
        graph = compile_graph(exported_spec(manifest), manifest["dims"])
    """
    root = Path(directory)
    manifest_path = root / MANIFEST
    if not os.path.lexists(manifest_path):
        raise WeightsError(f"'{manifest_path}' does not exist; export shards first (fastserve "
                           f"partition SPEC --export DIR)")
    root_real = Path(os.path.realpath(root))
    checked = _Checker(str(manifest_path))
    manifest_real = _confine(checked, root_real, MANIFEST, "")
    with _open_regular(manifest_real, "manifest") as (f, size):
        if size > MANIFEST_MAX_BYTES:
            checked.fail("", f"is {size} bytes, more than the {MANIFEST_MAX_BYTES >> 20} MiB a "
                             f"manifest may have; it is not a FastServe manifest")
        raw = f.read(MANIFEST_MAX_BYTES + 1)  # bounded even if the file grows meanwhile
    if len(raw) > MANIFEST_MAX_BYTES:
        checked.fail("", f"grew beyond {MANIFEST_MAX_BYTES >> 20} MiB while being read")
    manifest = _validate(checked, _parse_json(checked, raw))

    # every path confined before any file is opened
    spec = manifest["spec"]
    if spec is not None:
        spec["path"] = str(_confine(checked, root_real, spec["file"], "spec.file"))
    for i, entry in enumerate(manifest["shards"]):
        entry["path"] = str(_confine(checked, root_real, entry["file"], f"shards[{i}].file"))
    if spec is not None:
        path = Path(spec["path"])
        data = read_verified(path, spec["sha256"], "spec file", size=spec.get("bytes"),
                             limit=SPEC_MAX_BYTES)
        try:
            spec["text"] = data.decode("utf-8")
        except UnicodeDecodeError as e:  # only if the manifest's hash is of a non-text file
            raise WeightsError(f"spec file '{path}' is not UTF-8 text ({e.reason} at byte "
                               f"{e.start})") from None
    if verify_shards:
        for entry in manifest["shards"]:
            verify_file(Path(entry["path"]), entry["sha256"], "shard file", size=entry["bytes"])
    manifest["directory"] = str(root_real)
    return manifest


def sent_manifest(doc: Any, index: Any, spec_path: Any, shard_path: Any) -> dict[str, Any]:
    """The manifest of an export sent in a rank's shard record (a rank on a host without the
    export directory): ``doc`` as :func:`load_manifest` reads ``manifest.json``, validated
    field by field the same way, with the spec copy and shard ``index``'s file at the given
    paths (where the host's agent keeps the files it was sent). The spec's text is read and
    verified here; the shard file is verified by its reader, on the bytes it parses."""
    checked = _Checker("the export's manifest in the shard record")
    if not _is_int(index) or not isinstance(spec_path, str) or not isinstance(shard_path, str):
        checked.fail("", "an export-file record needs 'index' (an integer), 'spec' and 'file' "
                         "(paths)")
    manifest = _validate(checked, copy.deepcopy(doc))
    if not 0 <= index < len(manifest["shards"]):
        checked.fail("", f"has {len(manifest['shards'])} shards; there is no shard {index}")
    spec = manifest["spec"]
    if spec is None:
        checked.fail("spec", "the export holds no spec to build the shard from")
    data = read_verified(Path(spec_path), spec["sha256"], "spec file", size=spec.get("bytes"),
                         limit=SPEC_MAX_BYTES)
    try:
        spec.update(path=spec_path, text=data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise WeightsError(f"spec file '{spec_path}' is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})") from None
    manifest["shards"][index]["path"] = shard_path
    manifest["directory"] = f"{manifest['graph']} (sent to this host)"
    return manifest


def as_sent(manifest: dict[str, Any]) -> dict[str, Any]:
    """What :func:`load_manifest` returned, as ``manifest.json`` holds it (without the paths
    and text it added): the document :func:`sent_manifest` reads on another host."""
    doc = {k: v for k, v in manifest.items() if k != "directory"}
    if doc["spec"] is not None:
        doc["spec"] = {k: v for k, v in doc["spec"].items() if k not in ("path", "text")}
    doc["shards"] = [{k: v for k, v in e.items() if k != "path"} for e in doc["shards"]]
    return doc


def exported_spec(manifest: dict[str, Any], *, trust_code: bool = False,
                  limits: Limits | None = None) -> GraphSpec:
    """The graph spec of an export, parsed from the text :func:`load_manifest` verified (the file
    is not read again, so it cannot change between the check and the parse). ``trust_code`` and
    ``limits`` are those of :func:`fastserve.graph.load_spec`: a matching hash says the spec is
    the one exported, not that its code is safe to run."""
    from fastserve.graph.loader import parse_spec

    spec = manifest.get("spec")
    if not spec:
        raise WeightsError(f"export '{manifest.get('directory', '?')}' holds no spec (its graph "
                           f"was not loaded from a file); pass the graph explicitly")
    if "text" not in spec:
        raise WeightsError("this manifest was not read by load_manifest, so its spec is not "
                           "verified; call load_manifest(directory) first")
    return parse_spec(spec["text"], file=spec["path"], trust_code=trust_code, limits=limits)


# --- verified reads -----------------------------------------------------------------------------


def read_verified(path: Path, sha256: str, what: str, *, size: int | None = None,
                  limit: int | None = None) -> bytes:
    """The bytes of ``path``, read once, refused unless their sha256 is ``sha256`` (and their
    length ``size`` and at most ``limit``, both checked before reading)."""
    with _open_regular(path, what) as (f, actual_size):
        _check_size(path, what, actual_size, size, limit)
        data = f.read(actual_size + 1)  # one byte more tells a file that grew meanwhile
    if len(data) != actual_size:
        raise WeightsError(f"{what} '{path}' changed size while being read; it is being "
                           f"modified, try again once it is not")
    _compare(path, what, hashlib.sha256(data).hexdigest(), sha256)
    return data


def verify_file(path: Path, sha256: str, what: str, *, size: int | None = None) -> None:
    """Refuse ``path`` unless its sha256 is ``sha256``, streaming it (the bytes are not kept)."""
    with _open_regular(path, what) as (f, actual_size):
        _check_size(path, what, actual_size, size, None)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    _compare(path, what, h.hexdigest(), sha256)


def check_hash(path: Path, expected: str, what: str = "shard file") -> None:
    """Refuse a file whose sha256 is not ``expected``, naming the file."""
    verify_file(Path(path), expected, what)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _open_regular(path: Path, what: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open a regular file for reading, with its size. O_NOFOLLOW: ``path`` is already fully
    resolved, so a final symlink there now was swapped in after the check. O_NONBLOCK: opening a
    FIFO would otherwise block forever before fstat can refuse it."""
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise WeightsError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise WeightsError(f"cannot open {what} '{path}': {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory less clearly
        os.close(fd)
        raise WeightsError(f"{what} '{path}' is not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            yield f, st.st_size
        except OSError as e:
            raise WeightsError(f"cannot read {what} '{path}': {e.strerror}") from None


def _check_size(path: Path, what: str, actual: int, expected: int | None,
                limit: int | None) -> None:
    if limit is not None and actual > limit:
        raise WeightsError(f"{what} '{path}' is {actual} bytes, more than the {limit >> 20} MiB "
                           f"allowed")
    if expected is not None and actual != expected:
        raise WeightsError(f"{what} '{path}' is {actual} bytes, the manifest records "
                           f"{expected}: the file was modified or truncated after export; "
                           f"export the shards again")


def _compare(path: Path, what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise WeightsError(f"{what} '{path}' has sha256 {actual[:16]}..., the manifest "
                           f"records {expected[:16]}...: the file was modified or corrupted "
                           f"after export; export the shards again")


def _confine(checked: _Checker, root_real: Path, name: str, key: str) -> Path:
    """The real path of ``name`` inside the export directory, or a ManifestError: names are
    relative POSIX paths without ``..``, and symlinks must not lead out of the directory."""
    if not name or _CONTROL.search(name):
        checked.fail(key, f"expected a file name inside the export directory, got "
                          f"{_show(name)}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or os.path.isabs(name):
        checked.fail(key, f"'{name}' is an absolute path; files of an export are named "
                          f"relative to its directory")
    if ".." in rel.parts:
        checked.fail(key, f"'{name}' has a '..' component; files of an export must stay inside "
                          f"its directory")
    real = Path(os.path.realpath(root_real / rel))  # follows every symlink on the way
    if root_real not in real.parents:
        checked.fail(key, f"'{name}' resolves to '{real}', outside the export directory "
                          f"'{root_real}' (a symlink?); copy the file into the export instead")
    return real


# --- schema ---------------------------------------------------------------------------------------


class _Checker:
    """Raises ManifestErrors naming the manifest file and a JSON key path."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, message: str) -> None:
        # names from the file may hold newlines or escapes; the error stays one plain line
        raise ManifestError(_printable(message), file=self.file, key=_printable(key) or None)

    def expect(self, value: Any, kind: str, key: str) -> Any:
        """``value`` if it is of ``kind`` (one of the names below), else a ManifestError."""
        ok = {"object": lambda v: isinstance(v, dict),
              "list": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str),
              "integer": _is_int}[kind]
        if not ok(value):
            self.fail(key, f"expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got "
                           f"{_show(value)}")
        return value

    def keys(self, doc: dict, required: tuple[str, ...], key: str,
             optional: tuple[str, ...] = ()) -> None:
        missing = [k for k in required if k not in doc]
        if missing:
            self.fail(key, f"missing key '{missing[0]}'; expected {', '.join(required)}")
        unknown = sorted(set(doc) - set(required) - set(optional))
        if unknown:
            self.fail(key, f"unknown key '{unknown[0]}'; expected only "
                           f"{', '.join(required + optional)}")

    def names(self, value: Any, key: str, *, nonempty: bool = False) -> list[str]:
        """A list of distinct non-empty strings."""
        self.expect(value, "list", key)
        if nonempty and not value:
            self.fail(key, "expected a non-empty list, got []")
        seen: set[str] = set()
        for i, name in enumerate(value):
            if not isinstance(name, str) or not name:
                self.fail(f"{key}[{i}]", f"expected a non-empty string, got {_show(name)}")
            if name in seen:
                self.fail(f"{key}[{i}]", f"'{name}' is listed twice")
            seen.add(name)
        return list(value)

    def bounded(self, value: Any, key: str, low: int, high: int) -> int:
        self.expect(value, "integer", key)
        if not low <= value < high:
            self.fail(key, f"expected an integer in [{low}, {high}), got {_show(value)}")
        return value


_TOP = ("format", "graph", "strategy", "policy", "dims", "seed", "spec", "shards")
_SHARD = ("index", "file", "sha256", "bytes", "nodes", "inputs", "outputs", "tensors", "aliases")


def _parse_json(checked: _Checker, raw: bytes) -> Any:
    if not raw.strip():
        checked.fail("", "the manifest is empty; export the shards again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        checked.fail("", f"is not UTF-8 text ({e.reason} at byte {e.start}); a binary file?")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        checked.fail("", f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}")
    except ValueError as e:  # a duplicate key, NaN, or an integer of thousands of digits
        checked.fail("", f"is not valid JSON: {e}")
    except RecursionError:
        checked.fail("", "is not valid JSON: nested too deeply")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # two values for one key: readers disagree on which wins, so refuse rather than pick one
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"key '{key}' appears twice in one object")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"'{name}' is not a number JSON allows")


def _validate(checked: _Checker, doc: Any) -> dict[str, Any]:
    """The manifest, every field checked; raises a ManifestError at the first bad one."""
    if not isinstance(doc, dict):
        checked.fail("", f"expected a JSON object (a FastServe shard manifest), got "
                         f"{_show(doc)}")
    fmt = doc.get("format")
    if fmt != FORMAT:  # checked first: a newer format may have other keys
        if isinstance(fmt, str) and fmt.startswith("fastserve-shards/"):
            checked.fail("format", f"'{fmt}' is not a version this FastServe reads ({FORMAT}); "
                                   f"export the shards again with this version")
        checked.fail("format", f"expected '{FORMAT}', got {_show(fmt)}: not a FastServe shard "
                               f"manifest")
    checked.keys(doc, _TOP, "")
    if not checked.expect(doc["graph"], "string", "graph"):
        checked.fail("graph", "expected a graph name, got ''")
    checked.expect(doc["strategy"], "string", "strategy")
    checked.expect(doc["policy"], "object", "policy")
    for name, size in checked.expect(doc["dims"], "object", "dims").items():
        checked.bounded(size, f"dims.{name}", 1, MAX_DIM)
    checked.bounded(doc["seed"], "seed", 0, MAX_SEED)
    if doc["spec"] is not None:
        _validate_spec(checked, doc["spec"])
    shards = checked.expect(doc["shards"], "list", "shards")
    if not shards:
        checked.fail("shards", "expected at least one shard, got []")
    owner: dict[str, int] = {}
    files: dict[str, int] = {}
    for i, entry in enumerate(shards):
        _validate_shard(checked, entry, i)
        for n in entry["nodes"]:
            if n in owner:
                checked.fail(f"shards[{i}].nodes", f"node '{n}' is also in shard {owner[n]}; "
                                                   f"every node belongs to one shard")
            owner[n] = i
        if entry["file"] in files:
            checked.fail(f"shards[{i}].file", f"'{entry['file']}' is also the file of shard "
                                              f"{files[entry['file']]}")
        files[entry["file"]] = i
    return doc


def _validate_spec(checked: _Checker, spec: Any) -> None:
    checked.expect(spec, "object", "spec")
    # 'bytes' is optional: exports made before it was recorded hash the spec all the same
    checked.keys(spec, ("file", "sha256"), "spec", optional=("bytes",))
    checked.expect(spec["file"], "string", "spec.file")
    _check_sha256(checked, spec["sha256"], "spec.sha256")
    if "bytes" in spec:
        checked.bounded(spec["bytes"], "spec.bytes", 0, SPEC_MAX_BYTES + 1)


def _validate_shard(checked: _Checker, entry: Any, i: int) -> None:
    at = f"shards[{i}]"
    checked.expect(entry, "object", at)
    checked.keys(entry, _SHARD, at)
    index = checked.expect(entry["index"], "integer", f"{at}.index")
    if index != i:
        checked.fail(f"{at}.index", f"expected {i} (shards are listed in order), got "
                                    f"{_show(index)}")
    checked.expect(entry["file"], "string", f"{at}.file")
    _check_sha256(checked, entry["sha256"], f"{at}.sha256")
    checked.bounded(entry["bytes"], f"{at}.bytes", 0, MAX_SHARD_BYTES)
    checked.names(entry["nodes"], f"{at}.nodes", nonempty=True)
    checked.names(entry["inputs"], f"{at}.inputs")
    checked.names(entry["outputs"], f"{at}.outputs")
    tensors = set(checked.names(entry["tensors"], f"{at}.tensors"))
    for name, target in checked.expect(entry["aliases"], "object", f"{at}.aliases").items():
        if not isinstance(target, str) or target not in tensors:
            checked.fail(f"{at}.aliases.{name}", f"expected the name of a tensor of this "
                                                 f"shard, got {_show(target)}")


def _check_sha256(checked: _Checker, value: Any, key: str) -> None:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        checked.fail(key, f"expected a sha256 (64 lowercase hex digits), got {_show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a 1


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _show(value: Any) -> str:
    """A short description of an offending value for a one-line message."""
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if not isinstance(value, (dict, list)) else None
    if text is None:
        return f"{kind} of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"

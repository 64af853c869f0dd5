"""Which Python code a graph spec may run.

A spec can name code: a node ``module: "pkg.mod:Name"`` (an ``nn.Module`` class) or a captured
model's ``source: {torch: "pkg.mod:factory"}``. Building the graph imports that module and calls
that name with arguments from the file, so loading a spec someone sent you would run their code
(importing some modules is enough). Like ``trust_remote_code`` in transformers, FastServe refuses
such a spec unless the user says the code is trusted, in one of three ways:

* ``--trust-code`` on the command line, or ``trust_code=True`` to ``load_spec``/``fastserve.load``;
* listing module prefixes in the trust file, ``~/.config/fastserve/trust.yaml`` (or the file
  named by ``$FASTSERVE_TRUST_FILE``)::

      trusted_modules: [mypkg, other.sub]   # mypkg, mypkg.x, other.sub.y; not other, mypkgx

The op library (``op: linear`` ...) is FastServe's own code and needs no trust. The check runs
while the spec is validated, before anything is imported: :func:`check_code` is the one place
that decides.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastserve.errors import SpecError, TrustError
from fastserve.yamlio import line_of, read_text, read_yaml

TRUST_FILE_ENV = "FASTSERVE_TRUST_FILE"  # the only environment variable FastServe's trust reads
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_TARGET = re.compile(rf"^({_DOTTED}):({_DOTTED})\Z")
_PREFIX = re.compile(rf"^{_DOTTED}\Z")


def trust_file() -> Path:
    """Where the list of trusted module prefixes is read from."""
    override = os.environ.get(TRUST_FILE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".config" / "fastserve" / "trust.yaml"


def trusted_modules(path: str | Path | None = None) -> tuple[str, ...]:
    """The module prefixes the trust file lists; none when there is no trust file."""
    p = Path(path) if path is not None else trust_file()
    if not p.exists():
        return ()
    doc = read_yaml(read_text(p, "trust file", TrustError), str(p), TrustError)
    if not isinstance(doc, dict) or set(doc) - {"trusted_modules"}:
        raise TrustError("a trust file holds one key, 'trusted_modules: [prefix, ...]'",
                         file=str(p), line=line_of(doc))
    prefixes = doc.get("trusted_modules") or []
    if not isinstance(prefixes, list):
        raise TrustError("expected a list of module prefixes", file=str(p),
                         line=line_of(doc, "trusted_modules"), key="trusted_modules")
    for i, prefix in enumerate(prefixes):
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise TrustError(f"{prefix!r} is not a module prefix like 'mypkg' or 'mypkg.models'",
                             file=str(p), line=line_of(prefixes, i), key=f"trusted_modules[{i}]")
    return tuple(prefixes)


def check_code(target: str, *, trust_code: bool, file: str | None = None,
               line: int | None = None, key: str | None = None) -> None:
    """Refuse the code ``"pkg.mod:Name"`` a spec names unless it is trusted.

    ``trust_code=True`` trusts everything; otherwise the module must lie under a prefix of the
    trust file. Raises :class:`TrustError` naming the file, line and key, and how to trust it.
    """
    match = _TARGET.match(target)
    if match is None:
        raise SpecError(f"'{target}' is not of the form 'package.module:Name'", file=file,
                        line=line, key=key)
    if trust_code:
        return
    module = match.group(1)
    if any(module == p or module.startswith(p + ".") for p in trusted_modules()):
        return
    top = module.split(".")[0]
    raise TrustError(f"'{target}' is Python code, which a spec may run only when trusted: pass "
                     f"--trust-code (CLI) or trust_code=True (Python) if you trust this file, or "
                     f"list '{top}' under trusted_modules in {trust_file()}", file=file,
                     line=line, key=key)

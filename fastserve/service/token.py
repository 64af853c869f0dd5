"""The management token of a service: a random secret in a file only its owner can read."""

from __future__ import annotations

import os
import secrets
import stat

from fastserve.errors import ServiceConfigError

MAX_TOKEN_BYTES = 4096


def read_token(path: str, create: bool = False) -> str:
    """The token in ``path``; with ``create``, a new random one written there (mode 0600) when
    the file does not exist. A token file others can read, or an empty one, is refused."""
    if create and not os.path.exists(path):
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise ServiceConfigError(f"cannot create the token file: {e.strerror or e}",
                                     file=path) from None
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ServiceConfigError("the token file is not a regular file", file=path)
        if st.st_mode & 0o077:
            raise ServiceConfigError(f"the token file can be read by others (mode "
                                     f"{stat.S_IMODE(st.st_mode):o}): chmod 600 it", file=path)
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise ServiceConfigError("the token file does not exist", file=path) from None
    except OSError as e:
        raise ServiceConfigError(f"cannot read the token file: {e.strerror or e}",
                                 file=path) from None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or len(data) > MAX_TOKEN_BYTES or not token.isprintable() or " " in token:
        raise ServiceConfigError("the token file must hold one printable token of at most "
                                 f"{MAX_TOKEN_BYTES} bytes", file=path)
    return token

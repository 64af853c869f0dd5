"""A cluster's CURVE keys: who may command the agents, and how a coordinator knows it reached one.

``fastserve keys new DIR`` writes two certificates in ZeroMQ's own format
(:func:`zmq.auth.create_certificates`): ``coordinator`` and ``agent``, each a public ``.key``
file and a ``.key_secret`` file readable by its owner only. Copy the directory to every host:

* an agent serves with the agent secret key and accepts only clients whose public key is one of
  the ``coordinator*.key`` files of its directory (add more coordinators by adding their public
  keys there);
* a coordinator connects with the coordinator secret key and accepts only a server holding the
  agent secret key (a host that answers without it never completes the handshake).

The keys of the ranks themselves are fresh per deployment (:mod:`fastserve.engine.security`) and
travel to each agent over this encrypted, authenticated channel.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from fastserve.engine.security import KeyPair
from fastserve.errors import FastServeError

ROLES = ("coordinator", "agent")


class KeysError(FastServeError):
    """A key directory that is missing, incomplete, unreadable or too open."""

    exit_code = 2


@dataclass(frozen=True)
class ClusterKeys:
    """This process's key pair in its role, and the public keys it accepts from the other."""

    own: KeyPair
    peers: tuple[str, ...]  # agents: coordinators they obey; coordinators: the agents' key


def new_keys(directory: str | Path, force: bool = False) -> list[Path]:
    """Write the coordinator and agent certificates into ``directory`` (made 0700); refuse to
    overwrite existing keys unless ``force``. Returns the files written."""
    d = Path(directory)
    existing = [d / f"{r}.key_secret" for r in ROLES if (d / f"{r}.key_secret").exists()]
    if existing and not force:
        raise KeysError(f"'{d}' already holds keys ({existing[0].name}); pass --force to "
                        f"replace them (every agent and coordinator must then get the new ones)")
    # keys go in a directory of their own, made 0700: not among a user's files (key files,
    # such as other coordinators' public keys an agent accepts, may stay)
    others = sorted(p.name for p in d.iterdir() if not p.name.endswith((".key", ".key_secret"))
                    ) if d.is_dir() else []
    if others:
        raise KeysError(f"'{d}' holds other files ({others[0]}); give a new or empty "
                        f"directory for the keys")
    try:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    except OSError as e:
        raise KeysError(f"cannot make the key directory '{d}': {e.strerror or e}") from None
    written = []
    for role in ROLES:
        public, secret = zmq.auth.create_certificates(str(d), role)
        os.chmod(public, 0o644)  # (a umask of 002 would leave it writable by the group)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


def load_keys(directory: str | Path, role: str) -> ClusterKeys:
    """The keys of ``role`` (``coordinator`` or ``agent``) from a directory ``new_keys`` wrote."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    d = Path(directory)
    if not d.is_dir():
        raise KeysError(f"key directory '{d}' does not exist; make one with: fastserve keys new "
                        f"{d}")
    _check_owner(d, "key directory")
    secret_file = d / f"{role}.key_secret"
    own = _read(secret_file, secret=True)
    if role == "agent":
        peers = sorted(p for p in d.glob("coordinator*.key") if p.is_file())
        if not peers:
            raise KeysError(f"'{d}' lists no coordinator public key (coordinator*.key): this "
                            f"agent would obey nobody")
        accepted = tuple(_read(p, secret=False).public for p in peers)
    else:
        accepted = (_read(d / "agent.key", secret=False).public,)
    return ClusterKeys(own, accepted)


def _check_owner(path: Path, what: str) -> None:
    """Refuse a key file or directory that another user could change: whoever can write a
    ``coordinator*.key`` into an agent's directory commands that agent (the rule sshd applies
    to authorized_keys)."""
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeysError(f"{what} '{path}' can be changed by other users, who could then add a "
                        f"key the agents obey; make it writable by its owner only: chmod go-w "
                        f"{path}")
    if st.st_uid not in (os.geteuid(), 0):
        raise KeysError(f"{what} '{path}' belongs to another user (uid {st.st_uid}), who could "
                        f"change it; it must be this user's or root's")


def _read(path: Path, secret: bool) -> KeyPair:
    if not path.is_file():
        raise KeysError(f"key file '{path}' does not exist; make the keys with: fastserve keys "
                        f"new {path.parent}")
    _check_owner(path, "key file")
    if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeysError(f"secret key file '{path}' can be read by other users; make it "
                        f"private: chmod 600 {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise KeysError(f"'{path}' is not a ZeroMQ certificate: {e}") from None
    if len(public) != 40 or (secret and (secret_key is None or len(secret_key) != 40)):
        raise KeysError(f"'{path}' does not hold a {'secret' if secret else 'public'} CURVE key")
    return KeyPair(public.decode("ascii"), (secret_key or b"").decode("ascii"))

"""Authentication of the sockets a deployment opens: ZeroMQ CURVE on tcp.

Every process of a deployment (the coordinator and each rank) has its own CURVE key pair, made
fresh per deployment. A socket that binds is a CURVE server and accepts only the client keys it is
told: a rank's data socket only its upstream (the previous stage, or the coordinator), the
coordinator's results socket only the last-stage ranks, its control socket only the ranks. A
peer without an accepted key never completes the handshake, so nothing it sends is read; each
refusal is counted from the socket's monitor events.

ipc sockets are not encrypted: they live in a directory only the owner can enter (mode 0700,
made by :mod:`tempfile`), so a peer there already runs as the same user.

Secret keys travel to a rank on its stdin pipe, never on a command line (which every local user
can read in ``/proc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import zmq
from zmq.utils.monitor import recv_monitor_message

_REFUSALS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, both halves Z85 text."""

    public: str
    secret: str

    @staticmethod
    def new() -> KeyPair:
        public, secret = zmq.curve_keypair()
        return KeyPair(public.decode("ascii"), secret.decode("ascii"))


class Guard:
    """The authenticator of one process: which client keys each bound socket accepts, and how
    many peers were refused. ``keys`` None means no CURVE (ipc): sockets are left as they are."""

    def __init__(self, ctx: zmq.Context, keys: KeyPair | None) -> None:
        self.keys = keys
        self.refused = 0
        self._allowed: dict[str, frozenset[str]] = {}
        self._monitors: list[zmq.Socket] = []
        self._auth = None
        if keys is not None:
            if not zmq.has("curve"):
                raise RuntimeError("this libzmq was built without CURVE; tcp needs it")
            # imported here: the authenticator thread is only needed with CURVE
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: accept a client key only on the socket (domain) it was allowed for."""
        return key.decode("ascii", "replace") in self._allowed.get(domain, frozenset())

    def serve(self, sock: zmq.Socket, domain: str, clients: Iterable[str]) -> None:
        """Make ``sock`` (about to bind) a CURVE server accepting only ``clients``' keys."""
        if self.keys is None:
            return
        self._allowed[domain] = frozenset(clients)
        self._auth.configure_curve_callback(domain, self)  # the authenticator asks per domain
        sock.zap_domain = domain.encode()
        sock.curve_secretkey = self.keys.secret.encode()
        sock.curve_publickey = self.keys.public.encode()
        sock.curve_server = True
        self._monitors.append(sock.get_monitor_socket(_REFUSALS))

    def connect_to(self, sock: zmq.Socket, server_public: str | None) -> None:
        """Make ``sock`` (about to connect) a CURVE client of the server with that key."""
        if self.keys is None:
            return
        if not server_public:
            raise ValueError("a CURVE client needs its server's public key")
        sock.curve_secretkey = self.keys.secret.encode()
        sock.curve_publickey = self.keys.public.encode()
        sock.curve_serverkey = server_public.encode()

    @property
    def monitors(self) -> list[zmq.Socket]:
        """Monitor sockets to poll; pass a readable one to :meth:`count`."""
        return self._monitors

    def count(self, monitor: zmq.Socket | None = None) -> int:
        """Drain refusal events (of one monitor, or all) and return the running total."""
        for m in [monitor] if monitor is not None else self._monitors:
            while m.poll(0):
                recv_monitor_message(m)
                self.refused += 1
        return self.refused

    def close(self) -> None:
        for m in self._monitors:
            m.close(linger=0)
        self._monitors = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

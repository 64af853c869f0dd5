"""The HTTP server's connections, with the deadlines uvicorn lacks: a request's headers must
arrive within ``limits.header_timeout_s``, and its body soon after ``limits.body_timeout_s``.

uvicorn times a connection out only while it idles between requests (keep-alive), and each
byte that arrives stops that clock. A client that sends its headers a byte at a time
(slowloris), or a body to a route that answered without reading it (a 503 under overload, a
401), holds the connection, and a file descriptor, for as long as it likes.
:func:`guarded_protocol` is uvicorn's httptools protocol with a timer per request: from the
connection's opening, or from the first byte of a later request, to the end of its headers;
then from there to the end of its body. When it fires the connection is closed. A route that
reads the body answers 408 at ``body_timeout_s`` itself (``http._body``); the protocol's body
deadline, :data:`BODY_GRACE_S` later, is the backstop for those that do not. While uvicorn has
stopped reading the connection (a body waiting for its route), the clock is the server's, not
the client's: the timer waits for it.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BODY_GRACE_S = 5.0


def guarded_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``."""

    class GuardedProtocol(HttpToolsProtocol):
        _due: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(header_timeout_s)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._due is None:  # (armed already for a connection's first request)
                self._arm(header_timeout_s)

        def on_headers_complete(self) -> None:
            self._arm(body_timeout_s + BODY_GRACE_S)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._due = self.loop.call_later(seconds, self._too_slow, seconds)

        def _disarm(self) -> None:
            if self._due is not None:
                self._due.cancel()
                self._due = None

        def _too_slow(self, seconds: float) -> None:
            self._due = None
            if self.transport.is_closing():
                return
            if self.flow is not None and self.flow.read_paused:
                self._arm(seconds)  # uvicorn is not reading: the client is not the slow one
                return
            self.transport.close()

    return GuardedProtocol

"""The HTTP server's connections, with the deadline uvicorn lacks: a request's headers must
arrive within ``limits.header_timeout_s``.

uvicorn times a connection out only while it idles between requests (keep-alive). A client
that opens connections and sends each request's headers a byte at a time (slowloris) holds
them, and a file descriptor each, for as long as it likes. :func:`guarded_protocol` is
uvicorn's httptools protocol with a timer from a connection's opening, and from the first byte
of each later request, to the end of that request's headers; when it fires the connection is
closed. The body has its own deadline where a route reads it (``limits.body_timeout_s``, a
408).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``."""

    class GuardedProtocol(HttpToolsProtocol):
        _headers_due: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._headers_due is None:  # (armed already for a connection's first request)
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._headers_due = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None

        def _too_slow(self) -> None:
            self._headers_due = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol

"""The connection level: what one TCP connection may cost the server before a request reaches the app.

uvicorn's httptools protocol (kept: it is faster than h11) puts no bound on header bytes or count, has no
deadline for a request's headers (a connection that sends nothing, or half a header, stays open forever) and no
cap on open connections. ``GuardedHttpToolsProtocol`` adds those, in the spirit of nginx
(``large_client_header_buffers``, ``client_header_timeout``, ``worker_connections``, lingering close) and gunicorn
(``limit_request_fields``):

- header bytes (request line + headers) past ``max_header_bytes``, or more than ``max_headers`` headers: 431 and
  the connection is closed before anything more is read;
- headers not complete ``header_timeout_s`` after the connection opened, or after the request's first byte on a
  kept-alive connection: closed (408 if anything was received). Idle kept-alive connections keep uvicorn's own
  keep-alive timeout;
- past ``max_connections`` open connections in this worker, a new connection is answered 503 and closed at once;
- a refusal sent while the client is still uploading (``Connection: close`` with the body unread) is followed by
  a lingering close: the write side is shut (the client reads the answer and a clean end) and what the client
  still sends is read and dropped for at most ``linger_s`` instead of being answered with a reset, which makes
  clients such as httpx report a ReadError instead of the answer;
- ``Upgrade: h2c`` (``curl --http2`` on plain http) is ignored: httptools stops parsing at an upgrade request and
  uvicorn served it with its body lost; here the request keeps its body and is served as HTTP/1.1.

``siglip.server.patches.install_connection_limits`` makes every uvicorn server BentoML starts in this process
use it (uvicorn's internals are patched there, with BentoML's, for the versions they were read from).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from siglip import observe
from siglip.server.memory import trim_heap
from siglip.settings import Settings, fmt_bytes

logger = logging.getLogger("siglip.connections")

# File descriptors kept free below the process limit for everything that is not a client connection (model
# service sockets, URL fetches, files).
FD_RESERVE_MIN = 64


@dataclass(frozen=True)
class ConnectionLimits:
    """What every connection to a server of this process is held to; the first five from ``Settings`` (their one
    home), through ``from_settings``."""

    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    max_connections: int
    keep_alive_s: float  # 0: leave uvicorn's value
    linger_s: float = 5.0  # longest a refused upload is read and dropped after its answer
    trim_idle_s: float = 1.0  # freed heap goes back to the OS once no request has run for this long

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(max_header_bytes=settings.max_header_bytes, max_headers=settings.max_headers,
                   header_timeout_s=settings.header_timeout_s,
                   max_connections=connection_cap(settings.max_connections),
                   keep_alive_s=settings.keep_alive_s)


def connection_cap(wanted: int, fd_limit: int | None = None) -> int:
    """``wanted``, lowered to stay under the process's file-descriptor limit (so the cap, not EMFILE, is what a
    flood of connections meets)."""
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, fd_limit - max(FD_RESERVE_MIN, fd_limit // 8)))


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the protocol answers ``status`` and closes."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# What siglip_errors_total calls the refusals made here, before any request reaches the ASGI app.
REFUSAL_REASONS = {400: "malformed_http", 408: "header_timeout", 431: "header_limit", 503: "connection_limit"}


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with the service's {"error": ...} body, closing the connection. It is counted
    in siglip_errors_total and carries an X-Request-ID like every other answer (siglip.observe never sees it)."""
    body = orjson.dumps({"error": message})
    try:
        observe.metrics().errors.labels(status=str(status), reason=REFUSAL_REASONS.get(status, "other")).inc()
    except Exception:  # a refusal must go out even where metrics cannot be recorded
        logger.debug("could not count a %d refusal", status, exc_info=True)
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                     b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n",
                     b"x-request-id: ", observe.new_request_id().encode(), b"\r\n", b"\r\n", body])


class _Throttled:
    """At most one log line per ``interval_s`` for a repeated event, with the count of those not logged: a
    connection flood must not also flood the log."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.last = float("-inf")
        self.skipped = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.skipped += 1
            return
        if self.skipped:
            message += f" ({self.skipped} more since the last such line)"
        self.last, self.skipped = now, 0
        logger.warning(message, *args)


_cap_warnings = _Throttled()


class _LingeringTransport:
    """The connection's transport as the protocol and its request cycles see it: ``close()`` becomes a lingering
    close while the current request's body is still arriving; everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol):
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class IdleTrim:
    """Calls ``trim_heap`` once a server has had no request running for ``delay_s`` after some activity, so memory
    freed after a burst is returned (see ``siglip.server.memory``) without costing anything while requests run."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.timer: asyncio.TimerHandle | None = None

    def activity(self, loop: asyncio.AbstractEventLoop, tasks: set) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_later(self.delay_s, self._fire, loop, tasks)

    def _fire(self, loop: asyncio.AbstractEventLoop, tasks: set) -> None:
        self.timer = None
        if tasks:
            self.activity(loop, tasks)
        else:
            trim_heap()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionLimits  # set per server by ``protocol_class``
    idle_trim: IdleTrim

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_transport: asyncio.Transport | None = None
        self.refused_at_accept = False
        self.in_headers = True  # waiting for (the rest of) a request's headers
        self.header_bytes = 0
        self.header_count = 0
        self.header_timer: asyncio.TimerHandle | None = None
        self.received_any = False
        self.message_complete = True  # no request open (between requests, or its body fully read)
        self.messages_begun = 0
        self.lingering = False
        self.linger_timer: asyncio.TimerHandle | None = None
        self.replaying_head = False  # feeding the synthetic head of a request resumed after an h2c upgrade

    # -- connection --------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.real_transport = transport
        if len(self.connections) >= self.limits.max_connections:
            self.refused_at_accept = True
            self.transport = transport
            _cap_warnings.warning("refused a connection: %d open (SIGLIP_MAX_CONNECTIONS)", len(self.connections))
            transport.write(error_bytes(503, f"server has {len(self.connections)} open connections "
                                             "(SIGLIP_MAX_CONNECTIONS); retry shortly"))
            # Closed at once, not lingering like the other refusals: a flood past the cap must not hold the
            # descriptors the cap protects; a client already sending a large body may see a reset instead.
            transport.close()
            return
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.header_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        if self.refused_at_accept:
            return
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.lingering:
            self._really_close()
        return None

    def close_connection(self) -> None:
        """Close, lingering if the client is still sending a body nobody will read."""
        real = self.real_transport
        if real is None or real.is_closing() or self.lingering:
            return
        if self.message_complete or self.in_headers:
            real.close()
        else:
            self._linger()

    def _linger(self) -> None:
        real = self.real_transport
        if real is None or real.is_closing() or self.lingering:
            return
        if not real.can_write_eof():
            real.close()
            return
        self.lingering = True
        real.write_eof()
        if self.flow is not None and self.flow.read_paused:
            self.flow.read_paused = False
            real.resume_reading()
        self.linger_timer = self.loop.call_later(self.limits.linger_s, self._really_close)

    def _really_close(self) -> None:
        if self.real_transport is not None and not self.real_transport.is_closing():
            self.real_transport.close()

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with {"error": message}; nothing more is parsed, and the connection closes once the
        client stops sending (at most ``linger_s``)."""
        logger.info("refused a request on a connection: %d %s", status, message)
        if self.real_transport is not None and not self.real_transport.is_closing() and not self.lingering:
            self.real_transport.write(error_bytes(status, message))
            self._linger()

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, msg)

    # -- header deadline ---------------------------------------------------------------------------------------
    def _start_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self.header_timer = None
        if not self.in_headers or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is running; a pipelined request's partial headers wait for it
        if self.received_any and self.header_bytes:
            self.refuse(408, f"request headers not complete within {self.limits.header_timeout_s:g} s "
                             "(SIGLIP_HEADER_TIMEOUT_S)")
        else:
            self._really_close()

    # -- parsing -------------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the answer is sent; the rest of a refused upload is dropped
        self._unset_keepalive_if_required()
        self.received_any = True
        while data:
            if self.in_headers:
                # Parse at most one byte past the header budget: an endless header is refused on that byte.
                self._start_header_timer()
                room = self.limits.max_header_bytes - self.header_bytes
                piece, data = data[:room + 1], data[room + 1:]
            else:
                piece, data = data, b""
            # Header bytes are counted per piece, so only a piece known to hold just the current request's
            # head: it was open before the piece, or began with it. A piece that also ended a request is not
            # counted (the next head's share is unknown), which lets a pipelined head overrun by one piece.
            head_only = self.in_headers
            open_before = not self.message_complete
            begun = self.messages_begun
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                if isinstance(cause, _Refused):
                    return self.refuse(cause.status, cause.message)
                return self.refuse(400, "Invalid HTTP request received.")
            except httptools.HttpParserUpgrade as exc:
                if self._should_upgrade():
                    return self.handle_websocket_upgrade()
                self._serve_upgrade_as_http11()
                data = piece[exc.args[0]:] + data
                continue
            if head_only and self.in_headers and self.messages_begun - begun == (0 if open_before else 1):
                self.header_bytes += len(piece)
                if self.header_bytes > self.limits.max_header_bytes:
                    return self.refuse(431, f"request headers are over the "
                                            f"{fmt_bytes(self.limits.max_header_bytes)} limit "
                                            "(SIGLIP_MAX_HEADER_BYTES)")

    def _serve_upgrade_as_http11(self) -> None:
        """httptools treats a request asking to upgrade (h2c) as ending at its headers and leaves its body
        unparsed. Continue with a fresh parser primed with a head that frames the same body, so the request gets
        its body and the connection goes on as HTTP/1.1."""
        logger.debug("ignoring Upgrade: %r", self._get_upgrade())
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        framing = [(k, v) for k, v in self.headers if k in (b"content-length", b"transfer-encoding")]
        if not framing or self.cycle is None:
            return
        self.cycle.more_body = True
        self.message_complete = False
        self.in_headers = False
        self.replaying_head = True
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in framing)
                                  + b"\r\n")
        finally:
            self.replaying_head = False

    def on_message_begin(self) -> None:
        if self.replaying_head:
            return
        self.header_count = 0
        self.messages_begun += 1
        self.message_complete = False
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.replaying_head:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.replaying_head:
            return
        self.header_count += 1
        if self.header_count > self.limits.max_headers:
            raise _Refused(431, f"more than {self.limits.max_headers} request headers (SIGLIP_MAX_HEADERS)")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.replaying_head:
            return
        self.in_headers = False
        self.header_bytes = 0
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.message_complete = True
        self.in_headers = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.idle_trim.activity(self.loop, self.tasks)


def protocol_class(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"limits": limits, "idle_trim": IdleTrim(limits.trim_idle_s)})


def listening_address(argv: list[str] | None = None) -> str | None:
    """The address this worker's socket is bound to (BentoML passes the bound socket as ``--fd N``), or None when
    it cannot be told (not a BentoML worker, a Unix socket)."""
    import os
    import socket
    import sys

    argv = sys.argv if argv is None else argv
    try:
        fd = int(argv[argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:
            address = sock.getsockname()
    except (ValueError, IndexError, OSError):
        return None
    return address[0] if isinstance(address, tuple) else None


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

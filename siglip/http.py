"""The HTTP edge: one ASGI middleware in front of the BentoML app, and error -> response mapping.

``RequestGuard`` runs before BentoML parses anything, because BentoML's own parsing turns malformed JSON into
a 500 or an opaque validation error and cannot tell a missing field from null. In order, for API calls:
bearer auth (401), in-flight limit (429), body size (413), JSON well-formedness and shape (400). The body is
then replayed to BentoML. While the request runs, the guard watches the connection: if the client goes away,
the request's task is cancelled so no work is done for nobody.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import Response

from .errors import BadRequest, BodyTimeout, Overloaded, PayloadTooLarge, ServiceError, Unauthorized
from .settings import MB, fmt_bytes

logger = logging.getLogger("siglip.http")

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def error_response(exc: ServiceError) -> Response:
    return json_response(orjson.dumps({"error": exc.message}), exc.status, dict(exc.headers))


async def answer(run: Callable[[], Awaitable[bytes]]) -> Response:
    """Run one API call; every ServiceError becomes its status + {"error": ...}, anything else a logged 500."""
    try:
        return json_response(await run())
    except ServiceError as exc:
        if exc.status >= 500:
            logger.warning("answered %d: %s", exc.status, exc.message)
        return error_response(exc)
    except Exception as exc:
        logger.exception("unexpected error")
        return json_response(orjson.dumps({"error": f"internal error: {type(exc).__name__}"}), 500)


def check_body(body: bytes) -> None:
    """The body must be a JSON object with "inputs" (and "parameters", if any, an object)."""
    if not body.strip():
        raise BadRequest('request body is empty; send JSON like {"inputs": ..., "parameters": {...}}')
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest('request body must be a JSON object like {"inputs": ..., "parameters": {...}}')
    if "inputs" not in data:
        raise BadRequest('"inputs" is required: send {"inputs": ..., "parameters": {...}}')
    params = data.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequest("parameters must be a JSON object")


def is_last_body(message: dict[str, Any]) -> bool:
    """The ASGI message that completes a response."""
    return message["type"] == "http.response.body" and not message.get("more_body")


def token_ok(header: str | None, tokens: tuple[str, ...]) -> bool:
    if not header or header[:7].lower() != "bearer ":
        return False
    given = header[7:].strip().encode()
    # Compare against every token (no early exit), each in constant time.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token.encode())
    return ok


class RequestGuard:
    def __init__(self, app: Any, api_paths: frozenset[str], tokens: tuple[str, ...] = (),
                 max_body_bytes: int = 64 * MB, max_concurrency: int = 256, max_inflight_body_bytes: int = 512 * MB,
                 body_timeout_s: float = 120.0):
        self.app = app
        self.api_paths = api_paths
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.max_inflight_body_bytes = max_inflight_body_bytes
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0
        self.inflight_body_bytes = 0  # bodies of requests being read or served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.tokens and path not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not token_ok(auth, self.tokens):
                await self._discard_body(scope, receive)
                return await _send_error(send, Unauthorized("missing or invalid bearer token (Authorization: "
                                                            "Bearer <token>)"))
        if scope.get("method") != "POST" or path not in self.api_paths:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_concurrency:
            await self._discard_body(scope, receive)
            return await _send_error(send, Overloaded(f"server is busy ({self.in_flight} requests in flight, "
                                                      "SIGLIP_MAX_CONCURRENCY); retry shortly"))
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        async def releasing_send(message: dict[str, Any]) -> None:
            await send(message)
            if is_last_body(message):
                # Answered: the slot is free now. Freed only when the handler returns, a client that sends its
                # next request at once could find its own finished request still counted and get a 429.
                release()

        try:
            await self._guarded(scope, receive, releasing_send)
        finally:
            release()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        held = 0  # bytes of this body counted in inflight_body_bytes
        try:
            try:
                try:
                    async with asyncio.timeout(self.body_timeout_s):
                        body = await self._read_body(scope, receive)
                except TimeoutError:
                    raise BodyTimeout(f"request body did not arrive within {self.body_timeout_s:g} s") from None
                held = len(body)
                check_body(body)
            except (PayloadTooLarge, Overloaded, BodyTimeout) as exc:
                # Refused mid-upload: the rest of the body is not read, so the connection cannot be reused.
                return await _send_error(send, exc, close=True)
            except ServiceError as exc:
                return await _send_error(send, exc)
            await self._serve(scope, receive, send, body)
        finally:
            self.inflight_body_bytes -= held

    async def _serve(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        # BentoML picks its parser by Content-Type; `curl -d` sends form-urlencoded, so declare JSON.
        headers = [(k, v) for k, v in scope.get("headers", []) if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = dict(scope, headers=headers)

        disconnected = asyncio.Event()
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        response_done = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal response_done
            await send(message)
            if is_last_body(message):
                response_done = True  # from now on the server reports "disconnect" for a finished exchange

        app_task = asyncio.ensure_future(self.app(scope, replay, tracked_send))
        watch = asyncio.ensure_future(receive())
        try:
            done, _ = await asyncio.wait({app_task, watch}, return_when=asyncio.FIRST_COMPLETED)
            client_gone = (app_task not in done and not response_done
                           and watch.result().get("type") == "http.disconnect")
            if client_gone:
                disconnected.set()
                app_task.cancel()
                logger.info("client went away; cancelled %s", scope.get("path"))
            await asyncio.gather(app_task, return_exceptions=client_gone)
        finally:
            watch.cancel()
            if not app_task.done():
                app_task.cancel()
                await asyncio.gather(app_task, return_exceptions=True)  # release limits only once it stopped

    async def _discard_body(self, scope: Scope, receive: Receive) -> None:
        """Read and drop a refused request's body (up to the body limit): answering while the client is still
        sending makes the server drop the connection, which clients see as a reset rather than our answer."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return
        size = 0
        while size <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, refusing it (413) past the per-request cap and (429) past the memory budget shared
        by all requests in flight. Bytes read are counted in ``inflight_body_bytes``; the caller releases them."""
        too_large = PayloadTooLarge(f"request body is over the {fmt_bytes(self.max_body_bytes)} limit "
                                    "(SIGLIP_MAX_BODY_BYTES)")
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise too_large
        chunks, size = [], 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadRequest("client disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                self.inflight_body_bytes += len(chunk)
                if size > self.max_body_bytes:
                    raise too_large
                if self.inflight_body_bytes > self.max_inflight_body_bytes:
                    raise Overloaded(f"server is holding {fmt_bytes(self.inflight_body_bytes)} of request bodies "
                                     "(SIGLIP_MAX_INFLIGHT_BODY_BYTES); retry shortly")
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
        except BaseException:
            self.inflight_body_bytes -= size
            raise


def set_keep_alive(seconds: float) -> None:
    """Keep idle client connections open ``seconds`` in the uvicorn servers BentoML starts in this process.

    BentoML runs uvicorn with a 5 s keep-alive, no longer than clients keep idle pooled connections (httpx 5 s,
    aiohttp 15 s, cloud load balancers 60 s). When the server closes first, a request the client sends on that
    connection at the same moment meets a reset: ~0.5% of requests failed with ReadError under overload, and the
    same race gives sporadic 502s behind load balancers. A server keep-alive longer than any client's removes it.
    uvicorn has no environment variable for this and BentoML only a hidden CLI flag, so the Config is adjusted
    when BentoML's worker creates it (after importing the service); this overrides `--timeout-keep-alive`.
    """
    import uvicorn

    # Calling this again replaces our own wrapper, never another library's.
    original = getattr(uvicorn.Config.__init__, "_siglip_original", uvicorn.Config.__init__)

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.timeout_keep_alive = seconds

    init._siglip_original = original  # type: ignore[attr-defined]
    uvicorn.Config.__init__ = init  # type: ignore[method-assign]


async def _send_error(send: Send, exc: ServiceError, close: bool = False) -> None:
    body = orjson.dumps({"error": exc.message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The HTTP edge: one ASGI middleware in front of the BentoML app, and error -> response mapping.

``RequestGuard`` runs before BentoML parses anything, because BentoML's own parsing turns malformed JSON into
a 500 or an opaque validation error and cannot tell a missing field from null. In order, for API calls:
one Authorization header (400) and bearer auth (401), declared body size (413) and in-flight limit (429), all
from the headers alone; then the body (upload slots, rate, size and memory budget: 408/413/429), JSON
well-formedness, depth and shape (400). The body is then replayed to BentoML; error answers BentoML or Starlette
write as plain text (404, 405) get the service's error body. Image and multipart bodies (``siglip.server.uploads``)
skip the JSON checks and go to the uploads app instead of BentoML, after the same body limits. While the request runs, the guard watches the connection: if the client goes away,
the request's task is cancelled so no work is done for nobody.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response

from siglip import observe
from siglip.api.errors import BadRequest, BodyTimeout, Overloaded, PayloadTooLarge, ServiceError, Unauthorized
from siglip.api.openai_api import OPENAI_PREFIX
from siglip.api.openai_api import error_object as openai_error_object
from siglip.server import playground
from siglip.server.uploads import is_upload
from siglip.settings import Settings, fmt_bytes

logger = logging.getLogger("siglip.http")

# GET /info: what is served. Open like /metrics, whose siglip_model_info already names the model, device and
# backend, so the playground can say what answers before a token is typed.
INFO_PATH = "/info"
# Open without a token: the probes and metrics, /info, and the playground's files (the page asks for the token
# itself).
OPEN_PATHS = observe.QUIET_PATHS | playground.PATHS | {INFO_PATH}

MAX_JSON_DEPTH = 32

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def error_body(exc: ServiceError, path: str = "") -> bytes:
    """{"error": message}; under /v1/ OpenAI's {"error": {"message", "type", "param", "code"}}, which its SDKs read."""
    if path.startswith(OPENAI_PREFIX):
        return orjson.dumps(openai_error_object(exc))
    return orjson.dumps({"error": exc.message})


def error_response(exc: ServiceError, path: str = "") -> Response:
    observe.note_error(exc.reason)
    return json_response(error_body(exc, path), exc.status, dict(exc.headers))


async def answer(run: Callable[[], Awaitable[bytes]], path: str = "") -> Response:
    """Run one API call; every ServiceError becomes its status + {"error": ...}, anything else a logged 500."""
    try:
        return json_response(await run())
    except ServiceError as exc:
        if exc.status >= 500:
            logger.warning("answered %d: %s", exc.status, exc.message)
        return error_response(exc, path)
    except Exception as exc:
        logger.exception("unexpected error")
        return json_response(error_body(ServiceError(f"internal error: {type(exc).__name__}"), path), 500)


def check_body(body: bytes, path: str = "") -> None:
    """The body must be a JSON object with "inputs" (and "parameters", if any, an object); under /v1/ just a JSON
    object, whose fields ``siglip.api.openai_api`` checks."""
    if path.startswith(OPENAI_PREFIX):
        json_object(body, '{"model": ..., "input": ...}')
        return
    data = json_object(body, '{"inputs": ..., "parameters": {...}}')
    if "inputs" not in data:
        raise BadRequest('"inputs" is required: send {"inputs": ..., "parameters": {...}}')
    params = data.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequest("parameters must be a JSON object")


def json_object(body: bytes, example: str) -> dict[str, Any]:
    """The body parsed as a JSON object of bounded depth, or BadRequest saying what to send (``example``)."""
    if not body.strip():
        raise BadRequest(f"request body is empty; send JSON like {example}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    check_depth(data)
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object like {example}")
    return data


def check_depth(data: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """orjson parses 1024 levels, BentoML's pydantic parser fewer (it answers a bare validation error); no
    request needs more than a few."""
    level = [data]
    for _ in range(limit + 1):
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return
    raise BadRequest(f"request body is nested deeper than {limit} levels")


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


EVICT_AFTER_S = 1.0  # an upload must have run this long before a newcomer may take its slot


@dataclass(eq=False)
class Upload:
    """A request whose body is still arriving, and what eviction compares: its average rate so far."""

    started: float
    size: int = 0
    evicted: asyncio.Event = field(default_factory=asyncio.Event)

    def rate(self, now: float) -> float:
        return self.size / max(now - self.started, 1e-6)


async def receive_unless_evicted(receive: Receive, upload: Upload) -> dict[str, Any]:
    """The next ASGI message, or BodyTimeout as soon as a faster upload has taken this one's slot."""
    message = asyncio.ensure_future(receive())
    evicted = asyncio.ensure_future(upload.evicted.wait())
    try:
        await asyncio.wait({message, evicted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (message, evicted):
            if not task.done():
                task.cancel()
    if message.done() and not message.cancelled():
        return message.result()
    raise BodyTimeout(f"request body too slow: {fmt_bytes(upload.size)} arrived at "
                      f"{fmt_bytes(upload.rate(asyncio.get_running_loop().time()))}/s while SIGLIP_MAX_UPLOADS "
                      "uploads were arriving; the slowest gives way to a new request")


@dataclass(frozen=True)
class GuardLimits:
    """RequestGuard's tokens and budgets (per gateway worker), from ``Settings``: their one home."""

    tokens: tuple[str, ...]
    max_body_bytes: int
    max_concurrency: int
    max_inflight_body_bytes: int
    body_timeout_s: float
    min_upload_rate: int
    max_uploads: int
    request_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardLimits:
        return cls(tokens=settings.api_token, max_body_bytes=settings.max_body_bytes,
                   max_concurrency=settings.max_concurrency, max_inflight_body_bytes=settings.max_inflight_body_bytes,
                   body_timeout_s=settings.body_timeout_s, min_upload_rate=settings.min_upload_bytes_per_s,
                   max_uploads=settings.max_uploads, request_timeout_s=settings.request_timeout_s)


class RequestGuard:
    """Budgets, per gateway worker: ``max_uploads`` requests still receiving their body (one whose body came
    with its first read needs none), ``max_concurrency`` requests with a complete body being served, and
    ``max_inflight_body_bytes`` of bodies held. A slow upload can only take upload slots, never the slots of
    requests ready to run, and it must keep up ``min_upload_rate`` bytes/s once ``body_timeout_s`` has passed.

    Refusals (400 for several Authorization headers, 401, 413, 429, 408) answer at once, without reading the
    rest of the body, and close the connection (``siglip.server.connections`` lingers so the client reads the answer).
    """

    def __init__(self, app: Any, api_paths: frozenset[str], limits: GuardLimits, uploads: Any = None):
        self.app = app
        self.upload_app = uploads  # the ASGI app for image and multipart bodies (siglip.server.uploads)
        self.api_paths = api_paths
        self.limits = limits
        self.in_flight = 0  # requests with their body, being served
        self.uploads: set[Upload] = set()  # requests waiting for more of their body
        self.inflight_body_bytes = 0  # bodies of requests being read or served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guard(scope, receive, tracking)
        except Exception as exc:
            # A bug below must still answer: BentoML's outer layers leave an unanswered request hanging.
            logger.exception("unexpected error serving %s", scope.get("path"))
            if started:
                raise
            await _send_error(tracking, ServiceError(f"internal error: {type(exc).__name__}"), close=True,
                              path=scope.get("path", ""))

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        send = shape_errors(send, path)
        if path not in OPEN_PATHS:
            auth = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
            if len(auth) > 1:
                # Proxies and frameworks disagree on which one counts (first, last, joined): refuse the ambiguity.
                return await _send_error(send, BadRequest(f"{len(auth)} Authorization headers; send one"),
                                         close=True, path=path)
            if self.limits.tokens and not token_ok(auth[0].decode("latin-1") if auth else None, self.limits.tokens):
                return await _send_error(send, Unauthorized("missing or invalid bearer token (Authorization: "
                                                            "Bearer <token>)"), close=True, path=path)
        if scope.get("method") != "POST" or path not in self.api_paths:
            return await self.app(scope, receive, send)
        try:
            self._check_admission(scope)
        except ServiceError as exc:
            return await _send_error(send, exc, close=True, path=path)
        held = 0  # bytes of this body counted in inflight_body_bytes
        content_type = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"content-type"), "")
        upload = self.upload_app is not None and not path.startswith(OPENAI_PREFIX) and is_upload(content_type)
        try:
            try:
                body = await self._read_body(receive)
                held = len(body)
                if not upload:
                    check_body(body, path)
            except (PayloadTooLarge, Overloaded, BodyTimeout) as exc:
                # Refused mid-upload: the rest of the body is not read, so the connection cannot be reused.
                return await _send_error(send, exc, close=True, path=path)
            except ServiceError as exc:
                return await _send_error(send, exc, path=path)
            if self.in_flight >= self.limits.max_concurrency:  # filled while this body arrived
                return await _send_error(send, self._busy(), path=path)
            await self._run(scope, receive, send, body, upload)
        finally:
            self.inflight_body_bytes -= held

    def _busy(self) -> Overloaded:
        return Overloaded(f"server is busy ({self.in_flight} requests in flight, SIGLIP_MAX_CONCURRENCY); "
                          "retry shortly")

    def _check_admission(self, scope: Scope) -> None:
        """What can be refused from the headers alone, before any of the body is read."""
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limits.max_body_bytes:
                raise self._too_large()
        if self.in_flight >= self.limits.max_concurrency:
            raise self._busy()

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is over the {fmt_bytes(self.limits.max_body_bytes)} limit "
                               "(SIGLIP_MAX_BODY_BYTES)")

    async def _run(self, scope: Scope, receive: Receive, send: Send, body: bytes, upload: bool = False) -> None:
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
            await self._serve(scope, receive, releasing_send, body, upload)
        finally:
            release()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, body: bytes, upload: bool = False) -> None:
        app = self.upload_app if upload else self.app
        if not upload:
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

        response_started = response_done = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal response_started, response_done
            await send(message)
            response_started = True
            if is_last_body(message):
                response_done = True  # from now on the server reports "disconnect" for a finished exchange

        app_task = asyncio.ensure_future(app(scope, replay, tracked_send))
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
            if client_gone and not response_done:
                # An answer nobody reads (the server drops it), but the layers above wait for one: BentoML's
                # timeout middleware held the request, and its in-progress gauge, for its whole timeout.
                observe.note_error("client_closed")
                if not response_started:
                    await send({"type": "http.response.start", "status": observe.CLIENT_CLOSED, "headers": []})
                await send({"type": "http.response.body", "body": b""})
        finally:
            watch.cancel()
            if not app_task.done():
                app_task.cancel()
                await asyncio.gather(app_task, return_exceptions=True)  # release limits only once it stopped

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, refusing it (413) past the per-request cap, (429) past the memory budget shared by all
        requests in flight or when every upload slot is taken, and (408) when it stops arriving or trickles in
        (like Apache's mod_reqtimeout: ``body_timeout_s``, extended by one second per ``min_upload_rate`` bytes,
        at most ``request_timeout_s``). Bytes read are counted in ``inflight_body_bytes``; the caller releases
        them."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        chunks, size = [], 0
        upload: Upload | None = None
        try:
            while True:
                now = loop.time()
                until = min(now + self.limits.body_timeout_s, start + self.limits.request_timeout_s,
                            start + self.limits.body_timeout_s + size / self.limits.min_upload_rate)
                try:
                    async with asyncio.timeout(until - now):
                        message = await (receive() if upload is None else receive_unless_evicted(receive, upload))
                except TimeoutError:
                    raise BodyTimeout(self._slow_body(size, loop.time() - start)) from None
                if message["type"] == "http.disconnect":
                    raise BadRequest("client disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                self.inflight_body_bytes += len(chunk)
                if size > self.limits.max_body_bytes:
                    raise self._too_large()
                if self.inflight_body_bytes > self.limits.max_inflight_body_bytes:
                    raise Overloaded(f"server is holding {fmt_bytes(self.inflight_body_bytes)} of request bodies "
                                     "(SIGLIP_MAX_INFLIGHT_BODY_BYTES); retry shortly")
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
                if upload is None:
                    upload = self._take_upload_slot(start, loop.time())
                upload.size = size
        except BaseException:
            self.inflight_body_bytes -= size
            raise
        finally:
            if upload is not None:
                self.uploads.discard(upload)

    def _take_upload_slot(self, started: float, now: float) -> Upload:
        """A slot for a body that needs more than one read. When all are taken, the slowest upload that has run
        for EVICT_AFTER_S gives its slot up (it is answered 408): clients trickling bytes cannot hold the slots
        against uploads that arrive at a normal rate. Only when every upload is younger is the newcomer refused."""
        if len(self.uploads) >= self.limits.max_uploads:
            candidates = [u for u in self.uploads if now - u.started >= EVICT_AFTER_S]
            if not candidates:
                raise Overloaded(f"{len(self.uploads)} request bodies are still arriving (SIGLIP_MAX_UPLOADS); "
                                 "retry shortly")
            slowest = min(candidates, key=lambda u: u.rate(now))
            slowest.evicted.set()
            self.uploads.discard(slowest)
        upload = Upload(started)
        self.uploads.add(upload)
        return upload

    def _slow_body(self, size: int, elapsed: float) -> str:
        return (f"request body too slow: {fmt_bytes(size)} in {elapsed:.1f} s (at most {self.limits.body_timeout_s:g} s "
                f"between reads, SIGLIP_BODY_TIMEOUT_S, then at least {fmt_bytes(self.limits.min_upload_rate)}/s, "
                f"SIGLIP_MIN_UPLOAD_BYTES_PER_S, within SIGLIP_REQUEST_TIMEOUT_S)")


def shape_errors(send: Send, path: str) -> Send:
    """Error answers not written by this service (BentoML's and Starlette's 404, 405, 500 as plain text) get the
    service's error body, with their text as the message."""
    start: dict[str, Any] | None = None
    chunks: list[bytes] = []

    async def shaped(message: dict[str, Any]) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            content_type = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
            if not content_type.startswith(b"application/json"):
                start = message
                return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        error = ServiceError(b"".join(chunks).decode("utf-8", "replace").strip()[:1000] or "error")
        error.status = start["status"]
        body = error_body(error, path)
        headers = [(k, v) for k, v in start.get("headers", [])
                   if k.lower() not in (b"content-type", b"content-length", b"transfer-encoding")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return shaped


async def _send_error(send: Send, exc: ServiceError, close: bool = False, path: str = "") -> None:
    observe.note_error(exc.reason)
    body = error_body(exc, path)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""Observability: a request id on every response, one structured log line per request, and the ``siglip_*`` metrics.

``Observer`` is the outermost of the gateway's own ASGI middlewares. For each request it opens a ``RequestRecord`` in
a context variable; the layers below fill it in as they learn things (the engine: the mode it decided and how many
images and texts the request carries; the HTTP layer: why it refused), and once the answer is sent the observer
writes the log line and updates the metrics from the record alone. Nothing here sees image data or tokens.

Metrics (Prometheus, on ``/metrics`` beside BentoML's own; BentoML shares one multiprocess registry between the
gateway and model processes, so the model's batch sizes appear there too):

    siglip_requests_in_flight                              API requests being served (the autoscaling metric)
    siglip_requests_total{route, mode, status}             every answered request but health and metrics probes
    siglip_request_duration_seconds{route, mode, status}   the same, as a latency histogram
    siglip_images_total{mode}, siglip_texts_total{mode}    items in successful requests
    siglip_errors_total{status, reason}                    every 4xx/5xx by reason (429s and 504s included)
    siglip_url_fetch_failures_total{reason}                image URLs that could not be fetched, by kind
    siglip_text_cache_hits_total, siglip_text_cache_misses_total
    siglip_model_batch_size{encoder}                       the batches the model actually ran (model service)
    siglip_model_info{model, device, dtype, backend, jpeg_decode}   1 once loaded: which backend and decode path run
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

logger = logging.getLogger("siglip.access")

REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
# Probes and scrapes arrive every few seconds: neither logged nor counted (BentoML skips them the same way).
QUIET_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, float("inf"))

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    mode: str | None = None
    images: int = 0
    texts: int = 0
    status: int | None = None
    reason: str | None = None
    fetch_failures: tuple[str, ...] = ()  # kinds of the image URLs that could not be fetched

    def line(self, duration_s: float) -> bytes:
        return orjson.dumps({"request_id": self.request_id, "method": self.method, "path": self.path,
                             "mode": self.mode, "images": self.images, "texts": self.texts, "status": self.status,
                             "reason": self.reason, "duration_ms": round(duration_s * 1000, 2)})


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("siglip_request", default=None)


def note_request(mode: str, images: int, texts: int) -> None:
    """Called once a request's mode is decided (``POST /`` detects it): what it asks for, for the log and metrics."""
    record = _current.get()
    if record is not None:
        record.mode, record.images, record.texts = mode, images, texts


def note_error(reason: str) -> None:
    """Why the request is being refused (the ServiceError's reason), for ``siglip_errors_total``."""
    record = _current.get()
    if record is not None:
        record.reason = reason


def note_fetch_failure(kind: str) -> None:
    record = _current.get()
    if record is not None:
        record.fetch_failures += (kind,)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a sane token (so a trace crosses services), else a fresh one."""
    for key, value in headers:
        if key == REQUEST_ID_HEADER and _CLIENT_ID.fullmatch(value):
            return value.decode()
    return new_request_id()


def new_request_id() -> str:
    return uuid.uuid4().hex


class Observer:
    """ASGI middleware: request id in and out, then one log line and the request metrics per answered request."""

    def __init__(self, app: Any, routes: frozenset[str]):
        self.app = app
        self.routes = routes  # label values for paths: anything else is "other", so scanners cannot grow the series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope.get("headers") or [])
        record = RequestRecord(rid, scope.get("method", ""), scope.get("path", ""))
        token = _current.set(record)
        start = time.perf_counter()

        async def tag(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid.encode())]}
            await send(message)

        counted = record.method == "POST" and record.path in self.routes
        if counted:
            metrics().in_flight.inc()
        try:
            await self.app(scope, receive, tag)
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            if counted:
                metrics().in_flight.dec()
            _current.reset(token)
            if record.path not in QUIET_PATHS:
                self.finish(record, time.perf_counter() - start)

    def finish(self, record: RequestRecord, duration_s: float) -> None:
        if record.status is None:  # cancelled before any answer: the client disconnected
            record.status, record.reason = CLIENT_CLOSED, record.reason or "client_closed"
        try:
            logger.info("%s", record.line(duration_s).decode())
            metrics().request(record, self.routes, duration_s)
        except Exception:  # observability must never turn an answered request into an error
            logger.exception("recording request %s failed", record.request_id)


class Metrics:
    """The service's Prometheus series, created on first use in each process (after BentoML has set up its
    multiprocess registry, which importing ``bentoml.metrics`` earlier would bypass)."""

    def __init__(self) -> None:
        from bentoml.metrics import Counter, Gauge, Histogram

        labels = ["route", "mode", "status"]
        self.requests = Counter(name="siglip_requests", documentation="Requests answered, by route, mode and "
                                "status (the mode POST / detected)", labelnames=labels)
        self.latency = Histogram(name="siglip_request_duration_seconds", documentation="Request latency",
                                 labelnames=labels, buckets=LATENCY_BUCKETS)
        self.images = Counter(name="siglip_images", documentation="Images in successful requests",
                              labelnames=["mode"])
        self.texts = Counter(name="siglip_texts", documentation="Texts and candidate labels in successful requests",
                             labelnames=["mode"])
        self.errors = Counter(name="siglip_errors", documentation="Error answers by status and reason",
                              labelnames=["status", "reason"])
        self.fetch_failures = Counter(name="siglip_url_fetch_failures", documentation="Image URLs that could not "
                                      "be fetched, by reason", labelnames=["reason"])
        self.cache_hits = Counter(name="siglip_text_cache_hits", documentation="Text embeddings served from the cache")
        self.cache_misses = Counter(name="siglip_text_cache_misses",
                                    documentation="Text embeddings computed by the model")
        self.batch_size = Histogram(name="siglip_model_batch_size", documentation="Items per model call, by encoder",
                                    labelnames=["encoder"], buckets=BATCH_BUCKETS)
        # livesum: the sum over the gateway processes alive now (a killed worker's count goes with it; see
        # siglip.server.patches). What the HPA, KEDA and BentoCloud scale on.
        self.in_flight = Gauge(name="siglip_requests_in_flight", documentation="API requests received and not "
                               "yet answered", multiprocess_mode="livesum")
        self.model_info = Gauge(name="siglip_model_info", documentation="1 for the loaded checkpoint: device, dtype, "
                                "backend and JPEG decode path", multiprocess_mode="max",
                                labelnames=["model", "device", "dtype", "backend", "jpeg_decode"])

    def request(self, record: RequestRecord, routes: frozenset[str], duration_s: float) -> None:
        route = record.path if record.path in routes else "other"
        mode, status = record.mode or "none", str(record.status)
        self.requests.labels(route=route, mode=mode, status=status).inc()
        self.latency.labels(route=route, mode=mode, status=status).observe(duration_s)
        if record.status == 200:
            if record.images:
                self.images.labels(mode=mode).inc(record.images)
            if record.texts:
                self.texts.labels(mode=mode).inc(record.texts)
        elif record.status is not None and record.status >= 400:
            self.errors.labels(status=status, reason=record.reason or _default_reason(record.status)).inc()
        for kind in record.fetch_failures:
            self.fetch_failures.labels(reason=kind).inc()

    def text_cache(self, hits: int, misses: int) -> None:
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)

    def model_batch(self, encoder: str, size: int) -> None:
        self.batch_size.labels(encoder=encoder).observe(size)

    def loaded(self, info: Mapping[str, Any]) -> None:
        self.model_info.labels(model=info["model"], device=info["device"], dtype=info["dtype"],
                               backend=info.get("backend") or "torch",
                               jpeg_decode=info.get("jpeg_decode") or "gateway").set(1)


@functools.cache
def metrics() -> Metrics:
    return Metrics()


def _default_reason(status: int) -> str:
    """Answers our code did not word (BentoML's own validation, batching or timeout errors)."""
    return {400: "invalid_input", 404: "not_found", 405: "method_not_allowed", 429: "overloaded",
            503: "not_ready", 504: "deadline"}.get(status, "other")

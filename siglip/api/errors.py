"""Errors a request can end in, each carrying the HTTP status it maps to.

    ServiceError                 any failure answered as {"error": message}
    ├── BadRequest          400  the client sent something we cannot use (names the offending item)
    │   └── FetchError      400  an image URL could not be fetched (names the URL and the reason)
    ├── Unauthorized        401  missing or wrong bearer token
    ├── BodyTimeout         408  the request body did not arrive in time
    ├── PayloadTooLarge     413  body over SIGLIP_MAX_BODY_BYTES
    ├── Overloaded          429  too many requests in flight (with Retry-After)
    ├── NotReady            503  model still loading, or failed to load (with the reason)
    └── DeadlineExceeded    504  the request ran past SIGLIP_REQUEST_TIMEOUT_S

Lower layers raise these; only the HTTP layer (``siglip.server.http``) turns them into responses. Each carries a short
``reason`` (a class default, or a more precise one given when raised) that labels the ``siglip_errors_total`` and
``siglip_url_fetch_failures_total`` metrics; the message is for people, the reason for dashboards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pydantic import ValidationError


class ServiceError(Exception):
    status = 500
    reason = "internal"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class BadRequest(ServiceError):
    status = 400
    reason = "invalid_input"


class FetchError(BadRequest):
    reason = "url_fetch"

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind  # what went wrong, for siglip_url_fetch_failures_total: timeout, http_status, ...


class Unauthorized(ServiceError):
    status = 401
    reason = "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class BodyTimeout(ServiceError):
    status = 408
    reason = "body_timeout"


class PayloadTooLarge(ServiceError):
    status = 413
    reason = "too_large"


class Overloaded(ServiceError):
    status = 429
    reason = "overloaded"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class NotReady(ServiceError):
    status = 503
    reason = "not_ready"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "5"}


# The model service's 503 for a call that reached a worker whose model is not loaded (yet): the gateway tells it
# from the batcher's own 503 (queue full) by this text.
MODEL_LOADING = "model not loaded"


class DeadlineExceeded(ServiceError):
    status = 504
    reason = "deadline"


def validation_message(exc: ValidationError, where: str = "", skip: int = 0) -> tuple[str, str | None]:
    """The first error of a pydantic validation in the API's words, ``"<where>.<field path>: <what is wrong>"``
    (the path's first ``skip`` parts left out: a tagged union's tag), and the top-level field it is about."""
    first = exc.errors()[0]
    path = [str(part) for part in first["loc"][skip:]]
    location = ".".join([where, *path] if where else path)
    return (f"{location}: {first['msg']}" if location else first["msg"]), (path[0] if path else None)

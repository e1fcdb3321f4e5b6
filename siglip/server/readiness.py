"""``GET /readyz`` that says why: BentoML answers 503 "Runners are not ready." whatever the cause; this middleware
keeps its status and replaces the body with one line naming the cause, in the service's error shape
({"error": ...}, from ``siglip.server.http.shape_errors``): the model failed to load and why, still
loading, or not answering; asked of the model service's ``info`` within ``CAUSE_TIMEOUT_S``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

CAUSE_TIMEOUT_S = 1.0  # like the dependency probe (siglip.server.patches.READY_PROBE_S): a frozen model never hangs it


async def not_ready_cause(status: Callable[[], Awaitable[dict[str, Any]]]) -> str:
    """One line for a 503 /readyz from the model service's status (``ModelClient.status``)."""
    try:
        async with asyncio.timeout(CAUSE_TIMEOUT_S):
            answer = await status()
    except Exception:  # noqa: BLE001 - any failure to answer means the same thing here
        return "not ready: the model service is not answering (starting, restarting or stalled)"
    if answer.get("error"):
        return f"not ready: {answer['error']}"
    if not answer.get("ready"):
        return "not ready: the model is loading"
    return ("not ready: the model is loaded, but the model service's readiness check did not pass (warming up "
            "its batchers, or too busy to answer it in time)")


class ReadinessCause:
    """ASGI middleware: a 503 ``/readyz`` gets ``not_ready_cause`` as its body; everything else passes."""

    def __init__(self, app: Any, status: Callable[[], Callable[[], Awaitable[dict[str, Any]]]]):
        self.app = app
        self.status = status  # -> the current service's ModelClient.status (looked up per request)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/readyz":
            return await self.app(scope, receive, send)
        started: dict[str, Any] = {}

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
                if message["status"] != 503:
                    await send(message)
            elif started.get("status") != 503:
                await send(message)

        await self.app(scope, receive, capture)
        if started.get("status") == 503:
            body = (await not_ready_cause(self.status()) + "\n").encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-cache")]})
            await send({"type": "http.response.body", "body": body})

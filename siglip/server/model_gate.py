"""Model service: calls that arrive before the model has loaded are answered 503 at the door.

A model worker that BentoML restarts (after a crash or the OOM killer) accepts connections at once, while its model
is still loading. Its calls must fail fast with a 503 the gateway recognises (``MODEL_LOADING``: it answers its
clients 503 + Retry-After), and they must not reach BentoML's adaptive batcher, which would fit its timing model
on those instant failures and then cancel real calls as "overloaded".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from siglip.api.errors import MODEL_LOADING


class ModelGate:
    """ASGI middleware for the model service. ``state()`` -> (loaded, load error or None); set by the service with
    ``ModelGate.watch`` once its encoder exists (the middleware is built by BentoML, before the service)."""

    state: Callable[[], tuple[bool, str | None]] = staticmethod(lambda: (False, None))

    def __init__(self, app: Any, paths: frozenset[str]):
        self.app = app
        self.paths = paths

    @classmethod
    def watch(cls, state: Callable[[], tuple[bool, str | None]]) -> None:
        cls.state = staticmethod(state)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths:
            loaded, error = ModelGate.state()
            if not loaded:
                body = orjson.dumps({"error": f"{MODEL_LOADING}: {error or 'still loading'}"})
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def model_loading_detail(body: str) -> str:
    """The gateway's reading of that 503's body: the model's own words after "model not loaded:" (its load error,
    or "still loading")."""
    try:
        text = orjson.loads(body).get("error", "")
    except (orjson.JSONDecodeError, AttributeError):
        text = body
    return str(text).partition(MODEL_LOADING)[2].lstrip(": ").strip() or "still loading"

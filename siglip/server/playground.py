"""The browser playground: one static page (plus its script and style sheet) that calls this service's own API.

The files are read once at import and answered as they are: no templating, no build step, nothing from another
origin. Every asset is an exact path (part of ``siglip.server.http.OPEN_PATHS``, so the page loads when auth is
on: it carries no data, and the page sends the token itself, only to this origin).
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STATIC = Path(__file__).parent / "static"

# path -> (file in siglip/server/static, media type). The page refers to its assets relative to /playground, so it
# keeps working behind a proxy that serves the API under a path prefix.
PAGE = "/playground"
FILES = {
    PAGE: ("playground.html", "text/html; charset=utf-8"),
    f"{PAGE}/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    f"{PAGE}/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PATHS = frozenset(FILES)

# The browser enforces "this origin only": a pasted image URL is sent to the API, never loaded by the page.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _route(path: str, filename: str, media_type: str) -> Route:
    body = (STATIC / filename).read_bytes()

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return Route(path, serve, methods=["GET", "HEAD"])


# Mounted at "/" by the gateway: BentoML's PassiveMount only claims a request when one of these exact routes
# matches it, so the @bentoml.api routes, the docs UI and /docs.json are untouched.
app = Starlette(routes=[_route(path, *spec) for path, spec in FILES.items()])

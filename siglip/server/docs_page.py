"""The interactive API docs at ``GET /``: BentoML's Swagger UI page, without the parts that call other hosts.

BentoML 1.4.40's index page (``_bentoml_impl/server/main-openapi.html``) loads Google Tag Manager on every visit and
has no setting to turn it off, and Swagger UI's default validator badge sends the spec's URL to swagger.io. This page
uses the same Swagger UI files BentoML bundles (served by BentoML under ``/static_content/``) and nothing else, and
its Content-Security-Policy keeps the browser from reaching any other origin, so the docs work air-gapped and tell
nobody who looked at them.
"""

from __future__ import annotations

from typing import Any

DOCS_HTML = b"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>SigLIP 2 API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script>
      window.onload = function () {
        window.ui = SwaggerUIBundle({
          url: "./docs.json",
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null,
          presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
          plugins: [SwaggerUIBundle.plugins.DownloadUrl],
          layout: "StandaloneLayout",
        });
      };
    </script>
  </body>
</html>
"""

CSP = (b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'")


class DocsPage:
    """ASGI middleware answering ``GET /`` with ``DOCS_HTML``; everything else goes to BentoML."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(DOCS_HTML)).encode()),
                   (b"content-security-policy", CSP), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else DOCS_HTML})

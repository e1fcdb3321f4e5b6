"""The interactive API docs at ``GET /``: BentoML's Swagger UI page, without the parts that call other hosts.

BentoML 1.4.40's index page (``_bentoml_impl/server/main-openapi.html``) loads Google Tag Manager on every visit and
has no setting to turn it off, and Swagger UI's default validator badge sends the spec's URL to swagger.io. This page
uses the same Swagger UI files BentoML bundles (served by BentoML under ``/static_content/``) and nothing else, and
its Content-Security-Policy keeps the browser from reaching any other origin, so the docs work air-gapped and tell
nobody who looked at them.

``/docs.json`` (BentoML's OpenAPI document, which knows only the ``@bentoml.api`` routes and their JSON bodies) gets
this project's name and version, the routes the gateway serves beside them: the OpenAI-compatible ``/v1`` API (its
schemas from the same pydantic models the handlers validate with), ``/info`` and ``/playground``, and the other
bodies the JSON routes take: photos as a raw ``image/*`` body or a multipart form (``siglip.server.uploads``).
"""

from __future__ import annotations

import json
from typing import Any

PROJECT = "siglip2-serve"
DESCRIPTION = ("SigLIP / SigLIP 2 vision-language models: zero-shot classification, image and text embeddings and "
               "image-text similarity (JSON, raw or multipart image uploads), an OpenAI-compatible `/v1/embeddings`, "
               "`/info` and a `/playground`. Probes: `/livez`, `/readyz` (its 503 body says why); metrics: "
               "`/metrics`.")


def version() -> str:
    from siglip import __version__

    return __version__

DOCS_HTML = b"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>siglip2-serve API</title>
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


def _json(content: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": content}}


def extra_paths(openai_prefix: str, info_path: str, playground_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(OpenAPI paths, component schemas) of the gateway's routes that BentoML does not describe."""
    from siglip.api.openai_api import EmbeddingsRequest, ModelCard, ModelList

    schemas: dict[str, Any] = {}

    def ref(model: Any) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}

    error = _json({"schema": {"type": "object"}}, "OpenAI's error object: {\"error\": {message, type, param, code}}")
    v1 = openai_prefix.rstrip("/")
    paths = {
        f"{v1}/embeddings": {"post": {
            "tags": ["OpenAI-compatible"], "summary": "Embeddings of texts and images (OpenAI's embeddings API)",
            "requestBody": {"required": True, "content": {"application/json": ref(EmbeddingsRequest)}},
            "responses": {"200": _json({"schema": {"type": "object"}}, "{object: list, data: [{object, index, "
                                       "embedding}], model, usage}"), "400": error, "404": error}}},
        f"{v1}/models": {"get": {"tags": ["OpenAI-compatible"], "summary": "The served model",
                                 "responses": {"200": _json(ref(ModelList), "The model list")}}},
        f"{v1}/models/{{model}}": {"get": {
            "tags": ["OpenAI-compatible"], "summary": "One model",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(ref(ModelCard), "The model"), "404": error}}},
        info_path: {"get": {"tags": ["Service"], "summary": "The checkpoint, its family and shapes, backend, device "
                                                            "and request limits (open without a token)",
                            "responses": {"200": _json({"schema": {"type": "object"}}, "What is served")}}},
        playground_path: {"get": {"tags": ["Service"], "summary": "The playground: try every mode in a browser",
                                  "responses": {"200": {"description": "An HTML page",
                                                        "content": {"text/html": {}}}}}},
    }
    return paths, schemas


def upload_bodies() -> dict[str, Any]:
    """The request bodies ``siglip.server.uploads`` reads, as OpenAPI content entries."""
    from siglip.server.uploads import IMAGE_FIELDS, PARAMETER_FIELDS, TEXT_FIELDS

    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    texts = {"type": "array", "items": {"type": "string"}}
    (image, images), (text, texts_field) = IMAGE_FIELDS, TEXT_FIELDS
    properties = {
        image: {**files, "description": "Image files: one is one input, several a list"},
        images: {**files, "description": "Image files, always a list of inputs (even of one)"},
        text: {**texts, "description": "Texts: one is one input, several a list"},
        texts_field: {**texts, "description": "Texts, always a list"},
        "parameters": {"type": "string", "description": "The parameters as one JSON object"},
        **{name: {"type": "string", "description": "This parameter: a JSON value or plain text"}
           for name in sorted(PARAMETER_FIELDS)},
    }
    return {
        "multipart/form-data": {"schema": {"type": "object", "properties": properties}},
        "image/*": {"schema": {"type": "string", "format": "binary",
                               "description": "One image file; parameters in the query string"}},
    }


def complete_openapi(document: bytes, extra: tuple[dict[str, Any], dict[str, Any]],
                     upload_routes: frozenset[str], uploads: dict[str, Any]) -> bytes:
    """BentoML's document with this project's name and version, ``extra`` (paths, schemas) and, on each of
    ``upload_routes``, the ``uploads`` bodies (``upload_bodies()``) beside the JSON one."""
    spec = json.loads(document)
    # BentoML's description is its own banner: badge images from other hosts and links to its community.
    spec.setdefault("info", {}).update(title=f"{PROJECT} API", version=version(), description=DESCRIPTION)
    paths, schemas = extra
    for route in upload_routes:
        body = spec.get("paths", {}).get(route, {}).get("post", {}).get("requestBody")
        if body is not None:
            body.setdefault("content", {}).update(uploads)
    spec.setdefault("paths", {}).update(paths)
    spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
    return json.dumps(spec).encode()


class DocsPage:
    """ASGI middleware answering ``GET /`` with ``DOCS_HTML`` and completing ``GET /docs.json``; everything else goes
    to BentoML."""

    def __init__(self, app: Any, openai_prefix: str, info_path: str, playground_path: str,
                 upload_routes: frozenset[str] = frozenset()):
        self.app = app
        self.extra = extra_paths(openai_prefix, info_path, playground_path)
        self.upload_routes = upload_routes
        self.uploads = upload_bodies()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/docs.json" and scope.get("method") == "GET":
            return await self._openapi(scope, receive, send)
        if scope["type"] != "http" or scope.get("path") != "/" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(DOCS_HTML)).encode()),
                   (b"content-security-policy", CSP), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else DOCS_HTML})

    async def _openapi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        if start.get("status") != 200:
            await send(start)
            await send({"type": "http.response.body", "body": bytes(body)})
            return
        document = complete_openapi(bytes(body), self.extra, self.upload_routes, self.uploads)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(document)).encode())]})
        await send({"type": "http.response.body", "body": document})

"""Images sent as files: a raw body (``curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'``) or a multipart
form (``curl -F image=@a.jpg -F candidate_labels='["tile","wood"]'``), on the same routes as the JSON API.

They become the JSON body's ``inputs`` and ``parameters``, the images as ``ImageBytes`` (no base64 anywhere), and
take the same request path (``Engine.run``): same modes, limits, errors and metrics. ``RequestGuard`` reads the
body under the same size, rate and memory limits before this app sees it.

Form fields: ``image`` / ``images`` (files, repeatable), ``text`` / ``texts`` (repeatable), ``parameters`` (a JSON
object), and any parameter by name (``candidate_labels``, ``top_k``, ``function_to_apply``, ...), a JSON value or
plain text; ``candidate_labels`` may also be repeated. The query string may carry parameters the same
way (a raw body's only place for them).

The plural fields are a batch: files under ``images`` become a list of inputs even when there is one, so the
answer has the batch shape (``/zero_shot`` answers a list of rankings for a list of one image), as a JSON list of
one would. Under ``image`` one file is one input and several are a list; ``texts`` and ``text`` likewise. A form
uses one of the two names for its files (and one for its texts), not both: a 400 naming the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from siglip.api.errors import BadRequest
from siglip.api.requests import ImageBytes, Limits
from siglip.api.schemas import Parameters

IMAGE_FIELDS, TEXT_FIELDS = ("image", "images"), ("text", "texts")
PARAMETER_FIELDS = frozenset(Parameters.model_fields)
MAX_FIELD_BYTES = 1024 * 1024  # a text field of a form (Starlette's default part size)


def is_upload(content_type: str) -> bool:
    """An image body or a multipart form. Not application/octet-stream: clients (aiohttp's data=bytes) send JSON
    under it."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith("image/") or kind == "multipart/form-data"


def _value(name: str, raw: str) -> Any:
    """A parameter given as form or query text: JSON when it parses (numbers, lists), else the text itself."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _parameters(fields: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    from siglip.server.http import check_depth

    parameters: dict[str, Any] = {}
    labels: list[Any] = []
    for name, raw in fields:
        if not isinstance(raw, str):
            raise BadRequest(f"{where} {name!r} is a file; only {' and '.join(IMAGE_FIELDS)} take files")
        if name == "parameters":
            value = _value(name, raw)
            if not isinstance(value, dict):
                raise BadRequest(f"{where} 'parameters' must be a JSON object")
            parameters.update(value)
        elif name == "candidate_labels":
            value = _value(name, raw)
            labels.extend(value if isinstance(value, list) else [value if isinstance(value, str) else raw])
        elif name in PARAMETER_FIELDS:
            parameters[name] = _value(name, raw)
        else:
            known = ", ".join((*IMAGE_FIELDS, *TEXT_FIELDS, "parameters", *sorted(PARAMETER_FIELDS)))
            raise BadRequest(f"unknown {where} {name!r} (known: {known})")
    if labels:
        parameters["candidate_labels"] = labels
    check_depth(parameters)  # as deep as a JSON body may be
    return parameters


def _batch(found: Mapping[str, list[Any]], single: str, plural: str) -> tuple[list[Any], bool]:
    """The items a form sent under ``single`` or ``plural``, and whether they are a batch (a list of inputs):
    always under the plural, under the singular when repeated."""
    if single in found and plural in found:
        raise BadRequest(f"form fields {single!r} and {plural!r} both given; use one name: {plural!r} is a batch "
                         f"(a list, even of one), {single!r} one input (a list when repeated)")
    if plural in found:
        return found[plural], True
    items = found.get(single, [])
    return items, len(items) > 1


def _inputs(found: Mapping[str, list[Any]]) -> Any:
    """The JSON body's ``inputs`` for the images and texts of a form, by the field names they came under."""
    (images, images_batch), (texts, texts_batch) = _batch(found, *IMAGE_FIELDS), _batch(found, *TEXT_FIELDS)
    if images and texts:
        return {"images": images, "texts": texts}
    if images:
        return images if images_batch else images[0]
    if texts:
        return texts if texts_batch else texts[0]
    raise BadRequest(f"no image or text in the form: send files as {IMAGE_FIELDS[0]}=@photo.jpg and texts as "
                     f"{TEXT_FIELDS[0]}=...")


async def upload_request(request: Request, limits: Limits) -> tuple[Any, dict[str, Any]]:
    """(inputs, parameters) of a raw or multipart upload, in the JSON body's shape."""
    content_type = request.headers.get("content-type", "")
    query = list(request.query_params.multi_items())
    if not content_type.lower().startswith("multipart/form-data"):
        body = await request.body()
        return ImageBytes(body), _parameters(query, "query parameter")
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        # One file over the limit still parses, so the request path refuses it with its own message.
        form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_texts + 64,
                                  max_part_size=MAX_FIELD_BYTES)
    except (MultiPartException, HTTPException) as exc:
        raise BadRequest(_form_error(str(getattr(exc, "detail", None) or exc), limits)) from None
    found: dict[str, list[Any]] = {}  # image and text fields by name: which name was used decides the shape
    rest: list[tuple[str, Any]] = []
    for name, value in form.multi_items():
        if name in IMAGE_FIELDS:
            if not isinstance(value, UploadFile):
                raise BadRequest(f"form field {name!r} must be a file (curl -F {name}=@photo.jpg), not text")
            found.setdefault(name, []).append(ImageBytes(await value.read(), value.filename))
        elif name in TEXT_FIELDS:
            if not isinstance(value, str):
                raise BadRequest(f"form field {name!r} must be text, not a file")
            found.setdefault(name, []).append(value)
        else:
            rest.append((name, value))
    await form.close()
    return _inputs(found), _parameters(query + rest, "form field")


def _form_error(message: str, limits: Limits) -> str:
    """Starlette's refusal of a form, in the JSON API's terms."""
    if "Too many files" in message:
        return (f"more than {limits.max_images} images in one request, over the limit of {limits.max_images} "
                "(SIGLIP_MAX_IMAGES_PER_REQUEST)")
    if "Too many fields" in message:
        return (f"more than {limits.max_texts} texts in one request, over the limit of {limits.max_texts} "
                "(SIGLIP_MAX_TEXTS_PER_REQUEST)")
    if "Part exceeded maximum size" in message:
        return f"a text field of the form is over {MAX_FIELD_BYTES // 1024} KB"
    return f"multipart form could not be read: {message}"


def upload_app(routes: Mapping[str, str | None], run: Callable[[Any, Any, str | None], Any],
               limits: Callable[[], Limits]) -> Any:
    """An ASGI app answering uploads on ``routes`` (path -> the endpoint's mode, None for ``/``); ``run(inputs,
    parameters, mode)`` is the engine's request path, returning the response."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from siglip.server.http import answer

    async def handle(request: Request):
        mode = routes[request.url.path]

        async def call() -> bytes:
            inputs, parameters = await upload_request(request, limits())
            return await run(inputs, parameters, mode)

        return await answer(call, request.url.path)

    return Starlette(routes=[Route(path, handle, methods=["POST"]) for path in routes])

"""Request parsing and mode detection: the only place a request's mode is decided.

``parse_request(inputs, parameters, endpoint_mode, limits)`` turns the JSON body into a ``ParsedRequest`` or
raises ``BadRequest`` naming the offending item. Auto-detection (when neither the endpoint nor
``parameters.mode`` names a mode), in this order:

1. ``inputs`` is an object with ``image``/``images`` and ``text``/``texts``   -> similarity
2. ``parameters.candidate_labels`` is present                               -> zero_shot
3. ``inputs`` is text (a string, or a non-empty list of strings, each under 500 characters, not starting
   with http:// or https://, and not a base64/data-URI image)               -> text_embedding
4. otherwise                                                                 -> image_embedding
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from siglip.api.errors import BadRequest, validation_message
from siglip.api.images import is_http_url, looks_like_image_string
from siglip.api.schemas import MODES, Parameters
from siglip.settings import Settings

TEXT_DETECTION_MAX_CHARS = 500
MISSING_LABELS = "candidate_labels is required for zero-shot classification"


@dataclass(frozen=True)
class Limits:
    """Per-request counts and sizes; from ``Settings``, their one home."""

    max_images: int
    max_texts: int
    max_text_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_images_per_request, settings.max_texts_per_request, settings.max_text_chars)


@dataclass(frozen=True)
class ImageBytes:
    """An image sent as bytes (a raw or multipart upload), not as a string: no base64 anywhere."""

    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class ImageInput:
    where: str  # how error messages name it, e.g. "inputs[2]" or "inputs.image"
    value: str | ImageBytes


@dataclass(frozen=True)
class ParsedRequest:
    mode: str
    params: Parameters
    images: tuple[ImageInput, ...] = ()
    texts: tuple[str, ...] = ()  # model inputs: the texts, or the templated labels for zero_shot
    labels: tuple[str, ...] = ()  # zero_shot: the labels as the client wrote them
    batched: bool = False  # zero_shot: inputs was a list, so answer one list per image


def unknown_mode(mode: Any) -> BadRequest:
    return BadRequest(f"Unknown mode: {mode}. Supported: {', '.join(MODES)}")


def is_text_string(value: str) -> bool:
    return (len(value) < TEXT_DETECTION_MAX_CHARS and not is_http_url(value)
            and not looks_like_image_string(value))


def is_text_input(inputs: Any) -> bool:
    if isinstance(inputs, str):
        return is_text_string(inputs)
    if isinstance(inputs, list) and inputs:
        return all(isinstance(x, str) and is_text_string(x) for x in inputs)
    return False


def detect_mode(inputs: Any, parameters: dict[str, Any]) -> str:
    if isinstance(inputs, dict) and inputs.keys() & {"image", "images"} and inputs.keys() & {"text", "texts"}:
        return "similarity"
    if "candidate_labels" in parameters:
        return "zero_shot"
    if is_text_input(inputs):
        return "text_embedding"
    return "image_embedding"


def parse_request(inputs: Any, parameters: Any, endpoint_mode: str | None = None,
                  limits: Limits | None = None) -> ParsedRequest:
    """``limits``: the engine's; the settings' defaults when not given."""
    limits = limits or Limits.from_settings(Settings())
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"parameters must be a JSON object, not {json_type(parameters)}")

    requested = parameters.get("mode")
    if requested is not None and requested not in MODES:
        raise unknown_mode(requested)
    if endpoint_mode is not None and requested is not None and requested != endpoint_mode:
        raise BadRequest(f"parameters.mode is {requested!r} but this endpoint is /{endpoint_mode}; "
                         f"send it to /{requested} or to /")
    if isinstance(inputs, list) and len(inputs) > max(limits.max_images, limits.max_texts):
        # Before detection, which looks at every item: a huge list must not cost time on the event loop.
        raise BadRequest(f"{len(inputs)} inputs in one request, over the limits ({limits.max_images} images, "
                         f"SIGLIP_MAX_IMAGES_PER_REQUEST; {limits.max_texts} texts, SIGLIP_MAX_TEXTS_PER_REQUEST)")
    mode = endpoint_mode or requested or detect_mode(inputs, parameters)

    if mode == "zero_shot":
        _check_labels(parameters.get("candidate_labels"), limits)
    params = _validate_parameters(parameters)

    if mode == "image_embedding":
        images, _ = image_inputs(inputs, "inputs", limits)
        return ParsedRequest(mode, params, images=images)
    if mode == "text_embedding":
        return ParsedRequest(mode, params, texts=text_inputs(inputs, "inputs", limits))
    if mode == "zero_shot":
        images, batched = image_inputs(inputs, "inputs", limits)
        labels = tuple(params.candidate_labels or ())
        texts = _apply_template(params.hypothesis_template, labels, limits)
        return ParsedRequest(mode, params, images=images, texts=texts, labels=labels, batched=batched)
    return _similarity(inputs, params, limits)


def _similarity(inputs: Any, params: Parameters, limits: Limits) -> ParsedRequest:
    if not isinstance(inputs, dict):
        raise BadRequest('similarity needs inputs to be an object with "image" or "images" and "text" or "texts", '
                         f"not {json_type(inputs)}")
    image_key = _one_of(inputs, "image", "images")
    text_key = _one_of(inputs, "text", "texts")
    images, _ = image_inputs(inputs[image_key], f"inputs.{image_key}", limits)
    texts = text_inputs(inputs[text_key], f"inputs.{text_key}", limits)
    return ParsedRequest("similarity", params, images=images, texts=texts)


def _one_of(inputs: dict, single: str, plural: str) -> str:
    present = [k for k in (single, plural) if k in inputs]
    if not present:
        raise BadRequest(f"similarity needs inputs.{single} or inputs.{plural}")
    if len(present) == 2:
        raise BadRequest(f"send either inputs.{single} or inputs.{plural}, not both")
    return present[0]


def _check_labels(labels: Any, limits: Limits) -> None:
    if labels is None:
        raise BadRequest(MISSING_LABELS)
    if not isinstance(labels, list):
        raise BadRequest(f"candidate_labels must be a list of strings, not {json_type(labels)}")
    if not labels:
        raise BadRequest("candidate_labels must not be empty")
    if len(labels) > limits.max_texts:
        raise BadRequest(f"{len(labels)} candidate_labels, over the limit of {limits.max_texts} "
                         "(SIGLIP_MAX_TEXTS_PER_REQUEST)")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise BadRequest(f"candidate_labels[{i}] must be a string, not {json_type(label)}")
        if len(label) > limits.max_text_chars:
            raise BadRequest(f"candidate_labels[{i}] is {len(label)} characters, over the limit of "
                             f"{limits.max_text_chars} (SIGLIP_MAX_TEXT_CHARS)")


def _validate_parameters(parameters: dict[str, Any]) -> Parameters:
    try:
        return Parameters.model_validate(parameters)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc, "parameters")[0]) from None


def _apply_template(template: str, labels: tuple[str, ...], limits: Limits) -> tuple[str, ...]:
    if len(template) > limits.max_text_chars:
        raise BadRequest(f"hypothesis_template is {len(template)} characters, over the limit of "
                         f"{limits.max_text_chars} (SIGLIP_MAX_TEXT_CHARS)")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise BadRequest(f"hypothesis_template could not be applied: ValueError: {exc}") from None
    # Exactly one plain {} (or {0}) field: attribute/index lookups, conversions and format specs run on the label
    # (TypeError/AttributeError, or a "{:>999999999}" padding that allocates gigabytes), a template without a
    # field (e.g. "{{}}") would silently drop the label, and "{}{}" has no second argument to take.
    if len(fields) != 1 or any(name not in ("", "0") or spec or conv for name, spec, conv in fields):
        raise BadRequest(f"hypothesis_template must contain exactly one {{}} where the label goes, and no other "
                         f"{{...}} fields (write {{{{ and }}}} for literal braces); {template!r} has {len(fields)} fields")
    try:
        return tuple(template.format(label) for label in labels)
    except (IndexError, KeyError, ValueError) as exc:
        raise BadRequest(f"hypothesis_template could not be applied: {type(exc).__name__}: {exc}") from None


def _items(value: Any, name: str, kind: str, limit: int, setting: str) -> tuple[list[tuple[str, Any]], bool]:
    """A string or a non-empty list of strings as (where, value) pairs, and whether it was a list."""
    if isinstance(value, (str, ImageBytes)):
        items, batched = [(name, value)], False
    elif isinstance(value, list):
        if not value:
            raise BadRequest(f"{name} must not be an empty list")
        if len(value) > limit:
            raise BadRequest(f"{len(value)} {kind}s in one request, over the limit of {limit} ({setting})")
        items, batched = [(f"{name}[{i}]", v) for i, v in enumerate(value)], True
    else:
        where = "" if name == "inputs" else f" ({name})"  # top level: the spec's exact text
        raise BadRequest(f"Unsupported {kind} input type: {type(value)}{where}")
    for where, v in items:
        if isinstance(v, ImageBytes) and kind != "image":
            raise BadRequest(f"{where}: an image file was sent where {kind} is expected")
        if not isinstance(v, str) and not isinstance(v, ImageBytes):
            raise BadRequest(f"Unsupported {kind} input type: {type(v)} ({where})")
    return items, batched


def image_inputs(value: Any, name: str, limits: Limits) -> tuple[tuple[ImageInput, ...], bool]:
    """``value`` (a string or a list of them) as images named for error messages from ``name``; and whether it
    was a list. The one place image inputs are checked (siglip.api.openai_api uses it too)."""
    items, batched = _items(value, name, "image", limits.max_images, "SIGLIP_MAX_IMAGES_PER_REQUEST")
    for where, v in items:
        if isinstance(v, ImageBytes):
            if not v.data:
                raise BadRequest(f"{where}{f' ({v.filename})' if v.filename else ''}: image data is empty")
        elif not v.strip():
            raise BadRequest(f"{where}: empty string is not an image URL or base64 image")
    return tuple(ImageInput(where, v) for where, v in items), batched


def text_inputs(value: Any, name: str, limits: Limits) -> tuple[str, ...]:
    items, _ = _items(value, name, "text", limits.max_texts, "SIGLIP_MAX_TEXTS_PER_REQUEST")
    for where, v in items:
        if len(v) > limits.max_text_chars:
            raise BadRequest(f"{where} is {len(v)} characters, over the limit of {limits.max_text_chars} "
                             "(SIGLIP_MAX_TEXT_CHARS)")
    return tuple(v for _, v in items)


def json_type(value: Any) -> str:
    """How an error message names a JSON value's type ("a string", "null")."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)

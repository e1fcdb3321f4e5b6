"""OpenAI's embeddings API (``POST /v1/embeddings``, ``GET /v1/models``) on top of the engine.

A request is translated into the engine's inputs (texts and ``ImageInput``s, checked by the same
``siglip.api.requests`` rules and loaded by the same ``Engine`` path as every other route), and the answer is built
in OpenAI's shape, so the openai SDK, LangChain's ``OpenAIEmbeddings`` and LlamaIndex's
``OpenAILikeEmbedding`` work unchanged:

- ``input``: a string or a list. Plain strings are texts, or images (http(s) URL, data URI, raw base64) with
  ``"modality": "image"`` (michaelfeil/infinity's extension; the SDK sends it through ``extra_body``). Typed
  items ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}`` mix both in
  one request. Token-id arrays are refused: SigLIP has its own tokenizer, unrelated to tiktoken's ids.
- ``model``: the served checkpoint (SIGLIP_MODEL) or its last path component; answers name SIGLIP_MODEL.
- ``encoding_format``: "float" (the API's default) or "base64" (little-endian float32; the SDK's default).
- ``dimensions``: only the model's own size. SigLIP 2 is not Matryoshka-trained, so a truncated vector is not
  an embedding of anything: other sizes are refused rather than cut.
- ``usage``: real tokens. A text counts what the text tower reads (lowercased, at most 64 with EOS), an image
  its patch grid ((height / patch) * (width / patch): 1024 at 512 px with patch 16).
- Errors: ``error_object`` gives ``{"error": {"message", "type", "param", "code"}}`` and every client mistake is
  a 4xx, since the SDK retries 5xx.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from siglip import observe
from siglip.api.engine import Engine, gather_or_cancel
from siglip.api.errors import BadRequest, ServiceError, validation_message
from siglip.api.requests import ImageInput, Limits, image_inputs, json_type, text_inputs

OPENAI_PREFIX = "/v1/"
LANGCHAIN_HINT = ("this server tokenizes text itself and takes strings, not token ids. LangChain's "
                  "OpenAIEmbeddings sends tiktoken ids by default: create it with check_embedding_ctx_length=False")


class InvalidRequest(BadRequest):
    """A client mistake with the request field it concerns (OpenAI's ``param``) and a machine-readable code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(InvalidRequest):
    status = 404


def error_object(exc: ServiceError) -> dict[str, Any]:
    """OpenAI's error body for any of the service's errors (the SDK raises its status's exception with it)."""
    status = exc.status
    if status >= 500:
        kind = "server_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status == 401:
        kind = "authentication_error"
    else:
        kind = "invalid_request_error"
    code = getattr(exc, "code", None) or ("invalid_api_key" if status == 401 else getattr(exc, "reason", None))
    return {"error": {"message": exc.message, "type": kind, "param": getattr(exc, "param", None), "code": code}}


# -- request -------------------------------------------------------------------------------------------------
class EmbeddingsRequest(BaseModel):
    """The body of ``POST /v1/embeddings``. Unknown fields are ignored: clients and proxies add their own."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: Any = Field(description="A string or a list of strings, or of typed text/image_url items")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] | None = Field(
        None, description='"image": every plain string in input is an image (URL, data URI or base64)')
    max_num_patches: int | None = Field(None, description="NaFlex checkpoints: patches per image (extra_body)")


class TextItem(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value  # the chat API's {"url": ...}, or the URL itself


TYPED_ITEM: TypeAdapter[TextItem | ImageItem] = TypeAdapter(
    Annotated[TextItem | ImageItem, Field(discriminator="type")])


@dataclass(frozen=True)
class EmbeddingInputs:
    texts: tuple[str, ...]
    images: tuple[ImageInput, ...]
    order: tuple[tuple[bool, int], ...]  # per input item: (is an image, its index among the texts or images)

    @property
    def mode(self) -> str:
        """The mode label for logs and metrics."""
        if self.texts and self.images:
            return "mixed_embedding"
        return "image_embedding" if self.images else "text_embedding"


def parse_body(body: bytes) -> EmbeddingsRequest:
    try:
        return EmbeddingsRequest.model_validate_json(body)
    except ValidationError as exc:
        message, field = validation_message(exc)
        raise InvalidRequest(message, param=field) from None


def parse_input(value: Any, modality: str | None, limits: Limits) -> EmbeddingInputs:
    """``input`` as the engine's texts and images, in order; errors name the item (``input[3]``)."""
    if isinstance(value, str):
        items: Sequence[tuple[str, Any]] = [("input", value)]
    elif isinstance(value, list):
        if not value:
            raise InvalidRequest("input must not be an empty list", param="input")
        if _is_token_ids(value) or isinstance(value[0], list) and _is_token_ids(value[0]):
            raise InvalidRequest(f"input is a list of token ids: {LANGCHAIN_HINT}", param="input",
                                 code="token_ids_not_supported")
        if len(value) > limits.max_images + limits.max_texts:
            # Before looking at each item: a huge list must not cost time on the event loop.
            raise InvalidRequest(f"{len(value)} inputs in one request, over the limits ({limits.max_images} images, "
                                 f"SIGLIP_MAX_IMAGES_PER_REQUEST, and {limits.max_texts} texts, "
                                 "SIGLIP_MAX_TEXTS_PER_REQUEST)", param="input")
        items = [(f"input[{i}]", v) for i, v in enumerate(value)]
    else:
        raise InvalidRequest(f"input must be a string or a list, not {json_type(value)}", param="input")

    texts: list[str] = []
    images: list[ImageInput] = []
    order: list[tuple[bool, int]] = []
    try:
        for where, item in items:
            text, url = _classify(where, item, modality)
            if url is not None:
                order.append((True, len(images)))
                images.extend(image_inputs(url, where, limits)[0])
            else:
                order.append((False, len(texts)))
                texts.extend(text_inputs(text, where, limits))
    except InvalidRequest:
        raise
    except BadRequest as exc:
        raise InvalidRequest(exc.message, param="input") from None
    if len(images) > limits.max_images:
        raise InvalidRequest(f"{len(images)} images in one request, over the limit of {limits.max_images} "
                             "(SIGLIP_MAX_IMAGES_PER_REQUEST)", param="input")
    if len(texts) > limits.max_texts:
        raise InvalidRequest(f"{len(texts)} texts in one request, over the limit of {limits.max_texts} "
                             "(SIGLIP_MAX_TEXTS_PER_REQUEST)", param="input")
    return EmbeddingInputs(tuple(texts), tuple(images), tuple(order))


def _classify(where: str, item: Any, modality: str | None) -> tuple[str | None, str | None]:
    """(text, None) or (None, image string) for one item of ``input``."""
    if isinstance(item, str):
        return (None, item) if modality == "image" else (item, None)
    if isinstance(item, dict):
        if item.get("type") not in ("text", "image_url"):
            raise InvalidRequest(f'{where} must have "type": "text" or "image_url", not '
                                 f"{json_type(item.get('type'))}", param="input")
        try:
            typed = TYPED_ITEM.validate_python(item)
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc, where, skip=1)[0], param="input") from None  # [0]: the tag
        if isinstance(typed, TextItem):
            return typed.text, None
        return None, typed.image_url.url
    if isinstance(item, list) and _is_token_ids(item):
        raise InvalidRequest(f"{where} is a list of token ids: {LANGCHAIN_HINT}", param="input",
                             code="token_ids_not_supported")
    raise InvalidRequest(f'{where} must be a string or an object like {{"type": "text", "text": ...}}, not '
                         f"{json_type(item)}", param="input")


def _is_token_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


# -- response ------------------------------------------------------------------------------------------------
class Embedding(BaseModel):
    # A float32 row is kept as an array so orjson writes it (float32's shortest form, ~7x faster than pydantic).
    model_config = ConfigDict(arbitrary_types_allowed=True)

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: np.ndarray | str  # floats, or base64 of the little-endian float32 bytes


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def encode_vector(row: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row


def to_json(response: BaseModel) -> bytes:
    return orjson.dumps(response.model_dump(), option=orjson.OPT_SERIALIZE_NUMPY)


# -- the endpoint ------------------------------------------------------------------------------------------
class OpenAIEmbeddings:
    """The two routes' logic for one gateway worker; ``served_model`` is SIGLIP_MODEL."""

    def __init__(self, engine: Engine, served_model: str):
        self.engine = engine
        self.served_model = served_model
        # The name alone, for a local checkpoint directory ("/models/siglip2-base-512" -> "siglip2-base-512").
        self.names = frozenset({served_model, served_model.rstrip("/").rsplit("/", 1)[-1]})
        self.card = ModelCard(id=served_model, created=int(time.time()), owned_by="siglip2-serve")

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ModelNotFound(f"The model {name!r} is not served here; this server serves {self.served_model!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    async def create(self, body: bytes) -> bytes:
        request = parse_body(body)
        self.check_model(request.model)
        inputs = parse_input(request.input, request.modality, self.engine.limits)
        observe.note_request(inputs.mode, len(inputs.images), len(inputs.texts))
        return to_json(await self.engine.within_deadline(self._answer(request, inputs)))

    async def _answer(self, request: EmbeddingsRequest, inputs: EmbeddingInputs) -> EmbeddingsResponse:
        model = await self.engine.model()
        if request.dimensions is not None and request.dimensions != model.embed_dim:
            raise InvalidRequest(f"dimensions must be {model.embed_dim} (this model's embedding size) or omitted, "
                                 f"not {request.dimensions}: SigLIP 2 embeddings cannot be shortened",
                                 param="dimensions", code="unsupported_dimensions")
        try:
            spec = model.image_spec(request.max_num_patches, "max_num_patches") if inputs.images else model.image
        except BadRequest as exc:
            raise InvalidRequest(str(exc), param="max_num_patches") from None
        try:
            done, counts = await gather_or_cancel([
                self.engine.embed(inputs.images, inputs.texts, model, spec),
                self.engine.count_tokens(inputs.texts)])
        except BadRequest as exc:  # an image that cannot be fetched or decoded
            exc.param = getattr(exc, "param", None) or "input"  # type: ignore[attr-defined]
            raise
        fmt = request.encoding_format or "float"
        data = [Embedding(index=i, embedding=encode_vector(done.images[j] if is_image else done.texts[j], fmt))
                for i, (is_image, j) in enumerate(inputs.order)]
        tokens = sum(counts) + done.image_tokens  # the patches each image really had (NaFlex: its own grid)
        return EmbeddingsResponse(data=data, model=self.served_model,
                                  usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def models(self, name: str | None = None) -> bytes:
        """``GET /v1/models``, or ``GET /v1/models/{name}`` (the SDK's ``models.retrieve``)."""
        if name is None:
            return to_json(ModelList(data=[self.card]))
        self.check_model(name)
        return to_json(self.card)

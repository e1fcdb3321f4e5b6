"""The request path shared by every endpoint: parse -> load images / embed texts (concurrently) -> score.

    Engine.run(inputs, parameters, endpoint_mode) -> JSON bytes
      requests.parse_request        decide the mode, validate, name offending items
      fetch / images (decode pool)  URLs and base64 -> uint8 pixels at the checkpoint's size (NaFlex: patch rows)
      ModelClient.encode_*          the model service (batched across requests)
      scoring                       cosine, logits, softmax/sigmoid, ranking

The model is reached through ``ModelClient`` (six async methods), so the engine never imports BentoML or
torch and the service layer stays thin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson

from siglip import observe
from siglip.api import scoring
from siglip.api.coalesce import Coalescer
from siglip.api.errors import BadRequest, DeadlineExceeded, FetchError, NotReady
from siglip.api.fetch import Fetcher
from siglip.api.images import (
    ImageSpec,
    JpegPayload,
    PatchGrid,
    is_http_url,
    prepare_image,
    prepare_image_string,
    too_large,
    url_scheme,
)
from siglip.api.requests import ImageBytes, ImageInput, Limits, ParsedRequest, parse_request
from siglip.api.textcache import TextEmbeddingCache
from siglip.settings import Settings

logger = logging.getLogger("siglip.engine")
T = TypeVar("T")


class ModelClient(Protocol):
    async def status(self) -> dict[str, Any]: ...
    async def encode_images(self, pixels: np.ndarray) -> np.ndarray: ...
    async def encode_jpegs(self, items: list[tuple[bytes, int]]) -> np.ndarray: ...
    async def encode_patches(self, items: list[tuple[np.ndarray, int, int]]) -> np.ndarray: ...
    async def encode_texts(self, texts: list[str]) -> np.ndarray: ...
    async def count_tokens(self, texts: list[str]) -> list[int]: ...


@dataclass(frozen=True)
class ModelView:
    """The gateway's copy of the model's ModelInfo (``info``: all of it, as ``GET /info`` shows it)."""

    image: ImageSpec
    forward_jpeg: bool  # the model service decodes JPEGs itself (nvJPEG): send bytes, not pixels
    logit_scale: float
    logit_bias: float
    embed_dim: int
    patch_size: int | None = None  # the vision tower's patch: an image is (height/patch)*(width/patch) tokens
    max_num_patches_limit: int | None = None  # NaFlex: the most patches a request may ask for
    info: dict[str, Any] | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any], jpeg_draft_factor: float = 0.0) -> ModelView:
        return cls(image=ImageSpec(info.get("image_height"), info.get("image_width"), info["resample"],
                                   jpeg_draft_factor, info.get("patch_size"), info.get("max_num_patches")),
                   forward_jpeg=bool(info.get("jpeg_decode")), logit_scale=info["logit_scale"],
                   logit_bias=info["logit_bias"], embed_dim=info["embed_dim"], patch_size=info.get("patch_size"),
                   max_num_patches_limit=info.get("max_num_patches_limit"), info=info)

    def image_spec(self, max_num_patches: int | None, where: str = "parameters.max_num_patches") -> ImageSpec:
        """The image spec of one request: the model's, or (NaFlex) with the request's own patch budget."""
        if max_num_patches is None:
            return self.image
        if not self.image.naflex:
            raise BadRequest(f"{where} applies to NaFlex checkpoints only; this one resizes every image to "
                             f"{self.image.height}x{self.image.width}")
        limit = self.max_num_patches_limit or self.image.max_num_patches
        if not 1 <= max_num_patches <= limit:
            raise BadRequest(f"{where} must be between 1 and {limit} (SIGLIP_MAX_NUM_PATCHES_LIMIT), "
                             f"not {max_num_patches}")
        return replace(self.image, max_num_patches=max_num_patches)


@dataclass(frozen=True)
class Embedded:
    """The embeddings of one request's images and texts (None for a side with no items)."""

    images: np.ndarray | None
    texts: np.ndarray | None
    image_tokens: int = 0  # patches the vision tower read, summed over the images (the OpenAI usage counts them)


def patch_count(prepared: Any, model: ModelView) -> int:
    if isinstance(prepared, PatchGrid):
        return prepared.rows * prepared.cols
    image, patch = model.image, model.patch_size
    return (image.height // patch) * (image.width // patch) if patch and image.height else 0


class Engine:
    def __init__(self, settings: Settings, client: ModelClient, fetcher: Fetcher, decode_pool: Executor,
                 on_cache: Callable[[int, int], None] | None = None):
        self.settings = settings
        self.client = client
        self.fetcher = fetcher
        self.pool = decode_pool
        self.limits = Limits.from_settings(settings)
        self.cache = TextEmbeddingCache(settings.text_cache_size, on_lookup=on_cache)
        self._encode_images = self._coalesced(lambda xs: client.encode_images(np.stack(xs)), settings.max_batch_size)
        self._encode_jpegs = self._coalesced(client.encode_jpegs, settings.max_batch_size)
        self._encode_patches = self._coalesced(client.encode_patches, settings.max_batch_size)
        self._encode_texts = self._coalesced(client.encode_texts, settings.max_texts_per_request)
        self._model: ModelView | None = None

    def _coalesced(self, fn: Callable[[list[Any]], Awaitable[np.ndarray]], max_items: int):
        if self.settings.coalesce_in_flight <= 0:
            return fn
        return Coalescer(fn, max_items, self.settings.coalesce_in_flight)

    async def run(self, inputs: Any, parameters: Any, endpoint_mode: str | None = None) -> bytes:
        request = parse_request(inputs, parameters, endpoint_mode, self.limits)
        observe.note_request(request.mode, len(request.images), len(request.texts))
        return orjson.dumps(await self.within_deadline(self.answer(request)), option=orjson.OPT_SERIALIZE_NUMPY)

    async def within_deadline(self, work: Awaitable[T]) -> T:
        """``work`` under the whole-request deadline (504 past SIGLIP_REQUEST_TIMEOUT_S)."""
        deadline = asyncio.timeout(self.settings.request_timeout_s)
        try:
            async with deadline:
                return await work
        except TimeoutError:
            if not deadline.expired():  # a timeout from below (the model client's), not the request's deadline
                raise DeadlineExceeded("the model service did not answer in time") from None
            raise DeadlineExceeded(f"request took longer than {self.settings.request_timeout_s:g} s "
                                   "(SIGLIP_REQUEST_TIMEOUT_S)") from None

    async def answer(self, request: ParsedRequest) -> Any:
        model = await self.model()
        spec = model.image_spec(request.params.max_num_patches) if request.images else model.image
        done = await self.embed(request.images, request.texts, model, spec)
        return build_response(request, done.images, done.texts, model)

    async def embed(self, images: Sequence[ImageInput], texts: Sequence[str], model: ModelView,
                    spec: ImageSpec | None = None) -> Embedded:
        """Embeddings of parsed images and texts, computed concurrently; ``spec``: how this request's images are
        prepared (``ModelView.image_spec``: the model's, or a request's own NaFlex patch budget)."""
        (image_embeds, tokens), text_embeds = await gather_or_cancel([self.embed_images(images, model, spec),
                                                                      self.embed_texts(texts)])
        return Embedded(image_embeds, text_embeds, tokens)

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the text tower reads for each text (the model service owns the tokenizer)."""
        return list(await self.client.count_tokens(list(texts))) if texts else []

    async def model(self) -> ModelView:
        if self._model is None:
            status = await self.client.status()
            if not status.get("ready"):
                raise NotReady(status.get("error") or "model is still loading; retry shortly")
            self._model = ModelView.from_info(status["info"], self.settings.jpeg_draft_factor)
        return self._model

    async def info(self) -> dict[str, Any]:
        """``GET /info``: what is served (the model service's ModelInfo) and the limits a request must keep."""
        s = self.settings
        model = await self.model()
        return {**(model.info or {}), "limits": {
            "max_images_per_request": s.max_images_per_request, "max_texts_per_request": s.max_texts_per_request,
            "max_text_chars": s.max_text_chars, "max_image_bytes": s.max_image_bytes,
            "max_image_pixels": s.max_image_pixels, "max_body_bytes": s.max_body_bytes,
            "max_batch_size": s.max_batch_size, "request_timeout_s": s.request_timeout_s}}

    async def info_json(self) -> bytes:
        return orjson.dumps(await self.info())

    async def embed_images(self, images: Sequence[ImageInput], model: ModelView,
                           spec: ImageSpec | None = None) -> tuple[np.ndarray | None, int]:
        """(embeddings, patches read in all) of the images, prepared with ``spec`` (default: the model's)."""
        if not images:
            return None, 0
        spec = spec or model.image
        fetch_slots = asyncio.Semaphore(self.settings.max_parallel_fetches)
        prepared = await gather_or_cancel([self._load(item, model, spec, fetch_slots) for item in images])
        kinds: dict[type, list[int]] = {}
        for i, p in enumerate(prepared):
            kinds.setdefault(type(p), []).append(i)
        calls = {JpegPayload: lambda rows: self._encode_jpegs([(prepared[i].data, prepared[i].orientation)
                                                              for i in rows]),
                 PatchGrid: lambda rows: self._encode_patches([(prepared[i].patches, prepared[i].rows,
                                                               prepared[i].cols) for i in rows]),
                 np.ndarray: lambda rows: self._encode_images([prepared[i] for i in rows])}
        results = await gather_or_cancel([calls[kind](rows) for kind, rows in kinds.items()])
        embeds = np.empty((len(images), model.embed_dim), dtype=np.float32)
        for rows, result in zip(kinds.values(), results):
            embeds[rows] = result
        for i in kinds.get(JpegPayload, ()):
            if np.isnan(embeds[i, 0]):
                raise BadRequest(f"{images[i].where}: JPEG data could not be decoded")
        return embeds, sum(patch_count(p, model) for p in prepared)

    async def _load(self, item: ImageInput, model: ModelView, spec: ImageSpec, fetch_slots: asyncio.Semaphore):
        s = self.settings
        loop = asyncio.get_running_loop()
        if isinstance(item.value, ImageBytes):  # uploaded as bytes: the limits base64 input has, without base64
            where = f"{item.where} ({item.value.filename})" if item.value.filename else item.where
            size = len(item.value.data)
            if size > s.max_image_bytes:
                raise too_large(where, size, s.max_image_bytes)
            return await loop.run_in_executor(self.pool, prepare_image, item.value.data, where, spec,
                                              s.max_image_pixels, model.forward_jpeg)
        if is_http_url(item.value):
            async with fetch_slots:
                try:
                    data = await self.fetcher.fetch(item.value, item.where)
                except FetchError as exc:
                    observe.note_fetch_failure(exc.kind)
                    raise
            return await loop.run_in_executor(self.pool, prepare_image, data, f"{item.where} ({item.value})",
                                              spec, s.max_image_pixels, model.forward_jpeg)
        scheme = url_scheme(item.value)
        if scheme is not None:
            raise BadRequest(f"{item.where}: only http and https URLs are supported, not {scheme}://")
        return await loop.run_in_executor(self.pool, prepare_image_string, item.value, item.where, spec,
                                          s.max_image_bytes, s.max_image_pixels, model.forward_jpeg)

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        if not texts:
            return None
        return await self.cache.embed(texts, self._encode_texts)


async def gather_or_cancel(coros: Sequence[Any]) -> list[Any]:
    """Like gather, but the first failure cancels the rest (a bad image need not wait for slow URLs)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def build_response(request: ParsedRequest, image_embeds: np.ndarray | None, text_embeds: np.ndarray | None,
                   model: ModelView) -> Any:
    mode = request.mode
    if mode == "image_embedding":
        return [{"embedding": row} for row in image_embeds]
    if mode == "text_embedding":
        return [{"embedding": row} for row in text_embeds]
    cosine = scoring.cosine_matrix(image_embeds, text_embeds)
    if mode == "similarity":
        return {"similarity_scores": cosine, "image_count": cosine.shape[0], "text_count": cosine.shape[1]}
    p = request.params
    scores = scoring.zero_shot_scores(cosine, model.logit_scale, model.logit_bias, p.function_to_apply)
    ranked = [scoring.rank_labels(request.labels, row, p.top_k) for row in scores]
    return ranked if request.batched else ranked[0]

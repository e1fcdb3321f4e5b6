"""The ``local`` engine of ``siglip-index build``: the model in this process, no server.

The service's own request path runs here (``siglip.api.engine.Engine``: URL fetching under the same policy,
decoding, EXIF, modes, limits, NaFlex grids, the same error texts) over an encoder loaded in this process
(``siglip.model.encoder.SiglipEncoder``), so the vectors are the service's. ``LocalEmbedder`` answers the builder's
``image_embedding`` like the HTTP client does, refusals included (``SiglipError`` with the status the service
would answer), so batching, splitting on bad items, failures and resume are the builder's, shared by both engines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import numpy as np

from siglip.api.engine import Engine
from siglip.api.errors import ServiceError
from siglip.api.fetch import Fetcher, FetchPolicy
from siglip.api.requests import parse_request
from siglip.client import SiglipError, image_to_wire
from siglip.settings import Settings

logger = logging.getLogger("siglip.index")


class EncoderClient:
    """``siglip.api.engine.ModelClient`` over an encoder in this process; each call runs in a worker thread (the
    forward releases the GIL), as the model service runs its batches."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    async def status(self) -> dict[str, Any]:
        return self.encoder.status()

    async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.encode_images, pixels)

    async def encode_jpegs(self, items: list[tuple[bytes, int]]) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.encode_jpegs, items)

    async def encode_patches(self, items: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.encode_patches, items)

    async def encode_texts(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.encode_texts, texts)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return self.encoder.count_tokens(texts)


class LocalEmbedder:
    """``image_embedding(images)`` as the service answers it, computed here. Use ``async with``: loading the model
    takes seconds (minutes for a first download)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="siglip-decode")
        self._fetcher = Fetcher(FetchPolicy.from_settings(settings))
        self.encoder: Any = None
        self.engine: Engine | None = None

    async def __aenter__(self) -> Self:
        from siglip.model.encoder import SiglipEncoder

        self.encoder = SiglipEncoder(self.settings)
        await asyncio.to_thread(self.encoder.load)
        if self.encoder.error:
            from siglip.index.build import BuildAborted

            raise BuildAborted(f"the model did not load in this process (--engine local): {self.encoder.error}")
        self.engine = Engine(self.settings, EncoderClient(self.encoder), self._fetcher, self._pool)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._fetcher.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def info(self) -> dict[str, Any]:
        """What ``GET /info`` would say (the model's part)."""
        return self.encoder.info.to_dict()

    async def image_embedding(self, images: Sequence[Any]) -> np.ndarray:
        engine = self.engine
        try:
            wire = [image_to_wire(image, f"images[{i}]") for i, image in enumerate(images)]
            request = parse_request(wire, {}, "image_embedding", engine.limits)
            model = await engine.model()
            done = await engine.within_deadline(engine.embed(request.images, (), model, model.image))
        except ServiceError as exc:
            raise SiglipError(exc.status, exc.message) from None
        except (ValueError, RuntimeError) as exc:  # the model refused the batch: split like a server's 500
            raise SiglipError(500, f"{type(exc).__name__}: {exc}") from None
        return done.images

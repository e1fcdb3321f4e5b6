"""The ``local`` engine of ``siglip-index build``: the model in this process, no server.

The service's own request path runs here (``siglip.api.engine.Engine``: URL fetching under the same policy,
decoding, EXIF, modes, limits, NaFlex grids, the same error texts) over an encoder loaded in this process
(``siglip.model.encoder.SiglipEncoder``), so the vectors are the service's. ``LocalEmbedder`` answers the builder's
``image_embedding`` like the HTTP client does, refusals included (``SiglipError`` with the status the service
would answer), so batching, splitting on bad items, failures and resume are the builder's, shared by both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
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


async def _in_daemon_thread(fn: Any) -> None:
    """``fn()`` in a daemon thread, awaited. Not ``to_thread``: asyncio.run waits for its executor's threads at exit,
    so a Ctrl-C during a model download or warm-up would wait for it to finish."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def run() -> None:
        try:
            fn()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the build was interrupted meanwhile
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    threading.Thread(target=run, name="siglip-model-loader", daemon=True).start()
    await finished


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
        from siglip.index.build import BuildAborted
        from siglip.model.encoder import SiglipEncoder

        try:
            self.encoder = SiglipEncoder(self.settings)
            logger.info("--engine local: loading %s in this process", self.settings.model)
            await _in_daemon_thread(self.encoder.load)
            if self.encoder.error:
                raise BuildAborted(f"the model did not load in this process (--engine local): {self.encoder.error}")
        except BaseException:
            await self.__aexit__()
            raise
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
        # Files are read (and base64-encoded, the form the request path takes) in the decode pool, not on the loop
        # that runs the other batches' fetches. OSError (an unreadable file) is the builder's to report, as with
        # the HTTP client.
        wire = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: [image_to_wire(image, f"images[{i}]") for i, image in enumerate(images)])
        try:
            request = parse_request(wire, {}, "image_embedding", engine.limits)
            model = await engine.model()
            done = await engine.within_deadline(engine.embed(request.images, (), model, model.image))
        except ServiceError as exc:
            raise SiglipError(exc.status, exc.message) from None
        except Exception as exc:
            logger.exception("unexpected error embedding a batch")
            raise SiglipError(500, f"internal error: {type(exc).__name__}") from None
        return done.images

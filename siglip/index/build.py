"""Embedding a catalog and writing it to the store: bounded concurrency, batches, retries, and per-item failures.
The embedder is the service over HTTP (``AsyncSiglipClient``) or the model in this process
(``siglip.index.local.LocalEmbedder``); both answer ``image_embedding`` and refuse bad items alike.

- Each request carries one batch; at most ``concurrency`` are in flight, fewer while the server answers 429
  (``Window``). Every finished batch is written at once (one LanceDB commit), so an interruption loses only the
  batches in flight.
- 429, 502, 503, 504 and broken connections (``status is None``) are retried with capped exponential backoff
  and jitter; when the tries run out the build stops (what is written stays; a rerun resumes).
- A batch the server refuses for its content (400, 413, 422, 500) is split in halves until the refused items
  stand alone; they are reported with the server's message and the others are indexed.
- Any other answer (401, 403, 404, ...) is a mistake in the setup: the build stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import numpy as np

from siglip.client import Backoff, SiglipError
from siglip.index.sources import Failure, Item
from siglip.index.store import CatalogStore, StoreError, model_fingerprint

logger = logging.getLogger("siglip.index")
T = TypeVar("T")

RETRYABLE = frozenset({None, 429, 502, 503, 504})
INDEX_BACKOFF = Backoff(attempts=8, base_s=0.5)  # a long build rides out a restarting server
ITEM_LEVEL = frozenset({400, 413, 422, 500})
FIRST_CONTACT_TRIES = 3  # about 1.5 s of backoff before "no server there"


class ImageEmbedder(Protocol):
    async def image_embedding(self, images: Sequence) -> np.ndarray: ...
    async def info(self) -> dict: ...


class BuildAborted(Exception):
    """The build cannot go on (server unreachable or overloaded past the retries, auth, wrong URL, store)."""


class Window:
    """Requests allowed in flight: halved on each 429 (the server says it is full), one more after ``limit``
    answers in a row without one, between 1 and ``maximum`` (--concurrency). A slow server (a CPU, the full
    model) thus gets as many requests as it can finish, instead of 429s until the tries run out."""

    def __init__(self, maximum: int):
        self.maximum = self.limit = max(1, maximum)
        self.in_flight = 0
        self._ok = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1

    async def __aexit__(self, *exc_info: object) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def overloaded(self) -> None:
        self.limit, self._ok = max(1, self.limit // 2), 0

    def answered(self) -> None:
        self._ok += 1
        if self._ok >= self.limit and self.limit < self.maximum:
            self.limit, self._ok = self.limit + 1, 0


@dataclass
class BuildStats:
    total: int = 0  # items in the source
    skipped: int = 0  # already in the table
    todo: int = 0
    shards: int = 0  # in the source
    shards_todo: int = 0  # with an item not in the table yet
    shards_done: int = 0  # committed by this build (ray engine)
    added: int = 0
    added_ids: list[str] = field(default_factory=list)  # what this build wrote (their old failure rows go)
    failures: list[Failure] = field(default_factory=list)
    retries: Counter = field(default_factory=Counter)  # by status ("429", "503", "connection", ...)
    requests: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


DEFAULT_BATCH_SIZE = 16  # images per request (http and local engines)
DEFAULT_RAY_BATCH_SIZE = 64  # images per embed call on a ray actor (GPUs want big batches)
DEFAULT_SHARD_SIZE = 10_000  # images per shard (img2dataset's size): a ray build commits whole shards
DEFAULT_COMMIT_EVERY = 4  # shards per commit (ray): fewer table versions; at most this many lost to a crash


def plan(items: Sequence[Item], existing: set[str], shard_size: int = DEFAULT_SHARD_SIZE) -> list[Item]:
    """The items still to embed (those whose id is not in the table yet), each with its shard: its position in the
    source // ``shard_size``, the same in every run over the same source."""
    return [replace(item, shard=position // shard_size) for position, item in enumerate(items)
            if item.id not in existing]


def _status_key(status: int | None) -> str:
    return "connection" if status is None else str(status)


class Builder:
    def __init__(self, client: ImageEmbedder, store: CatalogStore, stats: BuildStats, *,
                 backoff: Backoff = INDEX_BACKOFF, progress: Callable[[int], None] = lambda n: None,
                 seed: int | None = None):
        self.client, self.store, self.stats = client, store, stats
        self.model: dict | None = None  # the embedder's fingerprint (siglip.index.store.model_fingerprint)
        self.backoff, self.progress = backoff, progress
        self.rng = random.Random(seed)
        self.window: Window  # set by run(), for its concurrency

    async def run(self, items: Sequence[Item], batch_size: int, concurrency: int) -> BuildStats:
        batches = iter([items[i:i + batch_size] for i in range(0, len(items), batch_size)])
        self.window = Window(concurrency)
        # Before any row: a table keeps one model's vectors (StoreError names both models otherwise).
        self.model = await self._fingerprint()
        self.store.check_model(self.model, stamp=True)

        async def worker() -> None:
            for batch in batches:  # one shared iterator: each batch goes to exactly one worker
                await self._batch(batch)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(max(1, min(concurrency, len(items)))):
                    group.create_task(worker())
        except* (BuildAborted, StoreError) as eg:
            raise eg.exceptions[0] from None
        finally:
            self.stats.finished = time.monotonic()
        return self.stats

    async def _batch(self, batch: Sequence[Item]) -> None:
        done: list[Item] = []
        vectors: list[np.ndarray] = []
        await self._embed(batch, done, vectors)
        if done:
            # Synchronous on purpose: a cancellation (Ctrl-C, SIGTERM) lands at an await, never mid-commit.
            self.store.add([i.id for i in done], [i.source for i in done], np.concatenate(vectors), self.model,
                           [i.shard for i in done])
            self.stats.added += len(done)
            self.stats.added_ids.extend(i.id for i in done)
        self.progress(len(batch))

    async def _embed(self, items: Sequence[Item], done: list[Item], vectors: list[np.ndarray]) -> None:
        """Embed ``items``, splitting on content errors; successes go to ``done``/``vectors``, refusals to
        ``stats.failures``."""
        try:
            result = await self._request([item.image for item in items])
        except SiglipError as exc:
            if exc.status not in ITEM_LEVEL:
                raise BuildAborted(self._fatal(exc)) from None
            status, message = exc.status, exc.message
        except OSError as exc:  # the client could not read a local file
            status, message = None, f"{type(exc).__name__}: {exc}"
        else:
            if result.ndim != 2 or result.shape[0] != len(items):
                raise BuildAborted(f"the server returned {result.shape[0]} embeddings for {len(items)} images")
            done.extend(items)
            vectors.append(result)
            return
        if len(items) == 1:
            self.stats.failures.append(Failure(items[0].id, items[0].source, status, message))
            return
        half = len(items) // 2
        await self._embed(items[:half], done, vectors)
        await self._embed(items[half:], done, vectors)

    async def _fingerprint(self) -> dict | None:
        """The embedder's model fingerprint; None from a server without ``GET /info`` (an older version)."""
        try:
            # The first contact: no connection at all is a wrong --server or a server not started, not a restart
            # to ride out, so it is not retried for half a minute.
            info = await self._retrying(self.client.info, unreachable_tries=FIRST_CONTACT_TRIES)
        except SiglipError as exc:
            if exc.status == 404:  # a server from before GET /info: check_model says what that means here
                return None
            raise BuildAborted(self._fatal(exc)) from None
        return model_fingerprint(info)

    async def _request(self, images: list) -> np.ndarray:
        async def call() -> np.ndarray:
            async with self.window:
                result = await self.client.image_embedding(images)
            self.window.answered()
            return result

        return await self._retrying(call)

    async def _retrying(self, call: Callable[[], Awaitable[T]], unreachable_tries: int | None = None) -> T:
        """``call()`` with the backoff's tries; ``unreachable_tries``: fewer while no connection is made at all."""
        for attempt in range(self.backoff.attempts):
            self.stats.requests += 1
            try:
                return await call()
            except SiglipError as exc:
                if exc.status == 429:
                    self.window.overloaded()
                last = self.backoff.attempts
                if exc.status is None and unreachable_tries:
                    last = min(last, unreachable_tries)
                if exc.status not in RETRYABLE or attempt >= last - 1:
                    exc.tries = attempt + 1  # type: ignore[attr-defined]
                    raise
                self.stats.retries[_status_key(exc.status)] += 1
                await asyncio.sleep(self.backoff.delay(attempt, self.rng))
        raise AssertionError("unreachable")

    def _fatal(self, exc: SiglipError) -> str:
        if exc.status in RETRYABLE:
            what = "no connection" if exc.status is None else f"HTTP {exc.status}"
            tries = getattr(exc, "tries", self.backoff.attempts)
            if exc.status is None and self.stats.added == 0 and tries < self.backoff.attempts:
                return (f"no server answered after {tries} tries ({exc.message}): start it (make serve) or point "
                        "--server at it; nothing was written")
            return (f"gave up after {tries} tries ({what}: {exc.message}); "
                    "what was written is kept: rerun to resume")
        return f"the server answered HTTP {exc.status}: {exc.message}"

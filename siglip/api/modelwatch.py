"""A model service that stops answering: calls fail within seconds instead of waiting out the request deadline.

While model calls are in flight (or after a stall, until it ends), the gateway asks whether the model service's
process answers at all (``probe``: its /livez, over a connection of its own, bounded to about a second) every
``interval_s``; a call that completes counts as an answer too. When nothing has answered for ``stall_after_s``
(the process is frozen, swapping, or gone and not yet restarted), every call in flight and every new one fails with
``NotReady`` (503 + Retry-After) until a probe is answered again. A model that is merely slow (big batches on a
CPU), loading, or failed to load still answers and is left alone: the deadline and its own 503s cover those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from siglip.api.errors import NotReady

logger = logging.getLogger("siglip.modelwatch")
T = TypeVar("T")


class ModelWatch:
    def __init__(self, probe: Callable[[], Awaitable[bool]], stall_after_s: float, interval_s: float = 1.0):
        self.probe = probe
        self.stall_after_s = stall_after_s
        self.interval_s = interval_s
        self.calls = 0  # model calls in flight
        self.last_ok = time.monotonic()
        self.stalled = asyncio.Event()
        self._task: asyncio.Task | None = None

    def error(self) -> NotReady:
        return NotReady(f"the model service has not answered for {self.stall_after_s:g} s "
                        "(SIGLIP_MODEL_STALL_TIMEOUT_S): frozen, overloaded or restarting; retry shortly",
                        reason="model_unresponsive")

    async def run(self, call: Awaitable[T]) -> T:
        """``call``'s result, or NotReady as soon as the model is found stalled."""
        if self.stalled.is_set():
            if asyncio.iscoroutine(call):
                call.close()  # never to be awaited: no "was never awaited" warning
            self._ensure_watching()  # whatever ended the last watcher, someone must notice the end of the stall
            raise self.error()
        self.calls += 1
        if self._task is None or self._task.done():
            self.last_ok = time.monotonic()  # the window starts with the first call in flight
        self._ensure_watching()
        work = asyncio.ensure_future(call)
        stall = asyncio.ensure_future(self.stalled.wait())
        try:
            await asyncio.wait({work, stall}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            self.calls -= 1
            stall.cancel()
        if work.done():
            result = work.result()
            self.last_ok = time.monotonic()
            return result
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise self.error()

    def _ensure_watching(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while self.calls > 0 or self.stalled.is_set():
            try:
                ok = await self.probe()
            except Exception:  # noqa: BLE001 - a probe that cannot even be sent (shutting down) is no answer
                ok = False
            now = time.monotonic()
            if ok:
                self.last_ok = now
                if self.stalled.is_set():
                    logger.warning("the model service answers again")
                    self.stalled.clear()
            elif not self.stalled.is_set() and now - self.last_ok >= self.stall_after_s:
                logger.warning("the model service has not answered for %.1f s: failing its calls with 503 until it "
                               "does", now - self.last_ok)
                self.stalled.set()
            await asyncio.sleep(self.interval_s)

"""CUDA graphs for the vision tower at fixed batch sizes ("buckets"), opt-in with ``SIGLIP_CUDA_GRAPHS=1``.

Why: on an H100 the eager bf16 vision tower at batch 1 spends ~6 ms issuing kernels from Python for ~3 ms of GPU
work, and holds the GIL while doing so, which also starves the model service's event loop under load. A graph
captured once per bucket replays every kernel with one launch.

A batch of n rows runs as one or more bucket-sized replays (``plan_batches``): rows of a ViT never interact, so
padding rows change nothing in the others, and the plan keeps padding under a quarter of the work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("siglip.graphs")

# Below this cosine between a graph replay and the eager forward on the same input, graphs are not used.
PARITY_MIN_COSINE = 0.999


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, the midpoints between them from 4 on (6, 12, 24, 48...), and
    ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError("max_batch must be positive")
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        sizes.add(b)
        if b >= 4 and b + b // 2 < max_batch:
            sizes.add(b + b // 2)
        b *= 2
    return tuple(sorted(sizes))


def plan_batches(n: int, buckets: Sequence[int]) -> list[int]:
    """The bucket sizes to run ``n`` rows through, in order; their sum is >= n and each but the last is full.

    The smallest bucket that holds the rest is taken when it pads at most a quarter of itself (or one row);
    otherwise the largest bucket that is filled completely, and the rest is planned again.
    """
    if n < 0:
        raise ValueError("n must not be negative")
    buckets = sorted(buckets)
    plan: list[int] = []
    while n > 0:
        up = next((b for b in buckets if b >= n), None)
        if up is not None and up - n <= max(1, up // 4):
            plan.append(up)
            break
        down = max(b for b in buckets if b <= n) if buckets[0] <= n else buckets[0]
        plan.append(down)
        n -= down
    return plan


class GraphedFunction:
    """``fn(x) -> y`` (device tensors, batch dimension first) replayed from CUDA graphs, one per bucket.

    ``fn`` must be a pure function of its input with no host synchronization. Replays are serialized with a lock
    because a graph's input and output buffers are shared; copies in and out are queued on the same stream as the
    replay, so the lock is held only while work is queued, not while it runs.
    """

    def __init__(self, torch: Any, fn: Callable[[Any], Any], example: Callable[[int], Any],
                 buckets: Sequence[int], device: Any):
        self._torch = torch
        self._device = device
        self._fn = fn
        self._example = example  # batch size -> an input tensor of that batch size (the static input buffer)
        self.buckets = tuple(sorted(buckets))
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def capture(self) -> float:
        """Capture every bucket (largest first, so the smaller graphs reuse its memory pool); returns seconds."""
        torch = self._torch
        t0 = time.perf_counter()
        # On the model's device (not cuda:0) and on one side stream for warm-up and capture alike: cuBLAS and
        # cuDNN allocate per-stream workspaces on first use, which must not happen during capture.
        with torch.cuda.device(self._device), torch.inference_mode():
            pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            for b in sorted(self.buckets, reverse=True):
                static_in = self._example(b)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._fn(static_in)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    static_out = self._fn(static_in)
                torch.cuda.current_stream().wait_stream(side)
                self._graphs[b] = (graph, static_in, static_out)
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def check_parity(self) -> float:
        """Lowest row cosine between replays and the eager ``fn`` on random inputs: every bucket one row short
        of full (so padding is exercised), and one batch that needs several replays."""
        torch = self._torch
        worst = 1.0
        sizes = sorted({max(1, b - 1) for b in self.buckets} | {self.buckets[-1] + 1})
        with torch.inference_mode():
            for n in sizes:
                x = torch.randn_like(self._example(n))
                eager = self._fn(x).float()
                graphed = self(x).float()
                cos = torch.nn.functional.cosine_similarity(eager.flatten(1), graphed.flatten(1), dim=-1)
                worst = min(worst, float(cos.min()))
        return worst

    def __call__(self, x: Any) -> Any:
        if x.shape[0] == 0:
            return self._fn(x)
        # The device guard: replays go to the current stream of the *current* device, which in a BentoML worker
        # thread is cuda:0 whatever GPU this worker uses.
        with self._torch.cuda.device(self._device), self._torch.inference_mode():
            return run_in_buckets(x, self.buckets, self._replay, self._torch.cat)

    def _replay(self, bucket: int, chunk: Any) -> Any:
        graph, static_in, static_out = self._graphs[bucket]
        n = chunk.shape[0]
        with self._lock:
            static_in[:n].copy_(chunk)
            graph.replay()
            return static_out[:n].clone()


def run_in_buckets(x: Any, buckets: Sequence[int], run: Callable[[int, Any], Any],
                   cat: Callable[[list[Any]], Any]) -> Any:
    """``run(bucket, chunk)`` over the chunks of ``x`` that ``plan_batches`` gives (each chunk has at most
    ``bucket`` rows; ``run`` returns one output row per chunk row), outputs joined in order."""
    outs = []
    start = 0
    for b in plan_batches(x.shape[0], buckets):
        chunk = x[start:start + b]
        outs.append(run(b, chunk))
        start += chunk.shape[0]
    return outs[0] if len(outs) == 1 else cat(outs)


def graph_or_none(torch: Any, fn: Callable[[Any], Any], example: Callable[[int], Any],
                  buckets: Sequence[int], device: Any) -> GraphedFunction | None:
    """Capture ``fn`` for ``buckets``, check it against eager, and return it; None (eager) on any failure."""
    graphed = GraphedFunction(torch, fn, example, buckets, device)
    try:
        seconds = graphed.capture()
        worst = graphed.check_parity()
    except Exception as exc:
        # A capture failure must not take the service down: run eager. exc_info: a failure inside capture
        # surfaces as "capture invalidated"; its cause is in the chain.
        logger.warning("CUDA graph capture failed (%s: %s); the vision tower runs eager", type(exc).__name__, exc,
                       exc_info=True)
        return None
    if worst < PARITY_MIN_COSINE:
        logger.warning("CUDA graph replays differ from the eager forward (cosine %.5f < %.3f); running eager",
                       worst, PARITY_MIN_COSINE)
        return None
    logger.info("CUDA graphs captured for batch sizes %s in %.1f s (parity cosine %.6f)",
                ",".join(map(str, graphed.buckets)), seconds, worst)
    return graphed


class CudaGraphTowers:
    """``siglip.model.towers.Towers`` whose vision tower replays ``graphed`` (fixed-resolution pixels only);
    the text tower is the base's."""

    def __init__(self, base: Any, graphed: GraphedFunction):
        self._base, self._graphed = base, graphed
        self.backend, self.precision, self.input_dtype = base.backend, base.precision, base.input_dtype
        self.buckets = graphed.buckets
        self.path = f"CUDA graphs ({','.join(map(str, graphed.buckets))})"

    def vision(self, pixel_values: Any) -> Any:
        return self._graphed(pixel_values)

    def text(self, input_ids: Any) -> Any:
        return self._base.text(input_ids)

    @classmethod
    def build(cls, torch: Any, base: Any, image_size: tuple[int, int], max_batch: int, device: Any) -> Any:
        """``base`` with its vision tower captured per batch bucket, or ``base`` itself where capture fails or
        differs from eager (logged)."""
        height, width = image_size
        graphed = graph_or_none(
            torch, lambda x: base.vision(pixel_values=x),
            lambda b: torch.zeros((b, 3, height, width), dtype=base.input_dtype, device=device),
            bucket_sizes(max_batch), device)
        return base if graphed is None else cls(base, graphed)

"""BentoML services: SiglipGateway (HTTP API, async, CPU) -> SiglipModel (one worker per GPU, batched encoders).

The gateway parses requests, fetches and decodes images and scores results (``siglip.api.engine``); it never imports
torch. The model service owns the checkpoint and exposes adaptive-batching ``encode_images`` (uint8 pixels) and
``encode_texts`` APIs. Both are configured by ``SIGLIP_*`` environment variables (``siglip.settings``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import bentoml
import httpx
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from siglip import observe
from siglip.api.engine import Engine
from siglip.api.errors import MODEL_LOADING, NotReady, Overloaded
from siglip.api.fetch import Fetcher, FetchPolicy
from siglip.api.images import tiny_jpeg
from siglip.api.modelwatch import ModelWatch
from siglip.api.openai_api import OPENAI_PREFIX, OpenAIEmbeddings
from siglip.bento import image as bento_image
from siglip.server import patches, playground
from siglip.server.connections import ConnectionLimits, is_loopback, listening_address
from siglip.server.docs_page import DocsPage
from siglip.server.drain import exit_with_server, hold_sigterm_until_callers_exit
from siglip.server.http import INFO_PATH, GuardLimits, RequestGuard, answer
from siglip.server.model_gate import ModelGate, model_loading_detail
from siglip.server.readiness import ReadinessCause
from siglip.server.uploads import upload_app
from siglip.settings import get_settings

# Before BentoML builds anything: graceful stops, bounded readiness probes, per-server metric files.
patches.install()

# BentoML's logging setup leaves the root logger at WARNING: give our own loggers a level so the
# "loaded model" and error lines are printed.
logging.getLogger("siglip").setLevel(logging.INFO)
logger = logging.getLogger("siglip.service")
if bentoml.server_context.worker_index is not None and not exit_with_server(  # a worker: not outliving the server
        int(os.environ[patches.SERVER_PID_ENV]) if patches.SERVER_PID_ENV in os.environ else None):
    logger.warning("this worker could not ask to exit with its server process (PR_SET_PDEATHSIG): if the main "
                   "process is killed, stop its workers by hand")

settings = get_settings()
# Both services' servers: keep-alive, header limits and deadline, connection cap (the gateway's clients and its
# own calls to the model).
patches.install_connection_limits(ConnectionLimits.from_settings(settings))

# SIGLIP_IMAGE=gpu (default) | cpu picks the locked requirements at `bentoml build` time (siglip/bento.py).
image = bento_image(settings)


@bentoml.service(
    name="SiglipModel",
    image=image,
    # One worker per GPU by default (worker i uses cuda:(i-1) mod the visible GPUs); SIGLIP_MODEL_WORKERS above
    # the GPU count puts several processes on one GPU, each with its own HTTP handling.
    workers=settings.model_workers,
    **({"resources": {"gpu": settings.gpus}} if settings.gpus else {}),
    # Image, JPEG and text batches may overlap: one prepares on the CPU while another runs on the GPU.
    threads=settings.model_threads,
    traffic={"timeout": settings.request_timeout_s + 30, "concurrency": settings.target_concurrency},
    # Work around bentoml#5540: the caller's connection is otherwise replaced every 100 calls while other
    # calls are in flight, and those fail with "Cannot write to closing transport".
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
    # Internal calls only: an access-log line per call costs the one model process time under load.
    logging={"access": {"enabled": False}},
)
class SiglipModel:
    def __init__(self) -> None:
        from siglip.model.encoder import SiglipEncoder

        logging.getLogger("siglip").disabled = False
        worker = bentoml.server_context.worker_index or 1
        self.encoder = SiglipEncoder(settings, worker_index=worker)
        # Until the model is loaded its batch calls are refused at the door (503 MODEL_LOADING): a restarted worker.
        ModelGate.watch(lambda: (self.encoder.ready.is_set(), self.encoder.error))
        # /metrics says which backend and decode path run as soon as the model is loaded, probes or not.
        self.encoder.start_loading(on_loaded=lambda info: observe.metrics().loaded(info.to_dict()))
        # BentoML stops all services at once: keep answering until the gateway has answered its requests.
        hold_sigterm_until_callers_exit("SiglipModel", max_wait_s=settings.request_timeout_s + 10)
        self._batchers_trained: asyncio.Future | None = None
        self._count_batches = True  # siglip_model_batch_size shows traffic, not the start-up training calls

    async def __is_ready__(self) -> bool:
        if not self.encoder.ready.is_set():
            return False
        if self._batchers_trained is None:
            self._batchers_trained = asyncio.ensure_future(self._train_batchers())
        return self._batchers_trained.done()

    async def _train_batchers(self) -> None:
        """BentoML's adaptive batcher fits its timing model on its first ~12 calls and, while fitting, holds lone
        calls back for several model-call times (about 1 s each on a CPU). Spend that at start-up, before
        /readyz turns 200, instead of on users' first requests."""
        info = self.encoder.info
        calls = [lambda: self.to_async.encode_texts(["warm-up"])]
        if info.naflex:
            grid = self.encoder.warmup_grid()
            calls.append(lambda: self.to_async.encode_patches([grid]))
        else:
            pixels = np.zeros((1, info.image_height, info.image_width, 3), dtype=np.uint8)
            calls.append(lambda: self.to_async.encode_images(pixels))
        if info.jpeg_decode:
            jpeg = tiny_jpeg()
            calls.append(lambda: self.to_async.encode_jpegs([(jpeg, 1)]))
        t0 = time.perf_counter()
        self._count_batches = False
        try:
            # Its phases: 8 single calls, then one each of batch 1, 2 and 3 (bentoml/_internal/marshal/dispatcher.py).
            for call in calls:
                for width in (1,) * 9 + (2, 2, 3, 3):
                    await asyncio.gather(*(call() for _ in range(width)))
        except Exception:
            logger.exception("adaptive batcher warm-up failed")
        finally:
            self._count_batches = True
        logger.info("Adaptive batchers trained in %.1f s", time.perf_counter() - t0)

    @bentoml.api
    async def info(self) -> dict:
        """Loading state and, once loaded, the checkpoint's image size, embedding size and logit scale/bias."""
        return self.encoder.status()

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, 3) at the checkpoint's size -> L2-normalized embeddings (N, D)."""
        if self._count_batches:
            observe.metrics().model_batch("images", len(pixels))
        return self.encoder.encode_images(pixels)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def encode_jpegs(self, items: list[Any]) -> np.ndarray:
        """(JPEG bytes, EXIF orientation) pairs -> embeddings (N, D), decoded next to the model; NaN rows for
        images that fail to decode."""
        if self._count_batches:
            observe.metrics().model_batch("jpegs", len(items))
        return self.encoder.encode_jpegs(items)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def encode_patches(self, items: list[Any]) -> np.ndarray:
        """NaFlex checkpoints: (uint8 patch rows (rows*cols, P*P*3), rows, cols) per image -> embeddings (N, D);
        images of any aspect ratio and patch budget batch together."""
        if self._count_batches:
            observe.metrics().model_batch("patches", len(items))
        return self.encoder.encode_patches(items)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=settings.max_texts_per_request,
                 max_latency_ms=settings.max_latency_ms)
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> L2-normalized embeddings (N, D)."""
        if self._count_batches:
            observe.metrics().model_batch("texts", len(texts))
        return self.encoder.encode_texts(texts)

    @bentoml.api
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the text tower reads per text (OpenAI-style usage counts; the gateway has no tokenizer)."""
        return self.encoder.count_tokens(texts)


SiglipModel.add_asgi_middleware(ModelGate, paths=frozenset(api.route for name, api in SiglipModel.apis.items()
                                                          if name != "info"))


class BentoModelClient:
    """``siglip.api.engine.ModelClient`` over a BentoML dependency. Idempotent calls are retried on broken
    connections; a model service that is restarting, loading or not answering its health check is a 503
    (``NotReady``, with Retry-After) and the batcher's queue overflow a 429, never a 500."""

    RETRIES = 2

    def __init__(self, proxy: Any, stall_after_s: float):
        self._proxy = proxy
        # Any answer of its /livez, even an error, shows the process is alive (siglip.server.patches.siglip_probe).
        self.watch = ModelWatch(lambda: self._alive(), stall_after_s)

    async def _alive(self) -> bool:
        return await self._proxy.to_async.siglip_probe("/livez") is not None

    async def status(self) -> dict:
        return await self._call("info")

    async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return await self._call("encode_images", pixels)

    async def encode_jpegs(self, items: list[tuple[bytes, int]]) -> np.ndarray:
        return await self._call("encode_jpegs", items)

    async def encode_patches(self, items: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
        return await self._call("encode_patches", items)

    async def encode_texts(self, texts: list[str]) -> np.ndarray:
        return await self._call("encode_texts", texts)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return await self._call("count_tokens", texts)

    async def _call(self, name: str, *args: Any) -> Any:
        return await self.watch.run(self._call_with_retries(name, *args))

    async def _call_with_retries(self, name: str, *args: Any) -> Any:
        for attempt in range(self.RETRIES + 1):
            try:
                return await getattr(self._proxy.to_async, name)(*args)
            except BentoMLException as exc:
                if int(getattr(exc, "error_code", 500)) == 503:
                    if name == "info" or MODEL_LOADING in str(exc):
                        detail = model_loading_detail(str(exc))
                        raise NotReady(f"the model service is (re)starting and not loaded: {detail}; retry shortly",
                                       reason="model_loading") from None
                    raise Overloaded("model queue is full (SIGLIP_MAX_LATENCY_MS); retry shortly") from None
                raise
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, httpx.TransportError) as exc:
                # A pooled connection the other side is closing ("Cannot write to closing transport",
                # bentoml#5540), or a model worker that died with this call, even halfway through sending its
                # answer (ClientPayloadError: 1 in 7,561 answers during a kill test): the calls are idempotent.
                if attempt == self.RETRIES:
                    raise NotReady(f"the model service is unreachable ({type(exc).__name__}); it may be "
                                   "restarting, retry shortly", reason="model_unreachable") from None
                logger.warning("retrying %s after a broken connection: %s", name, exc)


INPUTS = Field(None, description="An image (http(s) URL, base64, or data URI), a text, a list of either, or "
                                 '{"image"|"images": ..., "text"|"texts": ...} for similarity',
               examples=["a photo of a cat"])
PARAMETERS = Field(None, description='{"mode": ..., "candidate_labels": [...], "hypothesis_template": ..., '
                                     '"function_to_apply": "softmax"|"sigmoid"|"none", "top_k": int}; all optional',
                   examples=[{"mode": "text_embedding"}])


_GATEWAY: list[SiglipGateway] = []  # this worker's gateway, set when BentoML builds it


def gateway() -> SiglipGateway:
    """This worker's gateway instance, for the apps and middlewares mounted beside BentoML's routes. This module's
    own rather than ``bentoml.get_current_service()`` (one per process): a test process may build several gateways
    from copies of this module, each with its settings."""
    if not _GATEWAY:
        raise RuntimeError("the gateway is not built yet (BentoML builds it before serving)")
    return _GATEWAY[0]


async def _v1_embeddings(request: Request) -> Response:
    body = await request.body()
    return await answer(lambda: gateway().openai.create(body), request.url.path)


async def _v1_models(request: Request) -> Response:
    name = request.path_params.get("name")
    return await answer(lambda: gateway().openai.models(name), request.url.path)


async def _info(request: Request) -> Response:
    return await answer(lambda: gateway().engine.info_json(), request.url.path)


# GET /info (TEI's name): the checkpoint, its family and shapes, backend, device and the request limits; open without
# a token (siglip.server.http.OPEN_PATHS). Mounted at "/" like the playground: only its exact path is claimed.
info_app = Starlette(routes=[Route(INFO_PATH, _info, methods=["GET"])])

# OpenAI's embeddings API (siglip.api.openai_api), as its own app: BentoML APIs are POST-only and shape their errors.
openai_app = Starlette(routes=[Route("/embeddings", _v1_embeddings, methods=["POST"]),
                               Route("/models", _v1_models, methods=["GET"]),
                               Route("/models/{name:path}", _v1_models, methods=["GET"])])


@bentoml.asgi_app(openai_app, path=OPENAI_PREFIX.rstrip("/"), name="openai")
@bentoml.asgi_app(playground.app, path="/", name="playground")  # GET /playground (its exact paths only)
@bentoml.asgi_app(info_app, path="/", name="info")  # GET /info
@bentoml.service(
    name="SiglipGateway",
    image=image,
    workers=settings.gateway_workers,
    # siglip.observe writes one structured line per request (with mode, counts and request id) instead.
    logging={"access": {"enabled": False}},
    traffic={"timeout": settings.request_timeout_s + 10, "concurrency": settings.target_concurrency},
)
class SiglipGateway:
    model = bentoml.depends(SiglipModel)

    def __init__(self) -> None:
        logging.getLogger("siglip").disabled = False
        self.fetcher = Fetcher(FetchPolicy.from_settings(settings))
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="siglip-decode")
        self.engine = Engine(settings, BentoModelClient(self.model, settings.model_stall_timeout_s),
                             self.fetcher, self.pool,
                             on_cache=observe.metrics().text_cache)
        self.openai = OpenAIEmbeddings(self.engine, settings.model)
        _GATEWAY[:] = [self]  # complete: what gateway() hands the mounted apps
        logger.info("Gateway worker %s ready (pid %d): %r", bentoml.server_context.worker_index, os.getpid(),
                    settings)
        address = listening_address()
        if address is not None and not is_loopback(address) and not settings.api_token:
            logger.warning("Listening on %s with auth off: anyone who can reach this port can use the service (and "
                           "make it fetch URLs). Set SIGLIP_API_TOKEN, or listen on 127.0.0.1 (make serve does "
                           "unless HOST is set)", address)

    @bentoml.on_shutdown
    async def _close(self) -> None:
        await self.fetcher.aclose()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, mode: str | None, inputs: Any, parameters: Any) -> Any:
        return await answer(lambda: self.engine.run(inputs, parameters, mode))

    @bentoml.api(route="/")
    async def infer(self, inputs: Any = INPUTS, parameters: dict[str, Any] | None = PARAMETERS) -> Any:
        """Any mode: auto-detected from the inputs, or set with parameters.mode."""
        return await self._serve(None, inputs, parameters)

    @bentoml.api
    async def zero_shot(self, inputs: Any = INPUTS, parameters: dict[str, Any] | None = PARAMETERS) -> Any:
        """Classify image(s) against parameters.candidate_labels: [{"label", "score"}] sorted by score."""
        return await self._serve("zero_shot", inputs, parameters)

    @bentoml.api
    async def image_embedding(self, inputs: Any = INPUTS,
                              parameters: dict[str, Any] | None = PARAMETERS) -> Any:
        """L2-normalized image embeddings: [{"embedding": [...]}], one per image."""
        return await self._serve("image_embedding", inputs, parameters)

    @bentoml.api
    async def text_embedding(self, inputs: Any = INPUTS,
                             parameters: dict[str, Any] | None = PARAMETERS) -> Any:
        """L2-normalized text embeddings: [{"embedding": [...]}], one per text."""
        return await self._serve("text_embedding", inputs, parameters)

    @bentoml.api
    async def similarity(self, inputs: Any = INPUTS, parameters: dict[str, Any] | None = PARAMETERS) -> Any:
        """Cosine similarities of images x texts: {"similarity_scores", "image_count", "text_count"}."""
        return await self._serve("similarity", inputs, parameters)


# The API's routes, read from what serves them: the gateway's APIs (route -> the mode it serves, None for the
# auto-detecting "/") and the OpenAI app's POST route.
MODE_ROUTES = {api.route: None if api.route == "/" else name for name, api in SiglipGateway.apis.items()}
API_ROUTES = frozenset({*MODE_ROUTES, *(OPENAI_PREFIX.rstrip("/") + route.path for route in openai_app.routes
                                       if "POST" in route.methods)})

# Outermost first: the observer sees every answer (the guard's refusals too), the docs page sits behind auth.
SiglipGateway.add_asgi_middleware(observe.Observer, routes=API_ROUTES)
SiglipGateway.add_asgi_middleware(
    RequestGuard, api_paths=API_ROUTES, limits=GuardLimits.from_settings(settings),
    uploads=upload_app(MODE_ROUTES, run=lambda *request: gateway().engine.run(*request),
                       limits=lambda: gateway().engine.limits),
)
SiglipGateway.add_asgi_middleware(DocsPage, openai_prefix=OPENAI_PREFIX, info_path=INFO_PATH,
                                  playground_path=playground.PAGE, upload_routes=frozenset(MODE_ROUTES))
SiglipGateway.add_asgi_middleware(ReadinessCause, status=lambda: gateway().engine.client.status)

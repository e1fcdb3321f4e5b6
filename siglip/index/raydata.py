"""The ``ray`` engine: a Ray Data pipeline that embeds images as the service does, on as many machines as the
cluster has.

    read (ids + image bytes, paths or URLs)
      -> decode   CPU tasks: the service's own image code (fetch policy, size limits, EXIF, modes, resize, NaFlex
                  grids; ``siglip.api.images.prepare_image``), a bad image becoming a row with the service's error
      -> embed    actors (a GPU each, or a fraction of one) holding the service's encoder, loaded once per actor
                  (``siglip.model.encoder.SiglipEncoder``)

``embed_images`` is the Python API: a Ray Dataset in, a Ray Dataset out, to put inside a user's own Ray job. The
``siglip-index build --engine ray`` command adds the shards, the Lance writes and the resume
(``siglip.index.shards``).

Ray is an extra (``pip install 'siglip2-serve[scale]'``); nothing here imports it at module level.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from siglip.api.engine import ModelView
from siglip.api.errors import BadRequest, ServiceError
from siglip.api.fetch import Fetcher, FetchPolicy
from siglip.api.images import ImageSpec, PatchGrid, is_http_url, prepare_image, too_large, url_scheme
from siglip.index.build import DEFAULT_RAY_BATCH_SIZE
from siglip.index.sources import is_store_uri
from siglip.settings import Settings

logger = logging.getLogger("siglip.index")

EXTRA = "pip install 'siglip2-serve[scale]'"
# Columns the decode stage adds for the embed stage (and the embed stage drops).
PIXELS, ROWS, COLS = "_siglip_pixels", "_siglip_rows", "_siglip_cols"
STATUS, ERROR, EMBEDDING = "status", "error", "embedding"
WORKER_BYTES = 384 * 2**20  # a Ray worker running the decode code, before any image


def starts_local(address: str | None) -> bool:
    """Whether ``ray.init`` will start a cluster on this machine (no address given, none in RAY_ADDRESS)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def import_ray(local: bool = False) -> Any:
    """``ray`` with Ray Data, or ImportError naming the extra that brings it. ``local``: the command is about to
    start a cluster here; Ray reads the variables that keep it on loopback when it is first imported, so they are
    set before that (the Python API leaves the caller's process alone)."""
    if local:
        # With it, the node's address is 127.0.0.1 and every port binds there (ray_constants.ENABLE_RAY_CLUSTER).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # Ray Data is a separate import
    except ImportError as exc:
        raise ImportError(f"the ray engine needs Ray Data and Lance: {EXTRA} ({exc})") from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one that listens on loopback only
    and sends no usage report: a laptop run opens no port to the network."""
    ray = import_ray(local=starts_local(address))
    from ray.data import DataContext

    # The command shows its own progress bar (and Ray Data's per-operator lines would bury it).
    DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        with warnings.catch_warnings():
            # Ray starts its processes with fork+exec; LanceDB (imported by the store) warns about any fork.
            warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
            ray.init(address=address or None, include_dashboard=False, configure_logging=False,
                     log_to_driver=True)
    return ray


@dataclass(frozen=True)
class Resources:
    """What each stage reserves from the cluster. Ray hangs when the actors hold every CPU (no decode task can run),
    so the actors' CPUs are a fraction, sized by ``fit`` on a cluster that is all there is."""

    actors: tuple[int, int] = (1, 1)  # embed actors: (min, max); Ray Data scales between them
    gpus_per_actor: float = 0.0  # 0.5: two actors share a GPU
    cpus_per_actor: float = 1.0
    decode_cpus: float = 1.0  # per decode task
    batch_size: int = DEFAULT_RAY_BATCH_SIZE  # images per embed call

    def fit(self, cluster_cpus: float) -> Resources:
        """These resources with the actors' CPUs shrunk so that at least one decode task always fits beside the
        most actors (``cluster_cpus``: what the cluster has; 0: unknown, e.g. an autoscaler that starts empty)."""
        free = cluster_cpus - self.decode_cpus
        if cluster_cpus <= 0 or self.actors[1] * self.cpus_per_actor <= free:
            return self
        if free <= 0:
            raise ValueError(f"the cluster has {cluster_cpus:g} CPUs: not enough for a decode task of "
                             f"{self.decode_cpus:g} CPUs and an actor (lower --decode-cpus)")
        share = math.floor(free / self.actors[1] * 1000) / 1000  # rounded down: rounding up would not fit
        logger.info("%d actors x %g CPUs would leave no CPU for decoding on %g CPUs: reserving %g CPUs per actor",
                    self.actors[1], self.cpus_per_actor, cluster_cpus, share)
        return Resources(self.actors, self.gpus_per_actor, share, self.decode_cpus, self.batch_size)


# -------------------------------------------------------------------------------------------------------------
# the model: what the actors will load, asked of the cluster once
# -------------------------------------------------------------------------------------------------------------
def _load_encoder(settings: Settings) -> Any:
    from siglip.model.encoder import SiglipEncoder

    encoder = SiglipEncoder(settings)
    encoder.load()
    if encoder.error:
        raise RuntimeError(encoder.error)
    return encoder


def _model_info(settings: Settings) -> dict[str, Any]:
    return _load_encoder(settings).info.to_dict()


def model_info(settings: Settings, resources: Resources) -> dict[str, Any]:
    """The ``ModelInfo`` (as ``GET /info`` shows it) of ``settings.model`` loaded where an actor would load it: the
    fingerprint to check the table against and the image spec the decode tasks need, before any image is read.
    A model that cannot load there fails here, once, with its error."""
    ray = import_ray()
    task = ray.remote(_model_info).options(num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor,
                                           max_retries=0)
    try:
        return ray.get(task.remote(settings))
    except ray.exceptions.RayTaskError as exc:
        raise RuntimeError(f"the model did not load on the cluster: {exc.cause}") from None


# -------------------------------------------------------------------------------------------------------------
# decode: CPU tasks
# -------------------------------------------------------------------------------------------------------------
async def _fetch_all(urls: dict[int, str], wheres: Sequence[str], settings: Settings) -> dict[int, Any]:
    """Bytes (or the refusal) of each URL, fetched as the gateway fetches them: its URL policy, size cap and
    timeouts, at most SIGLIP_MAX_PARALLEL_FETCHES at a time."""
    fetcher = Fetcher(FetchPolicy.from_settings(settings))
    slots = asyncio.Semaphore(settings.max_parallel_fetches)

    async def one(i: int, url: str) -> tuple[int, Any]:
        async with slots:
            try:
                return i, await fetcher.fetch(url, wheres[i])
            except ServiceError as exc:
                return i, exc

    try:
        return dict(await asyncio.gather(*(one(i, url) for i, url in urls.items())))
    finally:
        await fetcher.aclose()


def _read_path(value: str, where: str, limit: int) -> tuple[int, bytes | None]:
    """(size, bytes, or None when over ``limit``) of a local path or an object-store URI (pyarrow's filesystems:
    s3://, gs://, ...; credentials as pyarrow finds them, e.g. AWS_* variables)."""
    if is_store_uri(value):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(value)
        size = fs.get_file_info(path).size
        if size is None:
            raise FileNotFoundError(f"{value}: no such object")
        if size > limit:
            return size, None
        with fs.open_input_file(path) as f:
            return size, f.read()
    scheme = url_scheme(value)
    if scheme is not None:
        raise BadRequest(f"{where}: only http and https URLs are supported, not {scheme}://")
    size = os.stat(value).st_size
    if size > limit:
        return size, None
    with open(value, "rb") as f:
        return size, f.read()


def _local_bytes(value: Any, where: str, limit: int) -> bytes:
    """One image given as bytes, a local path or an object-store URI, under the service's
    SIGLIP_MAX_IMAGE_BYTES."""
    if isinstance(value, str):
        size, data = _read_path(value, where, limit)
    else:
        data = bytes(value)
        size = len(data)
    if data is None or size > limit:
        raise too_large(where, size, limit)
    if not data:
        raise BadRequest(f"{where}: image data is empty")
    return data


def decode_batch(batch: pa.Table, *, spec: ImageSpec, settings: Settings, id_column: str,
                 image_column: str) -> pa.Table:
    """``batch`` without its image column, plus each image's pixels (or NaFlex patch rows) and, for an image the
    service would refuse, ``status`` and ``error`` as the service gives them (the error names the id)."""
    values = batch.column(image_column).to_pylist()
    wheres = [str(i) for i in batch.column(id_column).to_pylist()]
    urls = {i: v for i, v in enumerate(values) if isinstance(v, str) and is_http_url(v)}
    fetched = asyncio.run(_fetch_all(urls, wheres, settings)) if urls else {}
    pixels: list[bytes | None] = []
    rows: list[int | None] = []
    cols: list[int | None] = []
    status: list[int | None] = []
    error: list[str | None] = []
    for i, value in enumerate(values):
        where = wheres[i] if i not in urls else f"{wheres[i]} ({value})"
        try:
            if value is None:
                raise BadRequest(f"{wheres[i]}: no image")
            data = fetched[i] if i in urls else _local_bytes(value, where, settings.max_image_bytes)
            if isinstance(data, ServiceError):
                raise data
            prepared = prepare_image(data, where, spec, settings.max_image_pixels)
        except ServiceError as exc:
            out = (None, None, None, exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - an unreadable path, an odd value: this item fails, not its shard
            out = (None, None, None, None, f"{wheres[i]}: {type(exc).__name__}: {exc}")
        else:
            if isinstance(prepared, PatchGrid):
                out = (prepared.patches.tobytes(), prepared.rows, prepared.cols, None, None)
            else:
                out = (prepared.tobytes(), prepared.shape[0], prepared.shape[1], None, None)
        for column, v in zip((pixels, rows, cols, status, error), out):
            column.append(v)
    table = batch.drop_columns([image_column])
    for name, column, kind in ((PIXELS, pixels, pa.large_binary()), (ROWS, rows, pa.int32()),
                               (COLS, cols, pa.int32()), (STATUS, status, pa.int32()), (ERROR, error, pa.string())):
        table = table.append_column(pa.field(name, kind), pa.array(column, kind))
    return table


# -------------------------------------------------------------------------------------------------------------
# embed: actors holding the encoder
# -------------------------------------------------------------------------------------------------------------
def embedding_array(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """float32 (N, D) -> FixedSizeList<float32, D> (what LanceDB searches; a plain list is "not a vector"), null
    where ``valid`` is False."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1],
                                             mask=pa.array(~valid))


class EmbedActor:
    """One per actor: the service's encoder, loaded once; each call embeds the decoded rows of a batch."""

    def __init__(self, settings: Settings, expect: dict[str, Any] | None = None):
        from siglip.index.store import describe_model, model_fingerprint, same_model

        self.encoder = _load_encoder(settings)
        self.info = self.encoder.info
        if expect is not None and not same_model(model_fingerprint(self.info.to_dict()), expect):
            # A hub id without a pinned revision, or another checkpoint at the same path on this node.
            raise RuntimeError(f"this actor loaded {describe_model(model_fingerprint(self.info.to_dict()))}, not "
                               f"{describe_model(expect)}: the nodes do not see the same model")
        logger.info("embed actor: %s on %s (%s, %s)", self.info.model, self.info.device, self.info.dtype,
                    self.info.vision_path)

    def _encode(self, items: list[tuple[bytes, int, int]]) -> np.ndarray:
        info = self.info
        if info.naflex:
            width = info.patch_size * info.patch_size * 3
            return self.encoder.encode_patches([(np.frombuffer(p, np.uint8).reshape(r * c, width), r, c)
                                                for p, r, c in items])
        return self.encoder.encode_images(np.stack([np.frombuffer(p, np.uint8).reshape(r, c, 3)
                                                    for p, r, c in items]))

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch.column(PIXELS).to_pylist()
        shape = zip(batch.column(ROWS).to_pylist(), batch.column(COLS).to_pylist())
        status = batch.column(STATUS).to_pylist()
        error = batch.column(ERROR).to_pylist()
        todo = [(i, (p, r, c)) for i, (p, (r, c)) in enumerate(zip(pixels, shape)) if p is not None]
        vectors = np.zeros((len(pixels), self.info.embed_dim), np.float32)
        valid = np.zeros(len(pixels), bool)
        if todo:
            try:
                vectors[[i for i, _ in todo]] = self._encode([item for _, item in todo])
                valid[[i for i, _ in todo]] = True
            except Exception:  # find the rows that fail alone, as the service's 500s are split
                logger.exception("a batch of %d images failed; embedding them one by one", len(todo))
                for i, item in todo:
                    try:
                        vectors[i] = self._encode([item])[0]
                        valid[i] = True
                    except Exception as exc:  # noqa: BLE001
                        status[i], error[i] = 500, f"internal error: {type(exc).__name__}: {exc}"
        table = batch.drop_columns([PIXELS, ROWS, COLS, STATUS, ERROR])
        return (table.append_column(pa.field(EMBEDDING, pa.list_(pa.float32(), self.info.embed_dim)),
                                    embedding_array(vectors, valid))
                .append_column(pa.field(STATUS, pa.int32()), pa.array(status, pa.int32()))
                .append_column(pa.field(ERROR, pa.string()), pa.array(error, pa.string())))


# -------------------------------------------------------------------------------------------------------------
# the Python API
# -------------------------------------------------------------------------------------------------------------
def embed_images(ds: Any, settings: Settings | None = None, *, id_column: str = "id", image_column: str = "image",
                 resources: Resources = Resources(), info: dict[str, Any] | None = None) -> Any:
    """Embed the images of a Ray Dataset as the service would.

    ``ds``: rows with an id and an image, given as bytes, a local path (readable where the tasks run) or an
    http(s) URL; other columns pass through. ``settings``: the service's (default ``Settings.from_env()``: the
    same ``SIGLIP_*`` variables). ``info``: the model's ``model_info`` if already known.

    Returns a Dataset with the other columns, ``embedding`` (FixedSizeList<float32, D>, L2-normalized; null for an
    image the service would refuse), ``status`` and ``error`` (the service's HTTP status and message for it).
    Lazy, as Ray Datasets are: nothing runs until it is consumed."""
    settings = settings or Settings.from_env()
    import_ray()
    from ray.data import ActorPoolStrategy

    if info is None:
        info = model_info(settings, resources)
    spec = ModelView.from_info(info, settings.jpeg_draft_factor).image
    # A decode task is a Python worker (~350 MB measured) holding one full-size image being decoded and a batch of
    # resized ones; reserving that memory
    # also keeps Ray Data from fusing the decode into the actors (it fuses stages that ask for the same
    # resources): decoding must scale over the cluster's CPUs, not queue on the GPUs.
    pixels = (spec.max_num_patches * spec.patch_size ** 2 if spec.naflex else spec.height * spec.width) * 3
    memory = WORKER_BYTES + resources.batch_size * pixels + settings.max_image_pixels * 4
    decoded = ds.map_batches(decode_batch, batch_format="pyarrow", num_cpus=resources.decode_cpus, memory=memory,
                             batch_size=resources.batch_size,
                             fn_kwargs={"spec": spec, "settings": settings, "id_column": id_column,
                                        "image_column": image_column})
    from siglip.index.store import model_fingerprint

    return decoded.map_batches(EmbedActor, fn_constructor_kwargs={"settings": settings,
                                                                  "expect": model_fingerprint(info)},
                               batch_format="pyarrow",
                               batch_size=resources.batch_size, num_cpus=resources.cpus_per_actor,
                               num_gpus=resources.gpus_per_actor, compute=ActorPoolStrategy(
                                   min_size=resources.actors[0], max_size=resources.actors[1]))

"""siglip-index: build a LanceDB catalog of image embeddings through the service (or the model in this process),
and search it.

    siglip-index build ./photos --db ./catalog          # a folder (recursive), a list of URLs, or a CSV
    siglip-index build ./photos --db ./catalog --engine local   # no server: SIGLIP_MODEL loaded here
    siglip-index build manifest.parquet --db ./catalog --engine ray   # a Ray cluster (RAY_ADDRESS) or a local one
    siglip-index search --db ./catalog "a red car"      # text query
    siglip-index search --db ./catalog --image q.jpg    # image query (a path or an http(s) URL)
    siglip-index status --db ./catalog                  # rows, model, index, versions, failed items
    siglip-index finalize --db ./catalog                # compact, drop old versions, build the ANN index

Exit status of build: 0 every item indexed; 3 finished, some items failed (listed); 1 stopped by an error
(server unreachable, auth, wrong URL); 130/143 interrupted (SIGINT/SIGTERM; rerun to resume); 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from siglip.index.build import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COMMIT_EVERY,
    DEFAULT_RAY_BATCH_SIZE,
    DEFAULT_SHARD_SIZE,
)
from siglip.index.store import DEFAULT_INDEX_THRESHOLD

logger = logging.getLogger("siglip.index")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
SHOWN_FAILURES = 20


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="PATH",
                        help="LanceDB database: a directory (created if missing) or any LanceDB URI")
    parser.add_argument("--table", default="images", help="table name (default: images)")
    parser.add_argument("--server", default="http://localhost:3000", metavar="URL",
                        help="the SigLIP service (default: http://localhost:3000)")
    parser.add_argument("--token", default=os.environ.get("SIGLIP_API_TOKEN"),
                        help="bearer token when the service has auth on (default: $SIGLIP_API_TOKEN, the "
                             "variable the service reads it from)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds per request (default: 120)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _actors(value: str) -> tuple[int, int]:
    low, _, high = value.partition(",")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX or N, got {value!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {value!r}")
    return pair


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="siglip-index", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed a folder, URL list or CSV into a table (resumable)")
    b.add_argument("source", help="a folder of images (recursive), a text file with one URL or path per line, "
                                  "a CSV, or a Parquet manifest, with an id and an image column")
    b.add_argument("--type", dest="kind", choices=["auto", "folder", "list", "csv", "parquet"], default="auto",
                   help="how to read SOURCE (default: auto: folder, .csv/.tsv, .parquet/.pq, else a list)")
    b.add_argument("--id-column", default="id", help="CSV/Parquet: the id column (default: id)")
    b.add_argument("--image-column", default="image",
                   help="CSV/Parquet: the column with an http(s) URL or a path relative to the file (default: "
                        "image)")
    b.add_argument("--batch-size", type=_positive, default=None,
                   help=f"images per request, at most the server's SIGLIP_MAX_IMAGES_PER_REQUEST (default: "
                        f"{DEFAULT_BATCH_SIZE}); ray: images per embed call on an actor (default: "
                        f"{DEFAULT_RAY_BATCH_SIZE})")
    b.add_argument("--concurrency", type=_positive, default=4, help="requests in flight (default: 4)")
    b.add_argument("--tries", type=_positive, default=8,
                   help="tries per request on 429/502/503/504 or a broken connection (default: 8; while no "
                        "server has answered at all, 3)")
    b.add_argument("--index-threshold", type=int, default=DEFAULT_INDEX_THRESHOLD, metavar="ROWS",
                   help="build the IVF_HNSW_SQ cosine index once the table has this many rows; below it search "
                        f"is exact (default: {DEFAULT_INDEX_THRESHOLD}; 0: never)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--engine", choices=["http", "local", "ray"], default="http",
                   help="http: through the service at --server (default); local: the model in this process, "
                        "configured by the service's SIGLIP_* variables (SIGLIP_MODEL, SIGLIP_DEVICE, ...), no "
                        "server; ray: a Ray Data pipeline (decode on CPU tasks, embed on GPU actors), same "
                        "variables, needs the [scale] extra")
    b.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"images per shard: the ray engine commits whole shards, so a crash loses at most the "
                        f"shards in flight (default: {DEFAULT_SHARD_SIZE:,})")
    r = b.add_argument_group("ray engine")
    r.add_argument("--address", default=None,
                   help="the Ray cluster to join (default: $RAY_ADDRESS; none: start one on this machine, "
                        "listening on 127.0.0.1 only)")
    r.add_argument("--actors", type=_actors, default=None, metavar="MIN,MAX",
                   help="embed actors, each loading the model once; Ray Data scales between MIN and MAX "
                        "(default: 1,<GPUs in the cluster> or 1,1 without GPUs; N means N,N)")
    r.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per actor; 0.5 puts two actors on a GPU (default: 1 on a cluster with GPUs, else 0)")
    r.add_argument("--cpus-per-actor", type=float, default=None, metavar="C",
                   help="CPUs each actor reserves (default: 1; less when the actors would leave none for "
                        "decoding on a cluster of fixed size)")
    r.add_argument("--decode-cpus", type=float, default=None, metavar="C",
                   help="CPUs per decode task (default: 1); the cluster's other CPUs decode in parallel")
    r.add_argument("--commit-every", type=_positive, default=DEFAULT_COMMIT_EVERY, metavar="SHARDS",
                   help=f"finished shards per commit (default: {DEFAULT_COMMIT_EVERY})")
    _common(b)

    st = sub.add_parser("status", help="what a table holds: rows, model, ANN index, versions, failed items")
    st.add_argument("--failures", type=int, default=SHOWN_FAILURES, metavar="N",
                    help=f"failed items to list (default: {SHOWN_FAILURES}; --json lists them all)")
    _common(st)
    f = sub.add_parser("finalize", help="compact the table, drop old versions, build the ANN index (no build may "
                                        "be writing to the table)")
    f.add_argument("--index-threshold", type=int, default=DEFAULT_INDEX_THRESHOLD, metavar="ROWS",
                   help=f"build the ANN index at this many rows (default: {DEFAULT_INDEX_THRESHOLD}; 0: never)")
    f.add_argument("--remove-orphans", action="store_true",
                   help="also delete files no version refers to, however recent: those of shards a killed ray "
                        "build never committed (only when no build of this table is running: it would delete the "
                        "fragments a running ray build has written and not committed yet)")
    _common(f)

    s = sub.add_parser("search", help="the best matches for a text or an image")
    s.add_argument("query", nargs="?", help="query text")
    s.add_argument("--image", metavar="PATH_OR_URL", help="query image instead of text")
    s.add_argument("--top-k", type=_positive, default=10, help="matches to show (default: 10)")
    _common(s)
    return top


# -------------------------------------------------------------------------------------------------------------
# build
# -------------------------------------------------------------------------------------------------------------
def _summary(args, store, catalog, stats, index: str | None, interrupted: bool) -> dict:
    failed = catalog.problems + stats.failures
    return {"db": args.db, "table": args.table, "rows": store.count(), "in_source": len(catalog.items),
            "shards": stats.shards, "shards_todo": stats.shards_todo, "shards_done": stats.shards_done,
            "skipped": stats.skipped, "added": stats.added, "duplicates": catalog.duplicates,
            "failed": [f.as_dict() for f in failed], "retries": dict(stats.retries), "requests": stats.requests,
            "seconds": round(stats.seconds, 2), "images_per_s": round(stats.rate, 2), "index": index,
            "interrupted": interrupted}


def _print_summary(s: dict, threshold: int) -> None:
    print(f"{s['in_source']} images in the source: {s['skipped']} already in the table, {s['added']} added, "
          f"{len(s['failed'])} failed ({s['seconds']:.1f} s, {s['images_per_s']:.1f} images/s)"
          + (f"; {s['duplicates']} duplicate ids ignored" if s["duplicates"] else ""))
    if s["shards_done"]:
        print(f"shards: {s['shards_done']} of the {s['shards_todo']} to do committed ({s['shards']} in the source)")
    if s["retries"]:
        print("retried: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["retries"].items())))
    index = s["index"] or (f"none (exact search; built at {threshold:,} rows)" if threshold else "none")
    print(f"table {s['table']!r} in {s['db']}: {s['rows']} rows; ANN index: {index}")
    for f in s["failed"][:SHOWN_FAILURES]:
        status = f"HTTP {f['status']}" if f["status"] is not None else "error"
        print(f"  failed {f['id']}: {status}: {f['error']}")
    if len(s["failed"]) > SHOWN_FAILURES:
        print(f"  ... and {len(s['failed']) - SHOWN_FAILURES} more (--json lists them all)")
    if s["interrupted"]:
        print("interrupted: the batches written so far are kept; rerun the same command to resume")


async def _run_build(args, store, todo, stats, signals: list[int]) -> None:

    from siglip.index.build import INDEX_BACKOFF, Builder

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_term() -> None:
        signals.append(signal.SIGTERM)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    bar = _progress_bar(args, len(todo))

    def progress(n: int) -> None:
        bar.update(n)
        if stats.failures:
            bar.set_postfix(failed=len(stats.failures), refresh=False)

    try:
        async with _embedder(args) as embedder:
            builder = Builder(embedder, store, stats, backoff=replace(INDEX_BACKOFF, attempts=args.tries),
                              progress=progress)
            await builder.run(todo, args.batch_size, args.concurrency)
    finally:
        bar.close()


def _progress_bar(args, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _ray_resources(args, cluster: dict):
    """The stages' resources: the flags, with defaults sized to the cluster (``ray.cluster_resources()``)."""
    from siglip.index.raydata import Resources

    gpus = cluster.get("GPU", 0)
    if args.gpus_per_actor is None and not gpus:
        logger.warning("the cluster shows no GPU now: the actors embed on CPUs. On a cluster that adds GPU "
                       "workers on demand (KubeRay scaling from zero), pass --gpus-per-actor 1")
    per_actor = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if per_actor and not gpus:
        logger.warning("waiting for a node with %g GPU for each actor (the cluster shows none now; Ctrl-C if it "
                       "will never have one)", per_actor)
    actors = args.actors or (1, max(1, int(gpus / per_actor)) if per_actor else 1)
    defaults = Resources()
    return Resources(actors, per_actor,
                     defaults.cpus_per_actor if args.cpus_per_actor is None else args.cpus_per_actor,
                     defaults.decode_cpus if args.decode_cpus is None else args.decode_cpus,
                     args.batch_size).fit(cluster.get("CPU", 0))


def _run_ray_build(args, store, todo, stats, signals: list[int]) -> None:

    from siglip.index import shards
    from siglip.index.build import BuildAborted
    from siglip.index.raydata import connect, model_info, starts_local
    from siglip.index.store import StoreError, model_fingerprint

    def on_term(signum, frame) -> None:
        signals.append(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    bar = None
    ray = None
    try:
        ray = connect(args.address)
        cluster = ray.cluster_resources()
        resources = _ray_resources(args, cluster)
        logger.info("ray cluster: %s; %d-%d embed actors x (%g GPU, %g CPU), decode tasks of %g CPU, batches of %d",
                    ", ".join(f"{v:g} {k}" for k, v in sorted(cluster.items())
                              if k in ("CPU", "GPU")), *resources.actors, resources.gpus_per_actor,
                    resources.cpus_per_actor, resources.decode_cpus, resources.batch_size)
        info = model_info(args.settings, resources)
        fingerprint = model_fingerprint(info)
        store.check_model(fingerprint, stamp=True)
        store.prepare_for_fragments(info["embed_dim"], fingerprint)
        bar = _progress_bar(args, len(todo))
        shards.build(store, todo, stats, settings=args.settings, resources=resources, info=info,
                     shard_size=args.shard_size, commit_every=args.commit_every, progress=bar.update)
    except (KeyboardInterrupt, StoreError):
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in many types; the build stops with the cause
        raise BuildAborted(f"the ray pipeline stopped: {type(exc).__name__}: {exc}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
        stats.finished = time.monotonic()
        if ray is not None and starts_local(args.address):
            ray.shutdown()  # the cluster this run started


def _embedder(args):
    if args.engine == "local":
        from siglip.index.local import LocalEmbedder

        return LocalEmbedder(args.settings)
    from siglip.client import AsyncSiglipClient

    # retries=0: the builder retries itself, and narrows its window on 429s
    return AsyncSiglipClient(args.server, token=args.token, timeout=args.timeout, retries=0)


def build(args) -> int:
    from siglip.index.build import BuildAborted, BuildStats, plan
    from siglip.index.sources import SourceError, read_source
    from siglip.index.store import CatalogStore, StoreError

    try:
        if args.engine != "http":
            from siglip.settings import Settings

            args.settings = Settings.from_env()  # a bad SIGLIP_* value: one line naming it, before any work
        if args.engine == "ray":
            from siglip.index.raydata import import_ray, starts_local

            import_ray(local=starts_local(args.address))  # without the [scale] extra: say so before reading
        if args.batch_size is None:
            args.batch_size = DEFAULT_RAY_BATCH_SIZE if args.engine == "ray" else DEFAULT_BATCH_SIZE
        catalog = read_source(args.source, args.kind, args.id_column, args.image_column)
        created = "://" not in args.db and not Path(args.db).expanduser().exists()
        store = CatalogStore(args.db, args.table)
        todo = plan(catalog.items, store.ids(), args.shard_size)
    except (SourceError, StoreError, ValueError, ImportError) as exc:
        print(f"siglip-index: {exc}", file=sys.stderr)
        return EXIT_ERROR
    shards = -(-len(catalog.items) // args.shard_size)
    stats = BuildStats(total=len(catalog.items), todo=len(todo), skipped=len(catalog.items) - len(todo),
                       shards=shards, shards_todo=len({item.shard for item in todo}))
    if args.engine == "http":
        through = args.server
    elif args.engine == "local":
        through = (f"{args.settings.model} in this process (--engine local; --server, --token and --timeout do "
                   "not apply, SIGLIP_REQUEST_TIMEOUT_S does)")
    else:
        through = (f"{args.settings.model} on Ray ({stats.shards_todo} of {shards} shards of {args.shard_size:,} "
                   "to do)")
    logger.info("%s: %d images, %d already in table %r of %s; embedding %d with %s (batches of %d%s)",
                args.source, stats.total, stats.skipped, args.table, args.db, stats.todo, through, args.batch_size,
                "" if args.engine == "ray" else f", {args.concurrency} in flight")
    signals: list[int] = []
    error, interrupted, index = None, False, None
    try:
        if todo and args.engine == "ray":
            _run_ray_build(args, store, todo, stats, signals)
        elif todo:  # nothing to embed: no server needed, no model loaded
            asyncio.run(_run_build(args, store, todo, stats, signals))
    except KeyboardInterrupt:
        interrupted = True
        signals.append(signal.SIGINT)
    except asyncio.CancelledError:
        interrupted = True
    except (BuildAborted, StoreError) as exc:
        error = str(exc)
    if args.engine == "ray":
        # Compacting or indexing a table of a cluster's size is not the driver's job: `finalize` does it.
        index = store.vector_index()
        if stats.added and not index:
            logger.info("run `siglip-index finalize --db %s` once the builds are done: compaction, old versions, "
                        "the ANN index", args.db)
    elif not interrupted and not error:
        try:
            index = store.finish(args.index_threshold, changed=stats.added > 0)
        except KeyboardInterrupt:
            interrupted = True
            signals.append(signal.SIGINT)
    else:
        index = store.vector_index()
    try:
        # The failures table follows what this build settled, interrupted or not: a later `status` lists them.
        # (the ray engine recorded its failures with each commit)
        store.record_failures(catalog.problems + ([] if args.engine == "ray" else stats.failures), stats.added_ids)
    except Exception as exc:  # noqa: BLE001 - the rows are written; losing the failure list must not hide them
        logger.warning("could not record the failed items in %s: %s", args.db, exc)
    db_dir = Path(args.db).expanduser()
    if error and created and stats.added == 0 and db_dir.is_dir() and not any(db_dir.iterdir()):
        db_dir.rmdir()  # a build that could not start leaves no empty database behind
    summary = _summary(args, store, catalog, stats, index, interrupted)
    if args.json:
        print(json.dumps(summary | ({"error": error} if error else {}), indent=1))
    else:
        _print_summary(summary, args.index_threshold)
    if error:
        print(f"siglip-index: {error}", file=sys.stderr)
        return EXIT_ERROR
    if interrupted:
        return 128 + (signals[0] if signals else signal.SIGINT)
    return EXIT_PARTIAL if summary["failed"] else EXIT_OK


# -------------------------------------------------------------------------------------------------------------
# search
# -------------------------------------------------------------------------------------------------------------
def search(args) -> int:
    from siglip.client import SiglipClient, SiglipError
    from siglip.index.sources import is_url
    from siglip.index.store import StoreError, model_fingerprint

    if (args.query is None) == (args.image is None):
        print("siglip-index search: give a query text or --image, not both", file=sys.stderr)
        return EXIT_USAGE
    image = None
    if args.image is not None:
        image = args.image if is_url(args.image) else Path(args.image)
        if isinstance(image, Path) and not image.is_file():
            print(f"siglip-index search: {args.image}: no such file", file=sys.stderr)
            return EXIT_USAGE
    try:
        store = _open_existing(args)  # a search creates nothing
        if store is None:
            return EXIT_ERROR
        with SiglipClient(args.server, token=args.token, timeout=args.timeout) as client:
            if store.model is not None:
                try:
                    fingerprint = model_fingerprint(client.info())
                except SiglipError as exc:
                    if exc.status != 404:
                        raise
                    fingerprint = None  # a server from before GET /info: check_model warns it cannot check
                store.check_model(fingerprint, f"the server at {args.server}")
            vector = client.image_embedding([image]) if image is not None else client.text_embedding([args.query])
        matches = store.search(vector[0], args.top_k)
    except SiglipError as exc:
        status = "no connection" if exc.status is None else f"HTTP {exc.status}"
        print(f"siglip-index search: the server answered {status}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except StoreError as exc:
        print(f"siglip-index search: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps([m.as_dict() for m in matches], indent=1))
    else:
        width = max((len(m.id) for m in matches), default=2)
        for rank, m in enumerate(matches, 1):
            print(f"{rank:>3}  {m.score:.4f}  {m.id:<{width}}  {m.source}")
    return EXIT_OK


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a StreamHandler keeps the stream it started with)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


# -------------------------------------------------------------------------------------------------------------
# status and finalize
# -------------------------------------------------------------------------------------------------------------
def _open_existing(args):
    """The store of an existing table, or None after printing why (status and finalize create nothing)."""
    from siglip.index.store import CatalogStore

    if "://" not in args.db and not Path(args.db).expanduser().is_dir():
        print(f"siglip-index {args.command}: {args.db}: no such database", file=sys.stderr)
        return None
    store = CatalogStore(args.db, args.table)
    if store.table is None:
        print(f"siglip-index {args.command}: no table {args.table!r} in {args.db}", file=sys.stderr)
        return None
    return store


def _print_status(s: dict, failures: list[dict], shown: int) -> None:
    from siglip.index.store import describe_model

    model = describe_model(s["model"]) if s["model"] else "not recorded (written before model fingerprints)"
    shards = f" in {s['shards']} shards" if s["shards"] else ""
    print(f"table {s['table']!r} in {s['db']}: {s['rows']} rows{shards}, model {model}; ANN index: "
          f"{s['index'] or 'none'}; "
          f"{s['versions']} versions kept; {s['failures']} failed items")
    for f in failures[:shown]:
        status = f"HTTP {f['status']}" if f["status"] is not None else "error"
        print(f"  failed {f['id']}: {status}: {f['error']}")
    if s["failures"] > shown:
        print(f"  ... and {s['failures'] - shown} more (--json lists them all)")


def status(args) -> int:
    store = _open_existing(args)
    if store is None:
        return EXIT_ERROR
    summary, failures = store.status(), store.failures()
    if args.json:
        print(json.dumps(summary | {"failed": failures}, indent=1))
    else:
        _print_status(summary, failures, args.failures)
    return EXIT_OK


def finalize(args) -> int:
    from siglip.index.store import StoreError

    store = _open_existing(args)
    if store is None:
        return EXIT_ERROR
    try:
        summary = store.finalize(args.index_threshold, remove_orphans=args.remove_orphans)
    except StoreError as exc:
        print(f"siglip-index finalize: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_status(summary, store.failures(), SHOWN_FAILURES)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("siglip-index: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    return {"build": build, "search": search, "status": status, "finalize": finalize}[args.command](args)

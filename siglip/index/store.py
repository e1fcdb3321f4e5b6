"""The catalog table in LanceDB: ``id`` (string), ``source`` (string), ``embedding`` (float32 x D, L2-normalized),
``shard`` (int64: the item's position in the source // the build's shard size; null in tables from before shards).

The ``embedding`` column's metadata names the model that wrote it (``model_fingerprint``): a build or a search with
another checkpoint is refused, since vectors of two models are not comparable even when their widths agree
(base-224 and base-512 are both 768-dim).

LanceDB commits each ``add`` atomically (a new table version), so a write that is interrupted, even by SIGKILL,
leaves no partial rows: together with skipping ids already in the table, a rerun writes each id exactly once.
One build per table at a time (two concurrent builds could both write an id neither had seen).

The ``ray`` engine writes differently (``siglip.index.shards``): its workers write Lance fragments and the driver
commits them, a few whole shards per commit (``commit_fragments``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # pa.compute is a separate import

logger = logging.getLogger("siglip.index")

EMBEDDING = "embedding"
# Below this many rows an exact (brute-force) search is fast enough: 20k x 768 takes ~85 ms on 2 CPU cores, so
# 50k about 200 ms; above it IVF_HNSW_SQ answers in ~10 ms (recall ~0.98 in our measurement).
DEFAULT_INDEX_THRESHOLD = 50_000
REFINE = 10


class StoreError(RuntimeError):
    """The table cannot take these rows (e.g. embeddings of another size: another model)."""


@dataclass(frozen=True)
class Match:
    id: str
    source: str
    score: float  # cosine similarity

    def as_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "score": self.score}


MODEL_KEY = "siglip.model"
# What identifies the weights, whatever the checkpoint is called or where it is mounted (google/... on the hub,
# /models/siglip2 in a container, .../baked in a bento): the learned logit scale and bias, and the shapes.
IDENTITY = ("family", "model_type", "embed_dim", "patch_size", "image_height", "image_width", "text_length",
            "logit_scale", "logit_bias")


def model_fingerprint(info: Mapping[str, Any]) -> dict[str, Any]:
    """The model's fingerprint, from ``GET /info`` (or the local engine's ModelInfo): the ``IDENTITY`` fields, which
    decide whether two models' vectors are comparable, plus its name and hub revision for messages. Serving
    settings (dtype, backend) change vectors by rounding only; a NaFlex patch budget changes the resolution an
    image is seen at, not the space: none of them count."""
    model = str(info["model"])
    local = model.startswith(("/", "./", "../", "~"))
    return {"model": model.rstrip("/").rsplit("/", 1)[-1] if local else model, "revision": info.get("revision"),
            **{key: info.get(key) for key in IDENTITY}}


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(key) == b.get(key) for key in IDENTITY)


def describe_model(fingerprint: Mapping[str, Any]) -> str:
    revision = f" at {fingerprint['revision'][:12]}" if fingerprint.get("revision") else ""
    size = (f"{fingerprint['image_width']}x{fingerprint['image_height']}, " if fingerprint.get("image_height")
            else "NaFlex, " if fingerprint.get("model_type") == "siglip2" else "")
    return f"{fingerprint['model']}{revision} ({fingerprint.get('family')}, {size}{fingerprint['embed_dim']}-dim)"


SHARD = "shard"


def schema(dim: int, model: Mapping[str, Any] | None = None, shard: bool = True) -> pa.Schema:
    meta = {MODEL_KEY: json.dumps(dict(model), sort_keys=True)} if model else None
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("source", pa.string()),
              pa.field(EMBEDDING, pa.list_(pa.float32(), dim), metadata=meta)]
    return pa.schema(fields + [pa.field(SHARD, pa.int64())] if shard else fields)


def rows(ids: Sequence[str], sources: Sequence[str], vectors: np.ndarray,
         model: Mapping[str, Any] | None = None, shards: Sequence[int | None] | None = None) -> pa.Table:
    """Rows of the catalog table; without ``shards``, the schema of tables from before shards."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    columns = [pa.array(ids, pa.string()), pa.array(sources, pa.string()), embedding]
    if shards is not None:
        columns.append(pa.array(shards, pa.int64()))
    return pa.Table.from_arrays(columns, schema=schema(dim, model, shard=shards is not None))


FAILURES = "{table}_failures"  # beside each catalog table: the items its builds could not embed, and why
FAILURE_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("source", pa.string()),
                            pa.field("status", pa.int32()), pa.field("error", pa.string())])


def _quoted(ids: Sequence[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


class CatalogStore:
    """One table of one LanceDB database (a local directory, or any URI LanceDB accepts, e.g. ``s3://...``).
    The table is created by the first ``add``, when the embedding size is known."""

    def __init__(self, uri: str, table: str = "images"):
        import lancedb

        self.uri, self.name = uri, table
        self.db = lancedb.connect(uri)
        self.table = self._open()

    def _open(self):
        # open_table raises ValueError for a missing table; list_tables() is paginated, table_names() deprecated
        try:
            return self.db.open_table(self.name)
        except ValueError:
            return None

    @property
    def dim(self) -> int | None:
        return None if self.table is None else self.table.schema.field(EMBEDDING).type.list_size

    @property
    def model(self) -> dict[str, Any] | None:
        """The fingerprint of the model that wrote the table (None: no table, or one written before fingerprints)."""
        if self.table is None:
            return None
        raw = (self.table.schema.field(EMBEDDING).metadata or {}).get(MODEL_KEY.encode())
        return json.loads(raw) if raw else None

    def check_model(self, fingerprint: Mapping[str, Any] | None, doing: str = "this build",
                    stamp: bool = False) -> None:
        """Refuse a model other than the table's: its vectors would not be comparable with the table's. ``stamp``:
        a table written before fingerprints gets this one (the builder's: it is about to add rows)."""
        have = self.model
        if fingerprint is None:
            if have is None and stamp:
                logger.warning("the server has no GET /info: table %r will not record which model wrote it",
                               self.name)
            elif have is not None:
                logger.warning("cannot check %s against table %r's model %s (no GET /info)", doing, self.name,
                               describe_model(have))
            return
        if have is None:
            if self.table is not None and stamp:
                logger.warning("table %r in %s names no model (written before model fingerprints): recording %s",
                               self.name, self.uri, describe_model(fingerprint))
                self.table.update_field_metadata({"path": EMBEDDING, "metadata": {
                    MODEL_KEY: json.dumps(dict(fingerprint), sort_keys=True)}})
            return
        if not same_model(have, fingerprint):
            raise StoreError(f"table {self.name!r} in {self.uri} holds embeddings of {describe_model(have)}, but "
                             f"{doing} uses {describe_model(fingerprint)}: vectors of two models are not comparable;"
                             " use another --table or --db, or the model the table was built with")

    def count(self) -> int:
        return 0 if self.table is None else self.table.count_rows()

    def ids(self) -> set[str]:
        if self.table is None:
            return set()
        column = self.table.search().select(["id"]).limit(None).to_arrow().column("id")
        return set(column.to_pylist())

    @property
    def has_shards(self) -> bool:
        return self.table is None or SHARD in self.table.schema.names

    def add(self, ids: Sequence[str], sources: Sequence[str], vectors: np.ndarray,
            model: Mapping[str, Any] | None = None, shards: Sequence[int | None] | None = None) -> None:
        """Append rows; ``model``: the writer's fingerprint, recorded when this creates the table."""
        if not ids:
            return
        self._check_dim(vectors.shape[1])
        shards = (shards if shards is not None else [None] * len(ids)) if self.has_shards else None
        data = rows(ids, sources, vectors, model if self.table is None else self.model, shards)
        if self.table is None:
            self.table = self.db.create_table(self.name, data=data)
        else:
            self.table.add(data)

    def _check_dim(self, dim: int) -> None:
        if self.dim is not None and dim != self.dim:
            raise StoreError(f"table {self.name!r} in {self.uri} holds {self.dim}-dim embeddings but the model "
                             f"gives {dim}-dim ones (another model?): use another --table")

    # -- fragments written elsewhere (the ray engine) -----------------------------------------------------------
    def prepare_for_fragments(self, dim: int, model: Mapping[str, Any] | None) -> tuple[str, pa.Schema]:
        """Before workers write fragments: the table exists (empty if new) with a shard column. Returns the Lance
        dataset's URI and the schema the fragments must have."""
        self._check_dim(dim)
        if self.table is None:
            self.table = self.db.create_table(self.name, schema=schema(dim, model))
        elif SHARD not in self.table.schema.names:
            logger.info("adding a shard column to table %r (written before shards; its rows get none)", self.name)
            self.table.add_columns(pa.field(SHARD, pa.int64()))
        return self.table.to_lance().uri, self.table.schema

    def commit_fragments(self, fragments: Sequence[Any]) -> None:
        """Make fragments written by ``lance.fragment.write_fragments`` (``FragmentMetadata``) part of the table, in
        one commit (a new version): all of them or, if this is interrupted, none."""
        import lance

        if not fragments:
            return
        dataset = self.table.to_lance()
        lance.LanceDataset.commit(dataset.uri, lance.LanceOperation.Append(list(fragments)),
                                  read_version=dataset.version)
        self.table.checkout_latest()

    def shards(self) -> int:
        """How many shards have rows (with the ray engine, a shard's rows are committed all at once)."""
        if self.table is None or SHARD not in self.table.schema.names:
            return 0
        column = self.table.search().select([SHARD]).limit(None).to_arrow().column(SHARD)
        return len(pa.compute.unique(column.drop_null()))

    # -- failures -----------------------------------------------------------------------------------------------
    def _failures_table(self, create: bool = False):
        name = FAILURES.format(table=self.name)
        try:
            return self.db.open_table(name)
        except ValueError:
            return self.db.create_table(name, schema=FAILURE_SCHEMA) if create else None

    def record_failures(self, failures: Sequence[Any], settled: Sequence[str]) -> None:
        """After a build: ``settled`` ids (tried again by it, and now indexed or failed anew) lose their old failure
        rows; ``failures`` (``siglip.index.sources.Failure``) are written with the error the service gave."""
        table = self._failures_table(create=bool(failures))
        if table is None:
            return
        # Only ids the table holds are deleted: the failures table is small, the settled ids may be millions.
        held = set(table.to_arrow().column("id").to_pylist())
        ids = sorted((set(settled) | {f.id for f in failures}) & held)
        for start in range(0, len(ids), 1000):  # bounded predicates
            table.delete(f"id IN ({_quoted(ids[start:start + 1000])})")
        if failures:
            table.add(pa.Table.from_pylist([{"id": f.id, "source": f.source, "status": f.status, "error": f.error}
                                            for f in failures], schema=FAILURE_SCHEMA))

    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        table = self._failures_table()
        if table is None:
            return []
        rows = table.to_arrow().sort_by("id").to_pylist()
        return rows if limit is None else rows[:limit]

    # -- status and finalize --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What is in the table: rows, the model that wrote it, the ANN index, versions kept, failed items."""
        failures = self._failures_table()
        return {"db": self.uri, "table": self.name, "rows": self.count(), "shards": self.shards(), "model": self.model,
                "index": self.vector_index(), "versions": len(self.table.list_versions()) if self.table else 0,
                "failures": failures.count_rows() if failures is not None else 0}

    def finalize(self, index_threshold: int = DEFAULT_INDEX_THRESHOLD, remove_orphans: bool = False) -> dict[str, Any]:
        """Compact, drop every old version (only safe while no build writes to this table), and build the ANN
        index when the table has ``index_threshold`` rows. ``remove_orphans``: also delete files no version refers
        to however recent (those of shards a killed ray build never committed); while a ray build runs, that would
        delete the fragments it has written and not yet committed. Returns ``status()`` after."""
        if self.table is None:
            raise StoreError(f"no table {self.name!r} in {self.uri}: run `siglip-index build` first")
        from datetime import timedelta

        self.table.optimize(cleanup_older_than=timedelta(0), delete_unverified=remove_orphans)
        self.finish(index_threshold, changed=False)
        failures = self._failures_table()
        if failures is not None:
            failures.optimize(cleanup_older_than=timedelta(0), delete_unverified=remove_orphans)
        return self.status()

    def vector_index(self) -> str | None:
        """The type of the index on the embedding column, if any (e.g. "IVF_HNSW_SQ")."""
        if self.table is None:
            return None
        for index in self.table.list_indices():
            if EMBEDDING in index.columns:
                return self.table.index_stats(index.name).index_type
        return None

    def finish(self, index_threshold: int = DEFAULT_INDEX_THRESHOLD, changed: bool = True) -> str | None:
        """After a build: if rows were added, compact the small per-batch writes and add the new rows to an
        existing index (LanceDB's ``optimize``: no retraining); then create the ANN index if there is none and
        the table has ``index_threshold`` rows (0: never). Returns the index type or None."""
        if self.table is None:
            return None
        from lancedb.index import IvfHnswSq

        if changed:
            self.table.optimize()
        if self.vector_index() is None and 0 < index_threshold <= self.count():
            logger.info("building an IVF_HNSW_SQ cosine index on %d rows", self.count())
            # The config object is LanceDB 0.40's API; create_index(metric=..., vector_column_name=...) is deprecated.
            self.table.create_index(EMBEDDING, config=IvfHnswSq(distance_type="cosine"))
        return self.vector_index()

    def search(self, vector: np.ndarray, k: int = 10) -> list[Match]:
        if self.table is None:
            raise StoreError(f"no table {self.name!r} in {self.uri}: run `siglip-index build` first")
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise StoreError(f"table {self.name!r} holds {self.dim}-dim embeddings but the query embedding has "
                             f"{vector.shape[0]} (another model?)")
        # Cosine, as the index is built. The index compares 8-bit quantized vectors (scores off by 0.1 on the
        # tiny model); refine_factor re-ranks REFINE x k candidates on the stored float32 vectors, so the scores
        # are the exact cosine similarities (a no-op without an index). Naming _distance keeps LanceDB from
        # warning about auto-projection.
        hits = (self.table.search(vector, vector_column_name=EMBEDDING).distance_type("cosine").limit(k)
                .refine_factor(REFINE).select(["id", "source", "_distance"]).to_list())
        return [Match(h["id"], h["source"], round(1.0 - float(h["_distance"]), 6)) for h in hits]

"""The ``ray`` engine's writes: workers write Lance fragments, the driver commits whole shards.

Each item belongs to shard ``position in the source // shard size``. A write task turns the embedded rows of each
shard it sees into Lance fragments (files, not yet part of the table) and reports them with the ids they hold and
the items that failed; the driver commits the fragments of every ``commit_every`` finished shards in one commit
(Lance's distributed-write recipe: ``write_fragments`` on workers, ``LanceDataset.commit`` in one process).

A crash or Ctrl-C therefore loses the shards not yet committed and nothing else: their files are orphans until
``siglip-index finalize`` removes them, and a rerun, which skips ids already in the table, embeds exactly the
missing shards (plus the items that failed before), so no id is written twice. Failed items go to the failures
table with the committed shards, never failing their shard.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from siglip.index.build import DEFAULT_COMMIT_EVERY, BuildStats
from siglip.index.raydata import EMBEDDING, ERROR, STATUS, Resources, embed_images
from siglip.index.sources import Failure, Item
from siglip.index.store import SHARD, CatalogStore

logger = logging.getLogger("siglip.index")

# Rows per write task (a fragment per shard in it): ~3 MB of 768-dim vectors, so a shard of 10,000 is a few files,
# and a small shard is written as soon as it is embedded.
WRITE_ROWS = 1024
REPORT = pa.schema([pa.field(SHARD, pa.int64()), pa.field("fragments", pa.string()),
                    pa.field("ids", pa.list_(pa.string())), pa.field("failures", pa.string())])


def write_batch(batch: pa.Table, *, uri: str, schema: pa.Schema) -> pa.Table:
    """A write task: the embedded rows of each shard in ``batch`` as Lance fragments of the dataset at ``uri``
    (uncommitted), reported one row per shard with the ids written and the failed items."""
    import lance

    ok = batch.column(EMBEDDING).is_valid()
    report = []
    for shard in pa.compute.unique(batch.column(SHARD)).to_pylist():
        mine = pa.compute.equal(batch.column(SHARD), shard)
        rows = batch.filter(pa.compute.and_(mine, ok))
        failed = batch.filter(pa.compute.and_(mine, pa.compute.invert(ok))).select(["id", "source", STATUS, ERROR])
        fragments = []
        if rows.num_rows:
            data = pa.Table.from_arrays([rows.column(name) for name in schema.names], schema=schema)
            fragments = [f.to_json() for f in lance.fragment.write_fragments(data, uri, schema=schema)]
        report.append({SHARD: shard, "fragments": json.dumps(fragments), "ids": rows.column("id").to_pylist(),
                       "failures": json.dumps(failed.to_pylist())})
    return pa.Table.from_pylist(report, schema=REPORT)


@dataclass
class Ledger:
    """The driver's account of the shards in flight: what each still waits for, and what is ready to commit."""

    remaining: dict[int, int]  # items not yet reported, by shard
    fragments: dict[int, list[dict]] = field(default_factory=dict)
    ids: dict[int, list[str]] = field(default_factory=dict)
    failures: dict[int, list[Failure]] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)  # every item reported, not yet committed

    def report(self, row: dict[str, Any]) -> int:
        """Take one write-task report; returns how many items it settled."""
        shard = row[SHARD]
        failures = [Failure(f["id"], f["source"], f[STATUS], f[ERROR]) for f in json.loads(row["failures"])]
        self.fragments.setdefault(shard, []).extend(json.loads(row["fragments"]))
        self.ids.setdefault(shard, []).extend(row["ids"])
        self.failures.setdefault(shard, []).extend(failures)
        settled = len(row["ids"]) + len(failures)
        self.remaining[shard] -= settled
        if self.remaining[shard] < 0:
            raise RuntimeError(f"shard {shard} reported more items than it holds: a row was embedded twice")
        if self.remaining[shard] == 0:
            self.finished.append(shard)
        return settled

    def take_finished(self) -> tuple[list[int], list[dict], list[str], list[Failure]]:
        shards, self.finished = self.finished, []
        fragments = [f for s in shards for f in self.fragments.pop(s, [])]
        ids = [i for s in shards for i in self.ids.pop(s, [])]
        failures = [f for s in shards for f in self.failures.pop(s, [])]
        return shards, fragments, ids, failures


def item_table(items: Sequence[Item]) -> pa.Table:
    return pa.table({"id": pa.array([i.id for i in items], pa.string()),
                     "source": pa.array([i.source for i in items], pa.string()),
                     "image": pa.array([str(i.image) for i in items], pa.string()),
                     SHARD: pa.array([i.shard for i in items], pa.int64())})


def build(store: CatalogStore, items: Sequence[Item], stats: BuildStats, *, settings: Any, resources: Resources,
          info: dict[str, Any], shard_size: int, commit_every: int = DEFAULT_COMMIT_EVERY,
          progress: Callable[[int], None] = lambda n: None) -> None:
    """Embed ``items`` (each with its shard) on the connected Ray cluster into ``store``; the table must be ready
    (``CatalogStore.prepare_for_fragments``). ``stats`` counts what was committed."""
    import lance
    import ray

    uri, schema = store.table.to_lance().uri, store.table.schema
    ledger = Ledger(remaining={})
    for item in items:
        ledger.remaining[item.shard] = ledger.remaining.get(item.shard, 0) + 1
    table = item_table(items)
    # Blocks of a few batches: decode tasks run in parallel over blocks, not within one.
    rows = resources.batch_size * 4
    ds = ray.data.from_arrow([table.slice(start, rows) for start in range(0, table.num_rows, rows)])
    written = embed_images(ds, settings, resources=resources, info=info).map_batches(
        write_batch, batch_format="pyarrow", batch_size=max(resources.batch_size, min(shard_size, WRITE_ROWS)),
        # No CPU reserved: the decode tasks and the actors may hold every CPU of a small cluster, and a write that
        # waits for one holds back every commit (Ray Data's budget gives it none).
        num_cpus=0,
        fn_kwargs={"uri": uri, "schema": schema})

    def commit() -> None:
        shards, fragments, ids, failures = ledger.take_finished()
        if not shards:
            return
        # Ctrl-C or SIGTERM waits until the commit, the failures table and the counts agree.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            store.commit_fragments([lance.FragmentMetadata.from_json(json.dumps(f)) for f in fragments])
            store.record_failures(failures, ids)
            stats.added += len(ids)
            stats.failures.extend(failures)
            stats.shards_done += len(shards)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        logger.debug("committed shards %s: %d rows, %d failed", shards, len(ids), len(failures))

    try:
        for report in written.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            for row in report.to_pylist():
                progress(ledger.report(row))
            if len(ledger.finished) >= commit_every:
                commit()
    finally:
        # Interrupted or not, the shards that finished are worth their commit (it is one quick metadata write).
        commit()

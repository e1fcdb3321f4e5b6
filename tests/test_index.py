"""siglip-index end to end: a generated catalog of a few hundred images embedded through a real ``bentoml serve``
(tiny model) into LanceDB, then searched. Builds run the real CLI, in-process (``main(argv)``) or, where the
process itself matters (interruption), as ``python -m siglip.index`` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lancedb
import numpy as np
import pytest
from conftest import BROKEN, ROOT, child_env, encode, free_port, make_image, server_fixture

from siglip.client import SiglipClient
from siglip.index.build import Backoff, Window, plan
from siglip.index.cli import main
from siglip.index.sources import Item, SourceError, read_csv, read_folder, read_list

N_IMAGES = 300
NOT_AN_IMAGE_400 = "not a supported image"


@dataclass
class Catalog:
    root: Path
    ids: list[str]  # the good images, as the indexer names them (path relative to root)


def subfolder(i: int) -> str:
    return "a/b/" if i % 6 == 0 else "a/" if i % 6 in (1, 2) else ""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    """300 small pictures (PNG and JPEG) in a folder tree, a corrupt JPEG and a file that is not an image."""
    root = tmp_path_factory.mktemp("catalog")
    ids = []
    for i in range(N_IMAGES):
        fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        rel = f"{subfolder(i)}img{i:03d}.{suffix}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(make_image(i, (64, 48)), fmt))
        ids.append(rel)
    (root / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 truncated: not really a JPEG")
    (root / "a" / "notes.txt").write_text("not an image: ignored")
    return Catalog(root, sorted(ids))


@pytest.fixture(scope="module")
def expected(service, catalog) -> dict[str, np.ndarray]:
    """Each image's embedding, straight from the client (what the table must hold under that id)."""
    out = {}
    with SiglipClient(service.url) as client:
        for i in range(0, len(catalog.ids), 64):
            chunk = catalog.ids[i:i + 64]
            for item_id, vec in zip(chunk, client.image_embedding([catalog.root / c for c in chunk])):
                out[item_id] = vec
    return out


def cli(*args) -> tuple[int, str]:
    """Run the CLI in this process; (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


def cli_json(*args) -> tuple[int, dict | list]:
    rc, out = cli(*args, "--json")
    return rc, json.loads(out)


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "siglip.index", *map(str, args)], cwd=ROOT,
                            env=child_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def table(db: Path, name: str = "images"):
    """A fresh handle (a handle does not see other processes' later commits)."""
    try:
        return lancedb.connect(str(db)).open_table(name)
    except ValueError:
        return None


def count(db: Path) -> int:
    t = table(db)
    return 0 if t is None else t.count_rows()


def contents(db: Path) -> tuple[list[str], list[str], np.ndarray]:
    data = table(db).to_arrow()
    vectors = np.stack(data.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return data.column("id").to_pylist(), data.column("source").to_pylist(), vectors


def assert_matches(db: Path, want_ids: list[str], expected: dict[str, np.ndarray]) -> None:
    """Every wanted id exactly once, and each row holds that image's embedding."""
    ids, _, vectors = contents(db)
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(want_ids)
    for item_id, vec in zip(ids, vectors):
        assert float(vec @ expected[item_id]) > 0.9999, item_id


def wait_rows(db: Path, proc: subprocess.Popen, more_than: int, timeout_s: float = 120.0) -> int:
    """Poll the table until it has more than ``more_than`` rows while ``proc`` still runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"build exited ({proc.returncode}) before it was interrupted:\n{out}\n{err[-3000:]}")
        n = count(db)
        if n > more_than:
            return n
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no more than {more_than} rows after {timeout_s} s")


# ---------------------------------------------------------------------------------------------------------------
# a folder: build, rerun, search
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(service, catalog, tmp_path_factory) -> Path:
    """The catalog indexed once, with the ANN index (threshold below the row count). broken.jpg sorts first, so
    it shares its batch of 16 with good images: all 300 of those must be in."""
    db = tmp_path_factory.mktemp("built") / "db"
    rc, summary = cli_json("build", catalog.root, "--db", db, "--server", service.url, "--index-threshold", 200,
                           "--batch-size", 16, "--concurrency", 4, "--quiet")
    assert rc == 3, summary  # finished, one item failed
    assert summary["added"] == N_IMAGES and summary["skipped"] == 0 and summary["rows"] == N_IMAGES
    assert [f["id"] for f in summary["failed"]] == [BROKEN]
    assert summary["index"] == "IVF_HNSW_SQ"
    return db


def test_build_writes_every_image_once_with_its_embedding(built, catalog, expected):
    assert_matches(built, catalog.ids, expected)
    _, sources, _ = contents(built)
    assert {Path(s) for s in sources} == {catalog.root / i for i in catalog.ids}


def test_rerun_adds_nothing_and_reports_the_corrupt_file(service, built, catalog):
    rc, summary = cli_json("build", catalog.root, "--db", built, "--server", service.url, "--quiet")
    assert rc == 3
    assert (summary["added"], summary["skipped"], summary["rows"]) == (0, N_IMAGES, N_IMAGES)
    (failure,) = summary["failed"]
    assert failure["id"] == BROKEN and failure["status"] == 400
    assert NOT_AN_IMAGE_400 in failure["error"]
    assert Path(failure["source"]) == catalog.root / BROKEN
    assert count(built) == N_IMAGES

    rc, text = cli("build", catalog.root, "--db", built, "--server", service.url, "--quiet")
    assert f"failed {BROKEN}: HTTP 400: " in text and NOT_AN_IMAGE_400 in text


@pytest.mark.parametrize("pick", [0, 77, 299])
def test_search_by_an_indexed_image_returns_it_first(service, built, catalog, pick):
    item_id = catalog.ids[pick]
    rc, matches = cli_json("search", "--db", built, "--server", service.url, "--image", catalog.root / item_id,
                           "--top-k", 5)
    assert rc == 0
    assert matches[0]["id"] == item_id
    assert matches[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert all(m["score"] < 0.9999 for m in matches[1:])


def test_search_by_image_url_and_plain_output(service, built, catalog, image_server):
    item_id = catalog.ids[5]
    url = image_server.add("/index-query.png", (catalog.root / item_id).read_bytes())
    rc, text = cli("search", "--db", built, "--server", service.url, "--image", url, "--top-k", 3)
    assert rc == 0
    lines = text.splitlines()
    assert len(lines) == 3
    rank, score, first_id, source = lines[0].split()
    assert (rank, first_id, Path(source)) == ("1", item_id, catalog.root / item_id)
    assert float(score) == pytest.approx(1.0, abs=1e-3)


def test_text_search_json_has_the_cosine_scores_of_the_best_rows(service, built):
    rc, matches = cli_json("search", "--db", built, "--server", service.url, "rustic oak wood flooring",
                           "--top-k", 10)
    assert rc == 0
    assert isinstance(matches, list) and len(matches) == 10
    assert all(set(m) == {"id", "source", "score"} for m in matches)
    assert all(isinstance(m["id"], str) and isinstance(m["source"], str) and isinstance(m["score"], float)
               for m in matches)
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True)
    # The scores are cosine similarities against the stored vectors, and these are the 10 best rows.
    with SiglipClient(service.url) as client:
        query = client.text_embedding(["rustic oak wood flooring"])[0]
    ids, _, vectors = contents(built)
    cosine = dict(zip(ids, (vectors @ query).tolist()))
    for m in matches:
        assert m["score"] == pytest.approx(cosine[m["id"]], abs=1e-4)
    assert min(scores) >= sorted(cosine.values(), reverse=True)[9] - 1e-4


def test_search_errors(service, built, tmp_path, capsys):
    assert cli("search", "--db", built, "--server", service.url)[0] == 2  # neither text nor --image
    assert cli("search", "--db", built, "--server", service.url, "--image", tmp_path / "nope.jpg")[0] == 2
    rc, _ = cli("search", "--db", tmp_path / "nocatalog", "--server", service.url, "a cat")
    assert rc == 1 and "nocatalog: no such database" in capsys.readouterr().err
    assert not (tmp_path / "nocatalog").exists()  # a search creates nothing
    (tmp_path / "empty").mkdir()
    rc, _ = cli("search", "--db", tmp_path / "empty", "--server", service.url, "a cat")
    assert rc == 1 and "no table 'images'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# interruption
# ---------------------------------------------------------------------------------------------------------------
def test_interrupted_builds_resume_and_write_each_id_exactly_once(service, catalog, expected, tmp_path, capsys):
    db = tmp_path / "db"
    args = ("build", catalog.root, "--db", db, "--server", service.url, "--batch-size", 4, "--concurrency", 2)

    proc = spawn(*args)
    wait_rows(db, proc, more_than=0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in out
    after_sigint = count(db)
    assert 0 < after_sigint < N_IMAGES

    proc = spawn(*args)
    wait_rows(db, proc, more_than=after_sigint)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate(timeout=60)
    after_sigkill = count(db)
    assert after_sigint < after_sigkill < N_IMAGES
    ids, _, _ = contents(db)
    assert len(ids) == len(set(ids))

    # The rerun (in-process, bigger batches: the ids do not depend on them) completes the table.
    rc, summary = cli_json("build", catalog.root, "--db", db, "--server", service.url, "--batch-size", 32)
    assert rc == 3, summary
    assert summary["skipped"] == after_sigkill
    assert summary["added"] == N_IMAGES - after_sigkill
    assert [f["id"] for f in summary["failed"]] == [BROKEN]
    assert_matches(db, catalog.ids, expected)
    assert "img/s" in capsys.readouterr().err  # the progress bar: count, rate and ETA


# ---------------------------------------------------------------------------------------------------------------
# other sources
# ---------------------------------------------------------------------------------------------------------------
def test_url_list_source(service, image_server, tmp_path):
    urls = [image_server.add(f"/index-list/{i}.png", encode(make_image(2000 + i, (64, 48)))) for i in range(24)]
    missing = image_server.url("/index-list/missing.png")
    lines = ["# catalog export", *urls[:12], "", urls[3], missing, *urls[12:]]
    source = tmp_path / "urls.txt"
    source.write_text("\n".join(lines) + "\n")
    db = tmp_path / "db"

    rc, summary = cli_json("build", source, "--db", db, "--server", service.url, "--batch-size", 8, "--quiet")
    assert rc == 3
    assert (summary["added"], summary["duplicates"], summary["rows"]) == (24, 1, 24)
    (failure,) = summary["failed"]
    assert (failure["id"], failure["source"], failure["status"]) == (missing, missing, 400)
    assert "404" in failure["error"] and missing in failure["error"]
    ids, sources, _ = contents(db)
    assert sorted(ids) == sorted(urls) and sorted(sources) == sorted(urls)

    rc, matches = cli_json("search", "--db", db, "--server", service.url, "--image", urls[7], "--top-k", 1)
    assert matches[0]["id"] == urls[7]


def test_csv_source_with_named_columns(service, image_server, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    rows = []
    for i in range(20):
        (pics / f"p{i}.jpg").write_bytes(encode(make_image(3000 + i, (64, 48)), "JPEG"))
        rows.append({"sku": f"SKU-{i:04d}", "title": f"item {i}", "picture": f"pics/p{i}.jpg"})
    for i in range(5):
        url = image_server.add(f"/index-csv/{i}.png", encode(make_image(3100 + i, (64, 48))))
        rows.append({"sku": f"SKU-URL-{i}", "title": "from a URL", "picture": url})
    rows.append({"sku": "SKU-EMPTY", "title": "no picture", "picture": ""})
    rows.append({"sku": "SKU-GONE", "title": "file missing", "picture": "pics/gone.jpg"})
    source = tmp_path / "products.csv"
    with source.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["sku", "title", "picture"])
        writer.writeheader()
        writer.writerows(rows)
    db = tmp_path / "db"

    rc, _ = cli("build", source, "--db", db, "--server", service.url, "--quiet")
    assert rc == 1 and table(db) is None  # default column names: "id" and "image" are missing

    rc, summary = cli_json("build", source, "--db", db, "--server", service.url, "--id-column", "sku",
                           "--image-column", "picture", "--quiet")
    assert rc == 3
    assert summary["added"] == 25
    failed = {f["id"]: f for f in summary["failed"]}
    assert set(failed) == {"SKU-EMPTY", "SKU-GONE"}
    assert "empty 'picture'" in failed["SKU-EMPTY"]["error"]
    assert failed["SKU-GONE"]["status"] is None and "no such file" in failed["SKU-GONE"]["error"]
    ids, sources, _ = contents(db)
    by_id = dict(zip(ids, sources))
    assert sorted(ids) == sorted(r["sku"] for r in rows[:25])
    assert Path(by_id["SKU-0003"]) == pics / "p3.jpg"
    assert by_id["SKU-URL-2"] == rows[22]["picture"]


# ---------------------------------------------------------------------------------------------------------------
# overload and setup errors
# ---------------------------------------------------------------------------------------------------------------
busy = server_fixture("busy", SIGLIP_DTYPE="float32", SIGLIP_MAX_CONCURRENCY="1",
                      doc="One request at a time: a build with more in flight meets 429s.")


def test_429s_are_retried_until_the_build_completes(busy, catalog, expected, tmp_path):
    folder = catalog.root / "a" / "b"
    db = tmp_path / "db"
    rc, summary = cli_json("build", folder, "--db", db, "--server", busy.url, "--batch-size", 2,
                           "--concurrency", 8, "--quiet")
    n = sum(1 for i in catalog.ids if i.startswith("a/b/"))
    assert rc == 0, summary
    assert summary["added"] == n and summary["failed"] == []
    assert summary["retries"].get("429", 0) > 0
    ids, _, vectors = contents(db)
    assert sorted(ids) == sorted(i.removeprefix("a/b/") for i in catalog.ids if i.startswith("a/b/"))
    for item_id, vec in zip(ids, vectors):
        assert float(vec @ expected["a/b/" + item_id]) > 0.9999


def test_setup_errors_stop_the_build(image_server, catalog, tmp_path, capsys):
    db = tmp_path / "db"
    # Not a SigLIP service (the loopback image server answers 404 for everything): stops at once.
    rc, _ = cli("build", catalog.root, "--db", db, "--server", image_server.url(""), "--quiet")
    assert rc == 1 and "HTTP 404" in capsys.readouterr().err
    # Nothing listening: retried, then given up.
    rc, _ = cli("build", catalog.root, "--db", db, "--server", f"http://127.0.0.1:{free_port()}", "--tries", 2,
                "--quiet")
    assert rc == 1 and "gave up after 2 tries" in capsys.readouterr().err
    assert table(db) is None
    # With the default tries, no server at all is said after the first contact's few tries (not half a minute),
    # and the build leaves no empty database behind.
    fresh = tmp_path / "fresh"
    rc, _ = cli("build", catalog.root, "--db", fresh, "--server", f"http://127.0.0.1:{free_port()}", "--quiet")
    err = capsys.readouterr().err
    assert rc == 1 and "no server answered after 3 tries" in err and "nothing was written" in err, err
    assert not fresh.exists()


# ---------------------------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------------------------
def test_backoff_grows_and_is_capped():
    backoff, rng = Backoff(attempts=10, base_s=0.5, cap_s=8.0), random.Random(0)
    for retry in range(12):
        step = min(8.0, 0.5 * 2 ** retry)
        delays = [backoff.delay(retry, rng) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)


def test_window_halves_on_429_and_grows_back_one_at_a_time():
    w = Window(8)
    w.overloaded()
    w.overloaded()
    assert w.limit == 2
    for _ in range(3):
        w.overloaded()
    assert w.limit == 1
    w.answered()
    assert w.limit == 2  # after `limit` (1) answers
    w.answered()
    assert w.limit == 2
    w.answered()
    assert w.limit == 3
    for _ in range(100):
        w.answered()
    assert w.limit == 8


def test_window_bounds_requests_in_flight():
    async def scenario() -> int:
        w, peak = Window(3), 0

        async def one() -> None:
            nonlocal peak
            async with w:
                peak = max(peak, w.in_flight)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(10)))
        w.overloaded()  # limit 1
        peak_before, peak = peak, 0
        await asyncio.gather(*(one() for _ in range(5)))
        return peak_before * 10 + peak

    assert asyncio.run(scenario()) == 31


def test_sources_name_items_stably(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for rel in ("b.PNG", "x/a.jpg", "x/y/c.webp", "x/readme.md"):
        (tmp_path / rel).write_bytes(b"")
    assert [i.id for i in read_folder(tmp_path).items] == ["b.PNG", "x/a.jpg", "x/y/c.webp"]

    listing = tmp_path / "list.txt"
    listing.write_text("https://e.test/1.jpg\n# comment\n\n  x/a.jpg  \nhttps://e.test/1.jpg\n")
    got = read_list(listing)
    assert [(i.id, i.image) for i in got.items] == [("https://e.test/1.jpg", "https://e.test/1.jpg"),
                                                    ("x/a.jpg", (tmp_path / "x" / "a.jpg").resolve())]
    assert got.duplicates == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("sku,url\n1,https://e.test/1.jpg\n")
    with pytest.raises(SourceError, match="no column 'id', 'image'"):
        read_csv(bad)

    items = [Item("a", "a", "a"), Item("b", "b", "b"), Item("c", "c", "c")]
    assert plan(items, {"a"}, shard_size=2) == [Item("b", "b", "b", shard=0), Item("c", "c", "c", shard=1)]


# ---------------------------------------------------------------------------------------------------------------
# the local engine (model in this process) and the model fingerprint
# ---------------------------------------------------------------------------------------------------------------
def test_local_engine_writes_the_services_embeddings(service, odd_folder, tmp_path, monkeypatch, tiny_checkpoint):
    """--engine local (no server) gives the running service's vectors, refuses the corrupt file with the
    service's own error text, and records the same model fingerprint."""
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("SIGLIP_DTYPE", "float32")  # as the service fixture runs
    db = tmp_path / "db"
    rc, summary = cli_json("build", odd_folder, "--db", db, "--engine", "local", "--batch-size", 3, "--quiet")
    assert rc == 3, summary
    assert summary["added"] == 4 and [f["id"] for f in summary["failed"]] == [BROKEN]
    assert summary["failed"][0]["status"] == 400 and NOT_AN_IMAGE_400 in summary["failed"][0]["error"]
    ids, _, vectors = contents(db)
    with SiglipClient(service.url) as client:
        want = client.image_embedding([odd_folder / i for i in ids])
        info = client.info()
    assert min(float(a @ b) for a, b in zip(vectors, want)) > 0.9999
    from siglip.index.store import CatalogStore, model_fingerprint

    recorded = CatalogStore(str(db)).model
    assert recorded == model_fingerprint(info)
    assert (recorded["model"], recorded["revision"], recorded["embed_dim"], recorded["image_height"]) == \
        (tiny_checkpoint.name, None, 32, 64)

    # Nothing left to embed (the corrupt file aside, a rerun retries failures): no model loaded, no server asked.
    good = tmp_path / "good"
    good.mkdir()
    (good / "plain.png").write_bytes((odd_folder / "plain.png").read_bytes())
    assert cli_json("build", good, "--db", db, "--table", "good", "--engine", "local", "--quiet")[0] == 0
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint.parent / "no-such-checkpoint"))
    rc, again = cli_json("build", good, "--db", db, "--table", "good", "--engine", "local", "--server",
                         f"http://127.0.0.1:{free_port()}", "--quiet")
    assert rc == 0 and again["added"] == 0 and again["skipped"] == 1


def test_another_model_is_refused_for_build_and_search(service, odd_folder, tmp_path, monkeypatch, capsys):
    """A table keeps one vector space: a build or a search with another checkpoint of the same width is refused,
    naming both models."""
    from siglip.index.store import CatalogStore
    from siglip.model.checkpoint import build_checkpoint

    other = build_checkpoint(tmp_path / "other-siglip", image_size=48, patch_size=8)  # 32-dim too
    served, foreign = tmp_path / "served", tmp_path / "foreign"
    assert cli_json("build", odd_folder, "--db", served, "--server", service.url, "--quiet")[0] == 3
    monkeypatch.setenv("SIGLIP_MODEL", str(other))
    rc, summary = cli_json("build", odd_folder, "--db", served, "--engine", "local", "--quiet")
    assert rc == 1 and summary["added"] == 0 and CatalogStore(str(served)).count() == 4
    assert ("holds embeddings of tiny-siglip (SigLIP 2, 64x64, 32-dim), but this build uses other-siglip (SigLIP 2, "
            "48x48, 32-dim)") in summary["error"]

    assert cli_json("build", odd_folder, "--db", foreign, "--engine", "local", "--quiet")[0] == 3
    capsys.readouterr()
    rc, _ = cli("search", "--db", foreign, "--server", service.url, "a cat")
    assert rc == 1
    assert (f"holds embeddings of other-siglip (SigLIP 2, 48x48, 32-dim), but the server at {service.url} uses "
            "tiny-siglip" in capsys.readouterr().err)


def test_same_weights_elsewhere_match_and_old_tables_are_stamped(service, odd_folder, tiny_checkpoint, tmp_path,
                                                                 monkeypatch):
    """The same files under another path and name are the same model; a table from before fingerprints gets one
    at its next build, and is then checked like any other."""
    import shutil

    from siglip.index.store import CatalogStore, rows

    db = tmp_path / "db"
    with SiglipClient(service.url) as client:
        vector = client.image_embedding([odd_folder / "plain.png"])
    legacy = CatalogStore(str(db))
    legacy.table = legacy.db.create_table("images", data=rows(["plain.png"], ["x"], vector))  # no fingerprint
    assert CatalogStore(str(db)).model is None
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "mounted" / "renamed")
    monkeypatch.setenv("SIGLIP_MODEL", str(copy))
    monkeypatch.setenv("SIGLIP_DTYPE", "float32")
    rc, summary = cli_json("build", odd_folder, "--db", db, "--engine", "local", "--quiet")
    assert rc == 3 and summary["added"] == 3 and summary["skipped"] == 1
    assert CatalogStore(str(db)).model["model"] == "renamed"
    # the service (tiny-siglip, same files) may add to it and search it
    (odd_folder.parent / "more").mkdir(exist_ok=True)
    (odd_folder.parent / "more" / "extra.png").write_bytes(encode(make_image(7)))
    rc, summary = cli_json("build", odd_folder.parent / "more", "--db", db, "--server", service.url, "--quiet")
    assert rc == 0 and summary["added"] == 1
    rc, matches = cli_json("search", "--db", db, "--server", service.url, "--image", odd_folder / "plain.png")
    assert rc == 0 and matches[0]["id"] == "plain.png"


def test_parquet_manifest_in_parts(service, tmp_path):
    """A folder of Parquet part files (Spark, DuckDB) is one manifest; numeric ids are read as their text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = tmp_path / "manifest"
    parts.mkdir()
    for k in range(2):
        (tmp_path / f"p{k}.png").write_bytes(encode(make_image(k)))
        pq.write_table(pa.table({"id": [100 + k], "image": [f"../p{k}.png"]}), parts / f"part-{k}.parquet")
    (parts / "_SUCCESS").write_text("")
    rc, summary = cli_json("build", parts, "--db", tmp_path / "db", "--server", service.url, "--quiet")
    assert rc == 0, summary
    ids, sources, _ = contents(tmp_path / "db")
    assert sorted(ids) == ["100", "101"] and str(tmp_path / "p0.png") in sources


def test_parquet_manifest_source(service, image_server, tmp_path, capsys):
    """A Parquet manifest of id + path/URL (how a catalog too big to list is handed over): read row group by row
    group, paths relative to the manifest, URLs fetched by the service, empty rows reported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encode(make_image(1)))
    url = image_server.add("/m/b.png", encode(make_image(2)))
    manifest = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"sku": ["A1", "B2", "C3", "A1"], "photo": ["img/a.png", url, "", "img/a.png"],
                             "price": [1.0, 2.0, 3.0, 4.0]}), manifest, row_group_size=2)
    db = tmp_path / "db"
    rc, summary = cli_json("build", manifest, "--db", db, "--server", service.url, "--id-column", "sku",
                           "--image-column", "photo", "--quiet")
    assert rc == 3, summary
    assert summary["added"] == 2 and summary["duplicates"] == 1
    assert [(f["id"], f["error"]) for f in summary["failed"]] == [("C3", "catalog.parquet row 3: empty 'photo'")]
    ids, sources, _ = contents(db)
    assert dict(zip(ids, sources)) == {"A1": str(tmp_path / "img" / "a.png"), "B2": url}

    capsys.readouterr()
    rc, _ = cli("build", manifest, "--db", db, "--server", service.url, "--image-column", "photo", "--quiet")
    assert rc == 1 and "no column 'id' (columns: sku, photo, price)" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(SourceError, match="bad.parquet"):
        from siglip.index.sources import read_source

        read_source(bad)


def test_status_lists_failures_until_fixed_and_finalize_compacts(service, odd_folder, tmp_path, capsys):
    """Failed items are kept in a failures table with the service's error until a rerun indexes them; finalize
    leaves one version and a searchable table; status and finalize create nothing."""
    import shutil

    folder = shutil.copytree(odd_folder, tmp_path / "photos")
    db = tmp_path / "db"
    assert cli_json("build", folder, "--db", db, "--server", service.url, "--batch-size", 2, "--quiet")[0] == 3
    rc, status = cli_json("status", "--db", db)
    assert rc == 0 and status["rows"] == 4 and status["failures"] == 1 and status["model"]["embed_dim"] == 32
    [failed] = status["failed"]
    assert failed["id"] == BROKEN and failed["status"] == 400 and NOT_AN_IMAGE_400 in failed["error"]

    (folder / BROKEN).write_bytes(encode(make_image(11), "JPEG"))  # fixed at the source
    assert cli_json("build", folder, "--db", db, "--server", service.url, "--quiet")[0] == 0
    rc, status = cli_json("status", "--db", db)
    assert status["rows"] == 5 and status["failures"] == 0 and status["failed"] == [] and status["versions"] > 1

    rc, final = cli_json("finalize", "--db", db)
    assert rc == 0 and final["versions"] == 1 and final["rows"] == 5
    rc, matches = cli_json("search", "--db", db, "--server", service.url, "--image", folder / BROKEN)
    assert rc == 0 and matches[0]["id"] == BROKEN

    capsys.readouterr()
    assert cli("status", "--db", tmp_path / "nothing")[0] == 1
    assert "no such database" in capsys.readouterr().err and not (tmp_path / "nothing").exists()

"""The indexer's ray engine (issue: scale out on Ray Data): its stages in this process against the running service,
then whole builds on a real local Ray cluster.

Every Ray cluster here runs in a network and PID namespace of its own (``unshare``): it can reach nothing but its
own loopback (Ray otherwise asks cloud metadata addresses which accelerators the node has), and killing its driver
takes every Ray process with it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import (
    BACKGROUND,
    BROKEN,
    ROOT,
    can_isolate,
    child_env,
    cosine_rows,
    encode,
    loopback_namespace,
    make_image,
    start_with_session,
    started,
    to_the_front,
)
from test_index import NOT_AN_IMAGE_400, cli, cli_json, contents, count

from siglip.client import SiglipClient
from siglip.index import raydata, shards  # they import ray and lance only when they run
from siglip.index.store import CatalogStore, model_fingerprint
from siglip.index.store import rows as table_rows
from siglip.settings import Settings

pytest.importorskip("ray.data", reason=f"the ray engine needs the [scale] extra: {raydata.EXTRA}")
pytest.importorskip("lance", reason=f"the ray engine needs the [scale] extra: {raydata.EXTRA}")

BUILD_TIMEOUT_S = 300  # a whole ray build of a few images takes ~15 s here; this only bounds a hang


@pytest.fixture(scope="module")
def model_env(tiny_checkpoint) -> dict[str, str]:
    return model_settings(tiny_checkpoint)


def model_settings(tiny_checkpoint: Path) -> dict[str, str]:
    return {"SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_DTYPE": "float32"}  # as the service fixture runs


def without_ray_settings() -> dict[str, str]:
    """``child_env()`` without RAY_* variables (a cluster address would change what ``import_ray`` sets up)."""
    return {k: v for k, v in child_env().items() if not k.startswith("RAY_")}


@pytest.fixture(scope="module")
def settings(model_env) -> Settings:
    return Settings.from_env(model_env)


@pytest.fixture(scope="module")
def actor(settings):
    """The embed stage's actor, built in this process (Ray builds one per actor the same way)."""
    return raydata.EmbedActor(settings)


@pytest.fixture(scope="module")
def service_vectors(service, odd_folder) -> dict[str, np.ndarray]:
    names = sorted(p.name for p in odd_folder.iterdir() if p.name != BROKEN)
    with SiglipClient(service.url) as client:
        return dict(zip(names, client.image_embedding([odd_folder / n for n in names])))


# ---------------------------------------------------------------------------------------------------------------
# the stages, in this process
# ---------------------------------------------------------------------------------------------------------------
def spec_of(actor):
    from siglip.api.engine import ModelView

    return ModelView.from_info(actor.info.to_dict()).image


def test_decode_and_embed_stages_give_the_services_vectors_and_errors(actor, settings, odd_folder,
                                                                      service_vectors, tmp_path):
    """Bytes and paths decode with the service's image code (EXIF, CMYK, palette); refusals carry the service's
    status and text naming the id; the embed stage returns the service's vectors as a FixedSizeList."""
    names = sorted(service_vectors)
    limit = max((odd_folder / n).stat().st_size for n in names)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(limit))
    small = Settings.from_env({"SIGLIP_MODEL": settings.model, "SIGLIP_MAX_IMAGE_BYTES": str(limit)})

    def run(ids: list[str], images: list) -> list[dict]:
        batch = pa.table({"id": ids, "image": images, "extra": list(range(len(ids)))})
        out = actor(raydata.decode_batch(batch, spec=spec_of(actor), settings=small, id_column="id",
                                         image_column="image"))
        assert out.column_names == ["id", "extra", "embedding", "status", "error"]
        assert out.schema.field("embedding").type == pa.list_(pa.float32(), actor.info.embed_dim)
        rows = out.to_pylist()
        assert [r["extra"] for r in rows] == list(range(len(ids)))  # other columns pass through, in order
        return rows

    paths = run(names + [BROKEN, "missing.jpg", "big.png", "ftp.jpg"],
                [str(odd_folder / n) for n in names + [BROKEN]]
                + [str(tmp_path / "missing.jpg"), str(big), "ftp://e.test/a.jpg"])
    data = run(names + ["empty"], [(odd_folder / n).read_bytes() for n in names] + [b""])
    for rows in (paths, data):
        got = np.array([r["embedding"] for r in rows[:len(names)]], np.float32)
        assert cosine_rows(got, np.stack([service_vectors[n] for n in names])).min() >= 0.9999
        assert all(r["embedding"] is None for r in rows[len(names):])
    failed = {r["id"]: (r["status"], r["error"]) for r in paths[len(names):] + data[len(names):]}
    assert failed[BROKEN][0] == 400 and failed[BROKEN][1].startswith(BROKEN) and NOT_AN_IMAGE_400 in failed[BROKEN][1]
    assert failed["missing.jpg"][0] is None and "FileNotFoundError" in failed["missing.jpg"][1]
    assert failed["big.png"][0] == 400 and failed["big.png"][1].startswith("big.png: image is ")
    assert failed["big.png"][1].endswith(" limit (SIGLIP_MAX_IMAGE_BYTES)")
    assert failed["ftp.jpg"] == (400, "ftp.jpg: only http and https URLs are supported, not ftp://")
    assert failed["empty"] == (400, "empty: image data is empty")


def test_write_stage_fragments_commit_whole_shards_only(actor, settings, odd_folder, tmp_path):
    """Fragments written by the write stage are invisible until the driver commits them, a shard at a time once
    every item of it is reported; a failed item settles its shard without a row and goes to the failures table."""
    names = sorted(p.name for p in odd_folder.iterdir())  # broken.jpg included
    batch = pa.table({"id": names, "source": [str(odd_folder / n) for n in names],
                      "image": [str(odd_folder / n) for n in names], "shard": [i // 2 for i in range(len(names))]})
    embedded = actor(raydata.decode_batch(batch, spec=spec_of(actor), settings=settings, id_column="id",
                                          image_column="image"))
    store = CatalogStore(str(tmp_path / "db"))
    fingerprint = model_fingerprint(actor.info.to_dict())
    uri, schema = store.prepare_for_fragments(actor.info.embed_dim, fingerprint)
    ledger = shards.Ledger(remaining=collections.Counter(batch.column("shard").to_pylist()))
    first = shards.write_batch(embedded.slice(0, 3), uri=uri, schema=schema)  # shard 0 whole, shard 1 half
    assert [ledger.report(r) for r in first.to_pylist()] == [2, 1]
    assert ledger.finished == [0] and CatalogStore(str(tmp_path / "db")).count() == 0  # written, not committed
    done, fragments, ids, failures = ledger.take_finished()
    import lance

    store.commit_fragments([lance.FragmentMetadata.from_json(json.dumps(f)) for f in fragments])
    store.record_failures(failures, ids)
    assert names[:2] == [BROKEN, "cmyk.jpg"]  # shard 0: the corrupt file settles it without a row
    assert done == [0] and sorted(CatalogStore(str(tmp_path / "db")).ids()) == ids == ["cmyk.jpg"]
    assert [f.id for f in failures] == [BROKEN] and store.failures()[0]["id"] == BROKEN
    for row in shards.write_batch(embedded.slice(3), uri=uri, schema=schema).to_pylist():
        ledger.report(row)
    done, fragments, ids, failures = ledger.take_finished()
    store.commit_fragments([lance.FragmentMetadata.from_json(json.dumps(f)) for f in fragments])
    store.record_failures(failures, ids)
    assert done == [1, 2] and not failures and sorted(ids) == names[2:]
    assert store.status()["shards"] == 3 and store.status()["failures"] == 1
    assert store.model == fingerprint
    with pytest.raises(RuntimeError, match="embedded twice"):
        ledger.remaining[2] = 0
        ledger.report({"shard": 2, "fragments": "[]", "ids": ["x"], "failures": "[]"})


def test_actors_never_take_the_cpus_decoding_needs():
    """Ray hangs when actors reserve every CPU (no decode task can start): the reservation shrinks to fit."""
    fitted = raydata.Resources(actors=(1, 2), cpus_per_actor=1.0, decode_cpus=1.0).fit(2)
    assert fitted.cpus_per_actor == 0.5 and 2 * fitted.cpus_per_actor + fitted.decode_cpus <= 2
    roomy = raydata.Resources(actors=(1, 4), cpus_per_actor=1.0).fit(16)
    assert roomy.cpus_per_actor == 1.0
    assert raydata.Resources(actors=(1, 8)).fit(0).cpus_per_actor == 1.0  # unknown (autoscaler starting empty)
    with pytest.raises(ValueError, match="lower --decode-cpus"):
        raydata.Resources(decode_cpus=4).fit(2)
    for cpus, actors, decode in [(3, 3, 1.0), (6, 9, 1.0), (5, 6, 1.0), (7, 3, 0.5), (16, 64, 1.0)]:
        r = raydata.Resources(actors=(1, actors), decode_cpus=decode).fit(cpus)
        assert actors * r.cpus_per_actor + decode <= cpus, (cpus, actors, r)  # never rounded up past the cluster


def test_a_local_cluster_is_set_up_to_stay_on_loopback():
    """Ray reads these once, when first imported: import_ray sets them before, unless a cluster address is given."""
    probe = ("import os; from siglip.index.raydata import import_ray, starts_local; "
             "import_ray(local=starts_local(os.environ.get('ADDR'))); "
             "import ray._private.ray_constants as c; print(c.ENABLE_RAY_CLUSTER, os.environ.get("
             "'RAY_USAGE_STATS_ENABLED'))")
    env = without_ray_settings()
    local = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert local.stdout.split() == ["False", "0"], local.stderr
    remote = subprocess.run([sys.executable, "-c", probe], env={**env, "ADDR": "ray://head:10001"},
                            capture_output=True, text=True, check=True)
    assert remote.stdout.split() == ["True", "None"], remote.stderr


def test_a_table_from_before_shards_takes_fragments(actor, tmp_path):
    """A table written before the shard column gets one (empty for its old rows) before workers write fragments
    with it."""
    import lance

    store = CatalogStore(str(tmp_path / "db"))
    old = np.ones((1, actor.info.embed_dim), np.float32) / np.sqrt(actor.info.embed_dim)
    store.table = store.db.create_table("images", data=table_rows(["old"], ["old.png"], old))
    assert "shard" not in store.table.schema.names
    uri, schema = store.prepare_for_fragments(actor.info.embed_dim, None)
    assert schema.names == ["id", "source", "embedding", "shard"]
    batch = pa.table({"id": ["new"], "source": ["new.png"], "embedding": raydata.embedding_array(old, np.ones(1, bool)),
                      "shard": [3], "status": pa.array([None], pa.int32()), "error": pa.array([None], pa.string())})
    (report,) = shards.write_batch(batch, uri=uri, schema=schema).to_pylist()
    store.commit_fragments([lance.FragmentMetadata.from_json(json.dumps(f)) for f in json.loads(report["fragments"])])
    got = {r["id"]: r["shard"] for r in CatalogStore(str(tmp_path / "db")).table.to_arrow().to_pylist()}
    assert got == {"old": None, "new": 3}


def test_without_the_extra_the_command_names_it(monkeypatch, tmp_path, odd_folder, model_env, capsys):
    for name, value in model_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    with pytest.raises(ImportError, match=re.escape("pip install 'siglip2-serve[scale]'")):
        raydata.import_ray()
    rc, _ = cli("build", odd_folder, "--db", tmp_path / "db", "--engine", "ray")
    assert rc == 1 and "siglip2-serve[scale]" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


# ---------------------------------------------------------------------------------------------------------------
# whole builds on a local Ray cluster
# ---------------------------------------------------------------------------------------------------------------
def isolated(*command: str) -> list[str]:
    """``command`` in a network namespace with loopback only, and a PID namespace that dies with it."""
    return [*loopback_namespace("--pid", "--fork", "--kill-child", "--mount-proc"), *command]


def ray_environment(tiny_checkpoint: Path) -> dict[str, str]:
    return {**without_ray_settings(), **model_settings(tiny_checkpoint), "BENTOML_DO_NOT_TRACK": "True",
            "PYTHONUNBUFFERED": "1"}


class RayRun:
    """A command in namespaces of its own (``isolated``), started now at a lower CPU priority (``BACKGROUND``: it
    runs ahead of its test, in the CPU the tests meanwhile leave idle); its output goes to files (a full pipe would
    stall it), read once it has exited. The deadline counts from when a test starts waiting on it."""

    def __init__(self, name: str, command: list[str], env: dict, workdir: Path, cwd: Path = ROOT):
        self.name, self.workdir, self.out, self.err = name, workdir, workdir / f"{name}.out", workdir / f"{name}.err"
        # Slowed down on purpose while the tests in front run: Ray must not give up on its own processes.
        env = {**env, "RAY_health_check_failure_threshold": "1000", "RAY_worker_register_timeout_seconds": "600",
               "RAY_gcs_server_port_wait_time_s": "600"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(isolated(*BACKGROUND, *command), env=env, cwd=cwd, stdout=out, stderr=err)

    def wait(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it exits; killed (with everything in its namespace) at the deadline."""
        to_the_front(self.proc.pid)
        try:
            self.proc.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} still running after {BUILD_TIMEOUT_S} s:\n{self.err.read_text()[-4000:]}")
        return self.proc.returncode, self.out.read_text(), self.err.read_text()

    def summary(self) -> tuple[int, dict, str]:
        """A ``build --json`` run's (exit status, summary, stderr)."""
        rc, out, err = self.wait()
        try:
            return rc, json.loads(out), err
        except json.JSONDecodeError:
            pytest.fail(f"{self.name}: no JSON summary (exit {rc}):\n{out}\n{err[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: unshare's --kill-child takes the command (PID 1 of its namespace) and every Ray process with it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)


def index_command(*args) -> list[str]:
    return [sys.executable, "-m", "siglip.index", "build", *map(str, args), "--engine", "ray", "--quiet"]


def ray_build(env: dict, workdir: Path, *args) -> RayRun:
    return RayRun("build", index_command(*args, "--json"), env, workdir)


class StuckBuild:
    """A build over 22 images in shards of 4 whose last image is a FIFO nobody writes: its last shard never
    finishes, so the build runs until it is killed. A thread takes it through the scenario as soon as a shard is
    committed (the build starts ahead of its test, and the kill and the rerun follow it there): it notes where the
    cluster listens, SIGKILLs the build, notes the ids in the table, writes the missing image and starts the
    rerun. ``finish`` hands the test what it noted."""

    shard = 4

    def __init__(self, env: dict, tmp_path: Path):
        folder = tmp_path / "images"
        folder.mkdir()
        self.paths = []
        for i in range(21):
            path = folder / f"img{i:02d}.jpg"
            path.write_bytes(encode(make_image(i, (40, 30)), "JPEG"))
            self.paths.append(path)
        os.mkfifo(folder / "stuck.jpg")
        self.paths.append(folder / "stuck.jpg")
        listing = tmp_path / "list.txt"
        listing.write_text("".join(f"{p}\n" for p in self.paths))
        self.db = tmp_path / "db"
        self.args = [listing, "--db", self.db, "--shard-size", self.shard, "--commit-every", "1", "--batch-size", "2"]
        self.env, self.tmp_path = env, tmp_path
        self.run = RayRun("stuck", index_command(*self.args), env, tmp_path)
        self.listening: list[str] = []
        self.kept_ids: list[str] = []
        self.rerun: RayRun | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._deadline: float | None = None  # set by finish(): until a test waits, the build may take its time
        self._thread = threading.Thread(target=self._scenario, daemon=True)
        self._thread.start()

    def _scenario(self) -> None:
        try:
            try:
                while count(self.db) == 0:  # the stuck shard never finishes: the build cannot end before the kill
                    late = self._deadline is not None and time.monotonic() > self._deadline
                    if self.run.proc.poll() is not None or late or self._stopped:
                        raise AssertionError(f"no shard committed (exit {self.run.proc.returncode}):\n"
                                             f"{self.run.err.read_text()[-4000:]}")
                    time.sleep(0.2)
                import psutil

                (driver,) = psutil.Process(self.run.proc.pid).children()
                self.listening = subprocess.run(["nsenter", "-t", str(driver.pid), "-n", "ss", "-Hltn"],
                                                capture_output=True, text=True, check=True).stdout.split("\n")
            finally:
                self.run.kill()  # always (the FIFO would keep it running forever)
            gone = time.monotonic() + 60  # its last writes, if any, are in the table before it is read
            while alive(driver):
                if time.monotonic() > gone:
                    raise AssertionError(f"the killed driver (pid {driver.pid}) is still running")
                time.sleep(0.1)
            self.kept_ids = contents(self.db)[0]
            stuck = self.paths[-1]
            stuck.unlink()
            stuck.write_bytes(encode(make_image(99, (40, 30)), "JPEG"))
            with self._lock:
                if not self._stopped:
                    self.rerun = ray_build(self.env, self.tmp_path, *self.args)
        except BaseException as exc:  # noqa: BLE001 - raised in the test, by finish()
            self._error = exc

    def finish(self) -> StuckBuild:
        self._deadline = time.monotonic() + BUILD_TIMEOUT_S
        to_the_front(self.run.proc.pid)
        self._thread.join(timeout=BUILD_TIMEOUT_S + 180)  # the commit, the kill, the driver's exit
        if self._error is not None:
            raise self._error
        assert not self._thread.is_alive(), "the scenario is still running"
        return self

    def kill(self) -> None:
        with self._lock:
            self._stopped = True
        self.run.kill()
        if self.rerun is not None:
            self.rerun.kill()


def alive(proc) -> bool:
    """Running, and not a zombie (a process whose parent was killed may wait a while for init to reap it)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def other_model_build(env: dict, odd_folder: Path, tmp_path: Path) -> RayRun:
    """A table (``tmp_path / "db"``) the local engine wrote with the tiny checkpoint (one Ray cluster, not two),
    then a ray build of another checkpoint into it."""
    from siglip.model.checkpoint import build_checkpoint

    other = build_checkpoint(tmp_path / "other-siglip", image_size=48, patch_size=8)  # 32-dim too
    db = tmp_path / "db"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SIGLIP_MODEL", "SIGLIP_DTYPE"):
            mp.setenv(name, env[name])
        rc, summary = cli_json("build", odd_folder, "--db", db, "--engine", "local", "--quiet")
    assert rc == 3 and summary["added"] == 4, summary
    # broken.jpg failed, so the rerun has an item to embed and loads the model
    return ray_build({**env, "SIGLIP_MODEL": str(other)}, tmp_path, odd_folder, "--db", db)


def readme_example(env: dict, odd_folder: Path, tmp_path: Path) -> RayRun:
    """docs/indexer.md's Python example over a Parquet manifest of ids and image bytes (the corrupt one too)."""
    names = sorted(p.name for p in odd_folder.iterdir())
    pa.parquet.write_table(pa.table({"id": names, "image": [(odd_folder / n).read_bytes() for n in names]}),
                           tmp_path / "manifest.parquet")
    script = tmp_path / "example.py"
    script.write_text(readme_python_example())
    return RayRun("example", [sys.executable, str(script)], env, tmp_path, cwd=tmp_path)


@start_with_session("ray_run")
def start_ray_runs(request, tests: set[str]) -> dict[str, object]:
    """The whole Ray runs this module checks, started with the session (for the selected tests only, and none
    without the namespaces they need): each is mostly one core waiting on Ray's processes, so they run in the time
    the tests before this module leave idle. Each test reads its own (or what its start raised)."""
    if not can_isolate():
        return {}
    odd_folder = request.getfixturevalue("odd_folder")
    env = ray_environment(request.getfixturevalue("tiny_checkpoint"))
    starts = {
        "test_ray_build_equals_the_service_and_the_local_engine": lambda tmp: ray_build(
            env, tmp, odd_folder, "--db", tmp / "db", "--actors", "2", "--batch-size", "2", "--shard-size", "2",
            "--commit-every", "1"),
        "test_a_table_of_another_model_is_refused": lambda tmp: other_model_build(env, odd_folder, tmp),
        "test_a_killed_driver_costs_only_the_shards_in_flight": lambda tmp: StuckBuild(env, tmp),
        "test_the_readme_python_api_example_runs_as_written": lambda tmp: readme_example(env, odd_folder, tmp),
    }
    tmp_path_factory = request.getfixturevalue("tmp_path_factory")
    runs: dict[str, object] = {}
    for test, start in starts.items():
        if test in tests:
            try:
                runs[test] = start(tmp_path_factory.mktemp("ray-run"))
                request.addfinalizer(runs[test].kill)  # whatever its test did not get to stop
            except (Exception, pytest.fail.Exception, pytest.skip.Exception) as exc:  # noqa: BLE001
                runs[test] = exc  # its test fails with it
    return runs


@pytest.fixture
def ray_run(request):
    """This test's run, started with the session."""
    if not can_isolate():
        pytest.fail("these tests run Ray in namespaces of its own: they need root, unshare and ip (.ci/run "
                    "installs util-linux and iproute2)")
    run = started("ray_run")[request.node.name]
    if isinstance(run, BaseException):
        raise run
    yield run
    run.kill()


def test_ray_build_equals_the_service_and_the_local_engine(ray_run, odd_folder, service, service_vectors, model_env,
                                                            monkeypatch, tmp_path):
    """A folder with EXIF-rotated, CMYK, palette and corrupt images, two actors on this 2-CPU machine (the fit that
    keeps Ray from hanging): the service's vectors, the corrupt file in the failures table with the service's
    error, the local engine's fingerprint; then finalize leaves a table the service's queries search."""
    rc, summary, err = ray_run.summary()
    db = ray_run.workdir / "db"
    assert rc == 3, err[-4000:]
    assert summary["added"] == 4 and summary["shards_done"] == summary["shards"] == 3
    assert [(f["id"], f["status"]) for f in summary["failed"]] == [(BROKEN, 400)]
    assert NOT_AN_IMAGE_400 in summary["failed"][0]["error"]
    ids, _, vectors = contents(db)
    assert sorted(ids) == sorted(service_vectors)
    assert cosine_rows(vectors, np.stack([service_vectors[i] for i in ids])).min() >= 0.9999

    for name, value in model_env.items():
        monkeypatch.setenv(name, value)
    local_db = tmp_path / "local"
    rc, _ = cli_json("build", odd_folder, "--db", local_db, "--engine", "local", "--quiet")
    local_ids, _, local_vectors = contents(local_db)
    local = dict(zip(local_ids, local_vectors))
    assert cosine_rows(vectors, np.stack([local[i] for i in ids])).min() >= 0.9999
    assert CatalogStore(str(db)).model == CatalogStore(str(local_db)).model

    rc, status = cli_json("status", "--db", db)
    assert rc == 0 and status["rows"] == 4 and status["shards"] == 3 and status["failures"] == 1
    assert status["failed"][0]["id"] == BROKEN
    rc, final = cli_json("finalize", "--db", db, "--index-threshold", "0")
    assert rc == 0 and final["versions"] == 1 and final["rows"] == 4
    rc, hits = cli_json("search", "--db", db, "--server", service.url, "--image", odd_folder / "plain.png")
    assert rc == 0 and hits[0]["id"] == "plain.png" and hits[0]["score"] > 0.9999


def test_a_table_of_another_model_is_refused(ray_run):
    rc, summary, err = ray_run.summary()
    db = ray_run.workdir / "db"
    assert rc == 1 and summary["added"] == 0 and count(db) == 4, err[-4000:]
    assert ("holds embeddings of tiny-siglip (SigLIP 2, 64x64, 32-dim), but this build uses other-siglip (SigLIP 2, "
            "48x48, 32-dim)") in summary["error"]


def test_a_killed_driver_costs_only_the_shards_in_flight(ray_run):
    """SIGKILL while the last shard waits on an image that never comes: the table holds whole shards only; the
    rerun embeds exactly the shards that are missing, and every id is there once."""
    build: StuckBuild = ray_run.finish()
    # The local cluster listened on its namespace's loopback only (inside it, a port bound to every interface would
    # show as 0.0.0.0 or *).
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in build.listening if line.strip()}
    assert addresses and addresses <= {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}, build.listening
    ids, shard, paths = build.kept_ids, build.shard, build.paths
    kept = collections.Counter(p // shard for p in (paths.index(Path(i)) for i in ids))
    assert kept and all(kept[s] == shard for s in kept), f"partial shards committed: {kept}"
    assert (len(paths) - 1) // shard not in kept  # the stuck image's shard

    rc, summary, err = build.rerun.summary()
    assert rc == 0, err[-4000:]
    total_shards = -(-len(paths) // shard)
    assert summary["skipped"] == len(ids) and summary["added"] == len(paths) - len(ids)
    assert summary["shards_todo"] == summary["shards_done"] == total_shards - len(kept)
    final_ids, _, _ = contents(build.db)
    assert sorted(final_ids) == sorted(str(p) for p in paths)  # every id, once


def readme_python_example() -> str:
    """The Python example of docs/indexer.md's "Inside your own Ray job" (moved there from the README)."""
    page = (ROOT / "docs" / "indexer.md").read_text()
    section = page.split("### Inside your own Ray job", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_api_example_runs_as_written(ray_run, service_vectors):
    """docs/indexer.md's example over a Parquet manifest of ids and image bytes gives the service's vectors."""
    rc, _, err = ray_run.wait()
    assert rc == 0, err[-4000:]
    out = pa.parquet.read_table(ray_run.workdir / "embeddings").to_pylist()
    got = {r["id"]: r for r in out}
    assert sorted(got) == sorted(service_vectors)  # the corrupt image is filtered out by the example
    for name, vector in service_vectors.items():
        assert float(np.dot(got[name]["embedding"], vector)) >= 0.9999

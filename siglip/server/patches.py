"""Fixes to BentoML's, prometheus_client's and uvicorn's internals, in one place, for the versions they were read from
(``WRITTEN_FOR``: another version installed logs a warning naming it).

Each fixes a fault measured against ``bentoml serve`` (tests/test_faults.py):

- ``arbiter_removes_sockets_last``: on SIGTERM BentoML's arbiter removed the directory holding the model service's
  Unix socket *before* stopping the workers, so a gateway request that reached the model after the stop began
  failed with 500 ``UnixClientConnectorError`` (7 of 8 in flight, at random). The directory now goes once every
  worker has exited.
- ``bounded_dependency_probe``: the gateway's ``/readyz`` asks the model service's ``/readyz``; a frozen model made
  it hang (BentoML catches ``aiohttp.ServerTimeoutError``, not the ``TimeoutError`` raised). Now 1 s, then 503.
- ``own_metrics_dir``: every ``bentoml serve`` emptied the shared ``$BENTOML_HOME/prometheus_multiproc_dir``, so
  two servers on one host wiped each other's ``/metrics``. Each server now writes under a ``server-<pid>-*/``
  directory of its own there, locked while it runs (directories of servers that are gone are removed), and a start
  that cannot write there, or in the temporary directory, stops at once with one line naming the path and the
  setting instead of crash-looping.
- ``allocated_metric_files``: metric files are memory-mapped; on a full disk the first write to a new page killed
  the worker with SIGBUS, silently, in a restart loop. Their space is now reserved with ``posix_fallocate`` (an
  ordinary ``OSError``), and a process that cannot get it keeps that file's metrics in memory and says so once.
- ``dead_workers_leave_gauges``: ``livesum`` gauges (BentoML's ``bentoml_service_request_in_progress``, ours
  ``siglip_requests_in_flight``) kept the last value of a killed worker forever; each scrape now drops the gauge
  files of processes that no longer exist, which is what ``prometheus_client.multiprocess.mark_process_dead``
  is for.

``install()`` applies them once per process; the server's main process and its workers all import the service.
``install_connection_limits`` makes uvicorn serve every connection with ``siglip.server.connections``' protocol
(header, connection and keep-alive limits uvicorn has no options for).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import logging
import mmap
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from siglip.server.connections import ConnectionLimits

logger = logging.getLogger("siglip.patches")

WRITTEN_FOR = {"bentoml": "1.4.40", "prometheus-client": "0.26.0", "uvicorn": "0.54.0"}
READY_PROBE_S = 1.0  # the gateway's /readyz waits this long for the model service's
PREFLIGHT_BYTES = 1 << 20  # a start must be able to reserve this much for metric files
SERVER_DIR_PREFIX = "server-{pid}-"
LOCK_FILE = ".lock"
SERVER_PID_ENV = "_SIGLIP_SERVER_PID"  # the main `bentoml serve` process, as its workers see it
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for package, expected in WRITTEN_FOR.items():
        found = version(package)
        if found != expected:
            logger.warning("siglip.server.patches was written for %s %s, not %s: re-check it against tests/"
                           "test_faults.py and tests/test_hostile.py before relying on graceful stops, metrics and "
                           "connection limits", package, expected, found)
    arbiter_removes_sockets_last()
    bounded_dependency_probe()
    own_metrics_dir()
    allocated_metric_files()
    dead_workers_leave_gauges()


# -------------------------------------------------------------------------------------------------------------
# graceful stop
# -------------------------------------------------------------------------------------------------------------
def arbiter_removes_sockets_last() -> None:
    """BentoML's ``Arbiter.stop`` closes its exit stack (which ``rmtree``s the Unix-socket directory) and then
    stops the watchers; here the stack closes when ``start`` returns, i.e. after the last worker has exited."""
    from bentoml._internal.utils import circus as bento_circus
    from circus.arbiter import Arbiter as CircusArbiter

    def start(self, cb=None) -> None:
        self.exit_stack.__enter__()
        try:
            fut = CircusArbiter.start(self, cb)
            if exc := fut.exception():
                raise exc
        finally:
            self.exit_stack.__exit__(None, None, None)

    def stop(self):
        return CircusArbiter.stop(self)

    bento_circus.Arbiter.start = start
    bento_circus.Arbiter.stop = stop


# -------------------------------------------------------------------------------------------------------------
# readiness
# -------------------------------------------------------------------------------------------------------------
def bounded_dependency_probe() -> None:
    """``AsyncClient.siglip_probe(path)``: the status of GET ``path`` on the dependency within ``READY_PROBE_S``, or
    None, over a connection pool of its own (a probe never queues behind model calls that fill the shared pool);
    ``is_ready`` (the gateway's /readyz) uses it."""
    import asyncio

    import aiohttp
    from _bentoml_impl.client.proxy2 import AsyncClient

    async def siglip_probe(self, path: str) -> int | None:
        if getattr(self, "_siglip_closed", False):
            return None
        session = getattr(self, "_siglip_probe_session", None)
        if session is None or session.closed:
            session = self._siglip_probe_session = self._session_manager._make_client()
        try:
            async with asyncio.timeout(READY_PROBE_S), session.get(path) as resp:
                return resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):  # RuntimeError: session closed
            return None

    async def is_ready(self, timeout: float | None = None) -> bool:
        return await self.siglip_probe(self._readyz_endpoint) == 200

    original_close = AsyncClient.close

    async def close(self) -> None:
        self._siglip_closed = True
        session = getattr(self, "_siglip_probe_session", None)
        if session is not None:
            await session.close()
        await original_close(self)

    AsyncClient.siglip_probe = siglip_probe
    AsyncClient.is_ready = is_ready
    AsyncClient.close = close


# -------------------------------------------------------------------------------------------------------------
# metric files
# -------------------------------------------------------------------------------------------------------------
_held: list[int] = []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskProblem(SystemExit):
    """A start that cannot write where it must: one line, exit status 1, no traceback, no restart loop."""

    def __init__(self, path: str | os.PathLike[str], exc: OSError, setting: str):
        super().__init__(f"siglip: cannot write to {path}: {exc.strerror or exc} - free space there or set "
                         f"{setting} to a writable directory with room")


def reserve(path: Path, size: int) -> None:
    """Write ``size`` bytes' worth of blocks in a scratch file under ``path`` (removed again); OSError if not."""
    fd, scratch = tempfile.mkstemp(prefix=".siglip-space-", dir=path)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
        os.unlink(scratch)


def prepare_metrics_dir(base: Path, pid: int) -> tuple[Path, int]:
    """A new, empty ``base/server-<pid>-<random>`` and the descriptor holding its lock, after removing the
    directories of servers that no longer run; DiskProblem when it cannot be written.

    A server holds an exclusive ``flock`` on its directory's ``.lock`` for as long as it runs, so a directory whose
    lock can be taken belongs to a server that is gone, whatever PID namespace it ran in (containers sharing one
    BENTOML_HOME volume all see their main process as PID 1)."""
    try:
        base.mkdir(parents=True, exist_ok=True)
        for entry in base.iterdir():
            if entry.name.startswith("server-") and entry.is_dir() and not locked(entry / LOCK_FILE):
                shutil.rmtree(entry, ignore_errors=True)
        # Made under a name the scan above skips, locked, then renamed (the lock goes with it): another server
        # starting at the same moment never sees an unlocked directory of ours.
        pending = Path(tempfile.mkdtemp(prefix=".pending-", dir=base))
        lock_fd = os.open(pending / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        mine = base / f"{SERVER_DIR_PREFIX.format(pid=pid)}{pending.name.removeprefix('.pending-')}"
        os.rename(pending, mine)
        reserve(mine, PREFLIGHT_BYTES)
    except OSError as exc:
        raise DiskProblem(exc.filename or base, exc, "BENTOML_HOME") from None
    tmp = os.environ.get("TMPDIR") or "/tmp"
    try:
        reserve(Path(tempfile.gettempdir()), PREFLIGHT_BYTES // 16)  # the model service's socket lives there
    except OSError as exc:
        raise DiskProblem(exc.filename or tmp, exc, "TMPDIR") from None
    return mine, lock_fd


def locked(lock_file: Path) -> bool:
    """Whether a running server holds ``lock_file``: False only when the lock can be taken, or there is none (a
    directory from before this scheme); any other error counts as in use."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the lock just taken, if any
    return False


def own_metrics_dir() -> None:
    """``bentoml serve`` calls ``bentoml.serving.ensure_prometheus_dir`` in its main process, after importing the
    service and before starting any worker, and hands the result to every worker as PROMETHEUS_MULTIPROC_DIR."""
    import bentoml.serving
    from bentoml._internal.configuration.containers import BentoMLContainer

    def ensure_prometheus_dir(directory: str | None = None, clean: bool = True, use_alternative: bool = True) -> str:
        base = Path(directory or BentoMLContainer.prometheus_multiproc_dir.get())
        mine, lock_fd = prepare_metrics_dir(base, os.getpid())
        _held.append(lock_fd)  # held, and so the lock, until this process exits
        # The workers (started next, with a copy of this environment) exit with this process: drain.py.
        os.environ[SERVER_PID_ENV] = str(os.getpid())
        return str(mine.absolute())

    bentoml.serving.ensure_prometheus_dir = ensure_prometheus_dir


_reported: set[str] = set()


def report_metrics_write(path: str, exc: OSError) -> None:
    if path in _reported:
        return
    _reported.add(path)
    logger.error("cannot write metrics file %s: %s - this process keeps those metrics in memory (missing from "
                 "/metrics) until restarted; free space there or set BENTOML_HOME to a disk with room",
                 path, exc.strerror or exc)


def allocated_metric_files() -> None:
    import prometheus_client.values
    from prometheus_client import mmap_dict

    class AllocatedMmapedDict(mmap_dict.MmapedDict):
        """``MmapedDict`` whose file blocks are reserved before they are mapped (a full disk is an OSError here,
        not a SIGBUS at the first write), falling back to anonymous memory when they cannot be."""

        def __init__(self, filename: str, read_mode: bool = False):
            if read_mode:
                super().__init__(filename, read_mode)
                return
            self._fname = filename
            self._f = None
            self._positions = {}
            try:
                # Not append mode (the original's "a+b"): glibc's posix_fallocate emulation, used on file systems
                # without a native fallocate, refuses O_APPEND descriptors.
                self._f = os.fdopen(os.open(filename, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
                capacity = os.fstat(self._f.fileno()).st_size
                if capacity == 0:
                    capacity = mmap_dict._INITIAL_MMAP_SIZE
                    os.posix_fallocate(self._f.fileno(), 0, capacity)
                self._m = mmap.mmap(self._f.fileno(), capacity, access=mmap.ACCESS_WRITE)
            except OSError as exc:
                capacity = mmap_dict._INITIAL_MMAP_SIZE
                self._to_memory(exc, capacity, b"")
            self._capacity = capacity
            self._used = mmap_dict._unpack_integer(self._m, 0)[0]
            if self._used == 0:
                self._used = 8
                mmap_dict._pack_integer(self._m, 0, self._used)
            else:
                for key, _, _, pos in self._read_all_values():
                    self._positions[key] = pos

        def _to_memory(self, exc: OSError, capacity: int, content: bytes) -> None:
            report_metrics_write(self._fname, exc)
            if self._f is not None:
                # Its values would go stale on disk (a livesum gauge stuck), and an empty file breaks every
                # scrape: it goes.
                with contextlib.suppress(OSError):
                    os.unlink(self._fname)
                self._f.close()
                self._f = None
            if getattr(self, "_m", None) is not None:
                self._m.close()
            self._m = mmap.mmap(-1, capacity)
            self._m[:len(content)] = content

        def _init_value(self, key: str) -> None:
            encoded = key.encode("utf-8")
            padded = encoded + (b" " * (8 - (len(encoded) + 4) % 8))
            value = mmap_dict.struct.pack(f"i{len(padded)}sdd".encode(), len(encoded), padded, 0.0, 0.0)
            if self._used + len(value) > self._capacity:
                capacity = self._capacity
                while self._used + len(value) > capacity:
                    capacity *= 2
                self._grow(capacity)
            self._m[self._used:self._used + len(value)] = value
            self._used += len(value)
            mmap_dict._pack_integer(self._m, 0, self._used)
            self._positions[key] = self._used - 16

        def _grow(self, capacity: int) -> None:
            content = self._m[:self._used]
            if self._f is not None:
                try:
                    os.posix_fallocate(self._f.fileno(), 0, capacity)
                    self._m = mmap.mmap(self._f.fileno(), capacity)
                    self._capacity = capacity
                    return
                except OSError as exc:
                    self._to_memory(exc, capacity, content)
            else:
                old, self._m = self._m, mmap.mmap(-1, capacity)
                self._m[:len(content)] = content
                old.close()
            self._capacity = capacity

        def close(self) -> None:
            if self._m is not None:
                self._m.close()
                self._m = None
            if self._f is not None:
                self._f.close()
                self._f = None

    prometheus_client.values.MmapedDict = AllocatedMmapedDict


def dead_workers_leave_gauges() -> None:
    from bentoml._internal.server.metrics.prometheus import PrometheusClient
    from prometheus_client import multiprocess

    original = PrometheusClient.generate_latest

    def generate_latest(self):
        if self.multiproc:
            sweep_dead_gauges(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), multiprocess.mark_process_dead)
        return original(self)

    PrometheusClient.generate_latest = generate_latest


def sweep_dead_gauges(directory: str, mark_dead) -> list[int]:
    """``mark_dead(pid, directory)`` for every process with live-gauge files there that no longer exists."""
    if not directory:
        return []
    dead = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = Path(path).stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            dead.add(int(pid))
    for pid in sorted(dead):
        with contextlib.suppress(OSError):
            mark_dead(pid, directory)
    return sorted(dead)


# -------------------------------------------------------------------------------------------------------------
# uvicorn: connection limits
# -------------------------------------------------------------------------------------------------------------
def install_connection_limits(limits: ConnectionLimits) -> None:
    """Every uvicorn server started in this process after this call (BentoML creates them in its workers, after
    importing the service) serves with ``limits``. uvicorn has no environment variables for any of this and
    BentoML passes only a few options, so the Config is adjusted as it is created.

    ``keep_alive_s``: BentoML runs uvicorn with a 5 s keep-alive, no longer than clients keep idle pooled
    connections (httpx 5 s, aiohttp 15 s, load balancers 60 s). When the server closes first, a request sent on
    that connection at the same moment meets a reset (~0.5% of requests under overload, sporadic 502s behind load
    balancers); a keep-alive longer than any client's removes the race.
    """
    import bentoml
    import uvicorn

    # Calling this again replaces our own wrapper, never another library's.
    original = getattr(uvicorn.Config.__init__, "_siglip_original", uvicorn.Config.__init__)
    from siglip.server.connections import protocol_class
    from siglip.server.memory import fix_mmap_threshold, limit_arenas

    protocol = protocol_class(limits)

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if limits.keep_alive_s:
            self.timeout_keep_alive = limits.keep_alive_s
        if self.http in ("auto", "httptools"):
            self.http = protocol
        # h11 (if someone selects it) has its own header-size bound
        self.h11_max_incomplete_event_size = limits.max_header_bytes
        if bentoml.server_context.service_type == "entry_service":
            # The gateway holds clients' bodies and decodes their images in threads (see siglip.server.memory).
            limit_arenas(2)
            fix_mmap_threshold()

    init._siglip_original = original  # type: ignore[attr-defined]
    uvicorn.Config.__init__ = init  # type: ignore[method-assign]

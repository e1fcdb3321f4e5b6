"""Shutdown order: the model service keeps answering until the gateway has answered its requests.

On SIGTERM, BentoML's arbiter stops every service process at once (circus stops all watchers together). The
model service would then close its socket while gateway requests that are still fetching or decoding images
have yet to call it, and those requests would fail with 500. So a model worker holds its SIGTERM back until
the other processes of the same server (the gateway workers, which exit once their in-flight requests are
answered) are gone, or a deadline passes, and only then starts uvicorn's own graceful shutdown. A second
SIGTERM shuts down at once.

The other way round, a worker must not outlive the main process: killed (SIGKILL, the OOM killer), it would leave
its workers running and holding the port, and a new server could not bind it. ``exit_with_server`` asks the
kernel to kill the worker when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("siglip.drain")


def hold_sigterm_until_callers_exit(service_name: str, max_wait_s: float, poll_s: float = 0.1) -> bool:
    """Install the deferring SIGTERM handler in this (model worker) process; returns whether it did.

    Callers are the sibling processes (children of the same arbiter) that are not workers of ``service_name``.
    Does nothing outside a server's main thread or when no server handler is installed (the class used
    directly in a test)."""
    import psutil

    if threading.current_thread() is not threading.main_thread():
        return False
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        return False
    me = psutil.Process()
    parent = me.parent()
    if parent is None:
        return False

    def callers() -> list[psutil.Process]:
        alive = []
        try:
            siblings = parent.children()
        except psutil.Error:  # the arbiter itself is gone
            return []
        for p in siblings:
            try:
                if p.pid != me.pid and p.status() != psutil.STATUS_ZOMBIE and service_name not in p.cmdline():
                    alive.append(p)
            except psutil.Error:  # exited meanwhile
                continue
        return alive

    held = threading.Event()

    def on_sigterm(sig: int, frame) -> None:
        if held.is_set():
            server_handler(sig, frame)
            return
        held.set()
        shutdown = functools.partial(server_handler, sig, frame)
        threading.Thread(target=_wait_then, args=(callers, max_wait_s, poll_s, shutdown), name="siglip-drain",
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def _wait_then(callers: Callable[[], list], max_wait_s: float, poll_s: float,
               shutdown: Callable[[], None]) -> None:
    t0 = time.monotonic()
    waiting = callers()
    if waiting:
        logger.info("SIGTERM: answering %d caller process(es) until they exit (at most %.0f s)", len(waiting),
                    max_wait_s)
    while waiting and time.monotonic() - t0 < max_wait_s:
        time.sleep(poll_s)
        waiting = callers()
    if waiting:
        logger.warning("SIGTERM: callers still running after %.0f s; shutting down anyway", max_wait_s)
    shutdown()  # uvicorn's handler only sets a flag its main loop polls: safe from this thread


PR_SET_PDEATHSIG = 1


def exit_with_server(server_pid: int | None) -> bool:
    """In a worker: SIGKILL this process when its parent (``server_pid``, the main ``bentoml serve`` process) dies,
    and at once if it already has. Returns whether the kernel took the request (Linux only)."""
    if server_pid is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != server_pid:  # the parent died before the request: nothing would signal us
        logger.error("the server process %d is gone; this worker exits", server_pid)
        os.kill(os.getpid(), signal.SIGKILL)
    return True

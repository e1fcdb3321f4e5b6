"""The pieces behind tests/test_faults.py, in-process: the model-stall watch, metric files on a full disk, the
per-server metrics directory, dead workers' gauges, and the client's retries."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys

import pytest

from siglip.api.errors import NotReady
from siglip.api.modelwatch import ModelWatch
from siglip.server import patches


# ---------------------------------------------------------------------------------------------------------------
# ModelWatch
# ---------------------------------------------------------------------------------------------------------------
def test_watch_passes_results_and_errors_through_while_the_model_answers():
    async def main():
        probes = []

        async def probe():
            probes.append(1)
            return True

        watch = ModelWatch(probe, stall_after_s=0.2, interval_s=0.01)

        async def slow(x):
            await asyncio.sleep(0.3)  # longer than the stall window: a slow model is not a stalled one
            return x

        assert await watch.run(slow(7)) == 7
        with pytest.raises(KeyError):
            await watch.run(_raise(KeyError("x")))
        assert probes and watch.calls == 0

    asyncio.run(main())


async def _raise(exc):
    raise exc


def test_watch_fails_calls_in_flight_and_new_ones_while_stalled_then_recovers():
    async def main():
        answering = False

        async def probe():
            return answering

        watch = ModelWatch(probe, stall_after_s=0.1, interval_s=0.01)
        forever = asyncio.Event()
        with pytest.raises(NotReady) as info:
            await asyncio.wait_for(watch.run(forever.wait()), timeout=10)
        assert info.value.status == 503 and "SIGLIP_MODEL_STALL_TIMEOUT_S" in info.value.message
        with pytest.raises(NotReady):  # at once, without waiting for another window
            await asyncio.wait_for(watch.run(forever.wait()), timeout=0.05)
        answering = True
        for _ in range(1000):
            if not watch.stalled.is_set():
                break
            await asyncio.sleep(0.01)
        assert await watch.run(asyncio.sleep(0, result="ok")) == "ok"

    asyncio.run(main())


def test_a_probe_that_raises_does_not_leave_the_watch_stalled():
    async def main():
        state = {"calls": 0, "answering": False}

        async def probe():
            state["calls"] += 1
            if state["calls"] == 3:
                raise RuntimeError("session closed")
            return state["answering"]

        watch = ModelWatch(probe, stall_after_s=0.05, interval_s=0.01)
        with pytest.raises(NotReady):
            await asyncio.wait_for(watch.run(asyncio.Event().wait()), timeout=10)
        while state["calls"] < 3:  # the watcher survives the raising probe (it counts as no answer)
            await asyncio.sleep(0.01)
        watch._task.cancel()  # a watcher that ended anyway...
        await asyncio.gather(watch._task, return_exceptions=True)
        with pytest.raises(NotReady):  # ...is started again by the next refused call
            await watch.run(asyncio.sleep(0))
        state["answering"] = True
        for _ in range(1000):
            if not watch.stalled.is_set():
                break
            await asyncio.sleep(0.01)
        assert await watch.run(asyncio.sleep(0, result="ok")) == "ok"

    asyncio.run(main())


def test_the_model_loading_detail_is_read_from_the_503_body():
    import orjson

    from siglip.server.model_gate import model_loading_detail

    body = orjson.dumps({"error": 'model not loaded: loading /m failed: OSError: no "config.json"\nthere'}).decode()
    assert model_loading_detail(body) == 'loading /m failed: OSError: no "config.json"\nthere'
    assert model_loading_detail('{"error": "model not loaded: still loading"}') == "still loading"
    assert model_loading_detail("not json") == "still loading"


# ---------------------------------------------------------------------------------------------------------------
# metric files
# ---------------------------------------------------------------------------------------------------------------
def test_metrics_dir_is_per_server_locked_and_dead_servers_dirs_go(tmp_path):
    base = tmp_path / "prometheus_multiproc_dir"
    first, first_lock = patches.prepare_metrics_dir(base, 1)  # PID 1 twice: containers sharing a volume
    second, second_lock = patches.prepare_metrics_dir(base, 1)
    assert first != second and first.name.startswith("server-1-") and first.is_dir() and second.is_dir()
    assert [p.name for p in second.iterdir()] == [".lock"]
    (base / "server-7-old").mkdir()  # no lock file: a server from before, gone
    os.close(first_lock)  # the first server exits
    third, third_lock = patches.prepare_metrics_dir(base, 2)
    assert not first.exists() and not (base / "server-7-old").exists(), "dead servers' directories stay"
    assert second.exists() and third.exists(), "a running server's directory was removed"
    os.close(second_lock)
    os.close(third_lock)


def test_a_start_that_cannot_write_is_one_line_and_exit_1(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SystemExit) as info:
        patches.prepare_metrics_dir(tmp_path / "m", 12345)
    assert isinstance(info.value.code, str), "a message: Python prints it and exits with status 1"
    message = info.value.code
    assert "\n" not in message and "No space left on device" in message and "BENTOML_HOME" in message
    assert str(tmp_path / "m") in message


def test_metric_file_that_cannot_be_allocated_falls_back_to_memory(tmp_path, monkeypatch, caplog):
    import prometheus_client.values

    monkeypatch.setattr(prometheus_client.values, "MmapedDict", prometheus_client.values.MmapedDict)  # restored after
    patches.allocated_metric_files()

    cls = prometheus_client.values.MmapedDict
    ok = cls(str(tmp_path / "counter_1.db"))
    ok.write_value("a", 1.5, 0.0)
    assert ok.read_value("a") == (1.5, 0.0) and (tmp_path / "counter_1.db").stat().st_size == 1 << 16

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    fresh = cls(str(tmp_path / "gauge_livesum_1.db"))
    for i in range(4000):  # enough keys to need growing past the first 64 KiB
        fresh.write_value(f"key-{i}", float(i), 0.0)
    assert fresh.read_value("key-3999") == (3999.0, 0.0)
    assert not (tmp_path / "gauge_livesum_1.db").exists(), "an empty or stale file would break scrapes"
    for i in range(4000):  # the file-backed one must grow too: it moves to memory, values kept
        ok.write_value(f"key-{i}", float(i), 0.0)
    assert ok.read_value("a") == (1.5, 0.0) and ok.read_value("key-3999") == (3999.0, 0.0)
    lines = [r.getMessage() for r in caplog.records if "cannot write metrics file" in r.getMessage()]
    assert len(lines) == 2 and all("No space left on device" in x and "BENTOML_HOME" in x for x in lines), lines
    ok.close()
    fresh.close()


def test_dead_processes_live_gauges_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"gauge_livesum_{dead.pid}.db", f"gauge_liveall_{dead.pid}.db", f"gauge_livesum_{os.getpid()}.db",
                 f"counter_{dead.pid}.db"):
        (tmp_path / name).write_bytes(b"")
    marked = []
    assert patches.sweep_dead_gauges(str(tmp_path), lambda pid, d: marked.append((pid, d))) == [dead.pid]
    assert marked == [(dead.pid, str(tmp_path))]


# ---------------------------------------------------------------------------------------------------------------
# the client's retries
# ---------------------------------------------------------------------------------------------------------------
def test_client_retries_429_and_503_and_nothing_else():
    from siglip.client import AsyncSiglipClient, Call, SiglipClient, SiglipError

    for cls in (SiglipClient, AsyncSiglipClient):
        client = cls("http://127.0.0.1:9", retries=2)
        client.backoff = type(client.backoff)(attempts=3, base_s=0.0)  # no waiting between tries
        for statuses, outcome in (([503, 429, 200], "ok"), ([503, 503, 503], 503), ([400, 200], 400),
                                  ([None, 200], None), ([504, 200], 504)):
            answers = iter(statuses)

            def once(call, answers=answers):
                status = next(answers)
                if status != 200:
                    raise SiglipError(status, "x")
                return "ok"

            async def once_async(call, once=once):
                return once(call)

            client._run_once = once_async if cls is AsyncSiglipClient else once
            call = Call("text_embedding", "x", None, lambda raw: raw)
            try:
                got = asyncio.run(client._run(call)) if cls is AsyncSiglipClient else client._run(call)
            except SiglipError as exc:
                got = exc.status
            assert got == outcome, (cls.__name__, statuses)
        if cls is AsyncSiglipClient:
            asyncio.run(client.aclose())
        else:
            client.close()


# ---------------------------------------------------------------------------------------------------------------
# a fault found on the way: the model service's threads sharing one tokenizer
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_calls_from_several_threads_do_not_mix_their_settings(tiny_checkpoint):
    """A padded batch in one thread and unpadded counts in another: without SerialTokenizer the counts came back
    padded to 64 (15 of 20,000 here) and batches ragged."""
    import threading

    from transformers import AutoTokenizer

    from siglip.model.text import SerialTokenizer, token_counts, tokenize

    tokenizer = SerialTokenizer(AutoTokenizer.from_pretrained(tiny_checkpoint))
    stop, errors = threading.Event(), []

    def batches():
        while not stop.is_set():
            try:
                assert tokenize(tokenizer, ["a cat", "b"], 64).shape == (2, 64)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=batches)
    thread.start()
    try:
        counts = [tuple(token_counts(tokenizer, ["a cat", ""], 64)) for _ in range(20000)]
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:1]
    assert set(counts) == {tuple(token_counts(tokenizer, ["a cat", ""], 64))} and counts[0][1] == 1, set(counts)


def test_an_error_below_the_guard_is_answered_not_left_hanging():
    """Uploads and JSON alike: an exception from the app behind RequestGuard becomes a 500 with the service's error
    body (BentoML's outer layers would leave the request unanswered)."""
    import httpx

    from siglip.server.http import GuardLimits, RequestGuard
    from siglip.settings import Settings

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    guard = RequestGuard(broken, frozenset({"/image_embedding"}), GuardLimits.from_settings(Settings()),
                         uploads=broken)

    async def call(**kw):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as client:
            return await client.post("/image_embedding", **kw)

    for kw in ({"json": {"inputs": "a"}}, {"content": b"\xff\xd8", "headers": {"content-type": "image/jpeg"}}):
        r = asyncio.run(call(**kw))
        assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}, r.text

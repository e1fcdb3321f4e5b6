"""Shared pieces of the benchmark scripts: synthetic inputs and request bodies, the one request loop that
latency.py, throughput.py and loadtest.py send through, statistics, tables, JSON output, loopback checks.

The scripts run as ``python benchmarks/NAME.py`` (so this directory is on ``sys.path``) and never reach beyond
127.0.0.1 / localhost. Progress goes to stderr; result tables go to stdout; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:3000"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Ten labels as a client would send them (the service applies "This is a photo of {}.").
LABELS = ("cat", "dog", "bird", "car", "ceramic tile", "wooden floor", "heat pump", "company logo",
          "technical diagram", "person")
SHORT_TEXTS = ("a photo of a cat", "a red car on a street", "white ceramic floor tile", "a technical diagram",
               "the outdoor unit of a heat pump", "a company logo", "a rustic oak table", "a person in a city")

# The API spec's documented latency ranges (ms), per case; zero-shot has none.
SPEC_RANGES = {
    "single": {"T4": (50, 100), "A10G": (30, 60), "CPU": (500, 2000)},
    "batch10": {"T4": (200, 400), "A10G": (100, 200), "CPU": (2000, 5000)},
}
MODES = {  # request kind -> (path, images or texts per request)
    "image_embedding": ("/image_embedding", 1),
    "batch10": ("/image_embedding", 10),
    "zero_shot": ("/zero_shot", 1),
    "text_embedding": ("/text_embedding", 8),
}
CASES = {"single": "image_embedding", "batch10": "batch10", "zero_shot": "zero_shot"}  # latency / naive cases


# -------------------------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def meta(script: str, **extra: Any) -> dict[str, Any]:
    """Where and when a result was taken, stored beside it in the JSON."""
    return {"script": script, "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "python": platform.python_version(), "cpus": os.cpu_count(), **extra}


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, default=str) + "\n")
    log(f"wrote {p}")


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def arg_parser(doc: str, url: bool = True) -> argparse.ArgumentParser:
    """A parser with the script's docstring as --help and the flags every script shares."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    if url:
        parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL, loopback only (default: {DEFAULT_URL})")
    parser.add_argument("--distinct-images", type=int, default=16, help="size of the JPEG pool (default: 16)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    return parser


def pick_names(parser: argparse.ArgumentParser, text: str, choices: Iterable[str], what: str = "case") -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    for name in names:
        if name not in choices:
            parser.error(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return names


# -------------------------------------------------------------------------------------------------------------
# statistics
# -------------------------------------------------------------------------------------------------------------
def latency_stats(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean/min/max and p50/p90/p99 in milliseconds (linear interpolation between samples)."""
    if not seconds:
        return {"n": 0, "mean_ms": None, "min_ms": None, "max_ms": None, "p50_ms": None, "p90_ms": None,
                "p99_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"n": int(ms.size), "mean_ms": round(float(ms.mean()), 2), "min_ms": round(float(ms.min()), 2),
            "max_ms": round(float(ms.max()), 2), "p50_ms": round(float(p50), 2), "p90_ms": round(float(p90), 2),
            "p99_ms": round(float(p99), 2)}


# -------------------------------------------------------------------------------------------------------------
# inputs
# -------------------------------------------------------------------------------------------------------------
def make_jpeg(seed: int, width: int = 800, height: int = 600, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG: smooth lighting, a horizon, soft blobs, fine texture and sensor noise.

    Entropy close to a real photo matters: JPEG decode time and payload size depend on it (pure noise is
    2-3x larger than a photo; a flat gradient 10x smaller).
    """
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky, ground = rng.uniform(60, 230, 3), rng.uniform(20, 180, 3)
    horizon = height * rng.uniform(0.35, 0.65) + 20 * np.sin(xx / width * rng.uniform(2, 8) + rng.uniform(0, 6))
    t = np.clip((yy - horizon) / 40 + 0.5, 0, 1)[..., None]
    img = sky * (1 - t) + ground * t
    img += (xx / width - 0.5)[..., None] * rng.uniform(-60, 60, 3)  # lighting gradient
    for _ in range(int(rng.integers(5, 10))):  # soft objects
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(30, 160)
        mask = np.exp(-(((xx - cx) ** 2 + ((yy - cy) * rng.uniform(0.6, 1.6)) ** 2) / (2 * r * r)))[..., None]
        img = img * (1 - mask) + rng.uniform(0, 255, 3) * mask
    for _ in range(int(rng.integers(3, 7))):  # hard-edged objects
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        img[y0:y0 + h, x0:x0 + w] = img[y0:y0 + h, x0:x0 + w] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    texture = np.sin(xx * rng.uniform(0.05, 0.3)) * np.cos(yy * rng.uniform(0.05, 0.3)) * 8
    img += texture[..., None] + rng.normal(0, 6, (height, width, 3))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(0.7))
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@cache
def jpeg_b64_pool(count: int, width: int = 800, height: int = 600, quality: int = 90) -> tuple[str, ...]:
    """``count`` distinct base64 JPEGs (seeds 0..count-1), built once per process."""
    return tuple(base64.b64encode(make_jpeg(i, width, height, quality)).decode("ascii") for i in range(count))


def request_json(mode: str, pool: Sequence[str], i: int) -> dict[str, Any]:
    """The i-th image request of ``mode`` over a pool of base64 JPEGs (naive_handler.py times the same ones)."""
    if mode == "batch10":
        return {"inputs": [pool[(i * 10 + k) % len(pool)] for k in range(10)]}
    body: dict[str, Any] = {"inputs": pool[i % len(pool)]}
    if mode == "zero_shot":
        body["parameters"] = {"candidate_labels": list(LABELS)}
    return body


# mode -> JSON bodies, encoded once before the load (10 base64 JPEGs take ~2 ms to encode here: client CPU that
# would cap the throughput measured). Built before the client processes fork, which inherit them.
_BODIES: dict[str, list[bytes]] = {}


def build_bodies(modes: Iterable[str], distinct_images: int) -> None:
    pool = jpeg_b64_pool(distinct_images)
    for mode in set(modes) - {"text_embedding"}:
        _BODIES[mode] = [json.dumps(request_json(mode, pool, j)).encode() for j in range(len(pool))]


def body_for(mode: str, i: int, unique: str = "") -> bytes:
    if mode == "text_embedding":  # texts made unique by a run id, else the text cache answers from the 2nd on
        return json.dumps({"inputs": [f"{t} {unique}-{i}" if unique else t for t in SHORT_TEXTS]}).encode()
    bodies = _BODIES[mode]
    return bodies[i % len(bodies)]


def check_answer(mode: str, content: bytes) -> str | None:
    """None if a 200 answer of ``mode`` is right (unit-norm embeddings; the 10 labels ranked, scores summing to 1),
    else what is wrong."""
    try:
        data = json.loads(content)
        if mode == "zero_shot":
            if {d["label"] for d in data} != set(LABELS):
                return "zero_shot answer does not rank the 10 labels"
            return None if abs(sum(d["score"] for d in data) - 1) < 1e-3 else "zero_shot scores do not sum to 1"
        if len(data) != MODES[mode][1]:
            return f"{mode}: {len(data)} embeddings, expected {MODES[mode][1]}"
        norm = math.sqrt(sum(x * x for x in data[0]["embedding"]))
        return None if abs(norm - 1) < 1e-2 else f"{mode}: embedding norm {norm:.4f}, expected 1"
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return f"{mode}: unexpected answer {content[:120]!r} ({type(exc).__name__})"


# -------------------------------------------------------------------------------------------------------------
# the server under test
# -------------------------------------------------------------------------------------------------------------
def check_loopback(url: str) -> str:
    """The benchmarks send traffic to this machine only: refuse any other host."""
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(f"refusing to send benchmark traffic to {host!r}: only 127.0.0.1 / localhost / ::1")
    return url.rstrip("/")


def wait_ready(url: str, timeout_s: float = 60.0, since: float | None = None,
               alive: Callable[[], bool] | None = None) -> float:
    """Poll ``url``/readyz until it answers 200 and return the seconds since ``since`` (epoch; default now).
    Exits (SystemExit) once ``timeout_s`` have passed since ``since`` or ``alive()`` turns false; logs progress
    every 10 s."""
    import httpx

    since = time.time() if since is None else since
    last = "no answer"
    next_note = time.time() + 10
    # One client for the whole wait: httpx.get builds a TLS context per call (~80 ms of CPU on 2 cores), which at
    # four polls a second would take a third of a core from the start-up being timed.
    with httpx.Client(timeout=5) as probe:
        while True:
            now = time.time()
            if now - since > timeout_s:
                raise SystemExit(f"{url}/readyz not ready after {timeout_s:g} s ({last})")
            if alive is not None and not alive():
                raise SystemExit("server process exited before it was ready")
            try:
                r = probe.get(url + "/readyz")
                if r.status_code == 200:
                    return time.time() - since
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if now > next_note:
                log(f"waiting for {url}/readyz: {now - since:.0f} s ({last})")
                next_note = now + 10
            time.sleep(0.25)


# -------------------------------------------------------------------------------------------------------------
# the request loop: latency.py, throughput.py and loadtest.py all send their requests through run_load
# -------------------------------------------------------------------------------------------------------------
HEADERS = {"content-type": "application/json"}


@dataclass
class Samples:
    """What a load sent and got. ``records``: (mode, status, seconds taken, seconds since the start when it ended)
    per request; status is "200", "503", ..., the client-side exception's name, or "cancelled" (still in flight
    when the drain timeout ran out). The first error texts and the first three 200 answers per mode are kept."""

    records: list[tuple[str, str, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: dict[str, list[bytes]] = field(default_factory=dict)
    sent: int = 0
    skipped: int = 0  # open loop: arrivals dropped because the cap on requests in flight was reached
    elapsed: float = 0.0
    cpu_s: float = 0.0  # client CPU, all processes
    procs: int = 1

    def statuses(self, mode: str | None = None) -> dict[str, int]:
        return dict(sorted(Counter(s for m, s, _, _ in self.records if mode in (None, m)).items()))

    def latencies(self, mode: str | None = None, ok_only: bool = True) -> list[float]:
        """Seconds per request answered 200, or (``ok_only=False``) answered with any HTTP status."""
        return [t for m, s, t, _ in self.records if mode in (None, m) and (s == "200" if ok_only else s.isdigit())]

    def wrong_answers(self) -> list[str]:
        return [w for m, bodies in self.answers.items() for b in bodies if (w := check_answer(m, b))]

    def cpu_pct(self, elapsed: float) -> float:
        """Client CPU as % of its cores (near 100: the client, not the server, is the limit)."""
        return round(100 * self.cpu_s / max(elapsed, 1e-9) / self.procs, 1)


async def _load(url: str, mix: tuple[tuple[str, float], ...], unique: str, concurrency: int, count: int,
                duration: float, rate: float, drain_timeout: float, timeout: float, start_at: float,
                seed: int) -> Samples:
    import aiohttp

    rng = random.Random(seed)
    modes, weights = [m for m, _ in mix], [w for _, w in mix]
    out = Samples()
    # aiohttp, not httpx: the client's own time is in every latency measured, and a client at 100% CPU caps the
    # throughput measured. Against a no-op loopback server (70 KB bodies) httpx took 0.54 ms per sequential request
    # and topped out near 200 requests/s per client core at 32-512 connections; aiohttp 0.25 ms and ~3,000.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=HEADERS,
                                    timeout=aiohttp.ClientTimeout(total=timeout))
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    stop_at = t0 + duration

    async def one(i: int) -> None:
        mode = modes[0] if len(modes) == 1 else rng.choices(modes, weights)[0]
        body = body_for(mode, i, unique)
        status, answer = "cancelled", None
        t = time.perf_counter()
        try:
            async with session.post(url + MODES[mode][0], data=body) as r:
                answer = await r.read()
                status = str(r.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, answer = type(exc).__name__, exc
        finally:  # a cancelled request is recorded too, then the cancellation goes on
            now = time.perf_counter()
            out.records.append((mode, status, now - t, now - t0))
        if status == "200":
            if len(out.answers.setdefault(mode, [])) < 3:
                out.answers[mode].append(answer)
        elif len(out.errors) < 20:  # the texts of the first; the status counts cover all
            why = (f"HTTP {status}: {answer[:160].decode(errors='replace')}" if status.isdigit()
                   else f"{status}: {answer}")
            out.errors.append(f"{mode}: {why}")

    tasks: set[asyncio.Future] = set()
    try:
        if rate > 0:  # open loop: Poisson arrivals at ``rate``, whatever the answers do
            next_t = t0
            while out.sent < count:
                next_t += rng.expovariate(rate)
                if next_t >= stop_at or time.perf_counter() >= stop_at:
                    break  # on schedule, or behind it: a lagging client stops on time, not after its backlog
                await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
                if len(tasks) >= concurrency:
                    out.skipped += 1
                    continue
                task = asyncio.ensure_future(one(out.sent))
                out.sent += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        else:  # closed loop: each client sends its next request as soon as the last one is answered
            async def client() -> None:
                while time.perf_counter() < stop_at and out.sent < count:
                    out.sent += 1
                    await one(out.sent - 1)

            tasks = {asyncio.ensure_future(client()) for _ in range(concurrency)}
        if tasks:
            left = max(0.0, stop_at - time.perf_counter()) + drain_timeout
            _, pending = await asyncio.wait(set(tasks), timeout=left)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await session.close()
    out.elapsed, out.cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return out


def _load_in_process(args: tuple) -> Samples:  # top level, so that Pool.map can hand it to its processes
    return asyncio.run(_load(*args))


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def run_load(url: str, mix: Sequence[tuple[str, float]], *, concurrency: int, count: int,
             duration: float = math.inf, rate: float = 0.0, drain_timeout: float = 30.0, timeout: float = 120.0,
             procs: int = 1, unique: str = "", seed: int = 0) -> Samples:
    """Send at most ``count`` requests for at most ``duration`` s: a weighted ``mix`` of MODES ((mode, weight),
    ...), bodies from build_bodies (texts unique per request given a ``unique`` run id). ``rate`` > 0: an open loop
    of that many requests/s, at most ``concurrency`` in flight (arrivals beyond are skipped); else a closed loop of
    ``concurrency`` clients. Requests in flight at the end get ``drain_timeout`` s, then are cancelled. ``procs``
    client processes share the load, started together."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per connection, up to --max-in-flight
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536 if hard == resource.RLIM_INFINITY else hard, hard))
    procs = max(1, min(procs, concurrency))
    start_at = time.time() + (0.5 if procs > 1 else 0.0)
    jobs = [(url, tuple(mix), unique and f"{unique}p{k}", c, m, duration, rate / procs, drain_timeout, timeout,
             start_at, seed * 1000 + k)
            for k, (c, m) in enumerate(zip(split(concurrency, procs), split(count, procs)))]
    if procs == 1:
        parts = [_load_in_process(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            parts = pool.map(_load_in_process, jobs)
    out = Samples(procs=procs)
    for p in parts:
        out.records += p.records
        out.errors += p.errors
        for mode, bodies in p.answers.items():
            out.answers.setdefault(mode, []).extend(bodies)
        out.sent, out.skipped, out.cpu_s = out.sent + p.sent, out.skipped + p.skipped, out.cpu_s + p.cpu_s
        out.elapsed = max(out.elapsed, p.elapsed)
    return out

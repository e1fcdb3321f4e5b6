"""Shared pieces of the benchmark scripts: synthetic inputs, statistics, tables, JSON output, loopback checks.

The scripts run as ``python benchmarks/NAME.py`` (so this directory is on ``sys.path``) and never reach beyond
127.0.0.1 / localhost. Progress goes to stderr; result tables go to stdout; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
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


def status_key(status: int | None, exc: BaseException | None = None) -> str:
    """How a request ended, as a JSON key: "200", "503", or the client-side exception's name."""
    return str(status) if exc is None else type(exc).__name__


# Connections per httpx client: httpcore's pool scans its connections for every request it queues or finishes, so
# one pool of hundreds of kept-alive connections costs the load generator more CPU than the server it measures.
CONNECTIONS_PER_CLIENT = 32


@contextlib.asynccontextmanager
async def client_shards(concurrency: int, timeout: float, headers: dict[str, str]) -> AsyncIterator[list[Any]]:
    """httpx clients of at most CONNECTIONS_PER_CLIENT connections each, together ``concurrency``; spread the
    requests over them (request i on client i % len)."""
    import httpx

    n = max(1, math.ceil(concurrency / CONNECTIONS_PER_CLIENT))
    per = math.ceil(concurrency / n)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    clients = [httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) for _ in range(n)]
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))

"""Throughput of a RUNNING service under a concurrency sweep (closed loop: each client sends its next request
as soon as the last one is answered).

Modes:
  image_embedding  POST /image_embedding, 1 image (base64 800x600 JPEG, quality 90) per request
  zero_shot        POST /zero_shot, 1 image x 10 fixed labels (text cache hot after the warm-up)
  text_embedding   POST /text_embedding, 8 short texts per request, unique per request (text-cache misses)
                   unless --text-repeat

For each mode and concurrency level: requests sent, answered 200, non-200 counts by status (or client-side
exception name), requests/s, images/s (texts/s), p50/p99/mean latency of the 200s, and the client's CPU use
(near 100% means the client, not the server, is the limit: add --client-procs). Each level is bounded by
--duration and --max-requests; requests still in flight at the end get --drain-timeout seconds, then are
cancelled. Payloads are JSON-encoded once, up front. Traffic goes to loopback only.

    python benchmarks/throughput.py --url http://127.0.0.1:3000 --modes image_embedding \\
        --levels 1,8,32,128,256 --duration 8 --json /tmp/bench-out/throughput.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
from common import (
    DEFAULT_URL,
    LABELS,
    SHORT_TEXTS,
    check_loopback,
    client_shards,
    jpeg_b64_pool,
    latency_stats,
    log,
    meta,
    print_table,
    status_key,
    wait_ready,
    write_json,
)

MODES = {  # mode -> (path, items per request, unit)
    "image_embedding": ("/image_embedding", 1, "images"),
    "zero_shot": ("/zero_shot", 1, "images"),
    "text_embedding": ("/text_embedding", 8, "texts"),
}
HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class Job:
    """One client process's share of one level."""

    url: str
    mode: str
    concurrency: int
    max_requests: int
    duration: float
    drain_timeout: float
    timeout: float
    start_at: float  # wall clock, so every process starts together
    tag: str  # makes texts unique across processes and levels
    text_repeat: bool


_BODIES: dict[str, list[bytes]] = {}  # mode -> pre-encoded bodies (built before the client processes fork)


def build_bodies(modes: list[str], distinct_images: int) -> None:
    pool = jpeg_b64_pool(distinct_images)
    if "image_embedding" in modes:
        _BODIES["image_embedding"] = [json.dumps({"inputs": b}).encode() for b in pool]
    if "zero_shot" in modes:
        _BODIES["zero_shot"] = [json.dumps({"inputs": b, "parameters": {"candidate_labels": list(LABELS)}}).encode()
                                for b in pool]
    _BODIES["text_embedding"] = [json.dumps({"inputs": list(SHORT_TEXTS)}).encode()]


def body_for(job: Job, i: int) -> bytes:
    if job.mode == "text_embedding" and not job.text_repeat:
        return json.dumps({"inputs": [f"{t} {job.tag}-{i}" for t in SHORT_TEXTS]}).encode()
    bodies = _BODIES[job.mode]
    return bodies[i % len(bodies)]


def check_answer(mode: str, content: bytes) -> str | None:
    data = json.loads(content)
    if mode == "zero_shot":
        ok = isinstance(data, list) and len(data) == len(LABELS)
    else:
        ok = isinstance(data, list) and len(data) == MODES[mode][1] and "embedding" in data[0]
    return None if ok else f"{mode}: unexpected answer {content[:120]!r}"


async def run_job(job: Job) -> dict[str, Any]:
    """Closed-loop clients for one process; returns raw samples."""
    path = MODES[job.mode][0]
    latencies: list[float] = []
    done_at: list[float] = []
    statuses: dict[str, int] = {}
    problems: list[str] = []
    counter = 0
    checked = False
    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    t0 = time.perf_counter()
    stop_at = t0 + job.duration
    async with client_shards(job.concurrency, job.timeout, HEADERS) as clients:

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal counter, checked
            while time.perf_counter() < stop_at and counter < job.max_requests:
                i = counter
                counter += 1
                body = body_for(job, i)
                t = time.perf_counter()
                try:
                    r = await client.post(job.url + path, content=body)
                    key = status_key(r.status_code)
                except httpx.HTTPError as exc:
                    key = status_key(None, exc)
                    r = None
                now = time.perf_counter()
                statuses[key] = statuses.get(key, 0) + 1
                if r is not None and r.status_code == 200:
                    latencies.append(now - t)
                    done_at.append(now - t0)
                    if not checked:
                        checked = True
                        wrong = check_answer(job.mode, r.content)
                        if wrong:
                            problems.append(wrong)
                elif r is not None and len(problems) < 5:
                    problems.append(f"HTTP {r.status_code}: {r.text[:160]}")

        tasks = [asyncio.ensure_future(worker(clients[k % len(clients)])) for k in range(job.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=job.duration + job.drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            statuses["cancelled"] = statuses.get("cancelled", 0) + len(pending)
    return {"latencies": latencies, "done_at": done_at, "statuses": statuses, "problems": problems,
            "sent": counter, "elapsed": time.perf_counter() - t0}


def run_job_in_process(job: Job) -> dict[str, Any]:
    cpu0 = time.process_time()
    out = asyncio.run(run_job(job))
    out["cpu_s"] = time.process_time() - cpu0
    return out


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def parse_levels(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"bad concurrency levels {text!r}")
    if not levels or min(levels) < 1:
        parser.error(f"concurrency levels must be positive integers, not {text!r}")
    return levels


def run_level(pool: Any, url: str, mode: str, level: int, duration: float, args: argparse.Namespace,
              tag: str) -> dict[str, Any]:
    procs = max(1, min(args.client_procs, level))
    start_at = time.time() + (0.5 if procs > 1 else 0.0)
    jobs = [Job(url, mode, c, m, duration, args.drain_timeout, args.timeout, start_at, f"{tag}p{k}",
                args.text_repeat)
            for k, (c, m) in enumerate(zip(split(level, procs), split(args.max_requests, procs)))]
    parts = pool.map(run_job_in_process, jobs) if pool is not None and procs > 1 else \
        [run_job_in_process(j) for j in jobs]
    latencies = [x for p in parts for x in p["latencies"]]
    statuses: dict[str, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    ok = statuses.get("200", 0)
    done = [x for p in parts for x in p["done_at"]]
    elapsed = max(max(done, default=0.0), min(duration, max(p["elapsed"] for p in parts)), 1e-9)
    per_request = MODES[mode][1]
    row = {"concurrency": level, "duration_s": duration, "client_procs": procs, "sent": sum(p["sent"] for p in parts), "ok": ok,
           "non_200": {k: v for k, v in sorted(statuses.items()) if k != "200"},
           "elapsed_s": round(elapsed, 3), "requests_per_s": round(ok / elapsed, 2),
           "items_per_s": round(ok * per_request / elapsed, 2), "unit": MODES[mode][2],
           "client_cpu_pct": round(100 * sum(p["cpu_s"] for p in parts) / elapsed / procs, 1),
           "problems": [x for p in parts for x in p["problems"]][:10]}
    row.update(latency_stats(latencies))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL, loopback only (default: {DEFAULT_URL})")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--levels", default="1,4,16,64,256", help="concurrency levels (default: 1,4,16,64,256)")
    parser.add_argument("--levels-for", action="append", default=[], metavar="MODE=L1,L2,...",
                        help="levels for one mode instead of --levels (repeatable)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (default: 10)")
    parser.add_argument("--duration-for", action="append", default=[], metavar="MODE=SECONDS",
                        help="seconds per level for one mode instead of --duration (repeatable)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="requests per level at most")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds the requests in flight at the end of a level may still take (default: 30)")
    parser.add_argument("--warmup", type=int, default=16,
                        help="untimed requests per mode first, 4 at a time (default: 16)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s (default: 120)")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="client processes sharing each level (default: 1; use 2-4 on a many-core host)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between levels (default: 1)")
    parser.add_argument("--text-repeat", action="store_true",
                        help="text_embedding sends the same 8 texts every time (measures the text cache)")
    parser.add_argument("--distinct-images", type=int, default=16, help="size of the JPEG pool (default: 16)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    levels = {m: parse_levels(parser, args.levels) for m in modes}
    durations = {m: args.duration for m in modes}
    for spec in args.levels_for:
        mode, _, value = spec.partition("=")
        if mode not in MODES:
            parser.error(f"--levels-for: unknown mode {mode!r}")
        if mode in levels:
            levels[mode] = parse_levels(parser, value)
    for spec in args.duration_for:
        mode, _, value = spec.partition("=")
        if mode not in MODES:
            parser.error(f"--duration-for: unknown mode {mode!r}")
        if mode in durations:
            durations[mode] = float(value)

    wait_ready(url, 30)
    log(f"building {args.distinct_images} synthetic 800x600 JPEGs and request bodies ...")
    build_bodies(modes, args.distinct_images)
    pool = None
    if args.client_procs > 1:
        pool = multiprocessing.get_context("fork").Pool(args.client_procs)
    results: dict[str, list[dict[str, Any]]] = {}
    run_id = f"{os.getpid()}-{int(time.time())}"
    try:
        for mode in modes:
            if args.warmup:
                log(f"{mode}: warm-up, {args.warmup} requests ...")
                warm = Job(url, mode, min(4, args.warmup), args.warmup, 3600.0, 0.0, args.timeout, 0.0,
                           f"{run_id}-warm", args.text_repeat)
                out = run_job_in_process(warm)
                if set(out["statuses"]) != {"200"}:
                    log(f"{mode}: warm-up answers {out['statuses']} {out['problems'][:2]}")
            results[mode] = []
            for level in levels[mode]:
                log(f"{mode}: concurrency {level}, {durations[mode]:g} s ...")
                row = run_level(pool, url, mode, level, durations[mode], args, f"{run_id}-{mode}-{level}")
                results[mode].append(row)
                log(f"{mode} @{level}: {row['items_per_s']} {row['unit']}/s, p50 {row['p50_ms']} ms, "
                    f"p99 {row['p99_ms']} ms, non-200 {row['non_200'] or 0}, client CPU {row['client_cpu_pct']}%")
                time.sleep(args.pause)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    peak = {}
    for mode, rows in results.items():
        best = max(rows, key=lambda r: r["items_per_s"])
        peak[mode] = {"concurrency": best["concurrency"], "items_per_s": best["items_per_s"],
                      "requests_per_s": best["requests_per_s"], "unit": best["unit"], "p99_ms": best["p99_ms"]}
        print_table(f"throughput: {mode} ({MODES[mode][1]} {MODES[mode][2][:-1]}(s) per request), {url}",
                    ["conc", "sent", "ok", "non-200", "req/s", f"{MODES[mode][2]}/s", "p50 ms", "p99 ms", "mean ms",
                     "client cpu%"],
                    [[r["concurrency"], r["sent"], r["ok"],
                      " ".join(f"{k}:{v}" for k, v in r["non_200"].items()) or "0", r["requests_per_s"],
                      r["items_per_s"], r["p50_ms"], r["p99_ms"], r["mean_ms"], r["client_cpu_pct"]]
                     for r in rows])
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config.update(levels=levels, durations=durations)
    write_json(args.json, {"meta": meta("throughput", url=url), "config": config, "modes": results, "peak": peak})
    errors = sum(r["non_200"].get("500", 0) for rows in results.values() for r in rows)
    broken = [f"{m}@{r['concurrency']}" for m, rows in results.items() for r in rows
              if not r["ok"] or any(not p.startswith("HTTP ") for p in r["problems"])]
    if errors or broken:
        log(f"FAILED: {errors} answers 500; levels without a correct 200: {broken}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Overload test of a RUNNING service: mixed requests beyond its capacity, then a check that it still answers.

Traffic (loopback only) is a weighted mix (--mix) of
  image_embedding  1 image      batch10  10 images      zero_shot  1 image x 10 labels      text_embedding  8 texts
sent either open-loop at --rate requests/s (new requests keep coming whatever the server does; at most
--max-in-flight outstanding) or closed-loop by --concurrency clients. Default: twice the measured capacity of
that mix, computed from --throughput-json (throughput.py's output) as an open-loop rate; without it, 512
closed-loop clients (twice the default SIGLIP_MAX_CONCURRENCY). Bounded by --duration and --max-requests;
requests still in flight get --drain-timeout seconds, then are cancelled.

Reports requests sent, answers by status (and client-side errors by exception name), p50/p99 of the 200s,
peak memory of the server's process tree (--server-pid; RSS summed over it, psutil or /proc) and of the GPU
(nvidia-smi, if present), new tracebacks in --server-log, then sends normal requests and checks they answer
200 with correct shapes. Exit status 1 on any 500, a server process that died or was replaced, or a failed
check afterwards; overload answers (429, 503, 504) are expected and do not fail it.

    python benchmarks/loadtest.py --url http://127.0.0.1:3000 --server-pid $(cat /tmp/serve.pid) \\
        --throughput-json /tmp/bench-out/throughput.json --duration 60 --json /tmp/bench-out/loadtest.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
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
    write_json,
)

MODES = {  # mode -> (path, images or texts per request)
    "image_embedding": ("/image_embedding", 1),
    "batch10": ("/image_embedding", 10),
    "zero_shot": ("/zero_shot", 1),
    "text_embedding": ("/text_embedding", 8),
}
DEFAULT_MIX = "image_embedding=5,batch10=1,zero_shot=3,text_embedding=2"
HEADERS = {"content-type": "application/json"}
_BODIES: dict[str, list[bytes]] = {}


@dataclass(frozen=True)
class Job:
    url: str
    mix: tuple[tuple[str, float], ...]
    rate: float  # open loop, requests/s (0 = closed loop)
    concurrency: int  # closed loop clients, or open-loop cap on requests in flight
    max_requests: int
    duration: float
    drain_timeout: float
    timeout: float
    start_at: float
    seed: int


def build_bodies(distinct_images: int) -> None:
    pool = jpeg_b64_pool(distinct_images)
    _BODIES["image_embedding"] = [json.dumps({"inputs": b}).encode() for b in pool]
    _BODIES["batch10"] = [json.dumps({"inputs": [pool[(i + k) % len(pool)] for k in range(10)]}).encode()
                          for i in range(len(pool))]
    _BODIES["zero_shot"] = [json.dumps({"inputs": b, "parameters": {"candidate_labels": list(LABELS)}}).encode()
                            for b in pool]


def body_for(mode: str, i: int, seed: int) -> bytes:
    if mode == "text_embedding":  # unique texts: the text cache does not absorb the load
        return json.dumps({"inputs": [f"{t} {seed}-{i}" for t in SHORT_TEXTS]}).encode()
    bodies = _BODIES[mode]
    return bodies[i % len(bodies)]


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in MODES:
            raise SystemExit(f"--mix: unknown mode {name!r}; choose from {', '.join(MODES)}")
        mix.append((name, float(weight or 1)))
    total = sum(w for _, w in mix)
    if total <= 0:
        raise SystemExit("--mix weights must add up to more than 0")
    return tuple((m, w / total) for m, w in mix)


def mix_capacity(mix: tuple[tuple[str, float], ...], throughput: dict[str, Any]) -> float | None:
    """Requests/s the mix can be served at, from throughput.py's per-mode peaks (time per request adds up)."""
    peak = throughput.get("peak", {})
    per_request_s = 0.0
    for mode, weight in mix:
        if mode == "batch10":
            img = peak.get("image_embedding", {}).get("items_per_s")
            rps = img / 10 if img else None
        else:
            rps = peak.get(mode, {}).get("requests_per_s")
        if not rps:
            return None
        per_request_s += weight / rps
    return 1.0 / per_request_s if per_request_s else None


# -------------------------------------------------------------------------------------------------------------
# the clients (one asyncio loop per client process)
# -------------------------------------------------------------------------------------------------------------
async def run_job(job: Job) -> dict[str, Any]:
    rng = random.Random(job.seed)
    modes = [m for m, _ in job.mix]
    weights = [w for _, w in job.mix]
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    statuses: dict[str, dict[str, int]] = {m: {} for m in modes}
    all_latencies: list[float] = []
    sent = skipped = 0
    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    t0 = time.perf_counter()
    stop_at = t0 + job.duration
    async with client_shards(job.concurrency, job.timeout, HEADERS) as clients:

        busy = [0] * len(clients)  # requests in flight per client

        async def one(i: int, shard: int | None = None) -> None:
            # Closed loop: client k stays on its shard. Open loop: the least busy shard, so no pool queues
            # requests while another has free connections.
            k = shard % len(clients) if shard is not None else min(range(len(clients)), key=busy.__getitem__)
            busy[k] += 1
            mode = rng.choices(modes, weights)[0]
            t = time.perf_counter()
            try:
                r = await clients[k].post(job.url + MODES[mode][0], content=body_for(mode, i, job.seed))
                key = status_key(r.status_code)
            except httpx.HTTPError as exc:
                key, r = status_key(None, exc), None
            finally:
                busy[k] -= 1
            elapsed = time.perf_counter() - t
            statuses[mode][key] = statuses[mode].get(key, 0) + 1
            if r is not None:
                all_latencies.append(elapsed)
                if r.status_code == 200:
                    latencies[mode].append(elapsed)

        tasks: set[asyncio.Task] = set()
        if job.rate > 0:  # open loop: a request every 1/rate s (Poisson arrivals), whatever the answers do
            next_t = t0
            while sent < job.max_requests:
                next_t += rng.expovariate(job.rate)
                if next_t >= stop_at or time.perf_counter() >= stop_at:
                    break  # on schedule, or behind it: a lagging client stops on time, not after its backlog
                await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
                if len(tasks) >= job.concurrency:
                    skipped += 1
                    continue
                task = asyncio.ensure_future(one(sent))
                sent += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        else:  # closed loop
            async def client_loop(k: int) -> None:
                nonlocal sent
                while time.perf_counter() < stop_at and sent < job.max_requests:
                    sent += 1
                    await one(sent, shard=k)

            tasks = {asyncio.ensure_future(client_loop(k)) for k in range(job.concurrency)}
        pending: set = set()
        if tasks:
            left = max(0.0, stop_at - time.perf_counter()) + job.drain_timeout
            _, pending = await asyncio.wait(set(tasks), timeout=left)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return {"latencies": latencies, "all_latencies": all_latencies, "statuses": statuses, "sent": sent,
            "skipped": skipped, "cancelled": len(pending), "elapsed": time.perf_counter() - t0}


def run_job_in_process(job: Job) -> dict[str, Any]:
    cpu0 = time.process_time()
    out = asyncio.run(run_job(job))
    out["cpu_s"] = time.process_time() - cpu0
    return out


# -------------------------------------------------------------------------------------------------------------
# the server: memory, processes, log
# -------------------------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    try:
        import psutil

        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    if not Path(f"/proc/{pid}").exists():
        return []
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def gpu_used_mib() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             check=False, capture_output=True, text=True, timeout=10).stdout
        return float(sum(float(x) for x in out.split()))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class Sampler(threading.Thread):
    """Peak RSS of the server's process tree (and GPU memory) while the load runs."""

    def __init__(self, pid: int | None, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = 0
        self.peak_gpu: float | None = None
        self.max_processes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        last_gpu = 0.0
        while not self.stop.is_set():
            if self.pid:
                pids = process_tree(self.pid)
                self.max_processes = max(self.max_processes, len(pids))
                self.peak_rss = max(self.peak_rss, rss_bytes(pids))
            if time.monotonic() - last_gpu > 2:
                last_gpu = time.monotonic()
                gpu = gpu_used_mib()
                if gpu is not None:
                    self.peak_gpu = max(self.peak_gpu or 0.0, gpu)
            self.stop.wait(self.interval)


def post_check(url: str, timeout: float, wait_s: float) -> dict[str, Any]:
    """After the load: /readyz within wait_s, then one image embedding and one zero-shot answer correctly."""
    pool = jpeg_b64_pool(2)
    t0 = time.monotonic()
    result: dict[str, Any] = {"ok": False}
    with httpx.Client(timeout=timeout) as client:
        while True:
            try:
                if client.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > wait_s:
                result["detail"] = f"/readyz not 200 within {wait_s:g} s after the load"
                return result
            time.sleep(0.5)
        result["ready_after_s"] = round(time.monotonic() - t0, 2)
        t = time.perf_counter()
        r = client.post(url + "/image_embedding", json={"inputs": pool[1]})
        result["image_embedding_status"] = r.status_code
        result["image_embedding_ms"] = round(1000 * (time.perf_counter() - t), 1)
        if r.status_code != 200:
            result["detail"] = f"/image_embedding answered {r.status_code}: {r.text[:200]}"
            return result
        emb = r.json()[0]["embedding"]
        norm = math.sqrt(sum(x * x for x in emb))
        if abs(norm - 1) > 1e-2:
            result["detail"] = f"embedding norm {norm:.4f}, expected 1"
            return result
        r = client.post(url + "/zero_shot", json={"inputs": pool[0], "parameters": {"candidate_labels": list(LABELS)}})
        result["zero_shot_status"] = r.status_code
        if r.status_code != 200:
            result["detail"] = f"/zero_shot answered {r.status_code}: {r.text[:200]}"
            return result
        data = r.json()
        if {d["label"] for d in data} != set(LABELS) or abs(sum(d["score"] for d in data) - 1) > 1e-3:
            result["detail"] = "zero_shot answer does not rank the 10 labels with scores summing to 1"
            return result
    result["ok"] = True
    return result


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL, loopback only (default: {DEFAULT_URL})")
    parser.add_argument("--server-pid", type=int, help="pid of `bentoml serve` (memory of its process tree)")
    parser.add_argument("--server-log", help="the server's log file: count new tracebacks in it")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: 60)")
    parser.add_argument("--rate", type=float, help="open loop: requests/s (Poisson arrivals)")
    parser.add_argument("--concurrency", type=int, help="closed loop: this many clients")
    parser.add_argument("--throughput-json", help="throughput.py output; default load = 2x the mix's capacity")
    parser.add_argument("--overload-factor", type=float, default=2.0,
                        help="load as a multiple of measured capacity (default: 2)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"mode=weight,... (default: {DEFAULT_MIX})")
    parser.add_argument("--max-requests", type=int, default=200_000, help="requests sent at most")
    parser.add_argument("--max-in-flight", type=int, default=1000,
                        help="open loop: outstanding requests at most; further arrivals are skipped (default: 1000)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds requests in flight at the end may still take (default: 30)")
    parser.add_argument("--timeout", type=float, default=180.0, help="per-request timeout, s (default: 180)")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes sharing the load")
    parser.add_argument("--sample-interval", type=float, default=0.5, help="memory sampling period, s")
    parser.add_argument("--distinct-images", type=int, default=16, help="size of the JPEG pool (default: 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    mix = parse_mix(args.mix)
    raise_fd_limit()

    capacity = None
    if args.throughput_json:
        capacity = mix_capacity(mix, json.loads(Path(args.throughput_json).read_text()))
        log(f"measured capacity of this mix: {capacity and round(capacity, 1)} requests/s")
    if args.rate:
        rate, concurrency, how = args.rate, args.max_in_flight, f"open loop, {args.rate:g} req/s"
    elif args.concurrency:
        rate, concurrency, how = 0.0, args.concurrency, f"closed loop, {args.concurrency} clients"
    elif capacity:
        rate = round(args.overload_factor * capacity, 2)
        concurrency, how = args.max_in_flight, f"open loop, {rate:g} req/s = {args.overload_factor:g}x capacity"
    else:
        rate, concurrency, how = 0.0, 512, "closed loop, 512 clients (no --throughput-json given)"

    log(f"building {args.distinct_images} synthetic 800x600 JPEGs and request bodies ...")
    build_bodies(args.distinct_images)
    procs = max(1, min(args.client_procs, concurrency))
    pids_before = process_tree(args.server_pid) if args.server_pid else []
    if args.server_pid and not pids_before:
        raise SystemExit(f"--server-pid {args.server_pid}: no such process")
    rss_before = rss_bytes(pids_before)
    log_offset = Path(args.server_log).stat().st_size if args.server_log else 0

    sampler = Sampler(args.server_pid, args.sample_interval)
    sampler.start()
    start_at = time.time() + (0.5 if procs > 1 else 0.0)
    jobs = [Job(url, mix, rate / procs, max(1, concurrency // procs), max(1, args.max_requests // procs),
                args.duration, args.drain_timeout, args.timeout, start_at, args.seed * 1000 + k)
            for k in range(procs)]
    log(f"load: {how}, mix {args.mix}, {args.duration:g} s, {procs} client process(es) ...")
    t0 = time.perf_counter()
    if procs > 1:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            parts = pool.map(run_job_in_process, jobs)
    else:
        parts = [run_job_in_process(jobs[0])]
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    log(f"load done in {wall:.1f} s; checking the server ...")

    # --- aggregate ---
    statuses: dict[str, int] = {}
    by_mode: dict[str, Any] = {}
    for mode, _ in mix:
        st: dict[str, int] = {}
        lat: list[float] = []
        for p in parts:
            for k, v in p["statuses"][mode].items():
                st[k] = st.get(k, 0) + v
            lat += p["latencies"][mode]
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
        by_mode[mode] = {"answered": dict(sorted(st.items())), **latency_stats(lat),
                         "ok_items_per_s": round(len(lat) * MODES[mode][1] / wall, 2)}
    ok_lat = [x for p in parts for m in p["latencies"] for x in p["latencies"][m]]
    sent = sum(p["sent"] for p in parts)

    # --- after the load ---
    check = post_check(url, 60.0, 60.0)
    pids_after = process_tree(args.server_pid) if args.server_pid else []
    lost = sorted(set(pids_before) - set(pids_after))
    tracebacks = 0
    if args.server_log:
        with open(args.server_log, "rb") as f:
            f.seek(log_offset)
            tracebacks = f.read().decode(errors="replace").count("Traceback (most recent call last)")
    server_alive = (not args.server_pid) or bool(pids_after)

    result = {
        "meta": meta("loadtest", url=url), "load": how, "rate_rps": rate or None,
        "concurrency": None if rate else concurrency, "max_in_flight": concurrency if rate else None,
        "capacity_rps": capacity and round(capacity, 2), "mix": dict(mix), "duration_s": args.duration,
        "wall_s": round(wall, 2), "sent": sent, "skipped_by_client": sum(p["skipped"] for p in parts),
        "cancelled_at_end": sum(p["cancelled"] for p in parts), "answered": dict(sorted(statuses.items())),
        "ok": statuses.get("200", 0), "ok_latency": latency_stats(ok_lat),
        "answered_latency": latency_stats([x for p in parts for x in p["all_latencies"]]),
        "by_mode": by_mode, "client_cpu_pct": round(100 * sum(p["cpu_s"] for p in parts) / wall / procs, 1),
        "server_rss_before_mb": round(rss_before / 2**20, 1) if args.server_pid else None,
        "peak_server_rss_mb": round(sampler.peak_rss / 2**20, 1) if args.server_pid else None,
        "peak_gpu_used_mib": sampler.peak_gpu, "server_processes_max": sampler.max_processes or None,
        "server_pids_lost": lost, "server_alive": server_alive, "new_tracebacks_in_log": tracebacks,
        "post_check": check,
    }
    failures = []
    if statuses.get("500"):
        failures.append(f"{statuses['500']} answers 500")
    if not server_alive:
        failures.append("the server process is gone")
    if lost:
        failures.append(f"server processes died or were replaced: {lost}")
    if not check["ok"]:
        failures.append(f"post-load check failed: {check.get('detail')}")
    result["failures"] = failures
    result["passed"] = not failures

    print_table(f"overload test: {how}, {url}",
                ["mode", "answered by status", "p50 ms (200)", "p99 ms (200)", "ok items/s"],
                [[m, " ".join(f"{k}:{v}" for k, v in r["answered"].items()) or "-", r["p50_ms"], r["p99_ms"],
                  r["ok_items_per_s"]] for m, r in by_mode.items()]
                + [["all", " ".join(f"{k}:{v}" for k, v in result["answered"].items()),
                    result["ok_latency"]["p50_ms"], result["ok_latency"]["p99_ms"], None]])
    print_table("overload test: server",
                ["sent", "skipped", "cancelled", "RSS before MB", "peak RSS MB", "peak GPU MiB", "tracebacks",
                 "after: ready s", "after: 1 image ms", "passed"],
                [[sent, result["skipped_by_client"], result["cancelled_at_end"], result["server_rss_before_mb"],
                  result["peak_server_rss_mb"], result["peak_gpu_used_mib"], tracebacks, check.get("ready_after_s"),
                  check.get("image_embedding_ms"), "yes" if result["passed"] else "NO"]])
    write_json(args.json, result)
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

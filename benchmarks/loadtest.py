"""Overload test of a RUNNING service: mixed requests beyond its capacity, then a check that it still answers.

Traffic (loopback only) is a weighted mix (--mix) of
  image_embedding  1 image      batch10  10 images      zero_shot  1 image x 10 labels      text_embedding  8 texts
sent either open-loop at --rate requests/s (new requests keep coming whatever the server does; at most
--max-in-flight outstanding) or closed-loop by --concurrency clients. Default: twice the measured capacity of
that mix, computed from --throughput-json (throughput.py's output) as an open-loop rate; without it, 512
closed-loop clients (twice the default SIGLIP_MAX_CONCURRENCY). Bounded by --duration and --max-requests;
requests still in flight get --drain-timeout seconds, then are cancelled.

Reports requests sent, answers by status (and client-side errors by exception name), p50/p99 of the 200s,
peak memory of the server's process tree (--server-pid; RSS summed over it) and of the GPU (nvidia-smi, if
present), new tracebacks in --server-log, then sends normal requests and checks they answer 200 with correct
shapes. Exit status 1 on any 500, a wrong 200 answer, a server process that died or was replaced, or a failed
check afterwards; overload answers (429, 503, 504) are expected and do not fail it.

    python benchmarks/loadtest.py --url http://127.0.0.1:3000 --server-pid $(cat /tmp/serve.pid) \\
        --throughput-json /tmp/bench-out/throughput.json --duration 60 --json /tmp/bench-out/loadtest.json
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import (
    HEADERS,
    MODES,
    arg_parser,
    body_for,
    build_bodies,
    check_answer,
    check_loopback,
    latency_stats,
    log,
    meta,
    print_table,
    run_load,
    wait_ready,
    write_json,
)

DEFAULT_MIX = "image_embedding=5,batch10=1,zero_shot=3,text_embedding=2"


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in MODES:
            raise SystemExit(f"--mix: unknown mode {name.strip()!r}; choose from {', '.join(MODES)}")
        mix.append((name.strip(), float(weight or 1)))
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
# the server: memory, processes, log
# -------------------------------------------------------------------------------------------------------------
def process_tree(pid: int | None) -> list[psutil.Process]:
    """The server's processes; none once it is gone."""
    try:
        return [root := psutil.Process(pid), *root.children(recursive=True)] if pid else []
    except psutil.Error:
        return []


def rss_bytes(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # exited since the tree was read
            total += p.memory_info().rss
    return total


def gpu_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             check=False, capture_output=True, text=True, timeout=10).stdout
        return float(sum(float(x) for x in out.split()))
    except (OSError, ValueError, subprocess.SubprocessError):  # no nvidia-smi, or no answer from it
        return None


class Sampler(threading.Thread):
    """Peak RSS of the server's process tree, its process count and GPU memory, while the load runs."""

    def __init__(self, pid: int | None, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.stop = pid, interval, threading.Event()
        self.peak_rss, self.max_processes, self.peak_gpu = 0, 0, None

    def run(self) -> None:
        next_gpu = 0.0
        while not self.stop.is_set():
            procs = process_tree(self.pid)
            self.max_processes = max(self.max_processes, len(procs))
            self.peak_rss = max(self.peak_rss, rss_bytes(procs))
            if time.monotonic() > next_gpu:  # a process start per sample: every 2 s is enough
                next_gpu = time.monotonic() + 2
                gpu = gpu_used_mib()
                self.peak_gpu = self.peak_gpu if gpu is None else max(self.peak_gpu or 0.0, gpu)
            self.stop.wait(self.interval)


def post_check(url: str, wait_s: float = 60.0, timeout_s: float = 180.0) -> dict[str, Any]:
    """After the load: /readyz within wait_s, then one image embedding and one zero-shot answer correctly."""
    try:
        result: dict[str, Any] = {"ok": False, "ready_after_s": round(wait_ready(url, wait_s), 2)}
    except SystemExit as exc:  # wait_ready's way of saying "not in time"
        return {"ok": False, "detail": f"after the load: {exc}"}
    with httpx.Client(timeout=timeout_s, headers=HEADERS) as client:  # a CPU server may still drain its queue
        for i, mode in enumerate(("image_embedding", "zero_shot")):
            t = time.perf_counter()
            try:
                r = client.post(url + MODES[mode][0], content=body_for(mode, 1 - i))
            except httpx.HTTPError as exc:  # the check's result, not the end of the run's
                result["detail"] = f"{MODES[mode][0]} after the load: {type(exc).__name__}: {exc}"
                return result
            result[f"{mode}_status"] = r.status_code
            if mode == "image_embedding":
                result["image_embedding_ms"] = round(1000 * (time.perf_counter() - t), 1)
            wrong = check_answer(mode, r.content) if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
            if wrong:
                result["detail"] = f"{MODES[mode][0]} answered {wrong}"
                return result
    result["ok"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    mix = parse_mix(args.mix)

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
    build_bodies([m for m, _ in mix] + ["image_embedding", "zero_shot"], args.distinct_images)  # + post_check's
    procs_before = process_tree(args.server_pid)
    if args.server_pid and not procs_before:
        raise SystemExit(f"--server-pid {args.server_pid}: no such process")
    rss_before = rss_bytes(procs_before)
    log_offset = Path(args.server_log).stat().st_size if args.server_log else 0

    sampler = Sampler(args.server_pid, args.sample_interval)
    sampler.start()
    log(f"load: {how}, mix {args.mix}, {args.duration:g} s, {args.client_procs} client process(es) ...")
    t0 = time.perf_counter()
    s = run_load(url, mix, concurrency=concurrency, count=args.max_requests, duration=args.duration, rate=rate,
                 drain_timeout=args.drain_timeout, timeout=args.timeout, procs=args.client_procs,
                 unique=f"{os.getpid()}-{int(time.time())}", seed=args.seed)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    log(f"load done in {wall:.1f} s; checking the server ...")

    def answered(mode: str | None = None) -> dict[str, int]:
        return {k: v for k, v in s.statuses(mode).items() if k != "cancelled"}

    by_mode = {mode: {"answered": answered(mode), **latency_stats(s.latencies(mode)),
                      "ok_items_per_s": round(len(s.latencies(mode)) * MODES[mode][1] / wall, 2)} for mode, _ in mix}
    statuses = answered()
    check = post_check(url, timeout_s=args.timeout)
    procs_after = process_tree(args.server_pid)
    lost = sorted(p.pid for p in set(procs_before) - set(procs_after))  # a replaced process: same pid, new start
    tracebacks = 0
    if args.server_log:
        with open(args.server_log, "rb") as f:
            f.seek(log_offset)
            tracebacks = f.read().decode(errors="replace").count("Traceback (most recent call last)")
    server_alive = (not args.server_pid) or bool(procs_after)

    result = {
        "meta": meta("loadtest", url=url), "load": how, "rate_rps": rate or None,
        "concurrency": None if rate else concurrency, "max_in_flight": concurrency if rate else None,
        "capacity_rps": capacity and round(capacity, 2), "mix": dict(mix), "duration_s": args.duration,
        "wall_s": round(wall, 2), "sent": s.sent, "skipped_by_client": s.skipped,
        "cancelled_at_end": s.statuses().get("cancelled", 0), "answered": statuses, "ok": statuses.get("200", 0),
        "ok_latency": latency_stats(s.latencies()), "answered_latency": latency_stats(s.latencies(ok_only=False)),
        "by_mode": by_mode, "client_cpu_pct": s.cpu_pct(wall), "errors": s.errors[:10],
        "wrong_answers": s.wrong_answers(),
        "server_rss_before_mb": round(rss_before / 2**20, 1) if args.server_pid else None,
        "peak_server_rss_mb": round(sampler.peak_rss / 2**20, 1) if args.server_pid else None,
        "peak_gpu_used_mib": sampler.peak_gpu, "server_processes_max": sampler.max_processes or None,
        "server_pids_lost": lost, "server_alive": server_alive, "new_tracebacks_in_log": tracebacks,
        "post_check": check,
    }
    failures = [why for bad, why in (
        (statuses.get("500"), f"{statuses.get('500')} answers 500"),
        (result["wrong_answers"], f"wrong answers: {result['wrong_answers'][:3]}"),
        (not server_alive, "the server process is gone"),
        (lost, f"server processes died or were replaced: {lost}"),
        (not check["ok"], f"post-load check failed: {check.get('detail')}")) if bad]
    result["failures"] = failures
    result["passed"] = not failures

    print_table(f"overload test: {how}, {url}",
                ["mode", "answered by status", "p50 ms (200)", "p99 ms (200)", "ok items/s"],
                [[m, " ".join(f"{k}:{v}" for k, v in r["answered"].items()) or "-", r["p50_ms"], r["p99_ms"],
                  r["ok_items_per_s"]] for m, r in by_mode.items()]
                + [["all", " ".join(f"{k}:{v}" for k, v in statuses.items()), result["ok_latency"]["p50_ms"],
                    result["ok_latency"]["p99_ms"], None]])
    print_table("overload test: server",
                ["sent", "skipped", "cancelled", "RSS before MB", "peak RSS MB", "peak GPU MiB", "tracebacks",
                 "after: ready s", "after: 1 image ms", "passed"],
                [[s.sent, s.skipped, result["cancelled_at_end"], result["server_rss_before_mb"],
                  result["peak_server_rss_mb"], result["peak_gpu_used_mib"], tracebacks, check.get("ready_after_s"),
                  check.get("image_embedding_ms"), "yes" if result["passed"] else "NO"]])
    write_json(args.json, result)
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

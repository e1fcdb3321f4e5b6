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
import os
import sys
import time
from typing import Any

from common import (
    MODES,
    arg_parser,
    build_bodies,
    check_loopback,
    latency_stats,
    log,
    meta,
    pick_names,
    print_table,
    run_load,
    wait_ready,
    write_json,
)

UNITS = {"image_embedding": "images", "zero_shot": "images", "text_embedding": "texts"}


def parse_levels(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"bad concurrency levels {text!r}")
    if not levels or min(levels) < 1:
        parser.error(f"concurrency levels must be positive integers, not {text!r}")
    return levels


def run_level(url: str, mode: str, level: int, duration: float, args: argparse.Namespace,
              unique: str) -> dict[str, Any]:
    s = run_load(url, [(mode, 1.0)], concurrency=level, count=args.max_requests, duration=duration,
                 drain_timeout=args.drain_timeout, timeout=args.timeout, procs=args.client_procs, unique=unique)
    ok = s.latencies()
    # until the last 200, or the level's duration when answers stopped coming before it
    elapsed = max(max((end for _, st, _, end in s.records if st == "200"), default=0.0), min(duration, s.elapsed),
                  1e-9)
    wrong, per_s = s.wrong_answers(), len(ok) / elapsed
    return {"concurrency": level, "duration_s": duration, "client_procs": s.procs, "sent": s.sent, "ok": len(ok),
            "non_200": {k: v for k, v in s.statuses().items() if k != "200"}, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(per_s, 2), "items_per_s": round(per_s * MODES[mode][1], 2),
            "unit": UNITS[mode], "client_cpu_pct": s.cpu_pct(elapsed), "wrong_answers": len(wrong),
            "problems": (wrong + s.errors)[:10], **latency_stats(ok)}


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--modes", default=",".join(UNITS), help=f"comma-separated subset of {','.join(UNITS)}")
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
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    modes = pick_names(parser, args.modes, UNITS, "mode")
    levels = {m: parse_levels(parser, args.levels) for m in modes}
    durations = {m: args.duration for m in modes}
    for flag, specs, table, convert in (("--levels-for", args.levels_for, levels, lambda v: parse_levels(parser, v)),
                                        ("--duration-for", args.duration_for, durations, float)):
        for spec in specs:
            mode, _, value = spec.partition("=")
            if mode not in UNITS:
                parser.error(f"{flag}: unknown mode {mode!r}")
            if mode in table:
                table[mode] = convert(value)

    wait_ready(url, 30)
    log(f"building {args.distinct_images} synthetic 800x600 JPEGs and request bodies ...")
    build_bodies(modes, args.distinct_images)
    results: dict[str, list[dict[str, Any]]] = {}
    run_id = f"{os.getpid()}-{int(time.time())}"  # texts unique across runs against the same server too
    for mode in modes:
        unique = "" if args.text_repeat else run_id
        if args.warmup:
            log(f"{mode}: warm-up, {args.warmup} requests ...")
            warm = run_load(url, [(mode, 1.0)], concurrency=min(4, args.warmup), count=args.warmup,
                            timeout=args.timeout, unique=unique and f"{run_id}-warm")
            if set(warm.statuses()) != {"200"}:
                log(f"{mode}: warm-up answers {warm.statuses()} {warm.errors[:2]}")
        results[mode] = []
        for level in levels[mode]:
            log(f"{mode}: concurrency {level}, {durations[mode]:g} s ...")
            row = run_level(url, mode, level, durations[mode], args, unique and f"{run_id}-{mode}-{level}")
            results[mode].append(row)
            log(f"{mode} @{level}: {row['items_per_s']} {row['unit']}/s, p50 {row['p50_ms']} ms, "
                f"p99 {row['p99_ms']} ms, non-200 {row['non_200'] or 0}, client CPU {row['client_cpu_pct']}%")
            time.sleep(args.pause)

    peak = {}
    for mode, rows in results.items():
        best = max(rows, key=lambda r: r["items_per_s"])
        peak[mode] = {"concurrency": best["concurrency"], "items_per_s": best["items_per_s"],
                      "requests_per_s": best["requests_per_s"], "unit": best["unit"], "p99_ms": best["p99_ms"]}
        print_table(f"throughput: {mode} ({MODES[mode][1]} {UNITS[mode][:-1]}(s) per request), {url}",
                    ["conc", "sent", "ok", "non-200", "req/s", f"{UNITS[mode]}/s", "p50 ms", "p99 ms", "mean ms",
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
              if not r["ok"] or r["wrong_answers"]]
    if errors or broken:
        log(f"FAILED: {errors} answers 500; levels without a correct 200: {broken}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

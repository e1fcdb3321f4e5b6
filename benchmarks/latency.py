"""Sequential request latency of a RUNNING service, beside the API spec's documented latency table.

Cases (base64 800x600 JPEGs, quality 90, synthetic but photo-like and deterministic):
  single     POST /image_embedding with 1 image
  batch10    POST /image_embedding with 10 images in one request
  zero_shot  POST /zero_shot, 1 image x 10 labels seen before (warm-up first, so the text cache is hot)

Requests are sent one at a time on one keep-alive connection. Each case is warmed up first (>= 15 requests by
default: BentoML's adaptive batcher trains its latency model on the first ~12 calls). Reports p50/p90/p99/mean,
the spec's T4 / A10G / CPU ranges, and with ``--baseline-json`` (from naive_handler.py) the speed-up over it.

    python benchmarks/latency.py --url http://127.0.0.1:3000 --json /tmp/bench-out/latency.json \\
        --baseline-json /tmp/bench-out/naive.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import (
    CASES,
    MODES,
    SPEC_RANGES,
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


def run_case(url: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    mix = [(CASES[case], 1.0)]
    # zero_shot: the labels must have been seen, so the text cache is hot
    warmup = max(args.warmup, 1 if case == "zero_shot" else 0)
    warm = run_load(url, mix, concurrency=1, count=warmup, timeout=args.timeout)
    # the request in flight at --max-seconds still counts: it may take up to --timeout
    timed = run_load(url, mix, concurrency=1, count=args.requests, duration=args.max_seconds,
                     drain_timeout=args.timeout, timeout=args.timeout)
    if timed.sent < args.requests:
        log(f"{case}: stopped after {timed.sent} requests (--max-seconds {args.max_seconds:g})")
    times = timed.latencies()
    n_img = MODES[CASES[case]][1]
    problems = [f"warm-up: {e}" for e in warm.errors] + timed.errors + timed.wrong_answers()
    return {**latency_stats(times), "images_per_request": n_img, "statuses": timed.statuses(),
            "problems": problems[:20], "images_per_s": round(n_img * len(times) / sum(times), 2) if times else None}


def spec_text(case: str, instance: str) -> str:
    lo_hi = SPEC_RANGES.get(case, {}).get(instance)
    return f"{lo_hi[0]}-{lo_hi[1]}" if lo_hi else "-"


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per case (default: 50)")
    parser.add_argument("--warmup", type=int, default=15, help="untimed requests per case first (default: 15)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop a case's timed requests once it has run this long (default: 120)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s (default: 120)")
    parser.add_argument("--baseline-json", metavar="PATH", help="naive_handler.py --json output to compare with")
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    cases = pick_names(parser, args.cases, CASES)
    baseline = json.loads(Path(args.baseline_json).read_text()) if args.baseline_json else None

    wait_ready(url, 30)
    log(f"building {args.distinct_images} synthetic 800x600 JPEGs ...")
    build_bodies([CASES[c] for c in cases], args.distinct_images)
    results: dict[str, Any] = {}
    for case in cases:
        log(f"{case}: {args.warmup} warm-up + {args.requests} timed requests ...")
        r = results[case] = run_case(url, case, args)
        log(f"{case}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, statuses {r['statuses']}")
        for p in r["problems"][:3]:
            log(f"  problem: {p}")

    rows = []
    for case, r in results.items():
        base = (baseline or {}).get("cases", {}).get(case, {}).get("p50_ms")
        ratio = round(base / r["p50_ms"], 2) if base and r["p50_ms"] else None
        r["baseline_p50_ms"], r["speedup_vs_baseline_p50"] = base, ratio
        rows.append([case, r["n"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["mean_ms"], r["images_per_s"],
                     spec_text(case, "T4"), spec_text(case, "A10G"), spec_text(case, "CPU"), base,
                     f"{ratio}x" if ratio else None])
    print_table(f"latency, sequential requests, {url}",
                ["case", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s", "spec T4", "spec A10G", "spec CPU",
                 "naive p50", "speed-up"], rows)
    write_json(args.json, {"meta": meta("latency", url=url, baseline=args.baseline_json), "cases": results,
                           "spec_ranges_ms": SPEC_RANGES})
    return 1 if any(r["problems"] or not r["n"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

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
import math
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from common import (
    DEFAULT_URL,
    LABELS,
    SPEC_RANGES,
    check_loopback,
    jpeg_b64_pool,
    latency_stats,
    log,
    meta,
    print_table,
    status_key,
    wait_ready,
    write_json,
)

CASES = ("single", "batch10", "zero_shot")
IMAGES_PER_REQUEST = {"single": 1, "batch10": 10, "zero_shot": 1}


def request_for(case: str, pool: tuple[str, ...], i: int) -> tuple[str, bytes]:
    """(path, JSON body) of the i-th request of a case."""
    if case == "single":
        path, body = "/image_embedding", {"inputs": pool[i % len(pool)]}
    elif case == "batch10":
        path, body = "/image_embedding", {"inputs": [pool[(i * 10 + k) % len(pool)] for k in range(10)]}
    else:
        path, body = "/zero_shot", {"inputs": pool[i % len(pool)], "parameters": {"candidate_labels": list(LABELS)}}
    return path, json.dumps(body).encode()


def check_answer(case: str, data: Any) -> str | None:
    """None if the 200 answer has the expected shape, else what is wrong."""
    if case == "zero_shot":
        if not isinstance(data, list) or {d.get("label") for d in data} != set(LABELS):
            return "zero_shot answer does not rank the 10 labels"
        if abs(sum(d["score"] for d in data) - 1) > 1e-3:
            return "zero_shot scores do not sum to 1"
        return None
    n = IMAGES_PER_REQUEST[case]
    if not isinstance(data, list) or len(data) != n:
        return f"expected {n} embeddings"
    norm = math.sqrt(sum(x * x for x in data[0]["embedding"]))
    return None if abs(norm - 1) < 1e-2 else f"embedding norm {norm:.4f}, expected 1"


def run_case(client: httpx.Client, url: str, case: str, pool: tuple[str, ...], warmup: int, requests: int,
             max_seconds: float) -> dict[str, Any]:
    bodies = [request_for(case, pool, i) for i in range(max(warmup, requests, 1))]
    statuses: dict[str, int] = {}
    problems: list[str] = []
    if case == "zero_shot":
        warmup = max(1, warmup)  # the labels must have been seen: the text cache is hot
    for i in range(warmup):
        path, body = bodies[i % len(bodies)]
        r = client.post(url + path, content=body)
        if r.status_code != 200:
            problems.append(f"warm-up {i}: HTTP {r.status_code} {r.text[:200]}")
    times: list[float] = []
    started = time.perf_counter()
    for i in range(requests):
        path, body = bodies[i]
        t = time.perf_counter()
        try:
            r = client.post(url + path, content=body)
            content = r.content
        except httpx.HTTPError as exc:
            statuses[status_key(None, exc)] = statuses.get(status_key(None, exc), 0) + 1
            problems.append(f"request {i}: {type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - t
        statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
        if r.status_code != 200:
            problems.append(f"request {i}: HTTP {r.status_code} {r.text[:200]}")
            continue
        times.append(elapsed)
        if i < 3:  # check the shape of the first answers (parsing every one would add client time)
            wrong = check_answer(case, json.loads(content))
            if wrong:
                problems.append(f"request {i}: {wrong}")
        if time.perf_counter() - started > max_seconds:
            log(f"{case}: stopping after {i + 1} requests (--max-seconds {max_seconds:g})")
            break
    stats = latency_stats(times)
    n_img = IMAGES_PER_REQUEST[case]
    stats.update(images_per_request=n_img, statuses=statuses, problems=problems[:20],
                 images_per_s=round(n_img * len(times) / sum(times), 2) if times else None)
    return stats


def spec_text(case: str, instance: str) -> str:
    lo_hi = SPEC_RANGES.get(case, {}).get(instance)
    return f"{lo_hi[0]}-{lo_hi[1]}" if lo_hi else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL, loopback only (default: {DEFAULT_URL})")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per case (default: 50)")
    parser.add_argument("--warmup", type=int, default=15, help="untimed requests per case first (default: 15)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop a case's timed requests once it has run this long (default: 120)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s (default: 120)")
    parser.add_argument("--distinct-images", type=int, default=16, help="size of the JPEG pool (default: 16)")
    parser.add_argument("--baseline-json", metavar="PATH", help="naive_handler.py --json output to compare with")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            parser.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    baseline = json.loads(Path(args.baseline_json).read_text()) if args.baseline_json else None

    wait_ready(url, 30)
    log(f"building {args.distinct_images} synthetic 800x600 JPEGs ...")
    pool = jpeg_b64_pool(args.distinct_images)
    results: dict[str, Any] = {}
    with httpx.Client(timeout=args.timeout, headers={"content-type": "application/json"}) as client:
        for case in cases:
            log(f"{case}: {args.warmup} warm-up + {args.requests} timed requests ...")
            results[case] = run_case(client, url, case, pool, args.warmup, args.requests, args.max_seconds)
            r = results[case]
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
    failed = any(r["problems"] or not r["n"] for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

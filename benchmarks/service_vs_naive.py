"""One image over HTTP from a RUNNING service against the naive handler's whole request, interleaved.

``model_vs_naive.py`` compares the forwards in one process; this compares what a user sees: a POST
/image_embedding of one base64 JPEG on a keep-alive connection against ``naive_handler.EndpointHandler`` called
in this process on the same body. The two alternate in rounds (``--per-round`` calls of each), so both see the
same host: this VM's speed drifts by ±20% over minutes, which a naive-then-service sequence reads as a
difference between them.

    python benchmarks/service_vs_naive.py --url http://127.0.0.1:3000 --model /tmp/ckpt-full --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import naive_handler
from common import DEFAULT_URL, check_loopback, log, meta, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="service URL, loopback only")
    parser.add_argument("--model", required=True, help="the checkpoint directory the service runs")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=3, help="calls of each per round (default: 3)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    check_loopback(args.url)

    import torch

    handler = naive_handler.EndpointHandler(args.model, "cpu")
    pool = naive_handler.jpeg_b64_pool(4)
    service, naive = [], []
    with httpx.Client(base_url=args.url, timeout=300) as http:
        def post(body):
            resp = http.post("/image_embedding", json=body)
            resp.raise_for_status()

        for fn in (post, handler):  # one untimed call each
            fn(naive_handler.request_json("image_embedding", pool, 0))
        log(f"torch threads here {torch.get_num_threads()}; {args.rounds} rounds of {args.per_round} + "
            f"{args.per_round}")
        for r in range(args.rounds):
            for fn, times in ((handler, naive), (post, service)) if r % 2 == 0 else ((post, service),
                                                                                     (handler, naive)):
                for i in range(args.per_round):
                    body = naive_handler.request_json("image_embedding", pool, r * args.per_round + i)
                    t = time.perf_counter()
                    fn(body)
                    times.append((time.perf_counter() - t) * 1000)
    s, n = statistics.median(service), statistics.median(naive)
    print(f"service over HTTP, 1 image: median {s:,.0f} ms ({', '.join(f'{x:,.0f}' for x in service)})")
    print(f"naive handler, whole request: median {n:,.0f} ms ({', '.join(f'{x:,.0f}' for x in naive)})")
    print(f"service / naive speed: {n / s:.2f}x")
    write_json(args.json, {"meta": meta("service_vs_naive", model=args.model), "service_ms": service,
                           "naive_ms": naive, "speedup": round(n / s, 3)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

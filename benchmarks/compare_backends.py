"""Compare run_all.sh results of the same run for several SIGLIP_BACKEND values (compare_backends.sh).

Reads each run directory's latency.json, throughput.json and startup.json (and naive.json from whichever has it)
and prints p50 latencies per case, images/s per concurrency level and start-up seconds, with the ratios of every
backend to the first (``--base``, default the first directory) and to the naive handler.

    python benchmarks/compare_backends.py /tmp/bench-backends/torch /tmp/bench-backends/openvino [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import meta, print_table, write_json


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run_all.sh OUT directories, one per backend (name = folder name)")
    parser.add_argument("--naive", metavar="PATH", help="naive_handler.py JSON (default: the first run's that has one)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    runs = {Path(r).name: Path(r) for r in args.runs}
    names = list(runs)
    base = names[0]
    naive = load(Path(args.naive)) if args.naive else None
    naive = naive or next((n for n in (load(p / "naive.json") for p in runs.values()) if n), None)
    lat = {name: (load(p / "latency.json") or {}).get("cases", {}) for name, p in runs.items()}
    tp = {name: (load(p / "throughput.json") or {}).get("modes", {}) for name, p in runs.items()}
    start = {name: load(p / "startup.json") or {} for name, p in runs.items()}

    out: dict[str, Any] = {"meta": meta("compare_backends", runs=[str(p) for p in runs.values()]), "latency": {},
                           "throughput": {}, "startup": {}}
    rows = []
    for case in ("single", "batch10", "zero_shot"):
        naive_p50 = ((naive or {}).get("cases", {}).get(case) or {}).get("p50_ms")
        p50 = {n: (lat[n].get(case) or {}).get("p50_ms") for n in names}
        out["latency"][case] = {"naive_p50_ms": naive_p50, "p50_ms": p50,
                                f"speedup_vs_{base}": {n: ratio(p50[base], p50[n]) for n in names[1:]},
                                "speedup_vs_naive": {n: ratio(naive_p50, p50[n]) for n in names}}
        rows.append([case, naive_p50, *(p50[n] for n in names),
                     *(ratio(p50[base], p50[n]) for n in names[1:]), *(ratio(naive_p50, p50[n]) for n in names)])
    print_table("p50 latency, ms (same run)",
                ["case", "naive", *names, *(f"{n} vs {base}" for n in names[1:]), *(f"{n} vs naive" for n in names)],
                rows)

    rows = []
    for mode in ("image_embedding", "zero_shot", "text_embedding"):
        levels = sorted({r["concurrency"] for n in names for r in tp[n].get(mode, [])})
        for level in levels:
            per_s = {n: next((r["items_per_s"] for r in tp[n].get(mode, []) if r["concurrency"] == level), None)
                     for n in names}
            out["throughput"].setdefault(mode, {})[level] = per_s
            rows.append([mode, level, *(per_s[n] for n in names), *(ratio(per_s[n], per_s[base]) for n in names[1:])])
    print_table("throughput, items/s (images, or texts for text_embedding)",
                ["mode", "concurrency", *names, *(f"{n} / {base}" for n in names[1:])], rows)

    rows = []
    for n in names:
        s = start[n]
        out["startup"][n] = s
        rows.append([n, s.get("backend"), s.get("dtype"), s.get("ready_s"), s.get("model_load_s"),
                     s.get("model_warmup_s")])
    print_table("start-up (bentoml serve -> /readyz 200), s", ["run", "backend", "dtype", "ready", "model load",
                                                               "warm-up"], rows)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

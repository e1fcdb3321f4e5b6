"""Indexing rate of ``siglip-index build``: images/s from a folder of JPEGs into LanceDB, per engine.

Writes ``--count`` synthetic photo-like JPEGs (800x600 by default, not timed) into a temporary folder, then runs
the real CLI (``python -m siglip.index build DIR --db TMP --json``) as a subprocess once per ``--engines`` entry, on
the same images, and reports its own rate (embedding and writing: first request to last commit) and the whole
command's wall time (imports, reading the folder, model load or Ray start, compaction included).

    python benchmarks/index_rate.py --url http://127.0.0.1:3000 --count 200
    SIGLIP_MODEL=/tmp/ckpt python benchmarks/index_rate.py --engines http,local,ray --count 200

``local`` and ``ray`` load ``SIGLIP_MODEL`` themselves (the same model the server at ``--url`` must serve, for the
comparison to mean anything). ``ray`` starts a local Ray cluster in a network and PID namespace of its own
(``unshare``, root): Ray asks cloud metadata addresses about the node's accelerators, and a benchmark here sends
traffic to loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, check_loopback, log, make_jpeg, meta, print_table, write_json


def write_images(folder: Path, count: int, width: int, height: int) -> int:
    """``count`` JPEGs in ``folder`` (the ones already there are kept); their total size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"{i:05d}.jpg").exists()]
    if missing:
        log(f"writing {len(missing)} {width}x{height} JPEGs into {folder} ...")
    for i in missing:
        (folder / f"{i:05d}.jpg").write_bytes(make_jpeg(i, width, height))
    return sum((folder / f"{i:05d}.jpg").stat().st_size for i in range(count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the server (loopback only)")
    parser.add_argument("--count", type=int, default=200, help="images to index (default: 200)")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4, help="http and local engines")
    parser.add_argument("--engines", default="http", help="comma-separated: http, local, ray (default: http)")
    parser.add_argument("--ray-args", default="", help="extra build flags for the ray engine, e.g. '--actors 2'")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run the ray engine without its own namespaces (a machine that reaches nothing "
                             "outside itself anyway, e.g. the GPU host)")
    parser.add_argument("--images", metavar="DIR", help="keep the generated JPEGs here and reuse them on later "
                                                        "runs (default: a temporary folder)")
    parser.add_argument("--label", default="", help="a name for this run in the table (e.g. the model)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    url = check_loopback(args.url)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="index-rate-") as tmp:
        folder = Path(args.images or Path(tmp, "images")) / f"{args.count}-{args.width}x{args.height}"
        size = write_images(folder, args.count, args.width, args.height)
        for engine in engines:
            db = Path(tmp, f"db-{engine}")
            command = [sys.executable, "-m", "siglip.index", "build", str(folder), "--db", str(db), "--server", url,
                       "--batch-size", str(args.batch_size), "--engine", engine, "--json", "--quiet"]
            if engine == "ray":
                command += args.ray_args.split()
                command = isolated(command) if args.isolate else command
            else:
                command += ["--concurrency", str(args.concurrency)]
            log("running " + " ".join(command))
            t0 = time.perf_counter()
            proc = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                log(f"build exited with {proc.returncode}:\n{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}")
                return 1
            summary = json.loads(proc.stdout)
            result = {"engine": engine, "added": summary["added"], "build_s": summary["seconds"],
                      "images_per_s": summary["images_per_s"], "command_s": round(wall, 2),
                      "command_images_per_s": round(summary["added"] / wall, 2), "requests": summary["requests"],
                      "retries": summary["retries"]}
            results.append(result)
            rows.append([args.label or "-", engine, summary["added"], args.batch_size, summary["seconds"],
                         summary["images_per_s"], round(wall, 2), result["command_images_per_s"]])

    out = {"meta": meta("index_rate", url=url), "label": args.label, "count": args.count,
           "image": f"{args.width}x{args.height} JPEG", "mean_kb": round(size / args.count / 1024, 1),
           "batch_size": args.batch_size, "concurrency": args.concurrency, "ray_args": args.ray_args,
           "runs": results}
    print_table(f"siglip-index build, {args.count} images, same images per engine",
                ["run", "engine", "images", "batch", "build s", "images/s", "command s", "images/s incl. start"],
                rows)
    write_json(args.json, out)
    return 0


def isolated(command: list[str]) -> list[str]:
    """``command`` in a network namespace with loopback only and a PID namespace that dies with it."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise SystemExit("the ray engine is measured in a namespace of its own: run as root with unshare")
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
            'ip link set lo up && exec "$0" "$@"', *command]


if __name__ == "__main__":
    sys.exit(main())

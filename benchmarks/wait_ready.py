"""Wait for a starting service's /readyz and record its start-up time (used by run_all.sh).

Start-up = from the launch of `bentoml serve` (--since, epoch seconds) to the first 200 from /readyz: process
start, model load and the encoder's warm-up. The model's own "load X s, warm-up Y s" log line is parsed from
--server-log when given. Fails (exit 1) if the server process exits or the deadline passes first.

    python benchmarks/wait_ready.py --url http://127.0.0.1:3000 --since $T0 --pid $PID --timeout 300 \\
        --server-log /tmp/bench-out/server.log --json /tmp/bench-out/startup.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from common import DEFAULT_URL, check_loopback, log, meta, print_table, wait_ready, write_json

LOADED = re.compile(r"Loaded (\S+) on (\S+) \((\w+)\).*?(?:backend (\w+).*?)?load ([\d.]+) s, warm-up ([\d.]+) s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--since", type=float, default=None, help="launch time, epoch seconds (default: now)")
    parser.add_argument("--pid", type=int, help="server pid: give up at once if it exits")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline, s from --since (default: 300)")
    parser.add_argument("--server-log", help="server log, to read the model's load / warm-up times from")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    url = check_loopback(args.url)
    ready_s = wait_ready(url, args.timeout, since=args.since,
                         alive=(lambda: alive(args.pid)) if args.pid else None)
    result = {"meta": meta("wait_ready", url=url), "ready_s": round(ready_s, 2)}
    if args.server_log and Path(args.server_log).exists():
        m = LOADED.search(Path(args.server_log).read_text(errors="replace"))
        if m:
            result.update(model=m.group(1), device=m.group(2), dtype=m.group(3), backend=m.group(4),
                          model_load_s=float(m.group(5)), model_warmup_s=float(m.group(6)))
    log(f"ready after {ready_s:.1f} s")
    print_table("start-up (bentoml serve -> /readyz 200)",
                ["ready s", "device", "dtype", "backend", "model load s", "warm-up s"],
                [[result["ready_s"], result.get("device"), result.get("dtype"), result.get("backend"),
                  result.get("model_load_s"), result.get("model_warmup_s")]])
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recovery after a killed model worker: SIGKILL it (as the OOM killer does) under steady load, ``--kills`` times,
and measure what clients and probes saw.

    python benchmarks/fault_recovery.py --pid MAIN_PID [--url http://127.0.0.1:3000] [--clients 16] [--kills 3]

``MAIN_PID`` is the ``bentoml serve`` main process (its SiglipModel worker is the one killed). Each client sends
two distinct texts per request (model calls, not cache hits) in a loop. Per kill: seconds from the kill to
``/readyz`` 503, to ``/readyz`` 200 again and to the first 200 answer after a failure; answers by status while
not ready. Loopback only.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

import httpx
import psutil
from common import check_loopback, fmt, log, meta, print_table, write_json


def model_worker(main_pid: int) -> psutil.Process:
    for child in psutil.Process(main_pid).children():
        if "SiglipModel" in child.cmdline():
            return child
    raise SystemExit(f"no SiglipModel worker under pid {main_pid}")


def client_loop(url: str, tag: int, stop: threading.Event, answers: list[tuple[float, int | None]]) -> None:
    i = 0
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            i += 1
            try:
                status = client.post(url + "/text_embedding", json={"inputs": [f"c{tag} {i}", f"c{tag} {i}b"]}).status_code
            except httpx.HTTPError:
                status = None
            answers.append((time.monotonic(), status))


def readyz(probe: httpx.Client, url: str) -> int | None:
    try:
        return probe.get(url + "/readyz").status_code
    except httpx.HTTPError:
        return None


def one_kill(url: str, main_pid: int, answers: list, probe: httpx.Client, settle_s: float) -> dict:
    old = model_worker(main_pid)
    start = len(answers)
    t_kill = time.monotonic()
    old.kill()
    t_503 = t_200 = None
    while t_200 is None and time.monotonic() - t_kill < 300:
        status = readyz(probe, url)
        now = time.monotonic()
        if status != 200 and t_503 is None:
            t_503 = now
        elif status == 200 and t_503 is not None:
            t_200 = now
        time.sleep(0.05)
    time.sleep(settle_s)
    after = answers[start:]
    first_fail = next((t for t, s in after if s != 200), None)
    first_ok = next((t for t, s in after if s == 200 and first_fail is not None and t > first_fail), None)
    during = Counter("conn" if s is None else str(s) for t, s in after if t_200 is None or t <= t_200)
    return {"readyz_503_s": None if t_503 is None else t_503 - t_kill,
            "readyz_200_s": None if t_200 is None else t_200 - t_kill,
            "first_ok_after_failure_s": None if first_ok is None else first_ok - t_kill,
            "answers_until_ready": dict(during), "new_pid": model_worker(main_pid).pid != old.pid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--pid", type=int, required=True, help="the `bentoml serve` main process")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=5.0, help="load kept on after each recovery")
    parser.add_argument("--json")
    args = parser.parse_args()
    url = check_loopback(args.url.rstrip("/"))
    stop, answers = threading.Event(), []
    threads = [threading.Thread(target=client_loop, args=(url, c, stop, answers), daemon=True)
               for c in range(args.clients)]
    for t in threads:
        t.start()
    rows = []
    try:
        with httpx.Client(timeout=10) as probe:
            time.sleep(args.settle_s)
            for k in range(args.kills):
                log(f"kill {k + 1}/{args.kills}")
                rows.append(one_kill(url, args.pid, answers, probe, args.settle_s))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    total = Counter("conn" if s is None else str(s) for _, s in answers)
    print_table(f"model worker SIGKILL under {args.clients} clients ({len(answers)} answers: {dict(total)})",
                ["kill", "readyz 503 after s", "readyz 200 after s", "first 200 after a failure s", "answers until ready"],
                [[i + 1, fmt(r["readyz_503_s"], 2), fmt(r["readyz_200_s"], 1), fmt(r["first_ok_after_failure_s"], 1),
                  r["answers_until_ready"]] for i, r in enumerate(rows)])
    write_json(args.json, {**meta("fault_recovery", clients=args.clients), "kills": rows, "answers": dict(total)})


if __name__ == "__main__":
    main()

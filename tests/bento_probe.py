"""Drive a served bento from inside its network namespace (tests/test_bento.py runs this under `unshare -n`).

``python bento_probe.py PLAN.json RESULT.json``: starts ``plan["serve"]["cmd"]`` (the server's main process is
this script's child, as under a container runtime), waits for /readyz, sends ``plan["requests"]`` one by one,
scrapes /metrics, then starts ``plan["inflight"]["count"]`` image requests whose image URL answers only after
``delay_s`` (a loopback server in this script), sends SIGTERM to the server's main process once every one of
them is inside the service, and records their answers and the server's exit status. The test asserts on
RESULT.json; this script only records. It needs nothing beyond the bento's own packages (httpx).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class SlowImages:
    """Serves one PNG at /slow.png after a delay, counting the requests that arrived."""

    def __init__(self, png: bytes, delay_s: float):
        self.hits = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with lock:
                    outer.hits += 1
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def wait_ready(proc: subprocess.Popen, base: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    with httpx.Client(timeout=2) as probe:  # one client: httpx.get builds a TLS context (CPU) per call
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            try:
                if probe.get(base + "/readyz").status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout_s} s")


def answer(r: httpx.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        body = r.text
    return {"status": r.status_code, "body": body}


def run(plan: dict, result: dict) -> None:
    serve = plan["serve"]
    base = f"http://127.0.0.1:{plan['port']}"
    with open(serve["log"], "wb") as log:
        proc = subprocess.Popen(serve["cmd"], cwd=serve["cwd"], env=serve["env"], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        result["ready_s"] = wait_ready(proc, base, plan["ready_timeout_s"])
        result["readyz"] = httpx.get(base + "/readyz", timeout=10).status_code
        with httpx.Client(base_url=base, timeout=60) as client:
            result["responses"] = {req["name"]: answer(client.post(req["path"], json=req["body"]))
                                   for req in plan["requests"]}
            metrics = client.get("/metrics")
            result["metrics"] = {"status": metrics.status_code, "text": metrics.text}

        inflight = plan["inflight"]
        slow = SlowImages(base64.b64decode(inflight["png_b64"]), inflight["delay_s"])
        answers: list[dict | None] = [None] * inflight["count"]

        def call(i: int) -> None:
            try:
                r = httpx.post(base + inflight["path"], json={"inputs": slow.url}, timeout=120)
                answers[i] = answer(r)
            except httpx.HTTPError as exc:
                answers[i] = {"status": None, "body": f"{type(exc).__name__}: {exc}"}

        threads = [threading.Thread(target=call, args=(i,)) for i in range(inflight["count"])]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while slow.hits < inflight["count"] and time.monotonic() < deadline:
            time.sleep(0.02)
        result["inflight_started"] = slow.hits
        proc.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` / the kubelet do
        t_term = time.monotonic()
        for t in threads:
            t.join(180)
        result["inflight"] = answers
        result["exit_code"] = proc.wait(timeout=120)
        result["exit_s"] = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    plan_path, result_path = sys.argv[1], sys.argv[2]
    with open(plan_path) as f:
        plan = json.load(f)
    result: dict = {}
    try:
        run(plan, result)
    except Exception as exc:  # noqa: BLE001 - recorded for the test's failure message
        result["error"] = f"{type(exc).__name__}: {exc}"
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

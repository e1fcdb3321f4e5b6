"""The benchmark scripts run end to end against the tiny service and write the JSON they promise.

Tiny settings (a couple of requests, one-second levels): this checks that the scripts work, not the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BENCH = ROOT / "benchmarks"
SCRIPTS = ("make_checkpoint", "naive_handler", "latency", "throughput", "loadtest", "wait_ready", "model_vs_naive",
           "service_vs_naive", "family_cost")
LATENCY_KEYS = {"n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"}


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def test_benchmark_scripts_run_and_write_json(service, tiny_checkpoint, tmp_path: Path):
    helps = [subprocess.Popen([sys.executable, str(BENCH / f"{s}.py"), "--help"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for s in SCRIPTS]
    for script, proc in zip(SCRIPTS, helps):
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "usage:" in out, f"{script} --help:\n{out}"

    common = ["--distinct-images", "3"]
    ok(run("naive_handler", "--model", str(tiny_checkpoint), "--device", "cpu", "--requests", "2", "--warmup", "1",
           "--json", str(tmp_path / "naive.json"), *common))
    naive = json.loads((tmp_path / "naive.json").read_text())
    assert set(naive["cases"]) == {"single", "batch10", "zero_shot"}
    for case in naive["cases"].values():
        assert LATENCY_KEYS <= case.keys() and case["n"] == 2

    ok(run("model_vs_naive", "--model", str(tiny_checkpoint), "--calls", "2", "--json", str(tmp_path / "mvn.json")))
    mvn = json.loads((tmp_path / "mvn.json").read_text())
    assert mvn["meta"]["dtype"] == "float32"
    assert [len(mvn[k]["calls_ms"]) for k in ("encoder", "naive")] == [2, 2] and mvn["encoder"]["median_ms"] > 0

    ok(run("service_vs_naive", "--url", service.url, "--model", str(tiny_checkpoint), "--rounds", "2",
           "--per-round", "1", "--json", str(tmp_path / "svn.json")))
    svn = json.loads((tmp_path / "svn.json").read_text())
    assert len(svn["service_ms"]) == len(svn["naive_ms"]) == 2 and svn["speedup"] > 0

    proc = run("latency", "--url", service.url, "--requests", "2", "--warmup", "2", "--json",
               str(tmp_path / "latency.json"), "--baseline-json", str(tmp_path / "naive.json"), *common)
    ok(proc)
    assert "spec T4" in proc.stdout
    latency = json.loads((tmp_path / "latency.json").read_text())
    assert set(latency["cases"]) == {"single", "batch10", "zero_shot"}
    for case in latency["cases"].values():
        assert LATENCY_KEYS | {"statuses", "speedup_vs_baseline_p50"} <= case.keys()
        assert case["statuses"] == {"200": 2} and not case["problems"]

    ok(run("throughput", "--url", service.url, "--levels", "1,2", "--duration", "1", "--warmup", "2", "--pause", "0",
           "--levels-for", "text_embedding=2", "--json", str(tmp_path / "throughput.json"), *common))
    tp = json.loads((tmp_path / "throughput.json").read_text())
    assert set(tp["modes"]) == set(tp["peak"]) == {"image_embedding", "zero_shot", "text_embedding"}
    assert [r["concurrency"] for r in tp["modes"]["text_embedding"]] == [2]
    for rows in tp["modes"].values():
        for r in rows:
            assert {"concurrency", "sent", "ok", "non_200", "requests_per_s", "items_per_s", "p50_ms",
                    "p99_ms"} <= r.keys()
            assert r["ok"] > 0 and r["non_200"] == {}

    ok(run("loadtest", "--url", service.url, "--server-pid", str(service.proc.pid), "--server-log",
           str(service.log_path), "--duration", "2", "--concurrency", "3", "--json", str(tmp_path / "load.json"),
           *common))
    load = json.loads((tmp_path / "load.json").read_text())
    assert load["passed"] and load["post_check"]["ok"] and load["server_alive"]
    assert load["sent"] > 0 and load["answered"].get("200", 0) > 0 and load["peak_server_rss_mb"] > 0
    assert {"image_embedding", "batch10", "zero_shot", "text_embedding"} == set(load["by_mode"])


def test_summarize_profile_reads_py_spy_folded_stacks(tmp_path: Path):
    folded = tmp_path / "profile.txt"
    folded.write_text(
        "MainThread (runpy.py:1);run (asyncio/runners.py:118);handle (siglip/server/http.py:10) 3\n"
        "MainThread (runpy.py:1);run (asyncio/runners.py:118);encode (siglip/model/encoder.py:20) 1\n"
        "Worker (threading.py:1);forward (torch/nn/modules/linear.py:125) 6\n"
        "malformed line without a count\n")
    proc = run("summarize_profile", str(folded), "--top", "5")
    ok(proc)
    out = proc.stdout
    assert "10 busy samples" in out
    threads = out.split("threads")[1].split("functions, inclusive")[0]
    assert "60.0%" in threads and "Worker (threading.py)" in threads and "40.0%" in threads
    inclusive = out.split("functions, inclusive")[1].split("functions, self")[0]
    # thread roots and the event loop's run call are on every stack of their thread: not listed
    assert "runners.py" not in inclusive and "runpy.py" not in inclusive
    assert "30.0%" in inclusive and "handle (http.py)" in inclusive
    self_part = out.split("functions, self")[1]
    assert "60.0%" in self_part and "forward (linear.py)" in self_part

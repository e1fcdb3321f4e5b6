"""The benchmark scripts run end to end against the tiny service and write the JSON they promise.

Tiny settings (a couple of requests, sub-second levels, one JPEG): this checks that the scripts work, not the
numbers. Most of the time is interpreters starting and importing torch, so the scripts that load the model run
beside the HTTP ones, and every --help is checked in one interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "common")
LATENCY_KEYS = {"n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"}
ENV = child_env(BENTOML_DO_NOT_TRACK="True", PYTHONUNBUFFERED="1")
TINY = ("--distinct-images", "1")

# Each script's --help, run as __main__ in this one interpreter (imports are paid once, not per script).
HELP_ALL = """
import contextlib, io, runpy, sys
bench, scripts = sys.argv[1], sys.argv[2:]
sys.path.insert(0, bench)
for script in scripts:
    out = io.StringIO()
    sys.argv = [script + ".py", "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(f"{bench}/{script}.py", run_name="__main__")
            code = "no exit"
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None) or "usage:" not in out.getvalue():
        sys.exit(f"{script} --help: exit {code}\\n{out.getvalue()}")
"""


@pytest.fixture
def start(tmp_path: Path):
    """Start a script, its output into files (a full pipe would stall a script waited for later); any still
    running at the end are killed."""
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str, argv: tuple[str, ...] = ()) -> subprocess.Popen:
        stem = tmp_path / name
        with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, *(argv or (str(BENCH / f"{name}.py"), *args))], cwd=ROOT,
                                    env=ENV, stdout=out, stderr=err)
        proc.stem = stem
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ok(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for ``proc``; its stdout if it exited 0."""
    proc.wait(timeout=timeout)
    out, err = (Path(f"{proc.stem}.{k}").read_text() for k in ("out", "err"))
    assert proc.returncode == 0, \
        f"{proc.stem.name}: exit {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return out


def test_benchmark_scripts_run_and_write_json(service, tiny_checkpoint, tmp_path: Path, start):
    ckpt = str(tiny_checkpoint)
    naive = start("naive_handler", "--model", ckpt, "--device", "cpu", "--requests", "2", "--warmup", "1",
                  "--json", str(tmp_path / "naive.json"), *TINY)
    mvn = start("model_vs_naive", "--model", ckpt, "--calls", "2", "--json", str(tmp_path / "mvn.json"))
    svn = start("service_vs_naive", "--url", service.url, "--model", ckpt, "--rounds", "2", "--per-round", "1",
                "--json", str(tmp_path / "svn.json"))
    helps = start("help", argv=("-c", HELP_ALL, str(BENCH), *SCRIPTS))

    ok(start("throughput", "--url", service.url, "--levels", "1", "--levels-for", "text_embedding=2",
             "--duration", "0.5", "--duration-for", "zero_shot=0.3", "--warmup", "1", "--pause", "0",
             "--json", str(tmp_path / "throughput.json"), *TINY))
    tp = json.loads((tmp_path / "throughput.json").read_text())
    assert set(tp["modes"]) == set(tp["peak"]) == {"image_embedding", "zero_shot", "text_embedding"}
    assert [r["concurrency"] for r in tp["modes"]["text_embedding"]] == [2]
    assert [r["duration_s"] for r in tp["modes"]["zero_shot"]] == [0.3]
    for rows in tp["modes"].values():
        for r in rows:
            assert {"concurrency", "sent", "ok", "non_200", "requests_per_s", "items_per_s", "p50_ms",
                    "p99_ms", "client_cpu_pct"} <= r.keys()
            assert r["ok"] > 0 and r["non_200"] == {} and not r["problems"]

    # open loop at twice the capacity throughput.py measured, as run_all.sh runs it
    ok(start("loadtest", "--url", service.url, "--server-pid", str(service.proc.pid), "--server-log",
             str(service.log_path), "--throughput-json", str(tmp_path / "throughput.json"), "--duration", "1",
             "--max-in-flight", "8", "--json", str(tmp_path / "load.json"), *TINY))
    load = json.loads((tmp_path / "load.json").read_text())
    assert load["passed"] and load["post_check"]["ok"] and load["server_alive"] and load["rate_rps"] > 0
    assert load["sent"] > 0 and load["answered"].get("200", 0) > 0 and load["peak_server_rss_mb"] > 0
    assert {"image_embedding", "batch10", "zero_shot", "text_embedding"} == set(load["by_mode"])

    ok(naive)
    naive_json = json.loads((tmp_path / "naive.json").read_text())
    assert set(naive_json["cases"]) == {"single", "batch10", "zero_shot"}
    for case in naive_json["cases"].values():
        assert LATENCY_KEYS <= case.keys() and case["n"] == 2

    out = ok(start("latency", "--url", service.url, "--requests", "2", "--warmup", "1", "--json",
                   str(tmp_path / "latency.json"), "--baseline-json", str(tmp_path / "naive.json"), *TINY))
    assert "spec T4" in out
    latency = json.loads((tmp_path / "latency.json").read_text())
    assert set(latency["cases"]) == {"single", "batch10", "zero_shot"}
    for case in latency["cases"].values():
        assert LATENCY_KEYS | {"statuses", "speedup_vs_baseline_p50"} <= case.keys()
        assert case["statuses"] == {"200": 2} and not case["problems"] and case["speedup_vs_baseline_p50"] > 0

    ok(mvn)
    mvn_json = json.loads((tmp_path / "mvn.json").read_text())
    assert mvn_json["meta"]["dtype"] == "float32"
    assert [len(mvn_json[k]["calls_ms"]) for k in ("encoder", "naive")] == [2, 2]
    assert mvn_json["encoder"]["median_ms"] > 0
    ok(svn)
    svn_json = json.loads((tmp_path / "svn.json").read_text())
    assert len(svn_json["service_ms"]) == len(svn_json["naive_ms"]) == 2 and svn_json["speedup"] > 0
    ok(helps)


def test_summarize_profile_reads_py_spy_folded_stacks(tmp_path: Path, start):
    folded = tmp_path / "profile.txt"
    folded.write_text(
        "MainThread (runpy.py:1);run (asyncio/runners.py:118);handle (siglip/server/http.py:10) 3\n"
        "MainThread (runpy.py:1);run (asyncio/runners.py:118);encode (siglip/model/encoder.py:20) 1\n"
        "Worker (threading.py:1);forward (torch/nn/modules/linear.py:125) 6\n"
        "malformed line without a count\n")
    out = ok(start("summarize_profile", str(folded), "--top", "5"))
    assert "10 busy samples" in out
    threads = out.split("threads")[1].split("functions, inclusive")[0]
    assert "60.0%" in threads and "Worker (threading.py)" in threads and "40.0%" in threads
    inclusive = out.split("functions, inclusive")[1].split("functions, self")[0]
    # thread roots and the event loop's run call are on every stack of their thread: not listed
    assert "runners.py" not in inclusive and "runpy.py" not in inclusive
    assert "30.0%" in inclusive and "handle (http.py)" in inclusive
    self_part = out.split("functions, self")[1]
    assert "60.0%" in self_part and "forward (linear.py)" in self_part

"""Readiness and start-up: a service whose model cannot load stays alive but not ready, and says why."""

from __future__ import annotations

import http.client
import time

import httpx
import pytest
from conftest import b64, encode, isolated_network, make_image, server_fixture, wait_for

READY_WATCH_S = 5.0  # how long /readyz must stay 503 once the gateway is up
FAILURE_DEADLINE_S = 120.0  # the load failure must be reported within this


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_readyz_on_the_good_service(service):
    assert _get(service.url + "/readyz") == 200
    assert _get(service.url + "/livez") == 200
    assert _get(service.url + "/healthz") == 200


def test_good_service_log_names_checkpoint_device_and_dtype(service, tiny_checkpoint):
    # The whole log file: service.log() is only its tail, and access lines soon push the start-up lines out.
    log = service.log_path.read_text(errors="replace")
    loaded = [line for line in log.splitlines() if "Loaded" in line]
    assert loaded, log[-3000:]
    line = loaded[0]
    assert str(tiny_checkpoint) in line and "cpu" in line and "float32" in line, line
    assert "32-dim embeddings" in line and "64x64 images" in line, line


CAUSE = "checkpoint directory /nonexistent/dir does not exist (SIGLIP_MODEL)"


broken = server_fixture(
    "broken", ready=False, SIGLIP_MODEL="/nonexistent/dir", SIGLIP_KEEP_ALIVE_S="0",
    doc="""A model that cannot load; and BentoML's own keep-alive (SIGLIP_KEEP_ALIVE_S=0), which a gateway without
    a model serves as well as one with.""")


def test_model_that_cannot_load_keeps_service_not_ready(broken):
    wait_for(lambda: _get(broken.url + "/livez") == 200, 120, "gateway answering /livez", broken.log)
    # Live, but never ready: poll for a while, every answer must be 503.
    deadline = time.monotonic() + READY_WATCH_S
    seen = []
    while time.monotonic() < deadline:
        seen.append(_get(broken.url + "/readyz"))
        time.sleep(0.25)
    assert len(seen) >= 5 and set(seen) == {503}, seen
    assert broken.proc.poll() is None, "the server should stay up, not exit"
    # ... and its 503 says why, in the service's error shape
    wait_for(lambda: CAUSE in httpx.get(broken.url + "/readyz", timeout=10).text, 60, "/readyz naming the cause",
             broken.log)
    assert httpx.get(broken.url + "/readyz", timeout=10).json() == {
        "error": f"not ready: loading /nonexistent/dir failed: {CAUSE}"}


def test_a_hub_model_without_hub_access_is_explained(tmp_path, monkeypatch):
    """transformers' own error for a hub id that is not cached, with the hub off (HF_HUB_OFFLINE=1: nothing is
    sent), becomes the one-line cause with the offline hint."""
    from siglip.model.encoder import OFFLINE_HINT, explain_load_error, load_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # whatever this machine cached
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(Exception) as caught:
        load_checkpoint("google/siglip2-base-patch16-512", None)
    assert not isinstance(caught.value, AssertionError), caught.value
    cause, expected = explain_load_error("google/siglip2-base-patch16-512", caught.value)
    assert expected and cause.endswith(OFFLINE_HINT), (type(caught.value), caught.value)


def test_load_errors_are_explained_in_one_line():
    from siglip.model.encoder import OFFLINE_HINT, explain_load_error

    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection ...")
    assert explain_load_error("google/x", offline) == (
        f"the Hugging Face hub is unreachable and google/x is not in the local cache: {OFFLINE_HINT}", True)
    assert explain_load_error("m", MemoryError())[1] is True
    assert explain_load_error("m", ValueError("shape mismatch\nand more")) == ("ValueError: shape mismatch", False)
    missing = OSError("/models/x does not appear to have a file named config.json. Checkout ...")
    assert explain_load_error("/models/x", missing)[1] is True


def test_api_call_on_a_model_that_cannot_load_answers_503_with_the_reason(broken):
    wait_for(lambda: _get(broken.url + "/livez") == 200, 120, "gateway answering /livez", broken.log)
    answers = []

    def failure_reported():
        r = httpx.post(broken.url + "/", json={"inputs": "a cat"}, timeout=30)
        answers.append((r.status_code, r.text))
        assert r.status_code == 503, r.text
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        assert r.headers.get("retry-after"), r.headers
        return "failed" in body["error"] and body["error"]

    msg = wait_for(failure_reported, FAILURE_DEADLINE_S, "the load failure in the API's answer", broken.log)
    assert "/nonexistent/dir" in msg, msg
    image = b64(encode(make_image(900)))
    for path, body in (("/zero_shot", {"inputs": image, "parameters": {"candidate_labels": ["a", "b"]}}),
                       ("/similarity", {"inputs": {"image": image, "texts": ["y"]}})):
        r = httpx.post(broken.url + path, json=body, timeout=30)
        assert r.status_code == 503 and "/nonexistent/dir" in r.json()["error"], r.text
    # Bad requests are still told so (400) without waiting for a model.
    r = httpx.post(broken.url + "/", json={"inputs": "a", "parameters": {"mode": "invalid_mode"}}, timeout=30)
    assert r.status_code == 400, r.text
    assert _get(broken.url + "/readyz") == 503


def test_log_says_why_the_model_did_not_load(broken):
    """One ERROR line with the cause and nothing else: an expected failure (a missing directory, no hub access)
    gets no traceback to bury it."""
    def logged():
        log = broken.log_path.read_text(errors="replace")
        return f"loading /nonexistent/dir failed: {CAUSE}" in log and log

    log = wait_for(logged, FAILURE_DEADLINE_S, "the load failure in the log", broken.log)
    line = next(x for x in log.splitlines() if "loading /nonexistent/dir failed" in x)
    assert "ERROR" in line and line.endswith("; the service stays not-ready"), line
    assert "Traceback" not in log, log[-3000:]
    assert "Loaded " not in log


def _get_twice(conns: list[http.client.HTTPConnection], idle_s: float) -> list[bool]:
    """GET /healthz on each connection, stay idle, then again on the same sockets: did each stay open?"""
    ports = []
    for conn in conns:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        ports.append(conn.sock.getsockname()[1])
    time.sleep(idle_s)  # the idle period is the condition under test
    alive = []
    for conn, port in zip(conns, ports):
        try:
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200 and conn.sock.getsockname()[1] == port
        except (ConnectionError, http.client.HTTPException):
            ok = False
        alive.append(ok)
        conn.close()
    return alive


def test_idle_connections_outlive_clients_pool_expiry(service, broken):
    """SIGLIP_KEEP_ALIVE_S (75 s) replaces BentoML's 5 s keep-alive, which raced clients' own 5 s pool expiry
    and reset ~0.5% of requests under load; SIGLIP_KEEP_ALIVE_S=0 (the ``broken`` server) keeps BentoML's
    value."""
    wait_for(lambda: _get(broken.url + "/livez") == 200, 120, "gateway answering /livez", broken.log)
    # Its gateway keeps a connection for the next request (so what closes it below is the keep-alive's end)...
    assert _get_twice([http.client.HTTPConnection("127.0.0.1", broken.port, timeout=10)], idle_s=0) == [True]
    conns = [http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10) for svc in (service, broken)]
    assert _get_twice(conns, idle_s=6.5) == [True, False]


def test_the_log_warns_when_listening_beyond_loopback_with_auth_off(service, start_service):
    """The gateway reads the address of the socket BentoML hands it: served on 127.0.0.1 it says nothing; bound to
    all interfaces (as the container is), here inside a network namespace of its own, it warns at start-up."""
    import socket

    from siglip.server.connections import is_loopback, listening_address

    assert "with auth off" not in service.log_path.read_text(errors="replace")
    everywhere = start_service(ready=False, wrap=isolated_network(), host="0.0.0.0")

    def warning() -> str | None:
        assert everywhere.proc.poll() is None, f"the server exited:\n{everywhere.log()[-3000:]}"
        return next((x for x in everywhere.log().splitlines() if "with auth off" in x), None)

    line = wait_for(warning, 120, "the beyond-loopback warning", everywhere.log)
    assert "Listening on 0.0.0.0 with auth off" in line and "SIGLIP_API_TOKEN" in line
    everywhere.stop()
    with socket.socket() as everywhere:
        everywhere.bind(("0.0.0.0", 0))  # bound only, nothing is sent
        address = listening_address(["worker", "--fd", str(everywhere.fileno())])
    assert address == "0.0.0.0" and not is_loopback(address)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and listening_address(["worker"]) is None

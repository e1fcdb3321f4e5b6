"""Hostile connections: one slow or endless client must not stall, lock out or exhaust the service.

Each test is one way a client can misbehave (endless headers, connections that never finish their headers,
uploads at a byte a second, refused uploads, h2c upgrades, duplicate credentials, bad templates, huge images)
against a real ``bentoml serve`` with small limits, and checks that the offender is refused quickly and that
everyone else is served meanwhile. Everything goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import resource
import selectors
import shutil
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import orjson
import psutil
import pytest
from conftest import Route, b64, encode, make_image, server_fixture
from PIL import Image

TOKEN = "hostile-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXT = {"inputs": "a photo of a cat", "parameters": {"mode": "text_embedding"}}
HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MAX_BODY = 4_000_000


hostile = server_fixture(
    "hostile", SIGLIP_API_TOKEN=TOKEN, SIGLIP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    SIGLIP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S), SIGLIP_MAX_CONCURRENCY="2", SIGLIP_MAX_UPLOADS="2",
    SIGLIP_REQUEST_TIMEOUT_S="30", SIGLIP_MAX_BODY_BYTES=str(MAX_BODY), SIGLIP_ALLOW_PRIVATE_URLS="1",
    doc="""Auth on, two run slots and two upload slots, short header and body timeouts, a long request deadline
    (so anything answered quickly was answered by the new limits, not by the deadline).""")

@pytest.fixture(scope="module")
def capped(two_workers):
    """At most 50 open connections per gateway worker (the shared ``two_workers`` server)."""
    return two_workers


def connect(svc, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.port), timeout=timeout)


def read_answer(sock: socket.socket, timeout: float) -> tuple[int | None, bytes]:
    """The status and body of what the server sends before closing (None: it closed without answering)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def error_of(body: bytes) -> str:
    return orjson.loads(body)["error"]


def timed_requests(svc, n: int) -> list[float]:
    """``n`` ordinary requests one after another; each must succeed. Their latencies."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            t0 = time.monotonic()
            r = client.post(svc.url + "/", json=TEXT, headers=AUTH)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
    return latencies


class Trickle(threading.Thread):
    """A client that sends ``head`` and then one byte every ``interval_s`` until the server closes the
    connection; ``status`` and ``body`` are what it answered before."""

    def __init__(self, svc, head: bytes, interval_s: float = 0.25, limit: int = 400, chunk: bytes = b"a"):
        super().__init__(daemon=True)
        self.sock = connect(svc)
        self.head, self.interval_s, self.limit, self.chunk = head, interval_s, limit, chunk
        self.status: int | None = None
        self.body = b""
        self.answered_after: float | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        self.sock.sendall(self.head)
        self.sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        data = b""
        for _ in range(self.limit):
            if sel.select(self.interval_s):
                try:
                    chunk = self.sock.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    chunk = b""
                data += chunk
                if not chunk:  # every refusal closes the connection after its answer
                    break
            try:
                self.sock.send(self.chunk)
            except OSError:
                break
        self.answered_after = time.monotonic() - t0
        if data:
            head, _, self.body = data.partition(b"\r\n\r\n")
            self.status = int(head.split(b" ", 2)[1])
        self.sock.close()


def upload_head(path: str = "/", length: int = 100_000, auth: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {length}"] + ([f"Authorization: Bearer {TOKEN}"] if auth else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- headers ------------------------------------------------------------------------------------------------------
def test_endless_header_is_cut_off_while_others_are_served(hostile):
    """Before: no header limit, so the header grew without end (other requests stalled 9-115 s)."""
    sock = connect(hostile)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
    sent = 0

    def stream() -> None:  # 4 MB/s until the server answers; stops by itself after 4 MB
        nonlocal sent
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        try:
            while sent < 4_000_000 and not sel.select(0.001):
                sock.sendall(b"a" * 4096)
                sent += 4096
        except OSError:
            pass  # refused

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    latencies = timed_requests(hostile, 8)
    streamer.join(timeout=30)
    status, body = read_answer(sock, timeout=5)
    assert status == 431 and "SIGLIP_MAX_HEADER_BYTES" in error_of(body), (status, body[:200])
    assert sent < 1_000_000, sent  # answered long before the header was done
    assert max(latencies) < 2, latencies


def header_limit_refusals(svc) -> float:
    line = 'siglip_errors_total{reason="header_limit",status="431"} '
    text = httpx.get(svc.url + "/metrics", timeout=10).text
    return sum(float(x[len(line):]) for x in text.splitlines() if x.startswith(line))


def test_too_many_or_too_large_complete_headers_get_431(hostile):
    before = header_limit_refusals(hostile)
    many = {f"x-h{i}": "1" for i in range(150)}
    r = httpx.post(hostile.url + "/", json=TEXT, headers={**AUTH, **many}, timeout=10)
    assert r.status_code == 431 and "SIGLIP_MAX_HEADERS" in r.json()["error"]
    assert len(r.headers.get("x-request-id", "")) == 32  # refused before the app, still traceable
    big = {f"x-big{i}": "b" * 4000 for i in range(6)}  # 24 KB in six headers
    r = httpx.post(hostile.url + "/", json=TEXT, headers={**AUTH, **big}, timeout=10)
    assert r.status_code == 431 and "SIGLIP_MAX_HEADER_BYTES" in r.json()["error"]
    assert httpx.post(hostile.url + "/", json=TEXT, headers=AUTH, timeout=10).status_code == 200
    assert header_limit_refusals(hostile) - before == 2  # counted, though no request reached the app


def test_half_open_connections_are_closed_after_the_header_timeout(hostile):
    """Before: connections that never finish their headers stayed open until the fd limit was reached."""
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 500), hard))
    socks = []
    try:
        for i in range(n):
            s = connect(hostile)
            if i % 2:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half")  # a header, never finished
            socks.append(s)
        assert timed_requests(hostile, 1)  # still served meanwhile
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        open_ = len(socks)
        answers: dict[int, int] = {}
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 20
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                if data:
                    status = int(data.split(b" ", 2)[1])
                    answers[status] = answers.get(status, 0) + 1
                    continue
                sel.unregister(key.fileobj)
                open_ -= 1
        assert open_ == 0, f"{open_} of {n} connections still open {HEADER_TIMEOUT_S + 20:g} s later"
        assert set(answers) <= {408}, answers  # partial headers get 408, silent connections are just closed
    finally:
        for s in socks:
            s.close()
    assert timed_requests(hostile, 2)


def test_connections_past_the_cap_are_refused_at_once(capped):
    """Before: no cap, new clients got no answer at all once the fd limit was reached."""
    held = [connect(capped) for _ in range(60)]
    try:
        sel = selectors.DefaultSelector()
        for s in held:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        refused = []
        deadline = time.monotonic() + 5
        while len(refused) < 10 and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                sel.unregister(key.fileobj)
                refused.append(key.fileobj.recv(4096))
        assert 10 <= len(refused) <= 12, len(refused)  # the ones past 50 (a just-closed probe may still count)
        for data in refused:
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and "SIGLIP_MAX_CONNECTIONS" in error_of(body)
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server notices the closed connections
        try:
            if httpx.post(capped.url + "/", json=TEXT, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert httpx.post(capped.url + "/", json=TEXT, timeout=10).status_code == 200


# -- uploads ------------------------------------------------------------------------------------------------------
def test_slow_uploaders_cannot_take_the_slots_of_ready_requests(hostile):
    """Before: 4 uploaders at a byte a second held both SIGLIP_MAX_CONCURRENCY slots until the request deadline;
    everyone else got 429."""
    uploaders = [Trickle(hostile, upload_head() + b'{"inputs": "') for _ in range(4)]
    for u in uploaders:
        u.start()
    deadline = time.monotonic() + 5
    while sum(u.status == 429 for u in uploaders) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # until two found the upload slots taken: the other two hold them
    latencies = timed_requests(hostile, 6)
    for u in uploaders:
        u.join(timeout=20)
    statuses = sorted(u.status for u in uploaders)
    # two take the upload slots and are cut off for their rate, two find them taken
    assert statuses == [408, 408, 429, 429], [(u.status, u.body[:120]) for u in uploaders]
    assert max(u.answered_after for u in uploaders) < BODY_TIMEOUT_S + 5
    assert "SIGLIP_MIN_UPLOAD_BYTES_PER_S" in error_of(next(u.body for u in uploaders if u.status == 408))
    assert "SIGLIP_MAX_UPLOADS" in error_of(next(u.body for u in uploaders if u.status == 429))
    assert max(latencies) < 2, latencies


def test_slow_uploads_give_their_slots_to_a_normal_image_upload(hostile, reference):
    """Found in review: any photo over ~64 KB arrives in several reads and needs an upload slot, so clients
    trickling bytes (fast enough for SIGLIP_MIN_UPLOAD_BYTES_PER_S) held both slots and every real image upload
    got 429 SIGLIP_MAX_UPLOADS. Now the slowest upload older than 1 s gives its slot to the newcomer (408)."""
    rng = np.random.default_rng(5)
    photo = encode(Image.fromarray(rng.integers(0, 256, (500, 600, 3), dtype=np.uint8)))
    body = orjson.dumps({"inputs": b64(photo)})
    assert len(body) > 1_000_000  # several reads: it needs an upload slot
    # ~20 KB/s each: above the minimum rate, far below a real upload; 5 s of it at most
    trickles = [Trickle(hostile, upload_head(length=3_000_000) + b'{"inputs": "', interval_s=0.05, limit=100,
                        chunk=b"a" * 1024) for _ in range(2)]
    for t in trickles:
        t.start()
    time.sleep(1.3)  # both hold their upload slot longer than the eviction grace (1 s); the rule under test
    assert all(t.status is None for t in trickles), [(t.status, t.body[:100]) for t in trickles]
    r = httpx.post(hostile.url + "/image_embedding", content=body, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 200, r.text
    expected = reference.image_embeds([Image.open(io.BytesIO(photo))])[0]
    assert float(np.dot(r.json()[0]["embedding"], expected)) > 0.9999
    for t in trickles:
        t.join(timeout=20)
    evicted = [t for t in trickles if t.status == 408]
    assert len(evicted) == 1, [(t.status, t.body[:120]) for t in trickles]
    assert "gives way" in error_of(evicted[0].body)


def test_unauthenticated_slow_upload_is_refused_at_once(hostile):
    """Before: the 401 came only once the whole body had trickled in (24 s)."""
    u = Trickle(hostile, upload_head(auth=False) + b"{")
    u.start()
    u.join(timeout=20)
    assert u.status == 401 and u.answered_after < 1.5, (u.status, u.answered_after)


def test_slow_upload_meets_a_429_at_once_when_the_slots_are_full(hostile, image_server):
    """Before: the guard read the refused body first; BentoML's own timeout answered 504 after 18 s."""
    url = image_server.add("/hostile-slow.png", Route(encode(make_image(31)), delay_s=3))

    async def fill_slots() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            rs = await asyncio.gather(*(client.post(hostile.url + "/image_embedding", json={"inputs": url},
                                                    headers=AUTH) for _ in range(2)))
        return [r.status_code for r in rs]

    filler = threading.Thread(target=lambda: asyncio.run(fill_slots()), daemon=True)
    filler.start()
    deadline = time.monotonic() + 5
    while image_server.hits.get("/hostile-slow.png", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    u = Trickle(hostile, upload_head() + b"{")
    u.start()
    u.join(timeout=20)
    filler.join(timeout=30)
    assert u.status == 429 and "SIGLIP_MAX_CONCURRENCY" in error_of(u.body) and u.answered_after < 1.5, (
        u.status, u.body[:200], u.answered_after)


@pytest.mark.parametrize("case", ["401", "413"])
def test_clients_uploading_a_large_body_read_the_refusal(hostile, case):
    """The refusal is sent before the body is read and the connection closed; real clients must see the
    status, not a reset."""
    headers = {} if case == "401" else AUTH
    size = 8_000_000 if case == "401" else MAX_BODY + 1_000_000
    body = b'{"inputs": "' + b"a" * size + b'"}'
    seen = [httpx.post(hostile.url + "/", content=body, headers=headers, timeout=30).status_code]

    async def async_client() -> int:
        async with httpx.AsyncClient(timeout=30) as client:
            return (await client.post(hostile.url + "/", content=body, headers=headers)).status_code

    seen.append(asyncio.run(async_client()))
    if shutil.which("curl"):
        args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@-",
                *(f"-H{k}: {v}" for k, v in headers.items()), hostile.url + "/"]
        out = subprocess.run(args, input=body, capture_output=True, timeout=30, check=False)
        seen.append(int(out.stdout or 0))
    assert seen == [int(case)] * len(seen), seen


# -- protocol and auth --------------------------------------------------------------------------------------------
def test_curl_http2_upgrade_is_served_as_http11_with_its_body(hostile):
    """Before: ``Upgrade: h2c`` made uvicorn drop the body: 400 "request body is empty"."""
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    out = subprocess.run(["curl", "-s", "--http2", "-H", f"Authorization: Bearer {TOKEN}", "-w", "\n%{http_code}",
                          "-d", orjson.dumps(TEXT).decode(), hostile.url + "/", hostile.url + "/"],
                         capture_output=True, text=True, timeout=30, check=False)
    lines = out.stdout.split("\n")  # two requests on one connection: the connection stays usable
    assert lines[1].startswith("200") and lines[2] == "200", out.stdout[:300]
    assert len(orjson.loads(lines[0])[0]["embedding"]) == 32


@pytest.mark.parametrize("values", [["Bearer wrong", f"Bearer {TOKEN}"], [f"Bearer {TOKEN}"] * 2])
def test_duplicate_authorization_headers_are_400(hostile, values):
    """Before: the last Authorization header won."""
    r = httpx.post(hostile.url + "/", json=TEXT, headers=[("Authorization", v) for v in values], timeout=10)
    assert r.status_code == 400 and "Authorization" in r.json()["error"], r.text


# -- request content ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["{}{}", "{0} and {0}", "{{}}", "no placeholder"])
def test_templates_without_exactly_one_placeholder_are_refused(hostile, template):
    """Before: "{}{}" answered 'could not be applied: IndexError: Replacement index 1 out of range ...'."""
    body = {"inputs": b64(encode(make_image(32))), "parameters": {"candidate_labels": ["a", "b"],
                                                                 "hypothesis_template": template}}
    r = httpx.post(hostile.url + "/zero_shot", json=body, headers=AUTH, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error.startswith("hypothesis_template must contain exactly one {}"), error
    assert "IndexError" not in error


def test_every_error_uses_the_error_shape(hostile):
    """Before: BentoML's own errors answered plain text (404, 405) or pydantic's validation error."""
    deep = b'{"inputs": ' + b"[" * 500 + b"]" * 500 + b"}"
    answers = [
        httpx.post(hostile.url + "/no-such-route", json=TEXT, headers=AUTH, timeout=10),
        httpx.get(hostile.url + "/zero_shot", headers=AUTH, timeout=10),
        httpx.post(hostile.url + "/image_embedding", content=deep, headers=AUTH, timeout=10),
    ]
    assert [r.status_code for r in answers] == [404, 405, 400]
    for r in answers:
        assert r.headers["content-type"].startswith("application/json"), r.text
        body = r.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    assert "nested deeper than" in answers[2].json()["error"]


# -- memory -------------------------------------------------------------------------------------------------------
def gateway_process(svc) -> psutil.Process:
    for child in psutil.Process(svc.proc.pid).children(recursive=True):
        if "SiglipGateway" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no SiglipGateway worker process")


@pytest.mark.timeout(300)
def test_gateway_memory_returns_after_a_burst_of_large_images(capped):
    """Before: bursts of 4 concurrent 36 MP images took the gateway from ~100 MB to ~1.2 GB RSS, and it stayed
    there."""
    import io

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:6000, 0:6000].astype(np.uint16)
    pixels = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=70)
    del pixels, xx, yy
    big = b64(buf.getvalue())
    gateway = gateway_process(capped)
    small = {"inputs": b64(encode(make_image(33), "JPEG"))}
    for _ in range(3):  # warm: every code path and lazy import of the image path has run once
        assert httpx.post(capped.url + "/image_embedding", json=small, timeout=60).status_code == 200
    time.sleep(1.5)  # the idle trim (1 s after the last request) has run, as it will after the burst
    idle = gateway.memory_info().rss

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=240) as client:
            rs = await asyncio.gather(*(client.post(capped.url + "/image_embedding", json={"inputs": big})
                                        for _ in range(4)))
        return [r.status_code for r in rs]

    peak = 0
    for _ in range(2):  # glibc's heap growth depends on the order of frees: two bursts show it reliably
        assert asyncio.run(burst()) == [200] * 4
        peak = max(peak, gateway.memory_info().rss)
    deadline = time.monotonic() + 30
    while gateway.memory_info().rss > 1.5 * idle and time.monotonic() < deadline:
        time.sleep(0.25)
    after = gateway.memory_info().rss
    print(f"gateway RSS: idle {idle / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB, after {after / 2**20:.0f} MB")
    assert after <= 1.5 * idle, (f"idle {idle / 2**20:.0f} MB, right after the burst {peak / 2**20:.0f} MB, "
                                 f"30 s later {after / 2**20:.0f} MB")


# -- settings -----------------------------------------------------------------------------------------------------
def test_connection_cap_stays_under_the_fd_limit():
    from siglip.server.connections import connection_cap

    assert connection_cap(10_000, fd_limit=20_000) == 10_000
    assert connection_cap(10_000, fd_limit=1024) == 1024 - 128  # an eighth kept for sockets to the model, files
    assert connection_cap(10_000, fd_limit=100) == 36  # at least 64 kept


@pytest.mark.parametrize("name,value", [("SIGLIP_HEADER_TIMEOUT_S", "0"), ("SIGLIP_BODY_TIMEOUT_S", "nan"),
                                        ("SIGLIP_MAX_HEADER_BYTES", "0"), ("SIGLIP_MAX_CONNECTIONS", "-1"),
                                        ("SIGLIP_MIN_UPLOAD_BYTES_PER_S", "0"), ("SIGLIP_MAX_UPLOADS", "0"),
                                        ("SIGLIP_MAX_HEADERS", "x")])
def test_connection_settings_are_validated(name, value):
    from siglip.settings import Settings

    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})

"""Untrusted input over HTTP: SSRF refusals, hostile files, limits, bearer auth, overload and deadlines.

Every request goes to 127.0.0.1. Servers that fuzz (hypothesis, schemathesis) run with private URLs refused and
an allowlist of 127.0.0.1, so no generated URL can cause traffic to any other address.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, TOKENS, Route, b64, encode, make_image, server_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siglip.api.errors import FetchError
from siglip.api.fetch import BlockedAddress, Fetcher, FetchPolicy, GuardedBackend
from siglip.settings import Settings

AUTH = {"Authorization": f"Bearer {TOKENS[0]}"}


@pytest.fixture(scope="module")
def service(in_process):
    """The request path's refusals (hostile files, modes, URLs), in this process: fp32, loopback URLs allowed."""
    return in_process(SIGLIP_DTYPE="float32", SIGLIP_ALLOW_PRIVATE_URLS="1")


@pytest.fixture(scope="module")
def secure(authed):
    """Defaults (private URLs refused) plus bearer auth with two tokens."""
    return authed


@pytest.fixture(scope="module")
def fuzz(in_process):
    """For fuzzing, in this process: private URLs refused and only 127.0.0.1 allowed, so a generated URL is refused
    before any DNS lookup or connection."""
    return in_process(SIGLIP_URL_ALLOWLIST="127.0.0.1")


limited = server_fixture(
    "limited", SIGLIP_ALLOW_PRIVATE_URLS="1", SIGLIP_URL_ALLOWLIST="127.0.0.1", SIGLIP_MAX_IMAGE_PIXELS="1000000",
    SIGLIP_MAX_CONCURRENCY="2", SIGLIP_REQUEST_TIMEOUT_S="3", SIGLIP_FETCH_TOTAL_TIMEOUT_S="1.5",
    SIGLIP_MAX_PARALLEL_FETCHES="1", SIGLIP_MAX_IMAGES_PER_REQUEST="4", SIGLIP_MAX_TEXTS_PER_REQUEST="5",
    SIGLIP_MAX_TEXT_CHARS="50", SIGLIP_MAX_BODY_BYTES="2000000", SIGLIP_MAX_IMAGE_BYTES="1000000",
    doc="""Small limits so each can be crossed cheaply; loopback URLs allowed so slow URLs can be served, and only
    127.0.0.1, so a URL schemathesis makes up is refused before any DNS lookup or connection.""")


def post(svc, path, body, headers=AUTH, **kw):
    return httpx.post(svc.url + path, json=body, headers=headers, timeout=kw.pop("timeout", 30), **kw)


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height: valid IHDR (with CRC), a tiny IDAT and IEND, no real pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# -- SSRF ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_loopback_forms_are_refused_without_reaching_the_server(secure, image_server, host):
    path = f"/ssrf-{host.strip('[]').replace(':', '_')}.png"
    image_server.add(path, encode(make_image(1)))
    url = image_server.url(path, host=host)
    r = post(secure, "/image_embedding", {"inputs": url})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "not a public address" in error and url in error
    assert image_server.hits.get(path, 0) == 0  # refused before connecting


def test_redirect_hop_to_a_private_address_is_refused(image_server, monkeypatch):
    # No public server exists here, so treat the image server's own address as "public" for the first hop and
    # check that the second hop (127.0.0.2, private) is refused by the same guard before any connection.
    from siglip.api import fetch

    monkeypatch.setattr(fetch, "is_public_address", lambda address: address == "127.0.0.1")
    target = image_server.add("/redirect-target.png", encode(make_image(2)))
    hop = target.replace("127.0.0.1", "127.0.0.2")
    url = image_server.url(f"/redirect?to={hop}")

    async def run():
        fetcher = Fetcher(FetchPolicy.from_settings(Settings(allow_private_urls=False)))
        try:
            return await fetcher.fetch(url, "inputs")
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError, match="redirected to http://127.0.0.2.*not a public address"):
        asyncio.run(run())
    assert image_server.hits.get("/redirect", 0) >= 1


def test_every_redirect_hop_is_checked_against_the_allowlist(image_server):
    target = image_server.add("/allow-target.png", encode(make_image(3)))
    url = image_server.url("/redirect?to=" + target.replace("127.0.0.1", "localhost"))

    async def run():
        fetcher = Fetcher(FetchPolicy.from_settings(Settings(allow_private_urls=True, url_allowlist=("127.0.0.1",))))
        try:
            return await fetcher.fetch(url, "inputs")
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError, match="not in SIGLIP_URL_ALLOWLIST"):
        asyncio.run(run())


def test_redirect_loops_stop_after_the_limit(image_server):
    url = image_server.add("/loop", Route(b"", status=302, headers={"Location": "/loop"}))

    async def run():
        fetcher = Fetcher(FetchPolicy.from_settings(Settings(allow_private_urls=True, fetch_max_redirects=3)))
        try:
            return await fetcher.fetch(url, "inputs[0]")
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError, match="redirected more than 3 times"):
        asyncio.run(run())
    assert image_server.hits["/loop"] == 4  # the first request and three redirects, no more


def test_guarded_backend_refuses_before_connecting():
    import httpcore

    backend = GuardedBackend(httpcore.AnyIOBackend(), allow_private=False)
    with pytest.raises(BlockedAddress):
        asyncio.run(backend.connect_tcp("localhost", 9, timeout=2))


# -- hostile files ------------------------------------------------------------------------------------------------
def test_decompression_bomb_header_is_refused_fast(service):
    t0 = time.monotonic()
    r = service.post("/image_embedding", {"inputs": b64(png_header(20000, 20000))})
    assert r.status_code == 400 and "megapixel" in r.json()["error"], r.text
    assert time.monotonic() - t0 < 1.0


def test_image_just_over_the_pixel_cap_is_refused(limited):
    ok = post(limited, "/", {"inputs": b64(encode(make_image(4, size=(1000, 1000))))})
    assert ok.status_code == 200, ok.text
    r = post(limited, "/", {"inputs": b64(encode(make_image(4, size=(1001, 1000))))})
    assert r.status_code == 400 and "SIGLIP_MAX_IMAGE_PIXELS" in r.json()["error"]


@pytest.mark.parametrize("name,data", [
    ("truncated JPEG", encode(make_image(5, size=(200, 150)), "JPEG")[:700]),
    ("random bytes", os.urandom(4096)),
    ("base64 of text", b"this is just some text, not an image at all"),
    ("TIFF", encode(make_image(6), "TIFF")),
])
def test_hostile_files_get_a_clear_400(service, name, data):
    r = service.post("/", {"inputs": [b64(encode(make_image(1))), b64(data)],
                           "parameters": {"mode": "image_embedding"}})
    assert r.status_code == 400, (name, r.text)
    assert "inputs[1]" in r.json()["error"]


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16"])
def test_unusual_modes_work(service, mode):
    img = make_image(7)
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    r = service.post("/image_embedding", {"inputs": b64(encode(img, fmt))})
    assert r.status_code == 200, r.text


def test_30_mb_upload_is_refused_before_decoding(service):
    r = service.post("/image_embedding", {"inputs": b64(os.urandom(30 * 1024 * 1024))})
    assert r.status_code == 400 and "SIGLIP_MAX_IMAGE_BYTES" in r.json()["error"]


def test_url_that_never_answers_times_out(limited, image_server):
    url = image_server.add("/never.png", Route(encode(make_image(8)), delay_s=8))
    t0 = time.monotonic()
    r = post(limited, "/", {"inputs": url})
    assert r.status_code == 400 and url in r.json()["error"] and "SIGLIP_FETCH_TOTAL_TIMEOUT_S" in r.json()["error"]
    assert time.monotonic() - t0 < 4


def test_url_answering_html_is_refused(service, image_server):
    url = image_server.add("/page.png", Route(b"<!DOCTYPE html><html><body>hi</body></html>",
                                               content_type="text/html"))
    r = service.post("/", {"inputs": url})
    assert r.status_code == 400 and "HTML" in r.json()["error"] and url in r.json()["error"]


def test_oversized_url_body_is_refused(limited, image_server):
    url = image_server.add("/huge.png", Route(os.urandom(1_500_000)))
    r = post(limited, "/", {"inputs": url})
    assert r.status_code == 400 and "SIGLIP_MAX_IMAGE_BYTES" in r.json()["error"]


# -- request limits -----------------------------------------------------------------------------------------------
def test_request_limits(limited):
    img = b64(encode(make_image(9)))
    cases = [
        ({"inputs": [img] * 5, "parameters": {"mode": "image_embedding"}}, "SIGLIP_MAX_IMAGES_PER_REQUEST"),
        ({"inputs": ["a"] * 6, "parameters": {"mode": "text_embedding"}}, "SIGLIP_MAX_TEXTS_PER_REQUEST"),
        ({"inputs": img, "parameters": {"candidate_labels": list("abcdef")}}, "SIGLIP_MAX_TEXTS_PER_REQUEST"),
        ({"inputs": ["x" * 51], "parameters": {"mode": "text_embedding"}}, "SIGLIP_MAX_TEXT_CHARS"),
    ]
    for body, setting in cases:
        r = post(limited, "/", body)
        assert r.status_code == 400 and setting in r.json()["error"], r.text


def test_body_over_the_limit_is_413(limited):
    r = httpx.post(limited.url + "/", content=b'{"inputs": "' + b"a" * 2_100_000 + b'"}', headers=AUTH,
                   timeout=30)
    assert r.status_code == 413 and "SIGLIP_MAX_BODY_BYTES" in r.json()["error"]


# -- overload, deadlines, disconnects -----------------------------------------------------------------------------
def test_past_max_concurrency_answers_429_with_retry_after(limited, image_server):
    url = image_server.add("/slow-429.png", Route(encode(make_image(10)), delay_s=1.0))

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.post(limited.url + "/", json={"inputs": url}) for _ in range(5)])

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses, statuses
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] and "error" in busy.json()


def test_clients_at_exactly_max_concurrency_never_see_429(limited):
    """As many clients as slots (2), each sending its next request as soon as it has its answer: a finished request
    must free its slot when it is answered, or the next one races it (the old code refused 30-60 of 480 with 8 and
    8). Over sockets: in this process the client only has its answer once the handler has returned."""
    async def client(c: httpx.AsyncClient) -> list[int]:
        return [(await c.post(limited.url + "/text_embedding", json={"inputs": "a photo of a cat"},
                              headers=AUTH)).status_code for _ in range(200)]

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=2)) as c:
            per_client = await asyncio.gather(*(client(c) for _ in range(2)))
        return [s for statuses in per_client for s in statuses]

    statuses = asyncio.run(run())
    assert statuses.count(200) == len(statuses) == 400, {s: statuses.count(s) for s in set(statuses)}


def test_request_past_its_deadline_answers_504(limited, image_server):
    # One fetch at a time (SIGLIP_MAX_PARALLEL_FETCHES=1), each 1.2 s: 3 of them pass the 3 s deadline.
    urls = [image_server.add(f"/slow-504-{i}.png", Route(encode(make_image(11 + i)), delay_s=1.2)) for i in range(3)]
    t0 = time.monotonic()
    r = post(limited, "/image_embedding", {"inputs": urls})
    assert r.status_code == 504 and "SIGLIP_REQUEST_TIMEOUT_S" in r.json()["error"], r.text
    assert time.monotonic() - t0 < 5


def test_work_for_a_client_that_left_is_cancelled(limited, image_server):
    url = image_server.add("/slow-gone.png", Route(encode(make_image(14)), delay_s=1.2))
    with pytest.raises(httpx.TimeoutException):
        post(limited, "/", {"inputs": url}, timeout=0.3)
    deadline = time.monotonic() + 10
    while "client went away" not in limited.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client went away" in limited.log()
    assert post(limited, "/", {"inputs": "still healthy?"}).status_code == 200


# -- auth ---------------------------------------------------------------------------------------------------------
def test_auth_required_on_api_and_docs(secure):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKENS[0]}):
        r = post(secure, "/", {"inputs": "a cat"}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
        assert httpx.get(secure.url + "/docs.json", headers=headers).status_code == 401
    for token in TOKENS:  # both tokens work, so they can be rotated
        r = post(secure, "/text_embedding", {"inputs": "a cat"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    assert httpx.get(secure.url + "/docs.json", headers=AUTH).status_code == 200


def test_health_and_metrics_stay_open(secure):
    for path in ("/healthz", "/livez", "/readyz", "/metrics"):
        assert httpx.get(secure.url + path).status_code == 200, path


def test_python_client_with_token(secure):
    import bentoml

    with bentoml.SyncHTTPClient(secure.url, token=TOKENS[1]) as client:
        out = client.text_embedding(inputs=["a cat", "a dog"], parameters={})
    assert len(out) == 2 and len(out[0]["embedding"]) == 32


def test_tokens_never_logged(secure):
    post(secure, "/", {"inputs": "x"}, headers={"Authorization": "Bearer wrong-token-zzz"})
    log = Path(secure.log_path).read_text(errors="replace")
    assert all(t not in log for t in (*TOKENS, "wrong-token-zzz"))


# -- fuzzing: no input makes the service answer 500 -----------------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20).filter(
    lambda s: "://" not in s)
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(["image", "images", "text", "texts", "mode", "x"]), c, max_size=3), max_leaves=10)
_params = st.none() | st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["zero_shot", "image_embedding", "text_embedding", "similarity", "bad"]) | _scalars,
    "candidate_labels": _json, "top_k": _json, "function_to_apply": st.sampled_from(["softmax", "sigmoid"]) | _json,
    "hypothesis_template": st.sampled_from(["{}", "a {} b", "{0} {1}", "{x}", "no braces"]) | _json})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(inputs=_json, parameters=_params, path=st.sampled_from(["/", "/zero_shot", "/similarity", "/text_embedding"]))
def test_no_json_value_makes_the_service_fail(fuzz, inputs, parameters, path):
    r = fuzz.post(path, {"inputs": inputs, "parameters": parameters})
    assert r.status_code < 500, r.text
    assert r.status_code == 200 or "error" in r.json()


def test_schemathesis_finds_no_server_errors(limited):
    """Over a socket, as schemathesis runs: every route of /docs.json, bodies made up from its schemas."""
    cmd = [str(Path(sys.executable).with_name("st")), "run", limited.url + "/docs.json", "--checks",
           "not_a_server_error", "--max-examples", "40", "--seed", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


# -- regressions from review --------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/a.png", "http://127.0.0.1/\x01.png"])
def test_malformed_urls_are_a_400_not_a_500(service, url):
    r = service.post("/image_embedding", {"inputs": url})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("inputs: ")


def test_compressed_url_bodies_are_refused(service, image_server):
    import gzip

    url = image_server.add("/gz.png", Route(gzip.compress(encode(make_image(3))),
                                            headers={"Content-Encoding": "gzip"}))
    r = service.post("/", {"inputs": url})
    assert r.status_code == 400 and "compressed" in r.json()["error"] and url in r.json()["error"]

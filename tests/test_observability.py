"""What operators see: request ids, one structured log line per request, the siglip_* metrics on /metrics, and the
docs page at GET / (BentoML's, without Google Tag Manager). Every figure is scraped after real requests."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import Route, b64, encode, make_image, server_fixture
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "obs-token-8c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def scrape(svc) -> dict[tuple[str, frozenset], float]:
    """Every sample on /metrics as {(name, labels): value}."""
    r = svc.client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(samples, name: str, **labels: str) -> float:
    """Sum of a series over the labels not given (e.g. all worker pids)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def delta(before, after, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.fixture(scope="module")
def strict(in_process):
    """Auth on, one request slot and a short deadline, so 401, 429 and 504 are cheap to cause (in this process)."""
    return in_process(SIGLIP_API_TOKEN=TOKEN, SIGLIP_MAX_CONCURRENCY="1", SIGLIP_REQUEST_TIMEOUT_S="1.5",
                         SIGLIP_FETCH_TOTAL_TIMEOUT_S="10", SIGLIP_FETCH_READ_TIMEOUT_S="10",
                         SIGLIP_ALLOW_PRIVATE_URLS="1")


def test_every_response_carries_a_request_id(service):
    ids = set()
    for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/nope")):
        r = httpx.request(method, service.url + path, timeout=10)
        assert r.headers.get("x-request-id"), (path, r.headers)
        ids.add(r.headers["x-request-id"])
    r = service.post("/text_embedding", {"inputs": "a red chair"})
    assert r.status_code == 200 and r.headers["x-request-id"] not in ids
    r = service.post("/", {"inputs": "x", "parameters": {"mode": "bogus"}})
    assert r.status_code == 400 and r.headers.get("x-request-id")


def test_a_given_request_id_is_kept_and_an_odd_one_replaced(service):
    r = service.post("/text_embedding", {"inputs": "a chair"}, headers={"X-Request-ID": "trace-42.abc"})
    assert r.headers["x-request-id"] == "trace-42.abc"
    r = service.post("/text_embedding", {"inputs": "a chair"}, headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32


def test_metrics_count_requests_by_detected_mode_items_and_failures(service, image_server):
    png = b64(encode(make_image(51)))
    missing = image_server.url("/observability/missing.png")
    before = scrape(service)
    calls = [
        ("/", {"inputs": "a wooden table"}, 200),                                          # detected text
        ("/", {"inputs": png}, 200),                                                       # detected image
        ("/", {"inputs": png, "parameters": {"candidate_labels": ["tile", "wood", "cat"]}}, 200),
        ("/similarity", {"inputs": {"image": png, "texts": ["a", "b"]}}, 200),
        ("/text_embedding", {"inputs": ["one", "two", "three"]}, 200),
        ("/", {"inputs": png, "parameters": {"mode": "invalid_mode"}}, 400),
        ("/image_embedding", {"inputs": missing}, 400),
    ]
    for path, body, status in calls:
        r = service.post(path, body)
        assert r.status_code == status, (path, r.text)
    after = scrape(service)

    def requests(route, mode, status="200"):
        return delta(before, after, "siglip_requests_total", route=route, mode=mode, status=status)

    assert requests("/", "text_embedding") == 1
    assert requests("/", "image_embedding") == 1
    assert requests("/", "zero_shot") == 1
    assert requests("/similarity", "similarity") == 1
    assert requests("/text_embedding", "text_embedding") == 1
    assert requests("/", "none", "400") == 1  # refused before a mode was decided
    assert requests("/image_embedding", "image_embedding", "400") == 1
    assert delta(before, after, "siglip_request_duration_seconds_count", route="/", mode="zero_shot") == 1
    assert delta(before, after, "siglip_images_total", mode="image_embedding") == 1
    assert delta(before, after, "siglip_images_total", mode="zero_shot") == 1
    assert delta(before, after, "siglip_images_total", mode="similarity") == 1
    assert delta(before, after, "siglip_texts_total", mode="zero_shot") == 3
    assert delta(before, after, "siglip_texts_total", mode="text_embedding") == 4
    assert delta(before, after, "siglip_texts_total", mode="similarity") == 2
    assert delta(before, after, "siglip_errors_total", status="400", reason="invalid_input") == 1
    assert delta(before, after, "siglip_errors_total", status="400", reason="url_fetch") == 1
    assert delta(before, after, "siglip_url_fetch_failures_total", reason="http_status") == 1
    assert delta(before, after, "siglip_text_cache_misses_total") >= 1
    # The labels come back in a second request: served from the cache.
    service.post("/zero_shot", {"inputs": png, "parameters": {"candidate_labels": ["tile", "wood", "cat"]}})
    again = scrape(service)
    assert delta(after, again, "siglip_text_cache_hits_total") == 3
    # Model batches (recorded by the model process, on the same /metrics).
    assert delta(before, again, "siglip_model_batch_size_count", encoder="texts") >= 1
    assert delta(before, again, "siglip_model_batch_size_count", encoder="images") >= 1
    assert delta(before, again, "siglip_model_batch_size_sum", encoder="images") >= 3


def test_metrics_say_which_backend_and_decode_path_run(service, tiny_checkpoint):
    info = [(dict(lab), v) for (n, lab), v in scrape(service).items() if n == "siglip_model_info"]
    assert len(info) == 1 and info[0][1] == 1, info
    labels = info[0][0]
    assert labels["model"] == str(tiny_checkpoint) and labels["device"] == "cpu" and labels["dtype"] == "float32"
    assert labels["jpeg_decode"] == "gateway" and labels["backend"], labels


def test_refusals_401_429_504_are_counted_by_reason(strict, image_server):
    slow = image_server.add("/observability/slow.png", Route(encode(make_image(52)), delay_s=3.0))
    before = scrape(strict)
    assert strict.client.post("/", json={"inputs": "a"}).status_code == 401
    holder: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: holder.append(
        strict.client.post("/image_embedding", json={"inputs": slow}, headers=AUTH)))
    worker.start()
    deadline = time.monotonic() + 10
    while not image_server.hits.get("/observability/slow.png") and time.monotonic() < deadline:
        time.sleep(0.02)  # the slow request is fetching its image: it holds the one slot
    assert image_server.hits.get("/observability/slow.png"), "the slow request never fetched its image"
    busy = strict.client.post("/", json={"inputs": "b"}, headers=AUTH)
    worker.join()
    assert busy.status_code == 429, busy.text
    assert holder[0].status_code == 504, holder[0].text
    after = scrape(strict)
    assert delta(before, after, "siglip_errors_total", status="401", reason="unauthorized") == 1
    assert delta(before, after, "siglip_errors_total", status="429", reason="overloaded") >= 1
    assert delta(before, after, "siglip_errors_total", status="504", reason="deadline") == 1
    assert delta(before, after, "siglip_requests_total", route="/image_embedding", mode="image_embedding",
                 status="504") == 1


def _log_records(svc) -> list[dict]:
    out = []
    for line in svc.log().splitlines():
        start = line.find('{"request_id"')
        if start >= 0:
            out.append(json.JSONDecoder().raw_decode(line[start:])[0])  # BentoML appends " (trace=...)"
    return out


def test_one_structured_log_line_per_request_without_tokens_or_image_data(strict):
    png = b64(encode(make_image(53)))
    rid = "log-check-7f3a"
    r = strict.client.post("/", json={"inputs": png, "parameters": {"candidate_labels": ["a", "b"]}},
                           headers={**AUTH, "X-Request-ID": rid})
    assert r.status_code == 200, r.text
    strict.client.post("/", json={"inputs": "x"}, headers={"X-Request-ID": rid + "-401"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(x["request_id"] == rid + "-401" for x in _log_records(strict)):
        time.sleep(0.1)
    records = _log_records(strict)
    mine = [x for x in records if x["request_id"] == rid]
    assert len(mine) == 1, records[-5:]
    line = mine[0]
    assert line["mode"] == "zero_shot" and line["images"] == 1 and line["texts"] == 2
    assert line["status"] == 200 and line["path"] == "/" and line["method"] == "POST" and line["duration_ms"] > 0
    refused = [x for x in records if x["request_id"] == rid + "-401"]
    assert len(refused) == 1 and refused[0]["status"] == 401 and refused[0]["reason"] == "unauthorized"
    log = strict.log()
    assert TOKEN not in log and png[:64] not in log
    assert not any(x["path"] in ("/readyz", "/metrics") for x in records)


def test_docs_page_has_no_tag_manager_and_loads_only_local_assets(service):
    r = httpx.get(service.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "googletagmanager" not in page and "gtm" not in page.lower()
    assert "validatorUrl: null" in page
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset in ("static_content/swagger-ui-bundle.js", "static_content/swagger-ui-standalone-preset.js",
                  "static_content/swagger-ui.css", "docs.json"):
        assert asset in page
        assert httpx.get(f"{service.url}/{asset}", timeout=10).status_code == 200, asset
    assert "https://" not in page and "http://" not in page


unprobed = server_fixture("unprobed", ready=False, doc="Defaults, and nothing here asks its /readyz.")


def test_model_info_reaches_metrics_without_readiness_probes(unprobed):
    """Found in review: the info was recorded while the batchers trained, which only a /readyz poll starts, so a
    plain `docker run` never said which backend or decode path ran."""
    svc = unprobed
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and "Loaded " not in svc.log():
        time.sleep(0.25)  # the model service logs this line when its model is loaded; /readyz is never asked
    assert "Loaded " in svc.log(), svc.log()[-3000:]
    info = []
    while time.monotonic() < deadline and not info:
        try:
            info = [lab for (n, lab), v in scrape(svc).items() if n == "siglip_model_info" and v == 1]
        except (httpx.HTTPError, AssertionError):
            pass
        if not info:
            time.sleep(0.25)
    assert info and dict(info[0])["backend"] in ("torch", "openvino"), info  # auto: openvino on bf16 CPUs

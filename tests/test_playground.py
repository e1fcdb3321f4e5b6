"""GET /playground in a real headless browser (Debian's chromium driven by Playwright) against a real server.

Every number the page shows is checked against the API's own answer to the same request, posted here with httpx;
the curl command the page shows is run with bash and must give that answer too.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from conftest import ROOT, TOKENS, Route, b64, encode, make_image
from PIL import Image, ImageDraw

from siglip.server import playground
from siglip.server.http import OPEN_PATHS

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections are refused by the closed network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = TOKENS[0]  # the shared auth server's


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


try:
    from playwright.sync_api import FileChooser, Page, expect, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator:
    if sync_playwright is None:
        _unavailable("playwright is not installed: pip install 'playwright==1.65.2' (no `playwright install`: "
                     "the tests use Debian's chromium)")
    if not CHROMIUM.exists():
        _unavailable("chromium is not installed: apt-get update && apt-get install -y chromium")
    with sync_playwright() as driver:
        yield driver


@dataclass
class Browser:
    """A page in a fresh Chromium profile, recording console errors and every request the page makes."""

    page: Page
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    posts: list[tuple[str, dict]] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests
                if urlsplit(u).scheme not in ("data", "blob") and not u.startswith(self.origin + "/")]

    def submit(self, selector: str) -> str:
        """Click and wait for the answer; returns the output state ("done" or "error")."""
        self.page.click(selector)
        self.page.wait_for_selector("#output:not([data-state=busy]):not([data-state=idle])")
        return self.page.get_attribute("#output", "data-state")

    def last_post(self) -> tuple[str, dict]:
        return self.posts[-1]


@pytest.fixture
def open_page(playwright_driver, tmp_path) -> Iterator:
    contexts = []

    def open_(server, wait_ready: bool = True) -> Browser:
        profile = tmp_path / f"profile-{len(contexts)}"
        profile.mkdir()  # empty user data dir
        context = playwright_driver.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=FLAGS, headless=True, accept_downloads=True,
            viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page = context.pages[0] if context.pages else context.new_page()
        b = Browser(page, server.url)
        page.on("request", lambda r: b.requests.append(r.url))
        page.on("request", lambda r: r.method == "POST" and b.posts.append(
            (urlsplit(r.url).path, json.loads(r.post_data))))
        page.on("console", lambda m: m.type == "error" and b.errors.append(m.text))
        page.on("pageerror", lambda e: b.errors.append(f"uncaught: {e}"))
        page.goto(server.url + "/playground")
        if wait_ready:
            page.wait_for_selector("#status[data-state=ready]")
        return b

    yield open_
    for context in contexts:
        context.close()


def press_for_file_chooser(b: Browser, key: str) -> FileChooser:
    """Press `key` on the focused file input; the file chooser it opens.

    Playwright turns file-chooser interception on asynchronously once a listener subscribes, so a press that lands
    first opens headless Chromium's own chooser, which cancels at once, and the event never comes (seen once in CI).
    That the key activates the input is checked through the input's click event, every time; only a chooser lost to
    that race is asked for again, with the listener already in place.
    """
    b.page.evaluate("""() => { window.fileClicks = 0;
        document.getElementById("file").addEventListener("click", () => { window.fileClicks += 1; }); }""")
    choosers: list[FileChooser] = []

    def keep(chooser: FileChooser) -> None:
        choosers.append(chooser)

    b.page.on("filechooser", keep)
    try:
        for attempt in range(3):
            b.page.keyboard.press(key)
            b.page.wait_for_function("n => window.fileClicks > n", arg=attempt)
            if choosers:
                return choosers[0]
            try:
                return b.page.wait_for_event("filechooser", timeout=10_000)
            except PlaywrightTimeoutError:
                continue
    finally:
        b.page.remove_listener("filechooser", keep)
    raise AssertionError(f"{key} on #file clicked it {attempt + 1} times but no file chooser opened")


def add_files(b: Browser, files: list[tuple[str, bytes, str]]) -> None:
    items = b.page.locator("#images li")
    before = items.count()
    b.page.set_input_files("#file", files=[{"name": n, "mimeType": t, "buffer": d} for n, d, t in files])
    expect(items).to_have_count(before + len(files))


def set_labels(b: Browser, selector: str, values: list[str]) -> None:
    b.page.fill(selector, "\n".join(values))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def shown_bars(b: Browser) -> list[list[tuple[str, str]]]:
    return b.page.eval_on_selector_all(
        "#result .bars", "lists => lists.map(l => Array.from(l.querySelectorAll('li')).map("
        "li => [li.querySelector('.label').textContent, li.querySelector('.score').textContent]))")


def assert_shown(shown: list[str], values: list[float]) -> None:
    """The page shows 4 decimals, or 4 significant digits below 0.001."""
    assert len(shown) == len(values)
    for text, value in zip(shown, values, strict=True):
        assert math.isclose(float(text), value, rel_tol=6e-4, abs_tol=5e-5), (text, value)


def api(server, path: str, body: dict, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def run_curl(command: str, cwd: Path, token: str | None = None) -> object:
    env = {"PATH": os.environ["PATH"], **({"SIGLIP_API_TOKEN": token} if token else {})}
    # Through stdin, as when pasted into a shell: as an argument, a command over 128 KB would not even start.
    out = subprocess.run(["bash"], input=command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_close(a, b, tol: float = 1e-6) -> None:
    """Same JSON structure; numbers within ``tol``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, abs_tol=tol), (a, b)
    else:
        assert a == b


# -----------------------------------------------------------------------------------------------------------
# serving
# -----------------------------------------------------------------------------------------------------------
def test_every_page_path_is_open_and_shipped():
    """The guard lets the static files through without a token, and each one exists in siglip/server/static."""
    assert playground.PATHS <= OPEN_PATHS
    for filename, _ in playground.FILES.values():
        assert (playground.STATIC / filename).is_file()
    assert "playground" not in str(sorted(OPEN_PATHS - playground.PATHS))  # nothing else opened under it


def test_page_is_served_without_breaking_the_api(service):
    page = httpx.get(service.url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for path in ("/playground/playground.js", "/playground/playground.css"):
        assert httpx.get(service.url + path).status_code == 200
    assert httpx.head(service.url + "/playground").status_code == 200
    assert httpx.post(service.url + "/playground").status_code == 405
    # The mount claims only its exact paths: the API, its docs and the schema are as before.
    assert httpx.get(service.url + "/playground/other").status_code == 404
    spec = httpx.get(service.url + "/docs.json").json()
    assert {"/", "/zero_shot", "/similarity", "/text_embedding", "/image_embedding"} <= set(spec["paths"])
    # ... and it lists every route the gateway serves besides them, under this project's name and version
    assert {"/v1/embeddings", "/v1/models", "/v1/models/{model}", "/info", "/playground"} <= set(spec["paths"])
    assert not any(p.startswith("/playground/") for p in spec["paths"])
    assert spec["info"]["title"] == "siglip2-serve API" and spec["info"]["version"] == version("siglip2-serve")
    assert "http" not in spec["info"]["description"]  # no badges or links to other hosts
    request = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(spec["components"]["schemas"][request["$ref"].rsplit("/", 1)[1]]["properties"]) >= {"input", "model"}
    assert httpx.get(service.url + "/").status_code == 200
    emb = service.post("/", {"inputs": "a cat", "parameters": {"mode": "text_embedding"}})
    assert emb.status_code == 200 and len(emb.json()[0]["embedding"]) > 0


# -----------------------------------------------------------------------------------------------------------
# the page against the API
# -----------------------------------------------------------------------------------------------------------
def test_page_loads_and_talks_only_to_its_own_origin(service, open_page):
    b = open_page(service)
    assert b.page.title() == "SigLIP 2 playground"
    # what is served, from GET /info
    b.page.wait_for_selector("#status:has-text('32-dim embeddings')")
    assert "(SigLIP 2, 64x64 images, 32-dim embeddings) on cpu, " in b.page.inner_text("#status")
    # The style sheet applied (same-origin asset, allowed by the page's CSP).
    assert b.page.eval_on_selector("#drop", "e => getComputedStyle(e).borderStyle") == "dashed"
    b.page.fill("#text", "a photo of a cat")
    assert b.submit("#text-embedding-form button") == "done"
    assert b.errors == []
    assert b.foreign_requests() == []
    assert {urlsplit(u).path for u in b.requests} >= {"/playground", "/playground/playground.js",
                                                      "/playground/playground.css", "/readyz", "/info",
                                                      "/text_embedding"}


def noisy_png(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A PNG that does not compress: its base64 (~300 KB) is over the 128 KB a shell argument may have."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"))


def test_zero_shot_bars_show_the_api_scores(service, open_page, tmp_path):
    png = noisy_png(3)
    assert len(b64(png)) > 131072
    labels = ["a red square", "a blue gradient", "a photo of a dog", "a wooden floor"]
    b = open_page(service)
    add_files(b, [("tiles.png", png, "image/png")])
    set_labels(b, "#labels", labels)
    b.page.fill("#template", "A picture of {}.")
    assert b.submit("#zero-shot-form button") == "done"

    expected_body = {"inputs": data_uri(png), "parameters": {"candidate_labels": labels,
                                                              "hypothesis_template": "A picture of {}."}}
    assert b.last_post() == ("/zero_shot", expected_body)
    answer = api(service, "/zero_shot", expected_body).json()
    [bars] = shown_bars(b)
    assert [label for label, _ in bars] == [s["label"] for s in answer]  # the API's order: by score
    assert_shown([score for _, score in bars], [s["score"] for s in answer])
    # The bars' lengths follow the scores (softmax: a fraction of the full track).
    widths = b.page.eval_on_selector_all(
        "#result .bars li", "items => items.map(li => li.querySelector('.bar').getBoundingClientRect().width"
        " / li.querySelector('.track').getBoundingClientRect().width)")
    assert widths == pytest.approx([s["score"] for s in answer], abs=0.01)

    # The base64 body is long: shortened on screen, whole in the copied command and in body.json.
    shown = b.page.inner_text("#curl")
    assert len(shown) < 2000 and "more characters]" in shown
    b.page.click("#copy")
    b.page.wait_for_selector("#copied:has-text('Copied')")
    copied = b.page.evaluate("navigator.clipboard.readText()")
    assert b64(png) in copied
    assert_close(run_curl(copied, tmp_path), answer)
    with b.page.expect_download() as download:
        b.page.click("#download")
    (tmp_path / "body.json").write_bytes(Path(download.value.path()).read_bytes())
    assert json.loads((tmp_path / "body.json").read_text()) == expected_body
    file_command = b.page.inner_text("#curl-file")
    assert "@body.json" in file_command
    assert_close(run_curl(file_command, tmp_path), answer)

    # Sigmoid scores of a random model are tiny: shown with significant digits, not as 0.0000.
    b.page.select_option("#function", "sigmoid")
    assert b.submit("#zero-shot-form button") == "done"
    sigmoid_body = {**expected_body, "parameters": {**expected_body["parameters"], "function_to_apply": "sigmoid"}}
    assert b.last_post() == ("/zero_shot", sigmoid_body)
    answer = api(service, "/zero_shot", sigmoid_body).json()
    [bars] = shown_bars(b)
    assert [label for label, _ in bars] == [s["label"] for s in answer]
    assert_shown([score for _, score in bars], [s["score"] for s in answer])
    assert b.errors == [] and b.foreign_requests() == []


def test_similarity_heat_map_from_pasted_dropped_and_url_images(service, open_page, image_server):
    """Three ways in (clipboard paste, drag and drop, URL); the heat map shows the API's matrix."""
    pasted, dropped = encode(make_image(5)), encode(make_image(6), "JPEG", quality=90)
    url = image_server.add("/playground/seven.png", Route(encode(make_image(7))))
    texts = ["a red square", "a blue gradient", "a photo of a dog"]
    b = open_page(service)
    b.page.evaluate("""([pasted, dropped]) => {
        const file = (b64, name, type) => new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type});
        const paste = new DataTransfer();
        paste.items.add(file(pasted, "pasted.png", "image/png"));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: paste, bubbles: true}));
        const drop = new DataTransfer();
        drop.items.add(file(dropped, "dropped.jpg", "image/jpeg"));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true}));
    }""", [b64(pasted), b64(dropped)])
    expect(b.page.locator("#images li")).to_have_count(2)
    b.page.fill("#url", url)
    b.page.press("#url", "Enter")  # keyboard submit
    expect(b.page.locator("#images li")).to_have_count(3)
    set_labels(b, "#texts", texts)
    assert b.submit("#similarity-form button") == "done"

    expected_body = {"inputs": {"images": [data_uri(pasted), data_uri(dropped, "image/jpeg"), url], "texts": texts}}
    assert b.last_post() == ("/similarity", expected_body)
    matrix = api(service, "/similarity", expected_body).json()["similarity_scores"]
    shown = b.page.eval_on_selector_all(
        "table.heat tbody tr", "rows => rows.map(r => Array.from(r.querySelectorAll('td')).map(td => td.textContent))")
    assert [len(row) for row in shown] == [len(texts)] * 3
    assert_shown([x for row in shown for x in row], [x for row in matrix for x in row])
    headers = b.page.eval_on_selector_all("table.heat thead th", "ths => ths.map(th => th.textContent)")
    assert headers == texts
    # Darker cells for larger similarities.
    lightness = b.page.eval_on_selector_all(
        "table.heat tbody td", "tds => tds.map(td => getComputedStyle(td).backgroundColor)")
    flat = np.array(matrix).ravel()
    assert lightness[int(flat.argmax())] != lightness[int(flat.argmin())]
    assert b.errors == [] and b.foreign_requests() == []


def test_embeddings_show_norm_and_first_values(service, open_page, tmp_path):
    text = "rustic oak wood flooring"
    b = open_page(service)
    b.page.fill("#text", text)
    assert b.submit("#text-embedding-form button") == "done"
    answer = api(service, "/text_embedding", {"inputs": text}).json()
    assert float(b.page.inner_text("#result .norm")) == pytest.approx(1.0, abs=1e-3)
    assert_shown(b.page.inner_text("#result .first").split(", "), answer[0]["embedding"][:8])
    assert b.page.inner_text("#result .dims") == str(len(answer[0]["embedding"]))
    # A short body is shown whole: the command on screen is the one to paste.
    assert_close(run_curl(b.page.inner_text("#curl"), tmp_path), answer)
    assert not b.page.is_visible("#curl-file")

    # The file picker by keyboard alone: tab to it, press space.
    png = encode(make_image(9))
    b.page.focus("#text")
    for _ in range(10):
        if b.page.evaluate("() => document.activeElement.id") == "file":
            break
        b.page.keyboard.press("Shift+Tab")
    assert b.page.evaluate("() => document.activeElement.id") == "file"
    chooser = press_for_file_chooser(b, "Space")
    chooser.set_files(files=[{"name": "nine.png", "mimeType": "image/png", "buffer": png}])
    expect(b.page.locator("#images li")).to_have_count(1)
    assert b.submit("#image-embedding") == "done"
    assert b.last_post() == ("/image_embedding", {"inputs": [data_uri(png)]})
    vector = api(service, "/image_embedding", {"inputs": [data_uri(png)]}).json()[0]["embedding"]
    assert float(b.page.inner_text("#result .norm")) == pytest.approx(1.0, abs=1e-3)
    assert_shown(b.page.inner_text("#result .first").split(", "), vector[:8])
    assert b.errors == [] and b.foreign_requests() == []


def test_bad_image_shows_the_api_error_text(service, open_page):
    broken = b"\x89PNG\r\n\x1a\n" + b"this is not really a PNG" * 4
    b = open_page(service)
    add_files(b, [("broken.png", broken, "image/png")])
    set_labels(b, "#labels", ["a cat", "a dog"])
    assert b.submit("#zero-shot-form button") == "error"
    body = {"inputs": data_uri(broken), "parameters": {"candidate_labels": ["a cat", "a dog"]}}
    assert b.last_post() == ("/zero_shot", body)
    expected = api(service, "/zero_shot", body)
    assert expected.status_code == 400
    assert b.page.inner_text("#error-message") == expected.json()["error"]
    assert "400" in b.page.inner_text("#error-status")
    assert b.page.locator("#result .bars").count() == 0


def test_no_image_is_refused_in_the_page(service, open_page):
    b = open_page(service)
    assert b.submit("#zero-shot-form button") == "error"
    assert "Add an image first" in b.page.inner_text("#error-message")
    assert b.posts == []


def test_page_waits_for_readiness(service, open_page, playwright_driver):
    """While /readyz answers 503 the page says the model is loading, and says "ready" once it is."""
    state = {"loading": True}

    def readyz(route):
        if state["loading"]:
            return route.fulfill(status=503, content_type="application/json",
                                 body='{"error": "model is loading"}')
        return route.continue_()

    b = open_page(service, wait_ready=False)
    b.page.route("**/readyz", readyz)
    b.page.reload()
    b.page.wait_for_selector("#status[data-state=loading]")
    assert "503" in b.page.inner_text("#status")
    state["loading"] = False
    b.page.wait_for_selector("#status[data-state=ready]", timeout=15_000)


# -----------------------------------------------------------------------------------------------------------
# auth on
# -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_service(authed):
    return authed


def test_with_auth_the_page_loads_and_the_token_is_needed(auth_service, open_page, tmp_path):
    assert httpx.get(auth_service.url + "/playground").status_code == 200
    b = open_page(auth_service)
    assert b.errors == []
    # /info is open like /readyz: the page says what answers before the token is typed
    assert httpx.get(auth_service.url + "/info").json()["family"] == "SigLIP 2"
    b.page.wait_for_selector("#status:has-text('64x64 images')")

    b.page.fill("#text", "a token-protected text")
    assert b.submit("#text-embedding-form button") == "error"
    refused = api(auth_service, "/text_embedding", {"inputs": "a token-protected text"})
    assert refused.status_code == 401
    assert b.page.inner_text("#error-message") == refused.json()["error"]
    assert "401" in b.page.inner_text("#error-status")

    b.page.fill("#token", TOKEN)
    assert b.submit("#text-embedding-form button") == "done"
    answer = api(auth_service, "/text_embedding", {"inputs": "a token-protected text"}, token=TOKEN).json()
    assert_shown(b.page.inner_text("#result .first").split(", "), answer[0]["embedding"][:8])
    # The command names the token through the shell, never spells it out; with it set, it gives the answer.
    command = b.page.inner_text("#curl")
    assert TOKEN not in command and "$SIGLIP_API_TOKEN" in command
    assert_close(run_curl(command, tmp_path, token=TOKEN), answer)
    # The token is kept in the page only: no storage, no cookies.
    assert b.page.evaluate("sessionStorage.length + localStorage.length") == 0 and b.page.context.cookies() == []
    assert b.foreign_requests() == []


# -----------------------------------------------------------------------------------------------------------
# the README screenshot
# -----------------------------------------------------------------------------------------------------------
def floor_photo() -> bytes:
    """A tiled floor in perspective-free plan view: beige tiles with small shade changes and grey grout."""
    rng = np.random.default_rng(1)
    img = Image.new("RGB", (480, 360), (150, 145, 138))
    draw = ImageDraw.Draw(img)
    for row in range(6):
        for col in range(8):
            shade = rng.integers(-12, 12)
            x, y = col * 60 + 3, row * 60 + 3
            draw.rectangle([x, y, x + 54, y + 54], fill=(222 + shade, 205 + shade, 178 + shade))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def test_screenshot(service, open_page, tmp_path):
    """A realistic state with bars; SIGLIP_PLAYGROUND_SCREENSHOT=docs/playground.png refreshes the README's."""
    b = open_page(service)
    add_files(b, [("floor.jpg", floor_photo(), "image/jpeg")])
    assert b.submit("#zero-shot-form button") == "done"
    assert b.page.locator("#result .bars li").count() == 3
    b.page.evaluate("() => window.scrollTo(0, 0)")
    out = tmp_path / "playground.png"
    b.page.screenshot(path=str(out), full_page=False)
    with Image.open(out) as shot:
        assert shot.size == (1280, 900)
    target = os.environ.get("SIGLIP_PLAYGROUND_SCREENSHOT")
    if target:
        shutil.copyfile(out, ROOT / target)

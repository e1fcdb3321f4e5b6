"""HTTP contract tests: every example and rule of shared/spec/siglip2-api-spec.txt, checked against the
transformers reference on the same (tiny) checkpoint. The service runs in this process (``in_process``: BentoML's
app for the gateway over an ASGI transport); the spec's own Python client example runs against the real server.

Images come from the loopback ``image_server``; no traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from conftest import Route, b64, cosine, encode, make_image
from PIL import Image

EMBED_DIM = 32  # the tiny checkpoint (the real model has 768)


@pytest.fixture(scope="module")
def service(in_process):
    """The contract's service, in this process: fp32 (exact parity with the reference), loopback URLs allowed."""
    return in_process(SIGLIP_DTYPE="float32", SIGLIP_ALLOW_PRIVATE_URLS="1")


@pytest.fixture(scope="module", autouse=True)
def log_start(service) -> int:
    """Where this module's log lines begin (the in-process service is shared with other modules)."""
    return len(service.log().splitlines())
COS_MIN = 0.9999
SCORE_ATOL = 1e-4

CATALOG_LABELS = [
    "ceramic floor tile",
    "porcelain wall tile",
    "natural stone slab",
    "mosaic tile sheet",
    "wood laminate plank",
    "vinyl flooring",
    "heat pump outdoor unit",
    "heat pump indoor unit",
    "technical diagram",
    "company logo",
]
PRODUCT_DESCRIPTIONS = [
    "matte finish ceramic tile 60x60cm",
    "glossy white porcelain tile",
    "rustic oak wood flooring",
    "inverter heat pump 12kW",
]
MATCH_TEXTS = [
    "beige ceramic floor tile with matte finish",
    "white glossy porcelain wall tile",
    "gray natural stone tile with rough texture",
    "colorful mosaic glass tile",
]
DEFAULT_TEMPLATE = "This is a photo of {}."
MISSING_LABELS = {"error": "candidate_labels is required for zero-shot classification"}
NONE_IMAGE = {"error": "Unsupported image input type: <class 'NoneType'>"}
UNKNOWN_MODE = {"error": "Unknown mode: invalid_mode. Supported: zero_shot, image_embedding, text_embedding, "
                         "similarity"}
MODES = ("zero_shot", "image_embedding", "text_embedding", "similarity")


# ---------------------------------------------------------------------------------------------------------------
# fixtures and checks
# ---------------------------------------------------------------------------------------------------------------
class Served:
    """An image served by the loopback server: its URL, its bytes, and the picture as PIL decodes those bytes
    (what the reference must see: JPEG is lossy)."""

    def __init__(self, image_server, path: str, img: Image.Image, fmt: str):
        self.data = encode(img, fmt)
        self.url = image_server.add(path, self.data)
        self.image = Image.open(io.BytesIO(self.data))
        self.image.load()
        self.b64 = b64(self.data)


@pytest.fixture(scope="module")
def catalog(image_server) -> dict[str, Served]:
    return {
        "tile-001": Served(image_server, "/contract/tile-001.jpg", make_image(101, (160, 120)), "JPEG"),
        "tile-002": Served(image_server, "/contract/tile-002.png", make_image(102, (120, 160)), "PNG"),
        "tile-003": Served(image_server, "/contract/tile-003.jpg", make_image(103, (200, 90)), "JPEG"),
        "unknown": Served(image_server, "/contract/unknown-product.png", make_image(104, (80, 80)), "PNG"),
    }


def ok(r: httpx.Response):
    assert r.status_code == 200, f"{r.status_code}: {r.text}"
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def bad(r: httpx.Response, status: int = 400) -> str:
    """The response is ``status`` with a body of exactly {"error": <non-empty string>}; returns the message."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"], body
    return body["error"]


def assert_embeddings(result, expected: np.ndarray) -> None:
    """``result`` is [{"embedding": [...]}] matching the reference rows one to one, in order."""
    assert isinstance(result, list) and len(result) == len(expected), result
    for item, ref in zip(result, expected):
        assert set(item) == {"embedding"}, item
        vec = item["embedding"]
        assert len(vec) == EMBED_DIM and all(isinstance(x, float) for x in vec)
        assert abs(np.linalg.norm(vec) - 1) < 1e-4, "embedding is not L2-normalized"
        assert cosine(vec, ref) > COS_MIN
    # Each row matches its own reference better than any other (no reordering between items).
    if len(expected) > 1:
        sims = np.array([[cosine(item["embedding"], ref) for ref in expected] for item in result])
        assert (sims.argmax(axis=1) == np.arange(len(expected))).all(), sims


def assert_ranked(result, expected: list[tuple[str, float]], softmax: bool = True, atol: float = SCORE_ATOL,
                  rtol: float = 0.0) -> None:
    """``result`` is [{"label", "score"}] sorted by score descending, with the reference's score per label."""
    assert isinstance(result, list) and len(result) == len(expected), result
    for item in result:
        assert set(item) == {"label", "score"}, item
        assert isinstance(item["label"], str) and isinstance(item["score"], float)
    scores = [item["score"] for item in result]
    assert scores == sorted(scores, reverse=True), "not sorted by score descending"
    got = {item["label"]: item["score"] for item in result}
    want = dict(expected)
    assert set(got) == set(want)
    for label, score in want.items():
        assert got[label] == pytest.approx(score, abs=atol, rel=rtol), (label, got[label], score)
    if softmax:
        assert abs(sum(scores) - 1) < 1e-6
        assert all(0 <= s <= 1 for s in scores)


def ref_similarity(reference, images: list[Image.Image], texts: list[str]) -> np.ndarray:
    return reference.image_embeds(images) @ reference.text_embeds(texts).T


def assert_similarity(result, expected: np.ndarray) -> None:
    assert set(result) == {"similarity_scores", "image_count", "text_count"}, result
    n_images, n_texts = expected.shape
    assert result["image_count"] == n_images and result["text_count"] == n_texts
    matrix = np.asarray(result["similarity_scores"], dtype=np.float64)
    assert matrix.shape == (n_images, n_texts)
    np.testing.assert_allclose(matrix, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the spec's complete examples
# ---------------------------------------------------------------------------------------------------------------
def test_example_1_classify_product_image(service, catalog, reference):
    tile = catalog["tile-001"]
    r = service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": CATALOG_LABELS}})
    assert_ranked(ok(r), reference.zero_shot(tile.image, CATALOG_LABELS))


def test_example_2_build_product_search_index(service, catalog, reference):
    tiles = [catalog["tile-001"], catalog["tile-002"], catalog["tile-003"]]
    r = service.post("/", {"inputs": [t.url for t in tiles], "parameters": {"mode": "image_embedding"}})
    assert_embeddings(ok(r), reference.image_embeds([t.image for t in tiles]))


def test_example_3_embed_product_descriptions(service, reference):
    r = service.post("/", {"inputs": PRODUCT_DESCRIPTIONS, "parameters": {"mode": "text_embedding"}})
    assert_embeddings(ok(r), reference.text_embeds(PRODUCT_DESCRIPTIONS))


def test_example_4_match_image_to_descriptions(service, catalog, reference):
    product = catalog["unknown"]
    r = service.post("/", {"inputs": {"image": product.url, "texts": MATCH_TEXTS},
                           "parameters": {"mode": "similarity"}})
    result = ok(r)
    assert_similarity(result, ref_similarity(reference, [product.image], MATCH_TEXTS))
    assert result["image_count"] == 1 and result["text_count"] == 4


def test_example_5_python_client(main_server, catalog, reference, tmp_path):
    """The spec's Python client, verbatim but for httpx in place of requests and the loopback URL: over a socket."""
    api_url = main_server.url + "/"
    headers = {"Authorization": "Bearer hf_xxxxx"}

    def classify_product(image_url: str, labels: list[str]) -> list[dict]:
        response = httpx.post(api_url, headers=headers, json={
            "inputs": image_url,
            "parameters": {"candidate_labels": labels},
        }, timeout=60)
        return response.json()

    def get_image_embedding(image_url: str) -> list[float]:
        response = httpx.post(api_url, headers=headers, json={
            "inputs": image_url,
            "parameters": {"mode": "image_embedding"},
        }, timeout=60)
        return response.json()[0]["embedding"]

    def get_text_embedding(text: str) -> list[float]:
        response = httpx.post(api_url, headers=headers, json={
            "inputs": text,
            "parameters": {"mode": "text_embedding"},
        }, timeout=60)
        return response.json()[0]["embedding"]

    def get_similarity(image_url: str, texts: list[str]) -> list[float]:
        response = httpx.post(api_url, headers=headers, json={
            "inputs": {"image": image_url, "texts": texts},
            "parameters": {"mode": "similarity"},
        }, timeout=60)
        return response.json()["similarity_scores"][0]

    def classify_local_image(file_path: str, labels: list[str]) -> list[dict]:
        with open(file_path, "rb") as f:
            image_b64 = base64.b64encode(f.read()).decode()
        response = httpx.post(api_url, headers=headers, json={
            "inputs": image_b64,
            "parameters": {"candidate_labels": labels},
        }, timeout=60)
        return response.json()

    tile, product = catalog["tile-002"], catalog["tile-003"]
    labels = CATALOG_LABELS[:4]
    assert_ranked(classify_product(tile.url, labels), reference.zero_shot(tile.image, labels))

    emb = get_image_embedding(product.url)
    assert len(emb) == EMBED_DIM and cosine(emb, reference.image_embeds([product.image])[0]) > COS_MIN

    emb = get_text_embedding("a photo of ceramic floor tiles")
    assert len(emb) == EMBED_DIM
    assert cosine(emb, reference.text_embeds(["a photo of ceramic floor tiles"])[0]) > COS_MIN

    row = get_similarity(product.url, MATCH_TEXTS)
    np.testing.assert_allclose(row, ref_similarity(reference, [product.image], MATCH_TEXTS)[0], atol=1e-4)

    local = tmp_path / "tile-local.jpg"
    img = make_image(105, (140, 100))
    img.save(local, "JPEG")
    decoded = Image.open(local)
    decoded.load()
    assert_ranked(classify_local_image(str(local), CATALOG_LABELS), reference.zero_shot(decoded, CATALOG_LABELS))


def test_similarity_multiple_images(service, catalog, reference):
    """The spec's "Request (Multiple Images)": [image_count][text_count], row i = image i."""
    images = [catalog["tile-001"], catalog["unknown"]]
    texts = ["ceramic tile", "wood flooring", "heat pump"]
    r = service.post("/", {"inputs": {"images": [i.url for i in images], "texts": texts},
                           "parameters": {"mode": "similarity"}})
    assert_similarity(ok(r), ref_similarity(reference, [i.image for i in images], texts))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_supported_image_formats_by_url_and_base64(service, image_server, reference, fmt):
    img = make_image(110 + len(fmt), (90, 70))
    served = Served(image_server, f"/contract/format.{fmt.lower()}", img, fmt)
    ref = reference.image_embeds([served.image])
    for inputs in (served.url, served.b64):
        r = service.post("/", {"inputs": inputs, "parameters": {"mode": "image_embedding"}})
        assert_embeddings(ok(r), ref)


def test_url_behind_redirect(service, image_server, catalog, reference):
    url = image_server.url(f"/redirect?to={catalog['tile-002'].url}")
    r = service.post("/", {"inputs": url, "parameters": {"mode": "image_embedding"}})
    assert_embeddings(ok(r), reference.image_embeds([catalog["tile-002"].image]))


# ---------------------------------------------------------------------------------------------------------------
# auto-detection (no parameters.mode)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_key,text_key", [("image", "texts"), ("images", "text"), ("image", "text"),
                                                ("images", "texts")])
def test_auto_similarity_from_inputs_keys(service, catalog, reference, image_key, text_key):
    images = [catalog["tile-001"], catalog["tile-002"]] if image_key == "images" else [catalog["tile-001"]]
    texts = MATCH_TEXTS[:3] if text_key == "texts" else MATCH_TEXTS[:1]
    inputs = {image_key: [i.url for i in images] if image_key == "images" else images[0].url,
              text_key: texts if text_key == "texts" else texts[0]}
    assert_similarity(ok(service.post("/", {"inputs": inputs})),
                      ref_similarity(reference, [i.image for i in images], texts))


def test_auto_zero_shot_from_candidate_labels(service, catalog, reference):
    tile = catalog["tile-003"]
    r = service.post("/", {"inputs": tile.b64, "parameters": {"candidate_labels": ["stone", "wood", "logo"]}})
    assert_ranked(ok(r), reference.zero_shot(tile.image, ["stone", "wood", "logo"]))


def test_auto_text_embedding_from_list_of_short_strings(service, reference):
    texts = ["ceramic tile with matte finish", "glossy porcelain tile", "natural wood flooring"]
    assert_embeddings(ok(service.post("/", {"inputs": texts})), reference.text_embeds(texts))


def test_auto_text_embedding_from_single_string(service, reference):
    text = "a photo of ceramic floor tiles"
    assert_embeddings(ok(service.post("/", {"inputs": text})), reference.text_embeds([text]))


def _sentence(length: int) -> str:
    s = ("gray natural stone tile with rough texture and a matte finish. " * 20)[:length]
    assert len(s) == length
    return s


def test_auto_text_under_500_chars_is_text(service, reference):
    text = _sentence(499)
    assert_embeddings(ok(service.post("/", {"inputs": text})), reference.text_embeds([text]))


@pytest.mark.parametrize("length", [500, 600])
def test_auto_long_string_is_treated_as_an_image(service, length):
    """Not "short" (>= 500 chars): image_embedding, so a plain sentence is an image error naming inputs."""
    msg = bad(service.post("/", {"inputs": _sentence(length)}))
    assert msg.startswith("inputs:") and "image" in msg, msg
    # Explicitly asking for text embeds it fine.
    assert len(ok(service.post("/", {"inputs": _sentence(length), "parameters": {"mode": "text_embedding"}}))) == 1


def test_auto_http_url_is_an_image(service, catalog, reference):
    tile = catalog["unknown"]
    assert_embeddings(ok(service.post("/", {"inputs": tile.url})), reference.image_embeds([tile.image]))
    # A list of URLs too (short strings, but with the http prefix).
    tiles = [catalog["tile-001"], catalog["unknown"]]
    assert_embeddings(ok(service.post("/", {"inputs": [t.url for t in tiles]})),
                      reference.image_embeds([t.image for t in tiles]))


@pytest.fixture(scope="module")
def small_pngs() -> list[tuple[str, Image.Image]]:
    out = []
    for seed in (120, 121):
        img = make_image(seed, (16, 16))
        data = b64(encode(img, "PNG"))
        assert len(data) < 500, len(data)  # short enough to pass for text by length alone
        out.append((data, img))
    return out


def test_auto_short_base64_png_is_an_image(service, reference, small_pngs):
    data, img = small_pngs[0]
    assert_embeddings(ok(service.post("/", {"inputs": data})), reference.image_embeds([img]))
    assert_embeddings(ok(service.post("/", {"inputs": [d for d, _ in small_pngs]})),
                      reference.image_embeds([i for _, i in small_pngs]))


def test_auto_data_uri_is_an_image(service, catalog, reference):
    tile = catalog["tile-001"]
    uri = "data:image/jpeg;base64," + tile.b64
    assert_embeddings(ok(service.post("/", {"inputs": uri})), reference.image_embeds([tile.image]))
    data, img = b64(encode(make_image(122, (16, 16)))), make_image(122, (16, 16))
    assert_embeddings(ok(service.post("/", {"inputs": "data:image/png;base64," + data})),
                      reference.image_embeds([img]))


# ---------------------------------------------------------------------------------------------------------------
# batch shapes
# ---------------------------------------------------------------------------------------------------------------
def test_zero_shot_single_image_is_a_flat_list(service, catalog, reference):
    tile = catalog["tile-002"]
    result = ok(service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": CATALOG_LABELS[:3]}}))
    assert all(isinstance(x, dict) for x in result)
    assert_ranked(result, reference.zero_shot(tile.image, CATALOG_LABELS[:3]))


def test_zero_shot_list_of_one_image_is_a_list_of_one_list(service, catalog, reference):
    tile = catalog["tile-002"]
    result = ok(service.post("/", {"inputs": [tile.url], "parameters": {"candidate_labels": CATALOG_LABELS[:3]}}))
    assert isinstance(result, list) and len(result) == 1 and isinstance(result[0], list)
    assert_ranked(result[0], reference.zero_shot(tile.image, CATALOG_LABELS[:3]))


def test_zero_shot_batch_of_three(service, catalog, reference):
    tiles = [catalog["tile-001"], catalog["unknown"], catalog["tile-003"]]
    inputs = [tiles[0].url, tiles[1].b64, tiles[2].url]
    result = ok(service.post("/", {"inputs": inputs, "parameters": {"candidate_labels": CATALOG_LABELS}}))
    assert isinstance(result, list) and len(result) == 3
    for row, tile in zip(result, tiles):
        assert_ranked(row, reference.zero_shot(tile.image, CATALOG_LABELS))


def test_embedding_of_single_input_is_a_list_of_one(service, catalog, reference):
    result = ok(service.post("/", {"inputs": "glossy porcelain tile", "parameters": {"mode": "text_embedding"}}))
    assert_embeddings(result, reference.text_embeds(["glossy porcelain tile"]))
    tile = catalog["tile-001"]
    result = ok(service.post("/", {"inputs": tile.url, "parameters": {"mode": "image_embedding"}}))
    assert_embeddings(result, reference.image_embeds([tile.image]))


def test_text_case_does_not_matter(service):
    """SigLIP 2 text is lowercased: "Glossy TILE" and "glossy tile" embed identically."""
    a = ok(service.post("/", {"inputs": ["Glossy TILE"], "parameters": {"mode": "text_embedding"}}))
    b = ok(service.post("/", {"inputs": ["glossy tile"], "parameters": {"mode": "text_embedding"}}))
    assert cosine(a[0]["embedding"], b[0]["embedding"]) > 0.99999


# ---------------------------------------------------------------------------------------------------------------
# per-mode endpoints
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mode_bodies(catalog) -> dict[str, dict]:
    return {
        "zero_shot": {"inputs": [catalog["tile-001"].url, catalog["tile-002"].b64],
                      "parameters": {"candidate_labels": CATALOG_LABELS[:5]}},
        "image_embedding": {"inputs": [catalog["tile-003"].url, catalog["unknown"].b64], "parameters": {}},
        "text_embedding": {"inputs": PRODUCT_DESCRIPTIONS, "parameters": {}},
        "similarity": {"inputs": {"images": [catalog["tile-001"].url, catalog["unknown"].url],
                                  "texts": MATCH_TEXTS}},
    }


def _numbers(result) -> np.ndarray:
    """All floats of a response, in order (for comparing two answers numerically)."""
    if isinstance(result, dict):
        if "similarity_scores" in result:
            return np.asarray(result["similarity_scores"], dtype=np.float64).ravel()
        return np.concatenate([_numbers(v) for v in result.values()])
    if isinstance(result, list):
        if result and isinstance(result[0], float):
            return np.asarray(result, dtype=np.float64)
        return np.concatenate([_numbers(v) for v in result]) if result else np.zeros(0)
    if isinstance(result, float):
        return np.asarray([result])
    return np.zeros(0)


def _shape(result):
    """The response's structure with numbers erased (labels and counts kept)."""
    if isinstance(result, dict):
        return {k: _shape(v) for k, v in result.items() if k not in ("score", "embedding", "similarity_scores")}
    if isinstance(result, list):
        return [_shape(v) for v in result]
    return None if isinstance(result, float) else result


@pytest.mark.parametrize("mode", MODES)
def test_per_mode_endpoint_matches_root_with_mode(service, mode_bodies, mode):
    body = mode_bodies[mode]
    via_endpoint = ok(service.post(f"/{mode}", body))
    via_root = ok(service.post("/", {**body, "parameters": {**body.get("parameters", {}), "mode": mode}}))
    same_mode = ok(service.post(f"/{mode}", {**body, "parameters": {**body.get("parameters", {}), "mode": mode}}))
    for other in (via_root, same_mode):
        assert _shape(other) == _shape(via_endpoint)
        np.testing.assert_allclose(_numbers(other), _numbers(via_endpoint), atol=1e-5)
    if mode == "similarity":
        assert via_endpoint["image_count"] == 2 and via_endpoint["text_count"] == 4
    elif mode == "zero_shot":
        assert len(via_endpoint) == 2 and all(len(row) == 5 for row in via_endpoint)
    else:
        assert len(via_endpoint) == len(body["inputs"])


@pytest.mark.parametrize("endpoint,requested", [(e, r) for e in MODES for r in MODES if e != r])
def test_per_mode_endpoint_rejects_a_different_parameters_mode(service, mode_bodies, endpoint, requested):
    body = mode_bodies[endpoint]
    msg = bad(service.post(f"/{endpoint}", {**body, "parameters": {**body.get("parameters", {}),
                                                                      "mode": requested}}))
    assert requested in msg and endpoint in msg, msg


def test_per_mode_endpoint_forces_its_mode_over_auto_detection(service, reference):
    """/image_embedding given a short text does not auto-detect text: it is an image error."""
    msg = bad(service.post("/image_embedding", {"inputs": "a cat"}))
    assert msg.startswith("inputs:"), msg
    assert_embeddings(ok(service.post("/text_embedding", {"inputs": "a cat"})), reference.text_embeds(["a cat"]))


def test_zero_shot_endpoint_without_labels(service, catalog):
    assert service.post("/zero_shot", {"inputs": catalog["tile-001"].url}).json() == MISSING_LABELS


# ---------------------------------------------------------------------------------------------------------------
# parameters: top_k, function_to_apply, hypothesis_template
# ---------------------------------------------------------------------------------------------------------------
def test_top_k(service, catalog, reference):
    tile = catalog["tile-001"]
    expected = reference.zero_shot(tile.image, CATALOG_LABELS)
    result = ok(service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": CATALOG_LABELS,
                                                                       "top_k": 3}}))
    assert len(result) == 3
    scores = [x["score"] for x in result]
    assert scores == sorted(scores, reverse=True)
    full = dict(expected)
    for item in result:
        assert item["score"] == pytest.approx(full[item["label"]], abs=SCORE_ATOL)
    # The three returned are the three best (up to the tolerance).
    assert min(scores) >= expected[3][1] - SCORE_ATOL
    # top_k larger than the number of labels returns all of them.
    result = ok(service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": CATALOG_LABELS[:2],
                                                                       "top_k": 5}}))
    assert len(result) == 2


def test_function_to_apply_sigmoid(service, catalog, reference):
    tile = catalog["tile-003"]
    labels = CATALOG_LABELS[:6]
    result = ok(service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": labels,
                                                                       "function_to_apply": "sigmoid"}}))
    expected = reference.zero_shot(tile.image, labels, fn="sigmoid")
    # Sigmoid scores of SigLIP's (bias -10) logits are tiny: compare relatively.
    assert_ranked(result, expected, softmax=False, atol=1e-9, rtol=1e-3)
    assert abs(sum(x["score"] for x in result) - 1) > 1e-3, "sigmoid scores should not be normalized"
    assert all(0 < x["score"] < 1 for x in result)


def test_function_to_apply_none_gives_logits(service, catalog, reference):
    tile = catalog["tile-003"]
    labels = CATALOG_LABELS[:6]
    result = ok(service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": labels,
                                                                       "function_to_apply": "none"}}))
    cos = ref_similarity(reference, [tile.image], [DEFAULT_TEMPLATE.format(x) for x in labels])[0]
    logits = cos * np.exp(reference.logit_scale) + reference.logit_bias
    assert_ranked(result, list(zip(labels, logits.tolist())), softmax=False, atol=1e-3)


def test_hypothesis_template(service, catalog, reference):
    tile = catalog["tile-002"]
    labels = ["stone", "wood", "mosaic", "logo"]
    template = "a catalog picture showing {}"
    params = {"candidate_labels": labels, "hypothesis_template": template, "function_to_apply": "none"}
    result = ok(service.post("/", {"inputs": tile.url, "parameters": params}))
    cos = ref_similarity(reference, [tile.image], [template.format(x) for x in labels])[0]
    default = ref_similarity(reference, [tile.image], [DEFAULT_TEMPLATE.format(x) for x in labels])[0]
    scale = np.exp(reference.logit_scale)
    assert np.abs(cos - default).max() * scale > 1e-2, "the template should make a measurable difference"
    assert_ranked(result, list(zip(labels, (cos * scale + reference.logit_bias).tolist())), softmax=False,
                  atol=1e-3)
    # And with the default softmax it matches the reference pipeline with that template.
    params = {"candidate_labels": labels, "hypothesis_template": template}
    assert_ranked(ok(service.post("/", {"inputs": tile.url, "parameters": params})),
                  reference.zero_shot(tile.image, labels, template=template))


def test_unknown_parameters_are_ignored(service, reference):
    r = service.post("/", {"inputs": "a cat", "parameters": {"mode": "text_embedding", "truncation": True}})
    assert_embeddings(ok(r), reference.text_embeds(["a cat"]))


# ---------------------------------------------------------------------------------------------------------------
# the documented errors, exact bodies
# ---------------------------------------------------------------------------------------------------------------
def test_error_missing_candidate_labels(service, catalog):
    tile = catalog["tile-001"]
    for path in ("/", "/zero_shot"):
        r = service.post(path, {"inputs": tile.url, "parameters": {"mode": "zero_shot"}})
        assert r.status_code == 400 and r.json() == MISSING_LABELS, r.text
    r = service.post("/", {"inputs": tile.url, "parameters": {"mode": "zero_shot", "candidate_labels": None}})
    assert r.status_code == 400 and r.json() == MISSING_LABELS, r.text


@pytest.mark.parametrize("body", [
    {"inputs": None, "parameters": {"mode": "image_embedding"}},
    {"inputs": None},
    {"inputs": None, "parameters": {}},
    {"inputs": None, "parameters": None},
], ids=["image_embedding", "auto", "auto-empty-params", "auto-null-params"])
def test_error_null_image_input(service, body):
    r = service.post("/", body)
    assert r.status_code == 400 and r.json() == NONE_IMAGE, r.text
    assert service.post("/image_embedding", {"inputs": None}).json() == NONE_IMAGE


def test_error_unknown_mode(service, catalog):
    for inputs in ("a cat", catalog["tile-001"].url):
        r = service.post("/", {"inputs": inputs, "parameters": {"mode": "invalid_mode"}})
        assert r.status_code == 400 and r.json() == UNKNOWN_MODE, r.text


# ---------------------------------------------------------------------------------------------------------------
# other bad requests: 400 with {"error": ...} naming what is wrong
# ---------------------------------------------------------------------------------------------------------------
def _raw(service, path: str, content: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return service.client.post(path, content=content, headers=headers)


@pytest.mark.parametrize("path", ["/", "/zero_shot", "/text_embedding"])
def test_error_malformed_json(service, path):
    msg = bad(_raw(service, path, b'{"inputs": "a cat", "parameters": {'))
    assert "JSON" in msg, msg
    assert "JSON" in bad(_raw(service, path, b"{'inputs': 'single quotes'}"))


def test_error_empty_body(service):
    assert "empty" in bad(_raw(service, "/", b""))


@pytest.mark.parametrize("content", [b"[1, 2]", b'"a cat"', b"42", b"null"])
def test_error_body_not_an_object(service, content):
    assert "object" in bad(_raw(service, "/", content))


def test_error_missing_inputs(service):
    assert '"inputs"' in bad(service.post("/", {"parameters": {"mode": "text_embedding"}}))
    assert '"inputs"' in bad(service.post("/similarity", {"input": {"image": "x", "texts": ["y"]}}))


def test_error_parameters_not_an_object(service):
    assert "parameters" in bad(service.post("/", {"inputs": "a cat", "parameters": ["text_embedding"]}))


@pytest.mark.parametrize("mode", [None, "image_embedding", "text_embedding", "zero_shot"])
def test_error_empty_inputs_list(service, mode):
    params = {"candidate_labels": ["a"]} if mode == "zero_shot" else {}
    if mode:
        params["mode"] = mode
    msg = bad(service.post("/", {"inputs": [], "parameters": params}))
    assert "inputs" in msg and "empty" in msg, msg


def test_error_bad_base64_names_the_item(service, catalog):
    msg = bad(service.post("/", {"inputs": [catalog["tile-001"].b64, "not base64 at all!!! ###"],
                                 "parameters": {"mode": "image_embedding"}}))
    assert msg.startswith("inputs[1]") and "base64" in msg, msg


def test_error_undecodable_image_bytes(service):
    garbage = b64(b"these bytes are definitely not a picture in any format" * 3)
    msg = bad(service.post("/", {"inputs": garbage, "parameters": {"mode": "image_embedding"}}))
    assert msg.startswith("inputs") and "image" in msg, msg
    truncated = b64(encode(make_image(130, (120, 120)), "PNG")[:200])
    msg = bad(service.post("/", {"inputs": [truncated], "parameters": {"mode": "image_embedding"}}))
    assert msg.startswith("inputs[0]"), msg


def test_error_url_404_names_the_url(service, image_server):
    url = image_server.url("/contract/no-such-image.jpg")
    msg = bad(service.post("/", {"inputs": url, "parameters": {"mode": "image_embedding"}}))
    assert url in msg and "404" in msg, msg


def test_error_url_answering_html(service, image_server):
    url = image_server.add("/contract/page.jpg", Route(b"<!DOCTYPE html><html><body>Not found</body></html>",
                                                       content_type="text/html"))
    msg = bad(service.post("/", {"inputs": {"image": url, "texts": ["a"]}}))
    assert url in msg and "HTML" in msg and "inputs.image" in msg, msg


def test_error_url_in_batch_names_the_index(service, image_server, catalog):
    url = image_server.url("/contract/missing-2.png")
    msg = bad(service.post("/", {"inputs": [catalog["tile-001"].url, url],
                                 "parameters": {"candidate_labels": ["a", "b"]}}))
    assert msg.startswith("inputs[1]") and url in msg, msg


def test_error_unsupported_url_scheme(service):
    msg = bad(service.post("/", {"inputs": "ftp://127.0.0.1/tile.jpg", "parameters": {"mode": "image_embedding"}}))
    assert "ftp" in msg, msg


def test_error_empty_candidate_labels(service, catalog):
    msg = bad(service.post("/", {"inputs": catalog["tile-001"].url, "parameters": {"candidate_labels": []}}))
    assert "candidate_labels" in msg and "empty" in msg, msg


@pytest.mark.parametrize("labels", ["ceramic tile", {"a": 1}, 5])
def test_error_candidate_labels_not_a_list(service, catalog, labels):
    msg = bad(service.post("/", {"inputs": catalog["tile-001"].url, "parameters": {"candidate_labels": labels}}))
    assert "candidate_labels" in msg and "list" in msg, msg


def test_error_candidate_label_not_a_string(service, catalog):
    msg = bad(service.post("/", {"inputs": catalog["tile-001"].url,
                                 "parameters": {"candidate_labels": ["tile", 3]}}))
    assert "candidate_labels[1]" in msg, msg


def test_error_similarity_without_texts(service, catalog):
    url = catalog["tile-001"].url
    msg = bad(service.post("/", {"inputs": {"image": url}, "parameters": {"mode": "similarity"}}))
    assert "inputs.text" in msg, msg
    assert "inputs.text" in bad(service.post("/similarity", {"inputs": {"images": [url]}}))
    assert "inputs.image" in bad(service.post("/similarity", {"inputs": {"texts": ["a"]}}))
    # Without a mode, an object lacking text keys is no similarity request: it is an (unsupported) image.
    assert "Unsupported image input type" in bad(service.post("/", {"inputs": {"image": url}}))


def test_error_similarity_inputs_not_an_object(service):
    msg = bad(service.post("/", {"inputs": ["a", "b"], "parameters": {"mode": "similarity"}}))
    assert "similarity" in msg and "object" in msg, msg


def test_error_similarity_both_single_and_plural(service, catalog):
    url = catalog["tile-001"].url
    msg = bad(service.post("/similarity", {"inputs": {"image": url, "images": [url], "texts": ["a"]}}))
    assert "inputs.image" in msg and "inputs.images" in msg, msg


def test_error_similarity_bad_text_item(service, catalog):
    msg = bad(service.post("/similarity", {"inputs": {"image": catalog["tile-001"].url, "texts": ["a", 7]}}))
    assert "inputs.texts[1]" in msg, msg


@pytest.mark.parametrize("inputs,fragment", [
    (5, "Unsupported image input type: <class 'int'>"),
    ([1, 2], "Unsupported image input type: <class 'int'> (inputs[0])"),
    ({"foo": 1}, "Unsupported image input type: <class 'dict'>"),
    (True, "Unsupported image input type: <class 'bool'>"),
    (["a cat", 3], "(inputs[1])"),
])
def test_error_wrong_input_types(service, inputs, fragment):
    assert fragment in bad(service.post("/", {"inputs": inputs}))


def test_error_wrong_text_types(service):
    assert "inputs[1]" in bad(service.post("/", {"inputs": ["a", None], "parameters": {"mode": "text_embedding"}}))
    assert "text" in bad(service.post("/text_embedding", {"inputs": 5}))


def test_error_empty_string_image(service):
    assert bad(service.post("/", {"inputs": ["  "], "parameters": {"mode": "image_embedding"}})).startswith(
        "inputs[0]")


@pytest.mark.parametrize("params,fragment", [
    ({"top_k": 0}, "top_k"),
    ({"top_k": "3"}, "top_k"),
    ({"function_to_apply": "relu"}, "function_to_apply"),
    ({"hypothesis_template": "no placeholder"}, "hypothesis_template"),
    ({"hypothesis_template": 5}, "hypothesis_template"),
])
def test_error_bad_zero_shot_parameters(service, catalog, params, fragment):
    body = {"inputs": catalog["tile-001"].url, "parameters": {"candidate_labels": ["a", "b"], **params}}
    assert fragment in bad(service.post("/", body))


# ---------------------------------------------------------------------------------------------------------------
# transport details, documentation, and health after all of the above
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None])
def test_curl_style_body_without_json_content_type(service, catalog, reference, content_type):
    tile = catalog["tile-001"]
    body = json.dumps({"inputs": tile.url, "parameters": {"candidate_labels": CATALOG_LABELS}}).encode()
    assert_ranked(ok(_raw(service, "/", body, content_type)), reference.zero_shot(tile.image, CATALOG_LABELS))
    body = json.dumps({"inputs": PRODUCT_DESCRIPTIONS, "parameters": {"mode": "text_embedding"}}).encode()
    assert_embeddings(ok(_raw(service, "/text_embedding", body, content_type)),
                      reference.text_embeds(PRODUCT_DESCRIPTIONS))


def test_docs_json_lists_all_five_routes(service):
    r = service.client.get("/docs.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for route in ("/", "/zero_shot", "/image_embedding", "/text_embedding", "/similarity"):
        assert route in paths and "post" in paths[route], (route, sorted(paths))
        # the photos-as-files bodies beside the JSON one
        content = paths[route]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data", "image/*"} <= content.keys(), (route, sorted(content))
        form = content["multipart/form-data"]["schema"]["properties"]
        assert {"image", "images", "text", "texts", "parameters", "candidate_labels"} <= form.keys()


def test_gateway_routes_are_read_from_what_serves_them(service):
    """The guard, the observer and the uploads app get the routes from the gateway's APIs and the OpenAI app."""
    module = service.module
    assert module.MODE_ROUTES == {"/": None, "/zero_shot": "zero_shot", "/image_embedding": "image_embedding",
                                  "/text_embedding": "text_embedding", "/similarity": "similarity"}
    assert module.API_ROUTES == {*module.MODE_ROUTES, "/v1/embeddings"}


def test_zz_service_healthy_after_all_errors(service, catalog, reference, log_start):
    """Runs last in this module: every bad request above was answered without harming the server."""
    assert service.client.get("/info").status_code == 200  # the model answers (the in-process /readyz does not ask)
    assert service.client.get("/healthz").status_code == 200
    tile = catalog["tile-003"]
    assert_ranked(ok(service.post("/", {"inputs": tile.url, "parameters": {"candidate_labels": CATALOG_LABELS}})),
                  reference.zero_shot(tile.image, CATALOG_LABELS))
    log = "\n".join(service.log().splitlines()[log_start:])
    assert "unexpected error" not in log, "a bad request reached the 500 path"

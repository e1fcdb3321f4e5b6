"""OpenAI-compatible embeddings (``POST /v1/embeddings``, ``GET /v1/models``) with the official ``openai`` SDK
as the client, against a real ``bentoml serve`` on the tiny checkpoint.

Vectors are checked against the service's own ``/text_embedding`` and ``/image_embedding`` and against the
transformers reference; usage against the checkpoint's tokenizer. Images come from data URIs, raw base64 and
the loopback ``image_server``; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import InProcessService, Route, b64, cosine, encode, make_image

COS_MIN = 0.9999
EMBED_DIM = 32  # the tiny checkpoint's embedding size
IMAGE_TOKENS = (64 // 16) ** 2  # tiny checkpoint: 64x64 images, patch 16
LANGCHAIN_FLAG = "check_embedding_ctx_length=False"
TEXTS = ["a photo of a cat", "Rustic OAK wood flooring", "x"]
LONG_TEXT = " ".join(["ceramic floor tile"] * 60)  # far more than 64 tokens


def client_for(svc, api_key: str = "unused", **kw) -> openai.OpenAI:
    """The SDK as users run it for a real server; over the ASGI transport for one in this process."""
    if isinstance(svc, InProcessService):
        kw.setdefault("http_client", svc.client)
    # max_retries=0: a refusal must show as the first answer, not be hidden (or slowed) by the SDK's retries.
    return openai.OpenAI(base_url=str(svc.client.base_url).rstrip("/") + "/v1", api_key=api_key, max_retries=0,
                         timeout=60, **kw)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    return client_for(service)


@pytest.fixture(scope="module")
def model_id(tiny_checkpoint) -> str:
    return str(tiny_checkpoint)  # SIGLIP_MODEL of the test services


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text.lower(), truncation=True, max_length=64)["input_ids"])


@pytest.fixture(scope="module")
def pictures(image_server):
    """Three PNG pictures: the PIL images and their bytes; the third is also served by URL."""
    images = [make_image(seed, size=(80 + 8 * seed, 60)) for seed in (11, 12, 13)]
    pngs = [encode(im) for im in images]
    url = image_server.add("/openai/pic.png", Route(pngs[2]))
    return images, pngs, url


def service_vectors(svc, path: str, inputs) -> np.ndarray:
    r = svc.post(path, {"inputs": inputs})
    assert r.status_code == 200, r.text
    return np.array([item["embedding"] for item in r.json()])


def vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data])


# ---------------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------------
def test_text_sdk_default_is_base64_and_matches_text_embedding(service, client, model_id, reference):
    raw = client.embeddings.with_raw_response.create(model=model_id, input=TEXTS)
    body = raw.http_response.json()
    assert body["object"] == "list" and body["model"] == model_id
    assert all(isinstance(d["embedding"], str) and d["object"] == "embedding" for d in body["data"])
    # base64 is little-endian float32, as the SDK decodes it
    first = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert first.shape == (EMBED_DIM,)

    got = vectors(raw.parse())
    assert got.shape == (len(TEXTS), EMBED_DIM)
    ours = service_vectors(service, "/text_embedding", TEXTS)
    ref = reference.text_embeds(TEXTS)
    for i in range(len(TEXTS)):
        assert cosine(got[i], ours[i]) > COS_MIN
        assert cosine(got[i], ref[i]) > COS_MIN
    np.testing.assert_allclose(got[0], first)


def test_text_float_single_string(service, client, model_id, reference):
    raw = client.embeddings.with_raw_response.create(model=model_id, input="a photo of a dog",
                                                     encoding_format="float")
    body = raw.http_response.json()
    assert len(body["data"]) == 1 and isinstance(body["data"][0]["embedding"], list)
    vec = np.array(body["data"][0]["embedding"])
    assert vec.shape == (EMBED_DIM,)
    assert abs(np.linalg.norm(vec) - 1) < 1e-5
    assert cosine(vec, service_vectors(service, "/text_embedding", "a photo of a dog")[0]) > COS_MIN
    assert cosine(vec, reference.text_embeds(["a photo of a dog"])[0]) > COS_MIN


def test_usage_counts_real_text_tokens(client, model_id, tokenizer):
    texts = ["a cat", LONG_TEXT, ""]
    counts = [token_count(tokenizer, t) for t in texts]
    assert counts[1] == 64 and counts[2] == 1  # truncated at 64 (EOS included); an empty text is just EOS
    resp = client.embeddings.create(model=model_id, input=texts)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(counts)


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def test_images_with_modality_extension(service, client, model_id, reference, pictures):
    images, pngs, url = pictures
    inputs = [data_uri(pngs[0]), b64(pngs[1]), url]  # data URI, raw base64, URL
    resp = client.embeddings.create(model=model_id, input=inputs, extra_body={"modality": "image"})
    got = vectors(resp)
    ours = service_vectors(service, "/image_embedding", inputs)
    ref = reference.image_embeds(images)
    for i in range(3):
        assert cosine(got[i], ours[i]) > COS_MIN
        assert cosine(got[i], ref[i]) > COS_MIN
    assert resp.usage.prompt_tokens == 3 * IMAGE_TOKENS


def test_images_as_typed_items(client, model_id, reference, pictures):
    images, pngs, url = pictures
    resp = client.embeddings.create(model=model_id, encoding_format="float", input=[
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": data_uri(pngs[0])}},
    ])
    got = vectors(resp)
    ref = reference.image_embeds([images[2], images[0]])
    assert cosine(got[0], ref[0]) > COS_MIN and cosine(got[1], ref[1]) > COS_MIN
    assert resp.usage.total_tokens == 2 * IMAGE_TOKENS


def test_mixed_request_keeps_order(client, model_id, reference, tokenizer, pictures):
    images, pngs, _ = pictures
    resp = client.embeddings.create(model=model_id, input=[
        {"type": "text", "text": "a photo of a cat"},
        {"type": "image_url", "image_url": {"url": data_uri(pngs[1])}},
        "rustic oak wood flooring",  # a plain string stays text without "modality": "image"
    ])
    got = vectors(resp)
    text_ref = reference.text_embeds(["a photo of a cat", "rustic oak wood flooring"])
    assert cosine(got[0], text_ref[0]) > COS_MIN
    assert cosine(got[1], reference.image_embeds([images[1]])[0]) > COS_MIN
    assert cosine(got[2], text_ref[1]) > COS_MIN
    expected = token_count(tokenizer, "a photo of a cat") + token_count(tokenizer, "rustic oak wood flooring")
    assert resp.usage.prompt_tokens == expected + IMAGE_TOKENS


def test_image_errors_name_the_item(client, model_id, pictures):
    _, pngs, _ = pictures
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input=[b64(pngs[0]), "bm90IGFuIGltYWdl"],
                                 extra_body={"modality": "image"})
    assert "input[1]" in exc.value.message and exc.value.param == "input"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input=["file:///etc/passwd"], extra_body={"modality": "image"})
    assert "input[0]" in exc.value.message and "file://" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input=[{"type": "image_url", "image_url": {}}])
    assert "input[0].image_url" in exc.value.message and exc.value.param == "input"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input=[{"type": "audio", "audio": "x"}])
    assert "input[0]" in exc.value.message and '"type"' in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input="x", extra_body={"modality": "audio"})
    assert exc.value.param == "modality"


# ---------------------------------------------------------------------------------------------------------------
# request fields
# ---------------------------------------------------------------------------------------------------------------
def test_dimensions_only_the_models_own(client, model_id):
    resp = client.embeddings.create(model=model_id, input="a cat", dimensions=EMBED_DIM, user="user-1")
    assert len(resp.data[0].embedding) == EMBED_DIM
    for bad in (EMBED_DIM // 2, EMBED_DIM * 2, 0):
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model=model_id, input="a cat", dimensions=bad)
        assert exc.value.status_code == 400 and exc.value.param == "dimensions"
        assert "dimensions" in exc.value.message and str(EMBED_DIM) in exc.value.message


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2, 3], [4, 5]]], ids=["one-array", "list-of-arrays"])
def test_token_arrays_refused_with_langchain_hint(client, model_id, tokens):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input=tokens)
    assert LANGCHAIN_FLAG in exc.value.message
    assert exc.value.param == "input" and exc.value.code == "token_ids_not_supported"


def test_empty_input_list_is_400(client, model_id):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model_id, input=[])
    assert "empty" in exc.value.message and exc.value.param == "input"


def test_model_names(client, model_id, tiny_checkpoint):
    resp = client.embeddings.create(model=tiny_checkpoint.name, input="a cat")  # the directory's name
    assert resp.model == model_id  # the served id is echoed
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert exc.value.code == "model_not_found" and model_id in exc.value.message


def test_models_list_and_retrieve(client, model_id, tiny_checkpoint):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].object == "model" and models.data[0].created > 0
    assert client.models.retrieve(tiny_checkpoint.name).id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")


def test_error_shape_for_malformed_bodies(service):
    for body, needle in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "empty"),
                         (b'{"input": "a cat"}', "model")]:
        r = httpx.post(service.url + "/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and needle in error["message"]
    assert r.json()["error"]["param"] == "model"


def test_other_routes_keep_their_error_shape(service):
    r = service.post("/text_embedding", {"inputs": None})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


# ---------------------------------------------------------------------------------------------------------------
# the guard on /v1/*: auth, body size, concurrency
# ---------------------------------------------------------------------------------------------------------------
TOKEN = "openai-test-token"


@pytest.fixture(scope="module")
def guarded(in_process):
    return in_process(SIGLIP_API_TOKEN=TOKEN, SIGLIP_MAX_BODY_BYTES="20000", SIGLIP_MAX_CONCURRENCY="1",
                         SIGLIP_ALLOW_PRIVATE_URLS="1")


def test_bearer_token_is_the_api_key(guarded, model_id):
    good = client_for(guarded, api_key=TOKEN)
    assert len(good.embeddings.create(model=model_id, input="a cat").data) == 1
    assert [m.id for m in good.models.list().data] == [model_id]
    bad = client_for(guarded, api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.embeddings.create(model=model_id, input="a cat")
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_body_limit_is_413_in_openai_shape(guarded, model_id):
    with pytest.raises(openai.APIStatusError) as exc:
        client_for(guarded, api_key=TOKEN).embeddings.create(model=model_id, input=["a cat " * 100] * 50)
    assert exc.value.status_code == 413 and "SIGLIP_MAX_BODY_BYTES" in exc.value.message


def test_busy_is_429_in_openai_shape(guarded, model_id, image_server):
    slow = image_server.add("/openai/slow.png", Route(encode(make_image(5)), delay_s=3.0))
    client = client_for(guarded, api_key=TOKEN)
    first: dict = {}

    def occupy():
        first["resp"] = client.embeddings.create(model=model_id, input=[slow], extra_body={"modality": "image"})

    worker = threading.Thread(target=occupy)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not image_server.hits.get("/openai/slow.png") and time.monotonic() < deadline:
            time.sleep(0.02)  # until the first request is being served (its image is being fetched)
        assert image_server.hits.get("/openai/slow.png"), "the first request never reached the image fetch"
        with pytest.raises(openai.RateLimitError) as exc:
            client.embeddings.create(model=model_id, input="a cat")
        assert exc.value.status_code == 429 and "SIGLIP_MAX_CONCURRENCY" in exc.value.message
    finally:
        worker.join(timeout=60)
    assert len(first["resp"].data) == 1


# ---------------------------------------------------------------------------------------------------------------
# translation (pure): limits count texts and images separately, items are named
# ---------------------------------------------------------------------------------------------------------------
def test_parse_input_limits_and_names():
    from siglip.api.openai_api import InvalidRequest, parse_input
    from siglip.api.requests import Limits

    limits = Limits(max_images=2, max_texts=3, max_text_chars=10)
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/a.png"}}
    parsed = parse_input(["a", image, "b", image, "c"], None, limits)
    assert parsed.texts == ("a", "b", "c") and [i.where for i in parsed.images] == ["input[1]", "input[3]"]
    assert parsed.order == ((False, 0), (True, 0), (False, 1), (True, 1), (False, 2))
    for value, modality, needle in [
        ([image] * 3, None, "3 images in one request, over the limit of 2 (SIGLIP_MAX_IMAGES_PER_REQUEST)"),
        (["a"] * 6, None, "6 inputs in one request"),
        (["a", image, "b", "c", "d"], None, "4 texts in one request, over the limit of 3"),
        (["short", "far too long text"], None, "input[1] is 17 characters, over the limit of 10"),
        (["", "x"], "image", "input[0]: empty string"),
        ({"text": "a"}, None, "input must be a string or a list, not an object"),
    ]:
        with pytest.raises(InvalidRequest) as exc:
            parse_input(value, modality, limits)
        assert needle in exc.value.message and exc.value.param == "input"

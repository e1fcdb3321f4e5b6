"""BentoML's own Python client against the real server: one method per API, named arguments."""

from __future__ import annotations

import io

import bentoml
import numpy as np
import pytest
from conftest import b64, cosine, encode, make_image
from PIL import Image

LABELS = ["ceramic floor tile", "wood laminate plank", "heat pump outdoor unit", "company logo"]
TEXTS = ["glossy white porcelain tile", "rustic oak wood flooring", "inverter heat pump 12kW"]


@pytest.fixture(scope="module")
def client(service):
    c = bentoml.SyncHTTPClient(service.url, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pics(image_server):
    out = []
    for i, fmt in enumerate(["PNG", "JPEG", "PNG"]):
        data = encode(make_image(700 + i, (100, 80)), fmt)
        url = image_server.add(f"/client/pic-{i}.{fmt.lower()}", data)
        img = Image.open(io.BytesIO(data))
        img.load()
        out.append((url, b64(data), img))
    return out


def _assert_ranked(result, expected) -> None:
    assert [x["label"] for x in result] and len(result) == len(expected)
    scores = [x["score"] for x in result]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6
    want = dict(expected)
    assert {x["label"] for x in result} == set(want)
    for x in result:
        assert abs(x["score"] - want[x["label"]]) < 1e-4


def test_client_has_a_method_per_api(client):
    for name in ("infer", "zero_shot", "image_embedding", "text_embedding", "similarity"):
        assert callable(getattr(client, name)), name


def test_client_zero_shot(client, pics, reference):
    url, _, img = pics[0]
    _assert_ranked(client.zero_shot(inputs=url, parameters={"candidate_labels": LABELS}),
                   reference.zero_shot(img, LABELS))
    batch = client.zero_shot(inputs=[url, pics[1][1]], parameters={"candidate_labels": LABELS})
    assert len(batch) == 2
    _assert_ranked(batch[0], reference.zero_shot(img, LABELS))
    _assert_ranked(batch[1], reference.zero_shot(pics[1][2], LABELS))


def test_client_image_embedding(client, pics, reference):
    result = client.image_embedding(inputs=[p[0] for p in pics], parameters={"mode": "image_embedding"})
    expected = reference.image_embeds([p[2] for p in pics])
    assert len(result) == 3
    for item, ref in zip(result, expected):
        assert len(item["embedding"]) == 32 and cosine(item["embedding"], ref) > 0.9999
    # parameters is optional on a per-mode API.
    single = client.image_embedding(inputs=pics[1][1])
    assert len(single) == 1 and cosine(single[0]["embedding"], expected[1]) > 0.9999


def test_client_text_embedding(client, reference):
    result = client.text_embedding(inputs=TEXTS)
    assert len(result) == 3
    for item, ref in zip(result, reference.text_embeds(TEXTS)):
        assert len(item["embedding"]) == 32 and cosine(item["embedding"], ref) > 0.9999


def test_client_similarity(client, pics, reference):
    images = [pics[0][0], pics[2][1]]
    result = client.similarity(inputs={"images": images, "texts": TEXTS})
    assert result["image_count"] == 2 and result["text_count"] == 3
    expected = reference.image_embeds([pics[0][2], pics[2][2]]) @ reference.text_embeds(TEXTS).T
    np.testing.assert_allclose(np.asarray(result["similarity_scores"]), expected, atol=1e-4)


def test_client_infer_auto_detects(client, pics, reference):
    url, _, img = pics[2]
    _assert_ranked(client.infer(inputs=url, parameters={"candidate_labels": LABELS}),
                   reference.zero_shot(img, LABELS))
    emb = client.infer(inputs="a photo of ceramic floor tiles")
    assert len(emb) == 1
    assert cosine(emb[0]["embedding"], reference.text_embeds(["a photo of ceramic floor tiles"])[0]) > 0.9999
    emb = client.infer(inputs=url, parameters={"mode": "image_embedding"})
    assert cosine(emb[0]["embedding"], reference.image_embeds([img])[0]) > 0.9999


@pytest.mark.parametrize("call,expected", [
    (lambda c, url: c.zero_shot(inputs=url, parameters={}),
     "candidate_labels is required for zero-shot classification"),
    (lambda c, url: c.infer(inputs=url, parameters={"mode": "invalid_mode"}),
     "Unknown mode: invalid_mode. Supported: zero_shot, image_embedding, text_embedding, similarity"),
    (lambda c, url: c.image_embedding(inputs=None), "Unsupported image input type: <class 'NoneType'>"),
    (lambda c, url: c.similarity(inputs={"image": url}), "inputs.text"),
], ids=["missing-labels", "unknown-mode", "null-image", "similarity-no-texts"])
def test_client_errors_surface_as_exceptions(client, pics, call, expected):
    with pytest.raises(bentoml.exceptions.BentoMLException) as info:
        call(client, pics[0][0])
    assert expected in str(info.value)
    assert int(getattr(info.value, "error_code", 400)) == 400


def test_client_context_manager_closes(service):
    with bentoml.SyncHTTPClient(service.url, timeout=60) as c:
        assert len(c.text_embedding(inputs="closing time")) == 1

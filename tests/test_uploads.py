"""Images sent as files (siglip.server.uploads): a raw body or a multipart form on the JSON API's routes, through
the same request path: the same answers as base64 JSON, the same limits and error texts, the same metrics."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import b64, encode, make_image
from test_observability import delta, scrape

JPEG = encode(make_image(61, (120, 90)), "JPEG", quality=92)
PNG = encode(make_image(62, (70, 70)))


@pytest.fixture(scope="module")
def service(in_process):
    """Uploads through the request path, in this process (the same settings as the contract tests')."""
    return in_process(SIGLIP_DTYPE="float32", SIGLIP_ALLOW_PRIVATE_URLS="1")


def post_files(service, path: str, files: list[tuple[str, tuple]] | None = None, data=None, **kw) -> httpx.Response:
    """A form to a real server or one in this process (``service.client``)."""
    return service.client.post(path, files=files, data=data, **kw)


def test_a_raw_body_embeds_as_its_base64_does(service):
    raw = service.client.post("/image_embedding", content=JPEG, headers={"Content-Type": "image/jpeg"})
    as_json = service.post("/image_embedding", {"inputs": b64(JPEG)})
    assert raw.status_code == 200, raw.text
    assert np.allclose(raw.json()[0]["embedding"], as_json.json()[0]["embedding"], atol=1e-6)
    # the auto-detecting route takes it too, and parameters come from the query string
    ranked = service.client.post("/", content=JPEG, params={"candidate_labels": '["tile","wood"]'},
                                 headers={"Content-Type": "image/jpeg"})
    assert ranked.status_code == 200 and {r["label"] for r in ranked.json()} == {"tile", "wood"}, ranked.text
    # JSON sent as application/octet-stream (aiohttp's default for bytes) is still JSON
    as_bytes = service.client.post("/text_embedding", content=b'{"inputs": "a tile"}',
                                   headers={"Content-Type": "application/octet-stream"})
    assert as_bytes.status_code == 200 and len(as_bytes.json()) == 1, as_bytes.text


def test_multipart_forms_for_every_image_mode(service):
    files = [("image", ("a.jpg", JPEG, "image/jpeg")), ("image", ("b.png", PNG, "image/png"))]
    emb = post_files(service, "/image_embedding", files)
    want = service.post("/image_embedding", {"inputs": [b64(JPEG), b64(PNG)]}).json()
    assert emb.status_code == 200 and len(emb.json()) == 2, emb.text
    for got, ref in zip(emb.json(), want):
        assert np.allclose(got["embedding"], ref["embedding"], atol=1e-6)

    zs = post_files(service, "/zero_shot", files, data={"candidate_labels": '["tile","wood"]', "top_k": "1"})
    zs_json = service.post("/zero_shot", {"inputs": [b64(JPEG), b64(PNG)],
                                          "parameters": {"candidate_labels": ["tile", "wood"], "top_k": 1}})
    assert zs.status_code == 200, zs.text
    for got, want in zip(zs.json(), zs_json.json()):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
    # repeated plain labels work as well as one JSON list
    repeated = post_files(service, "/zero_shot", files[:1], data={"candidate_labels": ["tile", "wood"]})
    assert repeated.status_code == 200 and len(repeated.json()) == 2 and "label" in repeated.json()[0]

    sim = post_files(service, "/similarity", files, data={"text": ["a tile", "a plank", "a cat"]})
    sim_json = service.post("/similarity", {"inputs": {"images": [b64(JPEG), b64(PNG)],
                                                       "texts": ["a tile", "a plank", "a cat"]}})
    assert sim.status_code == 200 and (sim.json()["image_count"], sim.json()["text_count"]) == (2, 3), sim.text
    assert np.allclose(sim.json()["similarity_scores"], sim_json.json()["similarity_scores"], atol=1e-6)


def test_plural_fields_are_a_batch_even_of_one(service):
    labels = {"candidate_labels": '["tile","wood"]'}
    one = post_files(service, "/zero_shot", [("image", ("a.jpg", JPEG, "image/jpeg"))], data=labels)
    batch = post_files(service, "/zero_shot", [("images", ("a.jpg", JPEG, "image/jpeg"))], data=labels)
    assert one.status_code == batch.status_code == 200, (one.text, batch.text)
    assert "label" in one.json()[0] and len(batch.json()) == 1  # one ranking; a list of one ranking
    assert [r["label"] for r in batch.json()[0]] == [r["label"] for r in one.json()]
    texts = post_files(service, "/", [("texts", (None, "a tile"))])  # a files= part makes httpx send multipart
    assert texts.status_code == 200 and len(texts.json()) == 1, texts.text
    broken = post_files(service, "/zero_shot", [("images", ("broken.jpg", b"\xff\xd8 no", "image/jpeg"))], data=labels)
    assert broken.status_code == 400 and broken.json()["error"].startswith("inputs[0] (broken.jpg): "), broken.text
    for files, data, names in (([("image", ("a.jpg", JPEG, "image/jpeg")), ("images", ("b.png", PNG, "image/png"))],
                                None, "'image' and 'images'"),
                               ([("image", ("a.jpg", JPEG, "image/jpeg"))], {"text": "a", "texts": "b"},
                                "'text' and 'texts'")):
        mixed = post_files(service, "/similarity", files, data=data)
        assert mixed.status_code == 400 and f"form fields {names} both given" in mixed.json()["error"], mixed.text


def test_upload_mistakes_are_400s_that_name_the_item(service):
    broken = post_files(service, "/image_embedding", [("image", ("broken.jpg", b"\xff\xd8 not a jpeg", "image/jpeg"))])
    assert broken.status_code == 400
    assert broken.json()["error"].startswith("inputs (broken.jpg): data is not a supported image"), broken.text
    unknown = post_files(service, "/zero_shot", [("image", ("a.jpg", JPEG, "image/jpeg"))], data={"labels": "x"})
    assert unknown.status_code == 400 and "unknown form field 'labels'" in unknown.json()["error"]
    text_as_image = post_files(service, "/image_embedding", [("image", (None, "not a file"))])
    assert text_as_image.status_code == 400 and "must be a file" in text_as_image.json()["error"]
    empty = service.client.post("/image_embedding", content=b"", headers={"Content-Type": "image/png"})
    assert empty.status_code == 400 and empty.json()["error"] == "inputs: image data is empty"
    nothing = post_files(service, "/image_embedding", data={"top_k": "1"},
                         files=[("parameters", (None, "{}"))])
    assert nothing.status_code == 400 and "no image or text in the form" in nothing.json()["error"]
    deep = post_files(service, "/zero_shot", [("image", ("a.jpg", JPEG, "image/jpeg")),
                                              ("parameters", (None, '{"mode": ' + "[" * 900 + "]" * 900 + "}"))])
    assert deep.status_code == 400 and "nested deeper than" in deep.json()["error"], deep.text
    quoted = post_files(service, "/zero_shot", [("image", ("a.jpg", JPEG, "image/jpeg"))],
                        data={"candidate_labels": ['"tile"', "wood"]})
    assert quoted.status_code == 200 and {r["label"] for r in quoted.json()} == {"tile", "wood"}, quoted.text
    to_text = service.client.post("/text_embedding", content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert to_text.status_code == 400
    assert to_text.json()["error"] == "inputs: an image file was sent where text is expected"
    missing_labels = post_files(service, "/zero_shot", [("image", ("a.jpg", JPEG, "image/jpeg"))])
    assert missing_labels.status_code == 400
    assert missing_labels.json()["error"] == "candidate_labels is required for zero-shot classification"


def test_uploads_keep_the_limits_and_count_in_the_metrics(service, in_process):
    small = in_process(SIGLIP_MAX_IMAGE_BYTES=str(len(JPEG) - 1), SIGLIP_MAX_IMAGES_PER_REQUEST="2",
                       SIGLIP_MAX_BODY_BYTES=str(8 * len(JPEG)), SIGLIP_API_TOKEN="upload-secret")
    auth = {"Authorization": "Bearer upload-secret"}
    one = [("image", ("a.jpg", JPEG, "image/jpeg"))]
    assert post_files(small, "/image_embedding", one).status_code == 401  # no token, no upload
    big = post_files(small, "/image_embedding", one, headers=auth)
    assert big.status_code == 400 and "(a.jpg): image is" in big.json()["error"], big.text
    assert "(SIGLIP_MAX_IMAGE_BYTES)" in big.json()["error"]
    for n in (3, 6):  # one over the limit (the request path's message) and several over (the form parser's)
        files = [("image", (f"{i}.png", PNG, "image/png")) for i in range(n)]
        many = post_files(small, "/image_embedding", files, headers=auth)
        assert many.status_code == 400 and "(SIGLIP_MAX_IMAGES_PER_REQUEST)" in many.json()["error"], many.text
    huge = post_files(small, "/image_embedding", [("image", ("big.jpg", JPEG * 9, "image/jpeg"))], headers=auth)
    assert huge.status_code == 413 and "(SIGLIP_MAX_BODY_BYTES)" in huge.json()["error"], huge.text

    before = scrape(service)
    assert post_files(service, "/", [("image", ("a.jpg", JPEG, "image/jpeg"))]).status_code == 200
    after = scrape(service)
    assert delta(before, after, "siglip_requests_total", route="/", mode="image_embedding", status="200") == 1
    assert delta(before, after, "siglip_images_total", mode="image_embedding") == 1

"""Many concurrent requests of every mode against the real server, each checked against the reference for its
own inputs: a mix-up in cross-request batching (rows given to the wrong request, or in the wrong order) fails.

Crosses the 100-call mark on purpose (bentoml#5540: the inter-service connection used to be replaced every
100 calls while others were in flight, surfacing as 500s).
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import TOKENS, b64, cosine, encode, make_image
from PIL import Image

N_REQUESTS = 160
CONCURRENCY = 32
N_IMAGES = 24
TEMPLATE = "This is a photo of {}."
WORDS = ["ceramic", "porcelain", "stone", "mosaic", "wood", "vinyl", "heat pump", "diagram", "logo", "matte",
         "glossy", "white", "gray", "beige", "rustic", "oak", "tile", "floor", "wall", "unit"]


def _text(rng: random.Random, tag: str) -> str:
    """A distinct text per call site, so the text cache cannot hide a mix-up."""
    return " ".join(rng.sample(WORDS, 3)) + f" {tag}"


@pytest.fixture(scope="module")
def pictures(image_server):
    """N_IMAGES distinct pictures, each available as a URL and as base64; PNG and JPEG alternate."""
    out = []
    for i in range(N_IMAGES):
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        data = encode(make_image(500 + i, (64 + 8 * (i % 5), 48 + 8 * (i % 3))), fmt)
        url = image_server.add(f"/concurrency/img-{i}.{fmt.lower()}", data)
        img = Image.open(io.BytesIO(data))
        img.load()
        out.append({"url": url, "b64": b64(data), "image": img})
    return out


def _build_requests(pictures) -> tuple[list[dict], list[str]]:
    rng = random.Random(1234)
    modes = ["zero_shot", "image_embedding", "text_embedding", "similarity"]
    calls, texts = [], []

    def image_ref(i: int) -> str:
        return pictures[i]["url"] if rng.random() < 0.5 else pictures[i]["b64"]

    for n in range(N_REQUESTS):
        mode = modes[n % 4]
        via_root = rng.random() < 0.5
        params: dict = {"mode": mode} if via_root and rng.random() < 0.5 else {}
        call = {"mode": mode, "path": "/" if via_root else f"/{mode}"}
        if mode == "zero_shot":
            imgs = rng.sample(range(N_IMAGES), rng.randint(1, 3))
            labels = [_text(rng, f"z{n}-{k}") for k in range(rng.randint(2, 5))]
            batched = len(imgs) > 1 or rng.random() < 0.5
            inputs = [image_ref(i) for i in imgs] if batched else image_ref(imgs[0])
            params["candidate_labels"] = labels
            call.update(images=imgs, labels=labels, batched=batched)
            texts += [TEMPLATE.format(x) for x in labels]
        elif mode == "image_embedding":
            imgs = rng.sample(range(N_IMAGES), rng.randint(1, 3))
            inputs = [image_ref(i) for i in imgs] if len(imgs) > 1 or rng.random() < 0.5 else image_ref(imgs[0])
            call.update(images=imgs)
        elif mode == "text_embedding":
            ts = [_text(rng, f"t{n}-{k}") for k in range(rng.randint(1, 4))]
            inputs = ts if len(ts) > 1 or rng.random() < 0.5 else ts[0]
            call.update(texts=ts)
            texts += ts
        else:
            imgs = rng.sample(range(N_IMAGES), rng.randint(1, 2))
            ts = [_text(rng, f"s{n}-{k}") for k in range(rng.randint(1, 3))]
            inputs = {"images" if len(imgs) > 1 else "image": [image_ref(i) for i in imgs] if len(imgs) > 1
                      else image_ref(imgs[0]),
                      "texts": ts}
            call.update(images=imgs, texts=ts)
            texts += ts
        call["body"] = {"inputs": inputs, "parameters": params}
        calls.append(call)
    return calls, texts


def _check(call: dict, result, img_ref: np.ndarray, txt_ref: dict[str, np.ndarray], scale: float,
           bias: float) -> None:
    mode = call["mode"]
    if mode in ("image_embedding", "text_embedding"):
        refs = [img_ref[i] for i in call["images"]] if mode == "image_embedding" else \
            [txt_ref[t] for t in call["texts"]]
        assert len(result) == len(refs)
        for item, ref in zip(result, refs):
            assert len(item["embedding"]) == 32
            assert cosine(item["embedding"], ref) > 0.9999
    elif mode == "similarity":
        expected = np.stack([img_ref[i] for i in call["images"]]) @ np.stack([txt_ref[t] for t in call["texts"]]).T
        assert result["image_count"] == len(call["images"]) and result["text_count"] == len(call["texts"])
        np.testing.assert_allclose(np.asarray(result["similarity_scores"]), expected, atol=1e-4)
    else:
        rows = result if call["batched"] else [result]
        assert len(rows) == len(call["images"])
        if call["batched"]:
            assert all(isinstance(row, list) for row in rows)
        labels = call["labels"]
        text_emb = np.stack([txt_ref[TEMPLATE.format(x)] for x in labels])
        for row, i in zip(rows, call["images"]):
            logits = (img_ref[i] @ text_emb.T) * scale + bias
            e = np.exp(logits - logits.max())
            want = dict(zip(labels, e / e.sum()))
            got = {x["label"]: x["score"] for x in row}
            assert set(got) == set(want)
            scores = [x["score"] for x in row]
            assert scores == sorted(scores, reverse=True)
            assert abs(sum(scores) - 1) < 1e-6
            for label, score in want.items():
                assert abs(got[label] - score) < 1e-4, (label, got[label], score)


@pytest.mark.timeout(180)
def test_concurrent_mixed_requests_each_get_their_own_answer(service, pictures, reference):
    calls, texts = _build_requests(pictures)
    assert len(calls) == N_REQUESTS > 100
    img_ref = reference.image_embeds([p["image"] for p in pictures])
    unique_texts = list(dict.fromkeys(texts))
    txt_ref = dict(zip(unique_texts, reference.text_embeds(unique_texts)))
    scale, bias = float(np.exp(reference.logit_scale)), reference.logit_bias

    async def fire() -> list[tuple[int, httpx.Response | Exception]]:
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as client:
            async def one(n: int, call: dict):
                async with sem:
                    try:
                        return n, await client.post(call["path"], json=call["body"])
                    except httpx.HTTPError as exc:
                        return n, exc

            return await asyncio.gather(*(one(n, c) for n, c in enumerate(calls)))

    t0 = time.monotonic()
    answers = asyncio.run(fire())
    elapsed = time.monotonic() - t0

    transport_errors = [(n, repr(r)) for n, r in answers if isinstance(r, Exception)]
    assert not transport_errors, transport_errors[:5]
    statuses = [r.status_code for _, r in answers]
    server_errors = [(n, r.status_code, r.text[:200]) for n, r in answers if r.status_code >= 500]
    assert not server_errors, f"{len(server_errors)} 5xx answers, e.g. {server_errors[:3]}"
    failures = [(n, r.status_code, r.text[:200]) for n, r in answers if r.status_code != 200]
    assert not failures, failures[:5]
    assert statuses.count(200) == N_REQUESTS

    mismatches = []
    for n, r in answers:
        try:
            _check(calls[n], r.json(), img_ref, txt_ref, scale, bias)
        except AssertionError as exc:
            mismatches.append((n, calls[n]["mode"], str(exc)[:200]))
    assert not mismatches, f"{len(mismatches)} answers do not match their own inputs, e.g. {mismatches[:3]}"
    assert elapsed < 60, f"{N_REQUESTS} requests took {elapsed:.1f} s"


def test_service_still_serves_after_the_burst(service, reference):
    r = service.post("/", {"inputs": ["after the burst"], "parameters": {"mode": "text_embedding"}})
    assert r.status_code == 200
    assert cosine(r.json()[0]["embedding"], reference.text_embeds(["after the burst"])[0]) > 0.9999
    assert httpx.get(service.url + "/readyz", timeout=10).status_code == 200


def test_forwarded_jpegs_cross_the_process_boundary_in_order(authed, reference):
    """Over a real server (the shared auth server forwards JPEGs, SIGLIP_DEVICE_DECODE=on): concurrent requests'
    (JPEG bytes, orientation) pairs cross to the model process, where the adaptive batcher may merge them; each
    answer is its own image, in order."""
    assert authed.client.get("/info").json()["jpeg_decode"] == "pil"  # the gateway forwards JPEG bytes
    images = [make_image(20 + i, size=(120, 90)) for i in range(6)]
    blobs = [encode(im, "JPEG", quality=95) for im in images]
    want = reference.image_embeds([Image.open(io.BytesIO(b)) for b in blobs])
    headers = {"Authorization": f"Bearer {TOKENS[0]}"}

    def embed(pair: tuple[int, int]) -> np.ndarray:
        r = authed.client.post("/image_embedding", json={"inputs": [b64(blobs[i]) for i in pair]}, headers=headers)
        assert r.status_code == 200, r.text
        return np.array([row["embedding"] for row in r.json()])

    pairs = [(i, (i + 1) % 6) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:  # concurrent, so the model service batches them together
        answers = list(pool.map(embed, pairs))
    for pair, got in zip(pairs, answers):
        # Each row is its own image (closest to it of all six) and matches the reference as the path's other tests
        # require (the model side resizes on its device: not bit-equal to the processor's).
        assert np.argmax(got @ want.T, axis=1).tolist() == list(pair)
        assert (got * want[list(pair)]).sum(axis=1).min() > 0.999, pair

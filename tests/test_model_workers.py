"""Several model-service processes (SIGLIP_MODEL_WORKERS): both load, and every answer is still correct."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np


def test_two_model_workers_share_the_load_correctly(two_workers, reference):
    svc = two_workers
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(f"SiglipModel:{i}] Loaded" in svc.log() for i in (1, 2)):
        time.sleep(0.2)
    assert all(f"SiglipModel:{i}] Loaded" in svc.log() for i in (1, 2)), svc.log()[-3000:]

    texts = [f"a photo of thing number {i}" for i in range(40)]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(svc.url + "/text_embedding", json={"inputs": t})
                                          for t in texts])

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    got = np.array([r.json()[0]["embedding"] for r in responses])
    want = reference.text_embeds(texts)
    assert (got * want).sum(axis=1).min() > 0.9999

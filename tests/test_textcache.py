"""``TextEmbeddingCache``: only misses are computed, each distinct text once, case-insensitive keys, LRU order."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from siglip.api.textcache import TextEmbeddingCache


class FakeCompute:
    """An async compute that records every batch it is asked for; the embedding encodes the text itself."""

    def __init__(self):
        self.calls: list[list[str]] = []

    async def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([self.vector(t) for t in texts])

    @staticmethod
    def vector(text: str) -> np.ndarray:
        v = np.zeros(8, dtype=np.float32)
        for i, ch in enumerate(text.encode()[:8]):
            v[i] = ch
        v[7] = len(text)
        return v

    @property
    def computed(self) -> list[str]:
        return [t for batch in self.calls for t in batch]


def embed(cache: TextEmbeddingCache, compute: FakeCompute, texts: list[str]) -> np.ndarray:
    return asyncio.run(cache.embed(texts, compute))


def test_first_call_computes_each_distinct_text_once_in_order():
    cache, compute = TextEmbeddingCache(16), FakeCompute()
    out = embed(cache, compute, ["cat", "dog", "cat", "bird", "dog"])
    assert compute.calls == [["cat", "dog", "bird"]]
    assert out.shape == (5, 8)
    for row, text in zip(out, ["cat", "dog", "cat", "bird", "dog"]):
        np.testing.assert_array_equal(row, FakeCompute.vector(text))
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)


def test_only_misses_are_computed():
    cache, compute = TextEmbeddingCache(16), FakeCompute()
    embed(cache, compute, ["cat", "dog"])
    out = embed(cache, compute, ["dog", "fish", "cat", "eel"])
    assert compute.calls == [["cat", "dog"], ["fish", "eel"]]
    np.testing.assert_array_equal(out, np.stack([FakeCompute.vector(t) for t in ["dog", "fish", "cat", "eel"]]))
    assert (cache.hits, cache.misses) == (2, 4)


def test_all_hits_do_not_call_compute():
    cache, compute = TextEmbeddingCache(16), FakeCompute()
    embed(cache, compute, ["a", "b"])
    embed(cache, compute, ["b", "a", "b"])
    assert compute.calls == [["a", "b"]]
    assert (cache.hits, cache.misses) == (3, 2)


def test_keys_are_case_insensitive_and_compute_sees_lowercase():
    cache, compute = TextEmbeddingCache(16), FakeCompute()
    out = embed(cache, compute, ["Cat", "CAT", "cat"])
    assert compute.calls == [["cat"]]  # normalized text, what the model would see anyway
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    embed(cache, compute, ["cAt"])
    assert compute.calls == [["cat"]]
    assert len(cache) == 1 and cache.hits == 1


def test_lru_eviction():
    cache, compute = TextEmbeddingCache(3), FakeCompute()
    embed(cache, compute, ["a", "b", "c"])
    embed(cache, compute, ["a"])  # a is now the most recently used; b the least
    embed(cache, compute, ["d"])  # evicts b
    assert len(cache) == 3
    compute.calls.clear()
    embed(cache, compute, ["a", "c", "d"])
    assert compute.calls == []
    embed(cache, compute, ["b"])  # b was evicted: computed again (and now evicts a, the LRU)
    assert compute.calls == [["b"]]
    compute.calls.clear()
    embed(cache, compute, ["a"])
    assert compute.calls == [["a"]]


def test_batch_larger_than_capacity_still_answers_every_text():
    cache, compute = TextEmbeddingCache(2), FakeCompute()
    texts = ["t1", "t2", "t3", "t4", "t5"]
    out = embed(cache, compute, texts)
    np.testing.assert_array_equal(out, np.stack([FakeCompute.vector(t) for t in texts]))
    assert len(cache) == 2
    compute.calls.clear()
    embed(cache, compute, ["t4", "t5"])  # the most recent two were kept
    assert compute.calls == []


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_zero_disables_caching(capacity):
    cache, compute = TextEmbeddingCache(capacity), FakeCompute()
    out = embed(cache, compute, ["x", "x", "y"])
    np.testing.assert_array_equal(out[0], FakeCompute.vector("x"))
    embed(cache, compute, ["x"])
    assert compute.calls == [["x", "y"], ["x"]]
    assert len(cache) == 0
    assert cache.misses == 3 and cache.hits == 0


def test_results_are_copies_the_cache_cannot_be_corrupted():
    cache, compute = TextEmbeddingCache(4), FakeCompute()
    out = embed(cache, compute, ["cat"])
    out[:] = -1
    np.testing.assert_array_equal(embed(cache, compute, ["cat"])[0], FakeCompute.vector("cat"))
    assert compute.calls == [["cat"]]


def test_concurrent_callers_get_their_own_answers():
    cache, compute = TextEmbeddingCache(8), FakeCompute()

    async def main():
        return await asyncio.gather(cache.embed(["a", "b"], compute), cache.embed(["b", "c"], compute),
                                    cache.embed(["c", "a"], compute))

    outs = asyncio.run(main())
    for out, texts in zip(outs, [["a", "b"], ["b", "c"], ["c", "a"]]):
        np.testing.assert_array_equal(out, np.stack([FakeCompute.vector(t) for t in texts]))
    assert set(compute.computed) == {"a", "b", "c"}


def test_cached_rows_do_not_keep_their_batch_alive():
    async def compute(keys):
        return np.ones((len(keys), 8), dtype=np.float32)

    cache = TextEmbeddingCache(capacity=10)
    asyncio.run(cache.embed(["a", "b", "c"], compute))
    assert all(row.base is None for row in cache._entries.values())


def test_each_lookup_reports_its_own_hits_and_misses():
    seen = []

    async def compute(keys):
        return np.zeros((len(keys), 2), dtype=np.float32)

    cache = TextEmbeddingCache(capacity=10, on_lookup=lambda h, m: seen.append((h, m)))
    asyncio.run(cache.embed(["a", "b"], compute))
    asyncio.run(cache.embed(["a", "c", "a"], compute))
    assert seen == [(0, 2), (2, 1)]

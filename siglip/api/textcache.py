"""An LRU cache of text embeddings, so repeated labels and templates never rerun the text tower.

Keys are the normalized (lowercased) texts, exactly what the model sees, so "Cat" and "cat" share an entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from siglip.model.text import normalize_text

Compute = Callable[[list[str]], Awaitable[np.ndarray]]


class TextEmbeddingCache:
    def __init__(self, capacity: int, on_lookup: Callable[[int, int], None] | None = None):
        self.capacity = max(0, capacity)  # a negative size would make eviction pop from an empty dict
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._on_lookup = on_lookup  # (hits, misses) of each call, e.g. for metrics

    def __len__(self) -> int:
        return len(self._entries)

    async def embed(self, texts: Sequence[str], compute: Compute) -> np.ndarray:
        """Embeddings of ``texts`` (N, D), computing only the ones not cached, each once."""
        keys = [normalize_text(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        for key in keys:
            row = self._entries.get(key)
            if row is not None:
                self._entries.move_to_end(key)
                found[key] = row
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        hits = sum(1 for k in keys if k in found)
        self.hits += hits
        self.misses += len(missing)
        if self._on_lookup is not None:
            self._on_lookup(hits, len(missing))
        if missing:
            computed = await compute(missing)
            for key, row in zip(missing, computed, strict=True):
                found[key] = row
                if self.capacity > 0:
                    # A copy: a view would keep the whole batch array alive as long as the entry lives.
                    self._entries[key] = row.copy()
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return np.stack([found[k] for k in keys])

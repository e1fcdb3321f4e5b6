"""Text rules SigLIP was trained with. Any other padding makes embeddings wrong *and* batch-dependent.

- lowercase: SigLIP 2 saw lowercased text, and the GemmaTokenizer that AutoTokenizer returns for the
  fixed-resolution checkpoints does not lowercase. SigLIP 1's tokenizer and SigLIP 2 NaFlex's ``Siglip2Tokenizer``
  lowercase by themselves; doing it again first changes nothing for them.
- padding="max_length" to the checkpoint's own text length (``max_position_embeddings`` of its text tower: 64 for
  almost all, 16 for siglip-so400m-patch14-224), truncation: the text embedding is read at the last position, so
  every text is padded to the full length (EOS kept on truncation, right padding).
- no attention_mask: the model was trained attending to the padding too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


def normalize_text(text: str) -> str:
    return text.lower()


def tokenize(tokenizer: Any, texts: Sequence[str], length: int) -> np.ndarray:
    """input_ids of shape (len(texts), length), int64; no attention mask is produced."""
    encoded = tokenizer(
        [normalize_text(t) for t in texts],
        padding="max_length",
        max_length=length,
        truncation=True,
        return_attention_mask=False,
        return_tensors="np",
    )
    return np.asarray(encoded["input_ids"], dtype=np.int64)


def token_counts(tokenizer: Any, texts: Sequence[str], length: int) -> list[int]:
    """Tokens of each text the text tower reads: the same lowercasing and truncation (EOS kept) as ``tokenize``,
    without the padding."""
    encoded = tokenizer([normalize_text(t) for t in texts], truncation=True, max_length=length,
                        return_attention_mask=False)
    return [len(row) for row in encoded["input_ids"]]


class SerialTokenizer:
    """A tokenizer that runs one call at a time. A Hugging Face fast tokenizer keeps its padding and truncation
    settings in state shared by every call, and each call rewrites them: the model service's threads tokenizing at
    once (a padded text batch beside an unpadded token count) picked up each other's settings, giving padded
    counts in the OpenAI ``usage`` and ragged batches that failed with 500 (measured: 15 of 20,000 counts padded)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

"""Scores from normalized embeddings: pure numpy, no model.

SigLIP's logits are ``cos * exp(logit_scale) + logit_bias``. The API contract asks for a softmax over the
candidate labels (sum to 1); SigLIP's own per-label probability is the sigmoid of the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def cosine_matrix(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """[n_images, n_texts] cosine similarities of already-normalized embeddings."""
    return np.asarray(image_embeds, dtype=np.float32) @ np.asarray(text_embeds, dtype=np.float32).T


def logits(cosine: np.ndarray, logit_scale: float, logit_bias: float) -> np.ndarray:
    return cosine * np.float32(np.exp(logit_scale)) + np.float32(logit_bias)


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def zero_shot_scores(cosine: np.ndarray, logit_scale: float, logit_bias: float,
                     function_to_apply: str = "softmax") -> np.ndarray:
    z = logits(cosine, logit_scale, logit_bias).astype(np.float64)
    if function_to_apply == "softmax":
        return softmax(z)
    if function_to_apply == "sigmoid":
        return sigmoid(z)
    if function_to_apply == "none":
        return z
    raise ValueError(f"unknown function_to_apply {function_to_apply!r}")


def rank_labels(labels: Sequence[str], scores: np.ndarray, top_k: int | None = None) -> list[dict]:
    """[{"label", "score"}] sorted by score, descending; ties keep the labels' order."""
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    return [{"label": labels[i], "score": float(scores[i])} for i in order]

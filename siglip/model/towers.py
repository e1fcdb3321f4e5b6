"""The one interface every backend implements: two towers that turn model inputs into embeddings.

``Towers.vision(**inputs)`` takes the processor's inputs, already normalized and on the device
(``pixel_values`` (N, 3, H, W) for fixed-resolution checkpoints; ``pixel_values`` (N, P, 3*p*p),
``pixel_attention_mask`` and ``spatial_shapes`` for NaFlex) and ``Towers.text(input_ids)`` the padded token ids;
both return L2-normalized float32 (N, D) on the device. The encoder never asks which backend it runs.

Backends: ``TorchTowers`` here (eager, or the vision tower under ``torch.compile``),
``siglip.model.openvino_backend.OpenVinoTowers`` (CPU) and ``siglip.model.graphs.CudaGraphTowers`` (CUDA graphs
around a torch vision tower); ``siglip.model.backends.build_towers`` picks and checks them.
"""

from __future__ import annotations

from typing import Any, Protocol


class Towers(Protocol):
    backend: str  # "torch" | "openvino": what runs the towers
    precision: str  # "float32" | "bfloat16" | "float16": what the matmuls run in
    path: str  # how the vision tower runs, for logs and /info: "eager", "compiled", "CUDA graphs (1,2,4)", ...
    input_dtype: Any  # the torch dtype pixel inputs are given in

    def vision(self, **inputs: Any) -> Any: ...

    def text(self, input_ids: Any) -> Any: ...


def normalized_embedding(torch: Any, out: Any) -> Any:
    """A tower's output (transformers' output object, or the tensor a compiled graph returns) -> its
    ``pooler_output`` as L2-normalized float32: the embedding every backend serves."""
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.nn.functional.normalize(feats.float(), dim=-1)


class TorchTowers:
    """Both towers of a transformers SigLIP model (``SiglipModel`` or ``Siglip2Model``) in torch."""

    backend = "torch"

    def __init__(self, model: Any, dtype: Any, compile: bool = False):
        import torch

        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise TypeError(f"{type(model).__name__} is not a SigLIP-style dual encoder (no {method})")
        self._torch = torch
        self.model = model.to(dtype)
        self.input_dtype = dtype
        self.precision = str(dtype).removeprefix("torch.")
        self._vision = model.get_image_features
        if compile:
            # Batch sizes (and NaFlex patch counts) vary with load: one dynamic-shape graph, not one per shape.
            self._vision = torch.compile(model.get_image_features, dynamic=True)
        self.path = "compiled" if compile else "eager"

    def vision(self, **inputs: Any) -> Any:
        return normalized_embedding(self._torch, self._vision(**inputs))

    def text(self, input_ids: Any) -> Any:
        # No attention mask: SigLIP was trained attending to the padding (siglip.model.text).
        return normalized_embedding(self._torch, self.model.get_text_features(input_ids=input_ids))

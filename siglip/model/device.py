"""Where and in what precision the towers run: ``SIGLIP_DEVICE`` / ``SIGLIP_DTYPE`` resolved on this host."""

from __future__ import annotations

from typing import Any


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls are then ~3x faster than fp32 on CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_device(requested: str, worker_index: int = 1) -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return f"cuda:{(worker_index - 1) % torch.cuda.device_count()}"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"SIGLIP_DEVICE={requested} but CUDA is not available")
    return requested


def resolve_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return getattr(torch, requested)

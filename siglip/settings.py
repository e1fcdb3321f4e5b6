"""Every setting of the service, read from the environment in this one place.

Each field is one ``SIGLIP_*`` variable (its name upper-cased); docs/configuration.md's table lists them (tests/test_settings.py keeps the two in step).
Values are validated when read, so a typo fails at start-up with the variable's name rather than at the first
request.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MB = 1024 * 1024


def fmt_bytes(n: float) -> str:
    """Sizes as people read them in error messages: 20 MB, 512 KB, 300 bytes."""
    if n >= MB:
        return f"{n / MB:.3g} MB"
    if n >= 1024:
        return f"{n / 1024:.3g} KB"
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class Settings:
    # Model
    model: str = "google/siglip2-base-patch16-512"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the vision tower (slow start; faster large batches on GPU)
    cuda_graphs: bool = False  # replay the vision tower from CUDA graphs captured per batch bucket (CUDA only)
    text_cache_size: int = 4096  # text embeddings kept per gateway worker (LRU); 0 disables
    device_decode: str = "auto"  # auto: JPEGs decoded by nvJPEG on the model's GPU when it can; on | off
    backend: str = "auto"  # auto: OpenVINO on CPUs with AVX512-BF16 or AMX (if installed and its parity check passes), else torch
    openvino_cache_dir: str = ""  # converted OpenVINO models; empty: ~/.cache/siglip2-serve/openvino (XDG_CACHE_HOME)
    openvino_threads: int = 0  # OpenVINO inference threads; 0: its default (the cores it may run on)
    # NaFlex checkpoints (model_type siglip2): patches per image, aspect ratio kept; 0: the checkpoint's own (256)
    max_num_patches: int = 0
    max_num_patches_limit: int = 1024  # the most a request's parameters.max_num_patches may ask for (training
    # went up to 1024; more costs memory and time and its quality is not established)

    # Model service processes
    model_workers: int = 1  # model processes, spread round-robin over the visible GPUs (several may share one)
    gpus: int = 0  # GPUs the model service asks BentoML for (resources); 0: use whatever is visible
    # Batching (model service)
    model_threads: int = 4  # threads running batches in the model service (image, JPEG and text batches overlap)
    max_batch_size: int = 64
    max_latency_ms: int = 60_000  # a queued item waits at most this long in the model service (then 429)

    # Gateway
    coalesce_in_flight: int = 2  # model calls in flight per encoder per gateway worker; more requests wait and
    # are merged into the next call (0 = one call per request)
    gateway_workers: int = 1
    decode_threads: int = 4  # image decode/resize threads per gateway worker
    request_timeout_s: float = 120.0  # whole-request deadline (504 past it); sized for big CPU batches
    model_stall_timeout_s: float = 10.0  # the model service's process answering nothing this long: its calls fail
    # with 503 instead of waiting for the deadline (frozen, swapping or vanished worker)
    max_concurrency: int = 256  # requests in flight per gateway worker before 429
    keep_alive_s: float = 75.0  # idle HTTP connections kept open (longer than clients' and load balancers'); 0:
    # BentoML's 5 s
    jpeg_draft_factor: float = 0.0  # decode JPEGs at reduced size when >= this many times the model size (0 = off)

    # URL fetching
    allow_private_urls: bool = False
    url_allowlist: tuple[str, ...] = ()  # hosts (exact, or ".example.com" for subdomains); empty = any public host
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 10.0
    fetch_total_timeout_s: float = 20.0
    fetch_max_redirects: int = 3
    max_parallel_fetches: int = 8  # concurrent URL fetches within one request

    # Limits on what a request may carry
    max_image_bytes: int = 20 * MB  # per image, encoded (URL body or decoded base64)
    max_image_pixels: int = 40_000_000  # checked from the header, before decoding
    max_images_per_request: int = 64
    max_texts_per_request: int = 1024  # texts, or candidate labels
    max_text_chars: int = 2000
    max_body_bytes: int = 64 * MB
    max_inflight_body_bytes: int = 512 * MB  # request bodies held at once per gateway worker before 429

    # Connections (every server process): bounds one slow or endless client can hold
    max_header_bytes: int = 16 * 1024  # request line + headers; 431 and closed past it
    max_headers: int = 100  # header lines per request; 431 past it
    header_timeout_s: float = 10.0  # headers must be complete this long after the connection / request starts
    max_connections: int = 10_000  # open connections per worker (lowered to fit the fd limit); 503 past it
    body_timeout_s: float = 10.0  # longest wait for the next piece of a request body (408)
    min_upload_bytes_per_s: int = 16 * 1024  # past body_timeout_s an upload must average this rate (408)
    max_uploads: int = 64  # requests still receiving their body per gateway worker before 429

    # Deployment: the image variant and base image are read by `bentoml build` (siglip/bento.py)
    image: str = "gpu"  # gpu: PyPI torch with the CUDA 13 runtime (NVIDIA driver R580+) and torchvision;
    # cpu: torch+cpu and OpenVINO, no CUDA wheels
    base_image: str = ""  # the image's FROM; empty: python:3.11-slim. It must provide Python 3.11
    target_concurrency: int = 32  # traffic.concurrency of both services: the autoscaling target (requests in
    # flight per replica) that BentoCloud and the Kubernetes HPA scale on

    # Auth: one token or several (comma-separated) so they can be rotated; empty = no auth
    api_token: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"SIGLIP_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(name, raw.strip(), f.default)
            if isinstance(f.default, tuple) and not values[f.name]:
                # "," would otherwise turn auth, or the URL allowlist, silently off.
                raise ValueError(f"{name}={raw!r} lists nothing; unset it instead")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"SIGLIP_DEVICE must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.device_decode not in ("auto", "on", "off"):
            raise ValueError(f"SIGLIP_DEVICE_DECODE must be auto, on or off, not {self.device_decode!r}")
        if self.backend not in ("auto", "torch", "openvino"):
            raise ValueError(f"SIGLIP_BACKEND must be auto, torch or openvino, not {self.backend!r}")
        if self.backend == "openvino" and self.device.startswith("cuda"):
            raise ValueError(f"SIGLIP_BACKEND=openvino runs on the CPU only, not SIGLIP_DEVICE={self.device}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"SIGLIP_DTYPE must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.gpus < 0:
            raise ValueError("SIGLIP_GPUS must be 0 or more")
        for name in ("model_workers", "model_threads", "max_batch_size", "max_latency_ms", "gateway_workers", "decode_threads", "max_concurrency",
                     "max_parallel_fetches", "max_image_bytes", "max_image_pixels", "max_images_per_request",
                     "max_texts_per_request", "max_text_chars", "max_body_bytes", "max_inflight_body_bytes",
                     "max_header_bytes", "max_headers", "max_connections", "min_upload_bytes_per_s",
                     "max_uploads", "target_concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SIGLIP_{name.upper()} must be positive")
        if self.max_num_patches_limit <= 0:
            raise ValueError("SIGLIP_MAX_NUM_PATCHES_LIMIT must be positive")
        if not 0 <= self.max_num_patches <= self.max_num_patches_limit:
            raise ValueError(f"SIGLIP_MAX_NUM_PATCHES must be between 0 (the checkpoint's own) and "
                             f"SIGLIP_MAX_NUM_PATCHES_LIMIT ({self.max_num_patches_limit}), not {self.max_num_patches}")
        for name in ("text_cache_size", "fetch_max_redirects", "openvino_threads"):  # 0 = off / default
            if getattr(self, name) < 0:
                raise ValueError(f"SIGLIP_{name.upper()} must not be negative")
        for name in ("request_timeout_s", "model_stall_timeout_s", "fetch_connect_timeout_s", "fetch_read_timeout_s",
                     "fetch_total_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"SIGLIP_{name.upper()} must be a positive number of seconds")
        if not math.isfinite(self.keep_alive_s) or self.keep_alive_s < 0:
            raise ValueError("SIGLIP_KEEP_ALIVE_S must be 0 (BentoML's default) or a positive number of seconds")
        if not math.isfinite(self.jpeg_draft_factor) or self.jpeg_draft_factor < 0:
            raise ValueError("SIGLIP_JPEG_DRAFT_FACTOR must be 0 (off) or a positive number")
        if self.image not in ("gpu", "cpu"):
            raise ValueError(f"SIGLIP_IMAGE must be gpu or cpu, not {self.image!r}")

    def __repr__(self) -> str:  # tokens never reach logs
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "api_token"}
        shown["api_token"] = f"<{len(self.api_token)} token(s)>"
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected 1/0, true/false")
        if isinstance(default, int):
            return int(raw.replace("_", ""))
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not valid: {exc}") from None


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings

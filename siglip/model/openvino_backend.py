"""OpenVINO runs both towers on CPU-only nodes (``SIGLIP_BACKEND=auto|openvino``).

Why: on CPUs OpenVINO's fused kernels beat torch eager on the same model (Zen 4: 590 ms against 999 ms for the
bf16 vision tower at batch 1, cosine 0.99998 to torch fp32; shared notes, performance anchors).

How: each tower of the loaded transformers model (fp32) is wrapped so that its output is the L2-normalized
embedding, converted once with ``openvino.convert_model`` (batch dimension dynamic, so adaptive batching keeps
working), and saved in a cache directory keyed by the checkpoint's identity and the library versions; a restart
reads the IR instead of converting again. Before the encoder reports ready, the OpenVINO embeddings are compared
with torch's on a few inputs; below ``PARITY_MIN_COSINE`` the encoder keeps torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siglip.model.device import cpu_has_fast_bf16
from siglip.model.towers import TorchTowers, normalized_embedding

logger = logging.getLogger("siglip.openvino")

# Below this cosine between OpenVINO's and torch's embedding of the same input, torch is kept.
PARITY_MIN_COSINE = 0.9999
# Bumped whenever what is converted changes (the wrappers below), so old cache entries are not read.
FORMAT_VERSION = 1
PARITY_TEXTS = ("a photo of a cat", "glossy white porcelain tile", "")
# One synthetic image: torch fp32 costs ~2 s an image on 2 cores, and start-up should not be slower than torch's
# (whose batcher training OpenVINO shortens). OpenVINO runs it twice in one batch of 2, so the dynamic batch
# dimension is checked too.
PARITY_IMAGES = 1
TOWERS = ("vision", "text")
# SIGLIP_DTYPE -> OpenVINO's INFERENCE_PRECISION_HINT; "auto" leaves OpenVINO's choice (bf16 where the CPU has
# AVX512-BF16 or AMX, else f32).
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
DTYPE_NAMES = {hint: dtype for dtype, hint in PRECISION_HINTS.items()}


def installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(requested: str, device: str, fast_bf16: bool | None = None) -> str:
    """"torch" or "openvino" for SIGLIP_BACKEND on the resolved device; an explicit request that cannot be met
    fails loading (the operator asked for it), "auto" quietly takes torch.

    "auto" takes OpenVINO only on CPUs with bf16 instructions (AVX512-BF16 or AMX; ``fast_bf16``, read from
    /proc/cpuinfo when not given): there it ran the vision tower 1.7x faster than torch bf16 (Zen 4, 590 against
    999 ms). On an AVX2-only EPYC both run fp32 and OpenVINO measured 0.97x torch end to end on an idle host (one
    image, 5,712 against 5,526 ms; benchmarks/RESULTS.md), so torch stays the default there.
    """
    if requested == "torch":
        return "torch"
    on_cpu = device == "cpu"
    if requested == "auto":
        if fast_bf16 is None:
            fast_bf16 = cpu_has_fast_bf16()
        return "openvino" if on_cpu and fast_bf16 and installed() else "torch"
    if requested != "openvino":
        raise ValueError(f"SIGLIP_BACKEND must be auto, torch or openvino, not {requested!r}")
    if not on_cpu:
        raise RuntimeError(f"SIGLIP_BACKEND=openvino runs on the CPU only, but the model device is {device} "
                           "(set SIGLIP_DEVICE=cpu, or SIGLIP_BACKEND=auto)")
    if not installed():
        raise RuntimeError("SIGLIP_BACKEND=openvino but the openvino package is not installed")
    return "openvino"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siglip2-serve" / "openvino"


# -- cache key ------------------------------------------------------------------------------------------------
def checkpoint_dir(model_id: str) -> Path | None:
    """The directory holding the checkpoint's files: the local directory, or the hub cache's snapshot."""
    local = Path(os.path.expanduser(model_id))
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - no hub cache: no identity, no caching
        return None
    return Path(found).parent if isinstance(found, str) else None


def checkpoint_identity(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files the converted graph depends on: cheap (no hashing of 1.5 GB), and a
    rewritten checkpoint changes size or mtime."""
    names = sorted(p.name for p in directory.iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    out = []
    for name in names:
        st = (directory / name).stat()  # follows the hub cache's symlinks to the blobs
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("openvino", "torch", "transformers")}


def cache_key(model_id: str, directory: Path | None, image_size: tuple[int, int],
              versions: dict[str, str]) -> str:
    """A directory name for the converted towers of this checkpoint under these library versions."""
    source = str(directory) if directory is not None else model_id
    ident = checkpoint_identity(directory) if directory is not None else []
    blob = json.dumps({"format": FORMAT_VERSION, "source": source, "files": ident, "image_size": list(image_size),
                       "versions": versions}, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name or "model")[:48]
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


# -- conversion -----------------------------------------------------------------------------------------------
def _wrappers(model: Any) -> dict[str, Any]:
    """The towers as modules whose output is the L2-normalized float32 embedding."""
    import torch

    class Normalized(torch.nn.Module):
        def __init__(self, features: str, argument: str):
            super().__init__()
            self.model = model
            self.features, self.argument = features, argument

        def forward(self, x):
            return normalized_embedding(torch, getattr(self.model, self.features)(**{self.argument: x}))

    # text: ids only, no attention mask: SigLIP 2 was trained attending to the padding (siglip.model.text)
    return {"vision": Normalized("get_image_features", "pixel_values").eval(),
            "text": Normalized("get_text_features", "input_ids").eval()}


def convert(model: Any, image_size: tuple[int, int], text_length: int, target: Path) -> None:
    """Convert both towers of an fp32 ``model`` into ``target`` (vision.xml/.bin, text.xml/.bin, meta.json),
    atomically: written into a temporary sibling and renamed, so a concurrent reader sees all or nothing."""
    import openvino as ov
    import torch

    height, width = image_size
    examples = {"vision": torch.zeros((2, 3, height, width), dtype=torch.float32),
                "text": torch.zeros((2, text_length), dtype=torch.int64)}
    shapes = {"vision": ([-1, 3, height, width], ov.Type.f32), "text": ([-1, text_length], ov.Type.i64)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the entry from workers running as another user
    try:
        t0 = time.perf_counter()
        for name, module in _wrappers(model).items():
            # The tracer warns about Python constants (head size, sequence-length checks): fixed per checkpoint.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                shape, dtype = shapes[name]
                ov_model = ov.convert_model(module, example_input=examples[name],
                                            input=[(ov.PartialShape(shape), dtype)])
            # fp32 weights on disk: fp16 compression (save_model's default) costs parity on sensitive checkpoints
            ov.save_model(ov_model, tmp / f"{name}.xml", compress_to_fp16=False)
            del ov_model
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "versions": library_versions(),
                                                   "convert_seconds": round(time.perf_counter() - t0, 2)}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").exists():
                raise
            # Another worker finished the same conversion first: its files are as good as ours.
            logger.info("OpenVINO cache entry %s was written by another process meanwhile", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- inference ------------------------------------------------------------------------------------------------
class Tower:
    """A compiled tower called from several threads: one infer request per thread (a request is not thread-safe;
    requests beyond the plugin's streams queue inside OpenVINO instead of oversubscribing the cores)."""

    def __init__(self, compiled: Any, embed_dim: int):
        self._compiled = compiled
        self._local = threading.local()
        self.embed_dim = embed_dim

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(x)}, share_inputs=True, share_outputs=False)
        return np.asarray(result[0], dtype=np.float32)


@dataclass(frozen=True)
class CompiledTowers:
    vision: Tower
    text: Tower
    precision: str  # "float32" / "bfloat16" / "float16": what OpenVINO runs the matmuls in
    threads: int  # OpenVINO's inference threads (one stream)
    entry: Path
    converted: bool  # False: read from the cache
    seconds: float


def load_towers(model: Any, model_id: str, cache_dir: Path, image_size: tuple[int, int], text_length: int,
                embed_dim: int, dtype: str = "auto", threads: int = 0) -> CompiledTowers:
    """Read both towers from the cache (converting ``model`` into it first if needed) and compile them."""
    import openvino as ov

    t0 = time.perf_counter()
    entry = Path(cache_dir) / cache_key(model_id, checkpoint_dir(model_id), image_size, library_versions())
    converted = not (entry / "meta.json").exists()
    if converted:
        logger.info("Converting %s to OpenVINO into %s (once per checkpoint and library versions)...",
                    model_id, entry)
        convert(model, image_size, text_length, entry)
    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if dtype in PRECISION_HINTS:
        config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[dtype]
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads

    def compile_towers() -> dict[str, Any]:
        return {name: core.compile_model(core.read_model(entry / f"{name}.xml"), "CPU", config) for name in TOWERS}

    try:
        compiled = compile_towers()
    except Exception as exc:
        if converted:
            raise
        # A damaged entry (a full disk, a copy cut short) would otherwise send every restart to torch for good.
        logger.warning("cached OpenVINO entry %s could not be read (%s: %s); converting it again", entry,
                       type(exc).__name__, exc)
        aside = entry.with_name(f"{entry.name}.broken-{os.getpid()}")
        with contextlib.suppress(OSError):  # another worker may have moved it aside already
            entry.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
        convert(model, image_size, text_length, entry)
        converted = True
        compiled = compile_towers()
    hint = compiled["vision"].get_property("INFERENCE_PRECISION_HINT").to_string()
    precision = DTYPE_NAMES.get(hint, hint)
    return CompiledTowers(Tower(compiled["vision"], embed_dim), Tower(compiled["text"], embed_dim), precision,
                  int(compiled["vision"].get_property("INFERENCE_NUM_THREADS")), entry, converted,
                  time.perf_counter() - t0)


# -- parity ---------------------------------------------------------------------------------------------------
def parity_pixels(image_size: tuple[int, int], n: int = PARITY_IMAGES) -> np.ndarray:
    """Normalized pixels (n, 3, H, W) in [-1, 1]: smooth gradients plus noise, deterministic."""
    height, width = image_size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rows = []
    for i in range(n):
        base = np.stack([np.sin(xx / (7 + 5 * i)), np.cos(yy / (11 + 3 * i)), np.sin((xx + yy) / (13 + i))])
        rows.append(np.clip(0.7 * base + 0.3 * rng.uniform(-1, 1, base.shape), -1, 1))
    return np.stack(rows).astype(np.float32)


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest row cosine between two (N, D) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.nan_to_num(cos, nan=-1.0).min())


class OpenVinoTowers:
    """``siglip.model.towers.Towers`` on OpenVINO: torch tensors in and out, numpy in between."""

    backend = "openvino"
    path = "OpenVINO"

    def __init__(self, towers: CompiledTowers):
        import torch

        self._torch = torch
        self.compiled = towers
        self.precision = towers.precision
        self.input_dtype = torch.float32  # fp32 pixels whatever precision OpenVINO runs in

    def vision(self, pixel_values: Any) -> Any:
        return self._torch.from_numpy(self.compiled.vision(pixel_values.numpy()))

    def text(self, input_ids: Any) -> Any:
        return self._torch.from_numpy(self.compiled.text(input_ids.numpy()))

    @classmethod
    def build(cls, reference: TorchTowers, model_id: str, cache_dir: Path, image_size: tuple[int, int],
              text_length: int, embed_dim: int, dtype: str, threads: int,
              text_ids: Callable[[Sequence[str]], np.ndarray]) -> OpenVinoTowers | None:
        """Converted (or cached) towers of ``reference``'s fp32 model that agree with it, or None (torch is kept)
        on any failure or a parity cosine below ``PARITY_MIN_COSINE``; the reason is logged as a warning."""
        import torch

        def run(fn: Callable[..., Any], **inputs: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return fn(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

        try:
            towers = load_towers(reference.model, model_id, cache_dir, image_size, text_length, embed_dim, dtype,
                                 threads)
            pixels, ids = parity_pixels(image_size), text_ids(PARITY_TEXTS)
            worst = min(worst_cosine(np.tile(run(reference.vision, pixel_values=pixels), (2, 1)),
                                     towers.vision(np.tile(pixels, (2, 1, 1, 1)))),
                        worst_cosine(run(reference.text, input_ids=ids), towers.text(ids)))
        except Exception as exc:
            logger.warning("OpenVINO backend unavailable (%s: %s); running torch", type(exc).__name__, exc,
                           exc_info=True)
            return None
        if worst < PARITY_MIN_COSINE:
            logger.warning("OpenVINO embeddings differ from torch's (cosine %.6f < %s on the start-up parity inputs); "
                           "running torch", worst, PARITY_MIN_COSINE)
            return None
        logger.info("OpenVINO %s towers %s %s in %.1f s (%s, %d threads; parity cosine to torch fp32 %.6f)",
                    library_versions()["openvino"], "converted into" if towers.converted else "read from",
                    towers.entry, towers.seconds, towers.precision, towers.threads, worst)
        out = cls(towers)
        out.path = f"OpenVINO ({towers.threads} threads)"
        return out

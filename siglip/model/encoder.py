"""Model loading and encoding: the only module of the service that imports torch.

``SiglipEncoder`` loads a SigLIP checkpoint (hub id or local directory) with the Auto classes, in a background
thread, and encodes uint8 pixel batches and text batches into L2-normalized ``pooler_output`` embeddings.
Rescale and normalization run on the model's device so only uint8 pixels cross process boundaries.
On CPU the towers may run on OpenVINO instead (``SIGLIP_BACKEND``, ``siglip.model.openvino_backend``, which converts
them from the torch model); the input and output contract is the same.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from siglip.api.images import tiny_jpeg
from siglip.model.text import TEXT_MAX_LENGTH, SerialTokenizer, token_counts, tokenize

logger = logging.getLogger("siglip.encoder")
RESIZE_CHUNK_BYTES = 256 * 1024 * 1024  # float32 pixels resized in one call on the model's device
# Pixel batches arrive unpickled as read-only arrays; they are only read (the first op copies to float).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to know about the loaded checkpoint (sent to it once, as a dict)."""

    model: str
    device: str
    dtype: str
    image_height: int
    image_width: int
    resample: int
    embed_dim: int
    logit_scale: float  # raw parameter; logits use exp(logit_scale)
    logit_bias: float
    jpeg_decode: str | None = None  # "nvjpeg" / "pil" when the gateway may forward JPEG bytes, else None
    cuda_graphs: str | None = None  # the captured batch sizes, "1,2,4,...", when the vision tower runs from graphs
    backend: str = "torch"  # "torch" / "openvino": what runs both towers
    patch_size: int | None = None  # vision patch size: an image is (image_height/patch)*(image_width/patch) tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def resolve_dtype(requested: str, device: str):
    import torch

    if requested == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return getattr(torch, requested)


def normalized_embedding(torch: Any, out: Any) -> Any:
    """A tower's output (transformers' output object, or the tensor a compiled graph returns) -> its
    ``pooler_output`` as L2-normalized float32: the embedding every backend serves."""
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.nn.functional.normalize(feats.float(), dim=-1)


class SiglipEncoder:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", worker_index: int = 1,
                 compile: bool = False, warmup_batch_sizes: Sequence[int] = (1,), device_decode: str = "off",
                 cuda_graphs: bool = False, max_batch_size: int = 64, backend: str = "torch",
                 openvino_cache_dir: str = "", openvino_threads: int = 0):
        self.model_id = model
        self._backend = backend  # auto | torch | openvino (siglip.model.openvino_backend.resolve_backend)
        self._openvino_cache_dir = openvino_cache_dir
        self._openvino_threads = openvino_threads
        self._requested = (device, dtype, worker_index, compile)
        self._graph_max_batch = max_batch_size if cuda_graphs else 0
        self._device_decode = device_decode  # auto | on | off
        self._warmup_sizes = tuple(warmup_batch_sizes)
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start_loading(self, on_loaded: Callable[[ModelInfo], None] | None = None) -> threading.Thread:
        """Load in a background thread; ``on_loaded(info)`` runs there once the model is ready."""
        thread = threading.Thread(target=self.load, args=(on_loaded,), name="siglip-model-loader", daemon=True)
        thread.start()
        return thread

    def load(self, on_loaded: Callable[[ModelInfo], None] | None = None) -> None:
        try:
            self._load()
            if on_loaded is not None and self.info is not None:
                on_loaded(self.info)
        except Exception as exc:
            self.error = f"loading {self.model_id} failed: {type(exc).__name__}: {exc}"
            logger.exception("Model %s failed to load; the service stays not-ready", self.model_id)

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        device_req, dtype_req, worker_index, use_compile = self._requested
        t0 = time.perf_counter()
        device = resolve_device(device_req, worker_index)
        dtype = resolve_dtype(dtype_req, device)
        from siglip.model.openvino_backend import resolve_backend

        backend = resolve_backend(self._backend, device)
        logger.info("Loading %s on %s (%s, backend %s)...", self.model_id, device, str(dtype).removeprefix("torch."),
                    backend)
        if self.model_id.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(self.model_id)):
            # Otherwise the hub client reports a confusing "Repo id must be in the form ..." error.
            raise FileNotFoundError(f"checkpoint directory {self.model_id} does not exist (SIGLIP_MODEL)")
        # OpenVINO converts from fp32 weights (and compares against fp32 torch); it picks its own precision.
        load_dtype = torch.float32 if backend == "openvino" else dtype
        model = AutoModel.from_pretrained(self.model_id, dtype=load_dtype, attn_implementation="sdpa")
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise TypeError(f"{type(model).__name__} is not a SigLIP-style dual encoder (no {method})")
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        # The text embedding is read at the last position: padding must be on the right (the hub file says so;
        # Gemma's class default is left).
        tokenizer.padding_side = "right"
        processor = AutoImageProcessor.from_pretrained(self.model_id)

        height, width = _processor_size(processor)
        scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        if getattr(processor, "do_normalize", True):
            mean = torch.tensor(processor.image_mean, dtype=torch.float32)
            std = torch.tensor(processor.image_std, dtype=torch.float32)
        else:
            mean, std = torch.zeros(3), torch.ones(3)
        # (x * scale - mean) / std folded into one multiply-add, done on the device in fp32.
        self._pixel_mul = (scale / std).view(1, 3, 1, 1).to(device)
        self._pixel_add = (-mean / std).view(1, 3, 1, 1).to(device)

        self._torch = torch
        self._tokenizer = SerialTokenizer(tokenizer)  # batch and count threads share it
        self._device = torch.device(device)
        self._size = (height, width)
        embed_dim = int(model.config.vision_config.hidden_size)
        patch_size = int(model.config.vision_config.patch_size)
        logit_scale = float(model.logit_scale.detach().float().cpu())
        logit_bias = float(model.logit_bias.detach().float().cpu())
        towers = self._openvino_towers(model, embed_dim, dtype_req) if backend == "openvino" else None
        graphs = None
        if towers is not None:
            # The torch weights are not needed any more (1.5 GB fp32 for the full model): only the IR runs.
            del model
            self._model = None
            self._dtype = torch.float32  # the towers take fp32 pixels whatever precision OpenVINO runs in
            self._embed = lambda x: torch.from_numpy(towers.vision(x.numpy()))
            self._embed_text = lambda ids: torch.from_numpy(towers.text(ids.numpy()))
            use_compile = False
        else:
            backend = "torch"
            model = model.to(dtype)  # after a failed OpenVINO attempt the model is still fp32
            self._model = model
            self._dtype = dtype
            self._vision = model.get_image_features
            self._text = model.get_text_features
            if use_compile:
                # Batch sizes vary with load: one dynamic-shape graph instead of a recompile per batch size.
                self._vision = torch.compile(model.get_image_features, dynamic=True)
            graphs = self._capture_graphs() if self._graph_max_batch else None
            self._embed = graphs if graphs is not None else self._embed_eager
            self._embed_text = self._embed_text_eager
        self._decode_jpegs = self._jpeg_decoder()
        self.info = ModelInfo(
            model=self.model_id, device=device,
            dtype=towers.precision if towers is not None else str(dtype).removeprefix("torch."),
            image_height=height, image_width=width, resample=int(getattr(processor, "resample", 2)),
            embed_dim=embed_dim, logit_scale=logit_scale, logit_bias=logit_bias,
            jpeg_decode=getattr(self._decode_jpegs, "backend", None),
            cuda_graphs=",".join(map(str, graphs.buckets)) if graphs is not None else None,
            backend=backend,
            patch_size=patch_size,
        )
        self.load_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        for n in (*self._warmup_sizes, 2, 8) if use_compile else self._warmup_sizes:
            self.encode_images(np.zeros((n, height, width, 3), dtype=np.uint8))
        if self._decode_jpegs is not None:
            self.encode_jpegs([(tiny_jpeg(), 6)])
        self.encode_texts(["warm-up"])
        self.warmup_seconds = time.perf_counter() - t1
        self.ready.set()
        logger.info("Loaded %s on %s (%s): %dx%d images, %d-dim embeddings, JPEG decode in %s, backend %s; "
                    "load %.1f s, warm-up %.1f s", self.model_id, device, self.info.dtype, height, width, embed_dim,
                    self.info.jpeg_decode or "the gateway",
                    "openvino (both towers)" if towers is not None else "torch, vision tower "
                    + ("compiled" if use_compile else "eager")
                    + (f", replayed from CUDA graphs ({self.info.cuda_graphs})" if self.info.cuda_graphs else ""),
                    self.load_seconds, self.warmup_seconds)

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready.is_set(), "error": self.error,
                "info": self.info.to_dict() if self.ready.is_set() and self.info else None}

    # -- encoding -------------------------------------------------------------------------------------------
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, D), L2-normalized."""
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels))
            if self._device.type == "cuda":
                x = x.pin_memory().to(self._device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().mul_(self._pixel_mul).add_(self._pixel_add).to(self._dtype)
            return self._embed(x).cpu().numpy()

    def encode_jpegs(self, items: Sequence[tuple[bytes, int]]) -> np.ndarray:
        """(JPEG bytes, EXIF orientation) -> float32 (N, D), decoded and resized on the model's device.

        Rows of images that fail to decode are NaN, so one corrupt file fails only its own request.
        """
        torch = self._torch
        F = torch.nn.functional
        height, width = self._size
        with torch.inference_mode():
            decoded = self._decode_jpegs([data for data, _ in items])
            x = torch.zeros((len(items), 3, height, width), dtype=torch.float32, device=self._device)
            bad = [i for i, img in enumerate(decoded) if img is None]
            # Images of one size (the usual case: one camera, one catalog) are resized in one call, not one each.
            by_shape: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
            for i, (img, (_, orientation)) in enumerate(zip(decoded, items)):
                if img is not None:
                    img = apply_orientation(img, orientation)
                    by_shape.setdefault(tuple(img.shape), []).append((i, img))
            for (_, h, w), group in by_shape.items():
                # In float32 a group costs 12 bytes a pixel: chunks of at most RESIZE_CHUNK_BYTES (64 twelve-MP
                # photos at once would need 9 GB).
                step = max(1, RESIZE_CHUNK_BYTES // (12 * h * w))
                for start in range(0, len(group), step):
                    part = group[start:start + step]
                    batch = torch.stack([img for _, img in part]).float()
                    # Antialiased bilinear in float, rounded like PIL's uint8 resize: cosine >= 0.9999 vs PIL.
                    x[[i for i, _ in part]] = F.interpolate(batch, size=(height, width), mode="bilinear",
                                                            antialias=True, align_corners=False).round_().clamp_(0, 255)
            x = x.mul_(self._pixel_mul).add_(self._pixel_add).to(self._dtype)
            out = self._embed(x).cpu().numpy()
        out[bad] = np.nan
        return out

    def _embed_eager(self, pixel_values: Any) -> Any:
        """Normalized pixels (N, 3, H, W) in the model dtype -> L2-normalized float32 embeddings, on the device."""
        return normalized_embedding(self._torch, self._vision(pixel_values=pixel_values))

    def _embed_text_eager(self, input_ids: Any) -> Any:
        return normalized_embedding(self._torch, self._text(input_ids=input_ids))

    def _openvino_towers(self, model: Any, embed_dim: int, dtype_req: str):
        """Both towers on OpenVINO, checked against this fp32 ``model``; None: keep torch (the reason is logged)."""
        from pathlib import Path

        from siglip.model import openvino_backend

        torch = self._torch

        def reference(fn):
            def run(x: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return normalized_embedding(torch, fn(torch.from_numpy(x))).numpy()
            return run

        cache_dir = Path(self._openvino_cache_dir) if self._openvino_cache_dir else openvino_backend.default_cache_dir()
        return openvino_backend.towers_or_none(
            model, self.model_id, cache_dir, self._size, TEXT_MAX_LENGTH, embed_dim, dtype_req, self._openvino_threads,
            reference_vision=reference(lambda x: model.get_image_features(pixel_values=x)),
            reference_text=reference(lambda ids: model.get_text_features(input_ids=ids)),
            text_ids=lambda texts: tokenize(self._tokenizer, texts))

    def _capture_graphs(self):
        if self._device.type != "cuda":
            logger.warning("SIGLIP_CUDA_GRAPHS=1 needs a CUDA device; the vision tower runs eager on %s", self._device)
            return None
        from siglip.model.graphs import bucket_sizes, graph_or_none

        torch, (height, width) = self._torch, self._size
        return graph_or_none(
            torch, self._embed_eager,
            lambda b: torch.zeros((b, 3, height, width), dtype=self._dtype, device=self._device),
            bucket_sizes(self._graph_max_batch), self._device)

    def _jpeg_decoder(self):
        """A batch decoder list[bytes] -> list[(3, h, w) uint8 tensor on the device | None], or None when the
        gateway should decode. "auto": nvJPEG when the model is on CUDA and torchvision can decode there."""
        mode = self._device_decode
        if mode == "off":
            return None
        if self._device.type == "cuda":
            try:
                decoder = _NvJpegDecoder(self._torch, self._device)
                decoder([tiny_jpeg()])
                return decoder
            except Exception as exc:  # noqa: BLE001 - any failure: decode in the gateway instead
                logger.warning("nvJPEG decoding unavailable (%s: %s); images are decoded in the gateway",
                               type(exc).__name__, exc)
                return None
        return _PilDecoder(self._torch, self._device) if mode == "on" else None

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> float32 (N, D), L2-normalized (lowercased, 64-token max_length padding, no mask)."""
        torch = self._torch
        ids = torch.from_numpy(tokenize(self._tokenizer, texts)).to(self._device)
        with torch.inference_mode():
            return self._embed_text(ids).cpu().numpy()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text the text tower reads (``siglip.model.text.token_counts``)."""
        return token_counts(self._tokenizer, texts)


def apply_orientation(img: Any, orientation: int) -> Any:
    """EXIF orientation on a (C, H, W) tensor, as PIL.ImageOps.exif_transpose does on an image."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, k=-1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, k=1, dims=(-2, -1))
    return img


class _NvJpegDecoder:
    backend = "nvjpeg"

    def __init__(self, torch: Any, device: Any):
        from torchvision.io import ImageReadMode, decode_jpeg

        self._torch, self._device = torch, device
        self._decode, self._mode = decode_jpeg, ImageReadMode.RGB

    def __call__(self, blobs: Sequence[bytes]) -> list[Any]:
        tensors = [self._torch.frombuffer(bytearray(b), dtype=self._torch.uint8) for b in blobs]
        try:
            return list(self._decode(tensors, mode=self._mode, device=self._device))
        except Exception:  # noqa: BLE001 - one bad file fails the whole batch call: retry one by one
            out = []
            for t in tensors:
                try:
                    out.append(self._decode(t, mode=self._mode, device=self._device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out


class _PilDecoder:
    """The same contract on CPU with PIL: lets tests run the forwarded-JPEG path without a GPU."""

    backend = "pil"

    def __init__(self, torch: Any, device: Any):
        self._torch, self._device = torch, device

    def __call__(self, blobs: Sequence[bytes]) -> list[Any]:
        import io

        from PIL import Image

        out = []
        for blob in blobs:
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
                out.append(self._torch.from_numpy(arr.copy()).permute(2, 0, 1).to(self._device))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def _processor_size(processor: Any) -> tuple[int, int]:
    size = processor.size
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    height, width = get("height"), get("width")
    if height and width:
        return int(height), int(width)
    raise ValueError(f"image processor size {size!r} is not a fixed height/width; this service expects a "
                     "fixed-resolution SigLIP checkpoint")

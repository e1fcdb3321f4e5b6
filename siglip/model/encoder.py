"""Model loading and encoding: the model service's side of every request.

``SiglipEncoder`` loads a SigLIP or SigLIP 2 checkpoint (hub id or local directory) with the Auto classes, in a
background thread, reads its ``CheckpointSpec`` (``siglip.model.spec``), has ``siglip.model.backends`` pick the
``Towers`` that run it, and encodes uint8 pixels, JPEG bytes, NaFlex patch grids and texts into L2-normalized
embeddings. Rescale and normalization run on the model's device so only uint8 pixels cross process boundaries.
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

from siglip.api.images import naflex_size, tiny_jpeg, to_patches
from siglip.model.backends import BackendChoice, build_towers
from siglip.model.device import resolve_device, resolve_dtype
from siglip.model.spec import CheckpointSpec, read_spec
from siglip.model.text import SerialTokenizer, token_counts, tokenize
from siglip.model.towers import Towers
from siglip.settings import Settings

logger = logging.getLogger("siglip.encoder")
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR: the only filter the device resize matches
RESIZE_CHUNK_BYTES = 256 * 1024 * 1024  # float32 pixels resized in one call on the model's device
# NaFlex images are padded to a multiple of this many patches (with the mask, padding changes no embedding) and
# each pad length runs as one batch: a 256-patch image never pays for a 1024-patch neighbour, and an image under
# its budget (the binary search leaves a few patches unused: 252 of 256, 972 of 1024) pads at most this much.
PATCH_STEP = 64
# Pixel batches arrive unpickled as read-only arrays; they are only read (the first op copies to float).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway and ``GET /info`` need to know about the loaded checkpoint (sent once, as a dict)."""

    model: str
    device: str
    dtype: str
    embed_dim: int
    logit_scale: float  # raw parameter; logits use exp(logit_scale)
    logit_bias: float
    patch_size: int
    text_length: int  # tokens each text is padded/truncated to
    family: str  # "SigLIP" | "SigLIP 2"
    model_type: str  # "siglip" (fixed resolution) | "siglip2" (NaFlex)
    revision: str | None  # the hub commit the files came from; None for a local directory
    image_height: int | None  # fixed resolution: what every image is resized to; None for NaFlex
    image_width: int | None
    resample: int  # PIL filter of the checkpoint's processor
    max_num_patches: int | None  # NaFlex: patches per image unless a request asks otherwise
    max_num_patches_limit: int | None  # NaFlex: the most a request may ask for
    jpeg_decode: str | None  # "nvjpeg" / "pil" when the gateway may forward JPEG bytes, else None
    cuda_graphs: str | None  # the captured batch sizes, "1,2,4,...", when the vision tower runs from graphs
    backend: str  # "torch" / "openvino": what runs both towers
    vision_path: str  # how the vision tower runs: eager, compiled, CUDA graphs (...), OpenVINO (...)

    @property
    def naflex(self) -> bool:
        return self.model_type == "siglip2"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "naflex": self.naflex}


def pad_length(patches: int, limit: int) -> int:
    """The NaFlex pad length of an image of ``patches`` patches: the next multiple of ``PATCH_STEP``, at most
    ``limit``."""
    return min(limit, -(-patches // PATCH_STEP) * PATCH_STEP)


class SiglipEncoder:
    """``settings``: the service's (model, device, dtype, backend and patch settings are read from it)."""

    def __init__(self, settings: Settings, worker_index: int = 1, warmup_batch_sizes: Sequence[int] = (1,)):
        self.settings = settings
        self.model_id = settings.model
        self._worker_index = worker_index
        self._warmup_sizes = tuple(warmup_batch_sizes)
        self.spec: CheckpointSpec | None = None
        self.towers: Towers | None = None
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
            self._warm_up()
            if on_loaded is not None and self.info is not None:
                on_loaded(self.info)
        except Exception as exc:
            cause, expected = explain_load_error(self.model_id, exc)
            self.error = f"loading {self.model_id} failed: {cause}"
            if expected:  # the cause and the remedy in one line; a traceback would only bury them
                logger.error("%s; the service stays not-ready", self.error)
            else:
                logger.exception("Model %s failed to load; the service stays not-ready", self.model_id)

    def _load(self) -> None:
        import torch

        from siglip.model.openvino_backend import resolve_backend

        s = self.settings
        t0 = time.perf_counter()
        device = resolve_device(s.device, self._worker_index)
        dtype = resolve_dtype(s.dtype, device)
        backend = resolve_backend(s.backend, device)
        logger.info("Loading %s on %s (%s, backend %s)...", self.model_id, device, str(dtype).removeprefix("torch."),
                    backend)
        # OpenVINO converts from fp32 weights (and compares against fp32 torch); it picks its own precision.
        model, processor, tokenizer = load_checkpoint(self.model_id, torch.float32 if backend == "openvino" else dtype)
        spec = read_spec(model.config, processor, tokenizer)
        self._torch, self._device = torch, torch.device(device)
        self._tokenizer = SerialTokenizer(tokenizer)  # batch and count threads share it
        self.spec = spec
        model = model.to(device).eval()
        logit_scale = float(model.logit_scale.detach().float().cpu())
        logit_bias = float(model.logit_bias.detach().float().cpu())
        revision = hub_revision(self.model_id)
        self.towers = build_towers(spec, model, self.model_id, BackendChoice(
            backend=backend, backend_setting=s.backend, device=self._device, dtype=dtype, dtype_setting=s.dtype,
            compile=s.compile and backend == "torch", cuda_graphs_max_batch=s.max_batch_size if s.cuda_graphs else 0,
            openvino_cache_dir=s.openvino_cache_dir, openvino_threads=s.openvino_threads),
            text_ids=self.tokenize)
        del model  # OpenVINO towers do not need the torch weights (1.5 GB fp32 for the full model)

        self._pixel_mul, self._pixel_add = (t.to(device) for t in pixel_affine(torch, spec))
        self._decode_jpegs = None if spec.naflex else self._jpeg_decoder()
        if spec.naflex and (s.device_decode == "on" or (s.device_decode == "auto" and self._device.type == "cuda")):
            logger.info("SIGLIP_DEVICE_DECODE does not apply to NaFlex checkpoints: the gateway resizes each image "
                        "to its own grid and cuts its patches")
        default_patches = limit = None
        if spec.naflex:
            limit = s.max_num_patches_limit
            default_patches = s.max_num_patches or spec.max_num_patches
            if default_patches > limit:
                raise ValueError(f"the default patch budget {default_patches} is over SIGLIP_MAX_NUM_PATCHES_LIMIT="
                                 f"{limit}")
            self._patch_limit = limit
        height, width = spec.image_size or (None, None)
        towers = self.towers
        self.info = ModelInfo(
            model=self.model_id, revision=revision,
            device=device, dtype=towers.precision, embed_dim=spec.embed_dim, logit_scale=logit_scale,
            logit_bias=logit_bias, patch_size=spec.patch_size, text_length=spec.text_length, family=spec.family,
            model_type=spec.model_type, image_height=height, image_width=width, resample=spec.resample,
            max_num_patches=default_patches, max_num_patches_limit=limit,
            jpeg_decode=getattr(self._decode_jpegs, "backend", None),
            cuda_graphs=",".join(map(str, getattr(towers, "buckets", ()))) or None,  # CudaGraphTowers only
            backend=towers.backend, vision_path=towers.path)
        self.load_seconds = time.perf_counter() - t0

    def _warm_up(self) -> None:
        t1 = time.perf_counter()
        spec, info = self.spec, self.info
        if spec.naflex:
            for n in self._warmup_sizes:
                self.encode_patches([self.warmup_grid()] * n)
        else:
            height, width = spec.image_size
            sizes = (*self._warmup_sizes, 2, 8) if self.towers.path == "compiled" else self._warmup_sizes
            for n in sizes:
                self.encode_images(np.zeros((n, height, width, 3), dtype=np.uint8))
            if self._decode_jpegs is not None:
                self.encode_jpegs([(tiny_jpeg(), 6)])
        self.encode_texts(["warm-up"])
        self.warmup_seconds = time.perf_counter() - t1
        self.ready.set()
        logger.info("Loaded %s%s: %s; on %s (%s), backend %s, vision tower %s, JPEG decode in %s; load %.1f s, "
                    "warm-up %.1f s", self.model_id, f" at {info.revision[:12]}" if info.revision else "",
                    spec.describe(info.max_num_patches) + (f" (requests up to {info.max_num_patches_limit})"
                                                           if spec.naflex else ""),
                    info.device, info.dtype, info.backend, info.vision_path, info.jpeg_decode or "the gateway",
                    self.load_seconds, self.warmup_seconds)

    def warmup_grid(self) -> tuple[np.ndarray, int, int]:
        """A NaFlex item at the default budget (a 4:3 image's grid): what start-up calls run, so warm-up and the
        batcher's timing see the size real images have."""
        patch = self.spec.patch_size
        rows, cols = (n // patch for n in naflex_size(3 * patch * 16, 4 * patch * 16, patch, self.info.max_num_patches))
        return to_patches(np.zeros((rows * patch, cols * patch, 3), np.uint8), patch), rows, cols

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready.is_set(), "error": self.error,
                "info": self.info.to_dict() if self.ready.is_set() and self.info else None}

    # -- encoding -------------------------------------------------------------------------------------------
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) at the checkpoint's size -> float32 (N, D), L2-normalized."""
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels))
            if self._device.type == "cuda":
                x = x.pin_memory().to(self._device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().mul_(self._pixel_mul).add_(self._pixel_add)
            return self.towers.vision(pixel_values=x.to(self.towers.input_dtype)).cpu().numpy()

    def encode_patches(self, items: Sequence[tuple[np.ndarray, int, int]]) -> np.ndarray:
        """NaFlex: (uint8 patch rows (rows*cols, P*P*3), rows, cols) per image -> float32 (N, D), L2-normalized.

        Images are grouped by pad length (``patch_buckets``); each group runs as one batch with the attention mask
        and grid shapes ``Siglip2ImageProcessor`` gives, so mixed aspect ratios and budgets batch together without
        changing any embedding."""
        torch = self._torch
        if not self.spec.naflex:
            raise ValueError(f"{self.model_id} is not a NaFlex checkpoint: send pixels (encode_images)")
        width = self._pixel_mul.shape[0]
        out = np.empty((len(items), self.spec.embed_dim), dtype=np.float32)
        groups: dict[int, list[int]] = {}
        for i, (patches, rows, cols) in enumerate(items):
            if patches.ndim != 2 or patches.shape != (rows * cols, width):
                raise ValueError(f"item {i}: patch rows of shape {patches.shape} for a {rows}x{cols} grid; expected "
                                 f"({rows * cols}, {width})")
            if rows * cols > self._patch_limit:
                raise ValueError(f"item {i}: {rows * cols} patches, over SIGLIP_MAX_NUM_PATCHES_LIMIT="
                                 f"{self._patch_limit}")
            groups.setdefault(pad_length(rows * cols, self._patch_limit), []).append(i)
        with torch.inference_mode():
            for length, rows_of_group in groups.items():
                x = torch.zeros((len(rows_of_group), length, width), dtype=torch.float32, device=self._device)
                mask = torch.zeros((len(rows_of_group), length), dtype=torch.int32, device=self._device)
                shapes = torch.tensor([items[i][1:] for i in rows_of_group], dtype=torch.int64, device=self._device)
                for j, i in enumerate(rows_of_group):
                    patches = torch.from_numpy(np.ascontiguousarray(items[i][0])).to(self._device)
                    x[j, :len(patches)] = patches.float().mul_(self._pixel_mul).add_(self._pixel_add)
                    mask[j, :len(patches)] = 1
                out[rows_of_group] = self.towers.vision(
                    pixel_values=x.to(self.towers.input_dtype), pixel_attention_mask=mask,
                    spatial_shapes=shapes).cpu().numpy()
        return out

    def encode_jpegs(self, items: Sequence[tuple[bytes, int]]) -> np.ndarray:
        """(JPEG bytes, EXIF orientation) -> float32 (N, D), decoded and resized on the model's device
        (fixed-resolution checkpoints).

        Rows of images that fail to decode are NaN, so one corrupt file fails only its own request.
        """
        torch = self._torch
        F = torch.nn.functional
        height, width = self.spec.image_size
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
            x = x.mul_(self._pixel_mul).add_(self._pixel_add).to(self.towers.input_dtype)
            out = self.towers.vision(pixel_values=x).cpu().numpy()
        out[bad] = np.nan
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> float32 (N, D), L2-normalized (``siglip.model.text``: lowercased, padded to the checkpoint's
        text length, no mask)."""
        torch = self._torch
        ids = torch.from_numpy(self.tokenize(texts)).to(self._device)
        with torch.inference_mode():
            return self.towers.text(ids).cpu().numpy()

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return tokenize(self._tokenizer, texts, self.spec.text_length)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text the text tower reads (``siglip.model.text.token_counts``)."""
        return token_counts(self._tokenizer, texts, self.spec.text_length)

    def _jpeg_decoder(self):
        """A batch decoder list[bytes] -> list[(3, h, w) uint8 tensor on the device | None], or None when the
        gateway should decode. "auto": nvJPEG when the model is on CUDA and torchvision can decode there."""
        mode = self.settings.device_decode
        if mode == "off":
            return None
        if self.spec.resample != BILINEAR:
            # The device resize is antialiased bilinear, which matches PIL's bilinear only; a bicubic checkpoint
            # (SigLIP 1) would get other pixels from a JPEG than from a PNG of the same photo.
            if mode == "on" or self._device.type == "cuda":
                logger.info("JPEGs are decoded in the gateway: this checkpoint resizes with PIL filter %d, and "
                            "decoding on the device resizes bilinear only", self.spec.resample)
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


def pixel_affine(torch: Any, spec: CheckpointSpec) -> tuple[Any, Any]:
    """(mul, add) with x * mul + add = (x * rescale - mean) / std, shaped for the encoder's uint8 inputs: (1, 3, 1, 1)
    for (N, 3, H, W) pixels; for NaFlex rows, channel-last within each patch ((py, px, c) flattened), the
    per-channel values repeated P*P times."""
    mul = torch.tensor([spec.rescale / sd for sd in spec.std], dtype=torch.float32)
    add = torch.tensor([-m / sd for m, sd in zip(spec.mean, spec.std)], dtype=torch.float32)
    if spec.naflex:
        return mul.repeat(spec.patch_size ** 2), add.repeat(spec.patch_size ** 2)
    return mul.view(1, 3, 1, 1), add.view(1, 3, 1, 1)


def hub_revision(model_id: str) -> str | None:
    """The hub commit a checkpoint's files were read from (its snapshot folder in the hub cache); None for a local
    directory. transformers 5 no longer keeps it on the config."""
    if os.path.isdir(os.path.expanduser(model_id)):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - no hub cache: nothing to report
        return None
    return os.path.basename(os.path.dirname(found)) if isinstance(found, str) else None


class CheckpointNotFound(FileNotFoundError):
    """SIGLIP_MODEL names a local directory that is not there."""


OFFLINE_HINT = ("set SIGLIP_MODEL to a local checkpoint directory and HF_HUB_OFFLINE=1 (docs/configuration.md: Running offline), "
                "or give this machine access to huggingface.co")


def explain_load_error(model_id: str, exc: BaseException) -> tuple[str, bool]:
    """(one line saying why ``model_id`` did not load and what to do, whether the failure is an expected one: a
    missing directory, no hub access, an unknown or gated repo, out of memory)."""
    name, text = type(exc).__name__, (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, CheckpointNotFound):
        return text, True
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError":
        return f"out of memory ({name}): give it more memory, a smaller model or SIGLIP_DTYPE=bfloat16", True
    if name in ("GatedRepoError", "RepositoryNotFoundError") or "is not a local folder and is not a valid model" \
            in text:
        why = (f"{model_id} is neither a local directory nor a model on the hub that this machine may read "
               f"({name}; a gated or private model needs HF_TOKEN)")
        return why, True
    lowered = text.lower()
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "couldn't connect" in lowered \
            or "offline mode" in lowered or "cannot find the requested files in the local cache" in lowered:
        return f"the Hugging Face hub is unreachable and {model_id} is not in the local cache: {OFFLINE_HINT}", True
    if "does not appear to have a file named" in lowered:  # a directory without config.json, weights, ...
        return f"{text} (SIGLIP_MODEL must be a checkpoint directory: config, weights, processor and tokenizer)", True
    return f"{name}: {text}", False  # its first line: /readyz and the log line stay one line


def load_checkpoint(model_id: str, dtype: Any) -> tuple[Any, Any, Any]:
    """(model, image processor, tokenizer) of a checkpoint, each class picked by the Auto classes from the
    checkpoint's ``model_type`` (SiglipModel or Siglip2Model; ``architectures`` is not needed)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    if model_id.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model_id)):
        # Otherwise the hub client reports a confusing "Repo id must be in the form ..." error.
        raise CheckpointNotFound(f"checkpoint directory {model_id} does not exist (SIGLIP_MODEL)")
    model = AutoModel.from_pretrained(model_id, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    # The text embedding is read at the last position: padding must be on the right (the hub files say so;
    # Gemma's and Siglip2Tokenizer's class default is left).
    tokenizer.padding_side = "right"
    processor = AutoImageProcessor.from_pretrained(model_id)
    return model.eval(), processor, tokenizer


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

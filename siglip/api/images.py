"""Image inputs: base64 / data-URI decoding, format and size checks, and the exact resize the checkpoint expects.

Everything here is pure CPU work on bytes, run in the gateway's decode pool. The pixel math matches the
checkpoint's SiglipImageProcessor (PIL backend): ``exif_transpose``, ``convert("RGB")``, a squash resize to the
processor's size with its resample filter (bilinear for SigLIP 2), kept as uint8. Rescale and normalize happen on
the model's device (``encoder.py``), so only uint8 pixels travel between processes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from siglip.api.errors import BadRequest
from siglip.settings import fmt_bytes

# Formats the API promises (MPO is how PIL names multi-picture JPEGs from phones).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP"})
FORMAT_NAMES = "JPEG, PNG, GIF, WebP or BMP"

# PIL's own size warning must not decide (SIGLIP_MAX_IMAGE_PIXELS does, in open_checked); its hard error at twice
# Image.MAX_IMAGE_PIXELS still stops absurd headers. A process-wide filter: catch_warnings is not thread-safe and
# decoding runs in a thread pool.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
_B64_CHARS = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


@dataclass(frozen=True)
class ImageSpec:
    """What the checkpoint's image processor resizes to: one fixed size, or (NaFlex) a patch budget."""

    height: int | None
    width: int | None
    resample: int = Image.Resampling.BILINEAR
    # JPEG DCT-domain downscaling for photos at least this many times the target size (0 disables).
    jpeg_draft_factor: float = 0.0
    patch_size: int | None = None
    max_num_patches: int | None = None  # set for NaFlex checkpoints: images become PatchGrids

    @property
    def naflex(self) -> bool:
        return self.max_num_patches is not None


@dataclass(frozen=True)
class PatchGrid:
    """A NaFlex image: uint8 patch rows (rows*cols, P*P*3), channel-last within each patch, row-major."""

    patches: np.ndarray
    rows: int
    cols: int


def naflex_size(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """The (height, width) ``Siglip2ImageProcessor`` resizes an image to: the largest scale (binary search, as
    transformers' ``get_image_size_for_max_num_patches``) whose sides, each rounded up to a multiple of ``patch``
    and at least one patch, give at most ``max_patches`` patches. Aspect ratio kept; small images grow."""

    def side(scale: float, size: int) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        scale = (lo + hi) / 2
        if (side(scale, height) / patch) * (side(scale, width) / patch) <= max_patches:
            lo = scale
        else:
            hi = scale
    return side(lo, height), side(lo, width)


def to_patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """uint8 (H, W, 3), both sides multiples of ``patch`` -> (H/P * W/P, P*P*3) rows, as
    ``Siglip2ImageProcessor``'s ``convert_image_to_patches`` lays them out."""
    h, w, c = pixels.shape
    grid = pixels.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape((h // patch) * (w // patch), patch * patch * c))


def url_scheme(value: str) -> str | None:
    """The lower-cased scheme of ``scheme://...`` strings, else None."""
    m = _URL_SCHEME.match(value[:32])
    return m.group(1).lower() if m else None


def is_http_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


def too_large(where: str, size: int, max_bytes: int) -> BadRequest:
    """The refusal of an image over SIGLIP_MAX_IMAGE_BYTES, however it came (base64, upload, file)."""
    return BadRequest(f"{where}: image is {fmt_bytes(size)}, over the {fmt_bytes(max_bytes)} limit "
                      "(SIGLIP_MAX_IMAGE_BYTES)")


def decode_image_string(value: str, where: str, max_bytes: int) -> bytes:
    """Raw bytes of a base64 string or ``data:[mime];base64,`` URI, refusing oversize input before decoding."""
    payload = value
    if value[:5].lower() == "data:":
        header, sep, payload = value.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise BadRequest(f"{where}: data URI must be of the form data:image/...;base64,<data>")
    approx = (len(payload) * 3) // 4
    if approx > max_bytes:
        raise too_large(where, approx, max_bytes)
    data = _b64decode(payload)
    if data is None:
        raise BadRequest(f"{where}: not a valid image URL (http/https) or base64-encoded image")
    if not data:
        raise BadRequest(f"{where}: image data is empty")
    return data


def _b64decode(payload: str) -> bytes | None:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    # Common client variations: line-wrapped (MIME), URL-safe alphabet, missing padding.
    if not _B64_CHARS.fullmatch(payload):
        return None
    cleaned = "".join(payload.split()).replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        return None


def looks_like_image_string(value: str) -> bool:
    """True when a (short) string is a base64 or data-URI image: its decoded bytes open as an image."""
    if value[:5].lower() != "data:" and not _B64_CHARS.fullmatch(value):
        return False
    try:
        data = decode_image_string(value, "", max_bytes=len(value))
    except BadRequest:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format is not None
    except Exception:  # noqa: BLE001 - any failure to identify means "not an image"
        return False


def open_checked(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Open an image lazily (header only) and refuse unsupported formats and oversized dimensions."""
    try:
        # Only the plugins of the formats we accept ever see untrusted bytes.
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError:
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise BadRequest(f"{where}: image dimensions are over the {limit / 1e6:g} megapixel limit "
                         f"(SIGLIP_MAX_IMAGE_PIXELS)") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for garbage input
        raise BadRequest(f"{where}: data is not a supported image ({FORMAT_NAMES})") from None
    if img.format not in SUPPORTED_FORMATS:
        raise BadRequest(f"{where}: image format {img.format} is not supported (use {FORMAT_NAMES})")
    width, height = img.size
    if width * height > max_pixels:
        raise BadRequest(f"{where}: image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                         f"{max_pixels / 1e6:g} megapixel limit (SIGLIP_MAX_IMAGE_PIXELS)")
    if width == 0 or height == 0:
        raise BadRequest(f"{where}: image has no pixels ({width}x{height})")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then any mode converted to RGB, as the reference preprocessing does."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: PIL's RGB conversion clips at 255 (a white image); scale to 8 bits instead.
        arr = np.asarray(img.convert("I"), dtype=np.int64)
        peak = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        img = Image.fromarray((arr * 255 // max(peak, 1)).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: exif_transpose ignores it too
        return 1


def load_pixels(data: bytes, where: str, spec: ImageSpec, max_pixels: int) -> np.ndarray | PatchGrid:
    """Bytes -> uint8 array of shape (height, width, 3), resized exactly as the checkpoint's processor does; for
    NaFlex checkpoints, the image resized within its patch budget and cut into patch rows."""
    img = open_checked(data, where, max_pixels)
    try:
        if spec.naflex:
            # The grid follows the full-size (oriented) image, as in the processor, whatever a draft decodes.
            swapped = _orientation(img) in (5, 6, 7, 8)  # exif_transpose will swap the sides
            h, w = img.size if swapped else img.size[::-1]
            patch = spec.patch_size
            height, width = naflex_size(h, w, patch, spec.max_num_patches)
            if spec.jpeg_draft_factor and img.format in ("JPEG", "MPO") and min(w / width, h / height) >= \
                    spec.jpeg_draft_factor:
                img.draft("RGB", (height * 2, width * 2) if swapped else (width * 2, height * 2))  # file's own axes
            img = to_rgb(img).resize((width, height), resample=Image.Resampling(spec.resample))
            return PatchGrid(to_patches(np.asarray(img, dtype=np.uint8), patch), height // patch, width // patch)
        if spec.jpeg_draft_factor and img.format in ("JPEG", "MPO"):
            w, h = img.size
            if min(w / spec.width, h / spec.height) >= spec.jpeg_draft_factor:
                img.draft("RGB", (spec.width * 2, spec.height * 2))
        img = to_rgb(img)
        img = img.resize((spec.width, spec.height), resample=Image.Resampling(spec.resample))
        return np.asarray(img, dtype=np.uint8)
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files fail inside PIL with assorted types
        raise BadRequest(f"{where}: image could not be decoded ({type(exc).__name__}: {exc})") from None


# Larger JPEGs are decoded in the gateway: a device batch of 64 full-resolution decodes must fit in GPU memory.
FORWARD_MAX_PIXELS = 16_000_000


@dataclass(frozen=True)
class JpegPayload:
    """A JPEG forwarded undecoded to the model service, which decodes it next to the GPU (nvJPEG).

    Only the header was read here: format, mode and pixel count are checked, and the EXIF orientation is
    passed along so the model side can apply it to the decoded tensor.
    """

    data: bytes
    orientation: int = 1


def prepare_image(data: bytes, where: str, spec: ImageSpec, max_pixels: int,
                  forward_jpeg: bool = False) -> np.ndarray | PatchGrid | JpegPayload:
    """Pixels, or (``forward_jpeg`` and a plain RGB/greyscale JPEG) the checked bytes themselves."""
    if forward_jpeg:
        img = open_checked(data, where, max_pixels)
        if img.format == "JPEG" and img.mode in ("RGB", "L") and img.size[0] * img.size[1] <= FORWARD_MAX_PIXELS:
            orientation = _orientation(img)
            return JpegPayload(data, orientation if 1 <= orientation <= 8 else 1)
    return load_pixels(data, where, spec, max_pixels)


def prepare_image_string(value: str, where: str, spec: ImageSpec, max_bytes: int, max_pixels: int,
                         forward_jpeg: bool = False) -> np.ndarray | PatchGrid | JpegPayload:
    """A base64/data-URI input to pixels or a JpegPayload (one call, so it runs as one unit in the pool)."""
    return prepare_image(decode_image_string(value, where, max_bytes), where, spec, max_pixels, forward_jpeg)


def tiny_jpeg() -> bytes:
    """A small valid JPEG, for warming up decoders."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (120, 60, 30)).save(buf, "JPEG")
    return buf.getvalue()

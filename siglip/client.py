"""Typed Python clients for the SigLIP 2 service: ``SiglipClient`` (sync) and ``AsyncSiglipClient`` (asyncio).

Both are thin shells over BentoML's ``bentoml.SyncHTTPClient`` / ``bentoml.AsyncHTTPClient``. Everything but the
I/O is shared as pure functions: the ``*_call`` functions turn arguments into a ``Call`` (API name, ``inputs``,
``parameters`` or a multipart ``Form``, and the parser for the answer), ``error_from_bentoml`` / ``json_answer``
/ ``unreachable`` turn failures into ``SiglipError``. Each client only sends a ``Call`` and maps what went wrong.

How a call travels: when every image of it is local data (a file, bytes, a PIL image), as a multipart form
(``siglip.server.uploads``) with the images as files: their bytes as they are, a quarter smaller than base64, and
no encoding on either side. Files go under ``images`` for a list of images (even of one) and ``image`` for one;
texts under ``texts``; the parameters as one ``parameters`` JSON field. Each file is named by its path's base name,
else ``image-<i>`` (with the extension its first bytes say), which the server's error messages quote:
``inputs[1] (pic.jpg): data is not a supported image ...``. When any image is a URL or a string (or a list is
empty, or the options or a text are past the 1 MB a form field may hold), the whole call is the JSON body instead,
local images base64-encoded within it (``image_to_wire``).
Forms go through the client's own httpx client (BentoML's sends JSON only), with the same token, timeout,
retries and errors. Each kind of image:

- ``http://`` / ``https://`` URL: sent as is, the server fetches it (its URL policy applies).
- ``data:`` URI: sent as is.
- a ``str`` naming an existing file, or any ``os.PathLike``: the file's bytes, untouched (a JPEG stays a JPEG
  and its EXIF orientation is applied by the server).
- any other ``str``: taken for base64 when it only has base64 characters (sent as is), else a
  ``FileNotFoundError`` naming it (a mistyped path, rather than a puzzling "not base64" from the server).
- ``bytes`` / ``bytearray`` / ``memoryview``: encoded file contents, sent as they are.
- ``PIL.Image.Image``: saved as PNG, lossless, so the server embeds exactly the pixels you hold (modes PNG
  cannot store, such as CMYK, are converted to RGB first, as the server would). EXIF data is kept, so the
  server applies the orientation as it does for the file. Not JPEG, even for images opened from a JPEG:
  re-encoding loses detail a second time (a quality-90 test picture re-saved with its own quantization tables
  moved by 4.8 levels per pixel on average, 39 at most). For JPEG files you have on disk or in memory, pass
  the path or the bytes instead: they travel untouched, are several times smaller than a PNG of the same
  photo (mind ``SIGLIP_MAX_BODY_BYTES`` for big batches), cost no encoding time, and take the service's GPU
  JPEG decoding path where it has one.

Answers that say "ask again" (429 busy, 503 model loading, restarting or not answering) are retried ``retries``
times (5 by default, 25-50 s in all) with capped exponential backoff and jitter before ``SiglipError`` is raised.

A single image (or text) and a list of them are told apart by ``list``/``tuple``: anything else is one item.
Per-request limits (``SIGLIP_MAX_IMAGES_PER_REQUEST``, 64 by default; ``SIGLIP_MAX_TEXTS_PER_REQUEST``,
1024; ``SIGLIP_MAX_BODY_BYTES``, 64 MiB, counting the whole form or JSON body: the files' own sizes plus a few
hundred bytes each, or 4/3 of them as base64 in JSON) are the caller's to respect: split bigger batches yourself,
or the server answers 400/413, raised as ``SiglipError``.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeAlias, TypeVar, overload

import bentoml
import httpx
import numpy as np
from bentoml.exceptions import BentoMLException
from PIL import Image
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from siglip.server.uploads import MAX_FIELD_BYTES

__all__ = ["AsyncSiglipClient", "ImageLike", "LabelScore", "SiglipClient", "SiglipError", "image_to_wire"]

DEFAULT_URL = "http://localhost:3000"
APIS = ("zero_shot", "image_embedding", "text_embedding", "similarity")
# The server asks to be asked again: busy (429), or its model is loading, restarting or not answering (503).
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Backoff:
    attempts: int = 4  # tries per call, the first included
    base_s: float = 2.0  # 1-2, 2-4, 4-8, 8-16, 10-20 s with 5 retries: 25-50 s in all, more than a model worker's
    # restart (13-18 s measured on a CPU); BentoML's client hides the server's Retry-After
    cap_s: float = 20.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds before retry number ``retry`` (0-based): half the capped exponential step, plus jitter up to
        the other half, so clients refused together do not come back together."""
        step = min(self.cap_s, self.base_s * 2 ** retry)
        return step / 2 + rng.uniform(0, step / 2)

ImageLike: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image
Images: TypeAlias = ImageLike | list[ImageLike] | tuple[ImageLike, ...]
Texts: TypeAlias = str | Sequence[str]
T = TypeVar("T")

# Same alphabet the server accepts: standard and URL-safe base64, padding, line breaks.
_BASE64 = re.compile(r"[A-Za-z0-9+/=_\-\s]*")
_PATH_MAX = 4096  # longer strings cannot name a file; skip the stat() for big base64 payloads
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


class SiglipError(Exception):
    """A call that failed.

    ``status`` is the HTTP status (400 bad input, 401 token, 413 body too large, 429 busy, 503 model loading,
    504 deadline, ...), or None when the server could not be reached or the connection broke (refused, reset,
    timed out): those two, 429 and 503 are worth retrying. ``message`` is the server's ``{"error": ...}`` text
    verbatim (or the whole body when it is not that JSON), or for status None what went wrong on the way.
    """

    def __init__(self, status: int | None, message: str):
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message if self.status is None else f"HTTP {self.status}: {self.message}"


class LabelScore(BaseModel):
    """One zero-shot result: a candidate label and its score (softmax by default; see ``function_to_apply``)."""

    model_config = ConfigDict(frozen=True)

    label: str
    score: float


class _Embedding(BaseModel):
    embedding: list[float]


class _Similarity(BaseModel):
    similarity_scores: list[list[float]]
    image_count: int
    text_count: int


_RANKING = TypeAdapter(list[LabelScore])
_RANKINGS = TypeAdapter(list[list[LabelScore]])
_EMBEDDINGS = TypeAdapter(list[_Embedding])
_SIMILARITY = TypeAdapter(_Similarity)


# ---------------------------------------------------------------------------------------------------------------
# request building (pure)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Form:
    """A call's body as a multipart form, the way ``siglip.server.uploads`` reads it: image files (``files``,
    httpx's ``(field, (filename, bytes))`` pairs) and text fields (``fields``: texts and the parameters as JSON)."""

    files: tuple[tuple[str, tuple[str, bytes]], ...]
    fields: dict[str, str | list[str]]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: what to send and how to read the answer. With ``form``, the body is that form (local images
    as files) and ``inputs`` is None; else the JSON body ``{"inputs": inputs, "parameters": parameters}``."""

    api: str
    inputs: Any
    parameters: dict[str, Any]
    parse: Callable[[Any], T]
    form: Form | None = None


@dataclass(frozen=True)
class ImageFile:
    """Local image data: a file's bytes (``name``: its base name) or bytes / a PIL image the caller holds."""

    data: bytes
    name: str | None = None


def image_to_wire(image: ImageLike, where: str = "image") -> str:
    """The string the API's JSON takes for one image (see the module docstring for the rules)."""
    item = _image_item(image, where)
    return item if isinstance(item, str) else _b64(item.data)


def _image_item(image: ImageLike, where: str) -> ImageFile | str:
    """Local data as an ``ImageFile``; a URL, data URI or base64 string as the string the API takes."""
    if isinstance(image, str):
        head = image[:8].lower()
        if head.startswith(("http://", "https://", "data:")):
            return image
        if len(image) <= _PATH_MAX and os.path.isfile(image):
            return _file(image, where)
        if _BASE64.fullmatch(image[:_PATH_MAX]):  # the head is enough to tell; the server checks the rest
            return image
        raise FileNotFoundError(errno.ENOENT, f"{where}: no such file, and not an http(s) URL, data URI or "
                                              "base64 string", image)
    if isinstance(image, os.PathLike):
        return _file(image, where)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return ImageFile(bytes(image))
    if isinstance(image, Image.Image):
        return ImageFile(encode_pil(image))
    raise TypeError(f"{where}: unsupported image type {type(image).__name__}; expected a file path, bytes, a "
                    "PIL image, or an http(s) URL, data URI or base64 string")


def encode_pil(img: Image.Image) -> bytes:
    """PNG file bytes for a PIL image, with its EXIF data (orientation)."""
    buf = io.BytesIO()
    exif = img.getexif()
    extra: dict[str, Any] = {"exif": exif} if len(exif) else {}
    # compress_level=1: on photos the default (6) takes ~3.5x longer for ~15% fewer bytes.
    (img if img.mode in _PNG_MODES else img.convert("RGB")).save(buf, "PNG", compress_level=1, **extra)
    return buf.getvalue()


def _file(path: str | os.PathLike[str], where: str) -> ImageFile:
    try:
        with open(path, "rb") as f:
            return ImageFile(f.read(), os.path.basename(os.fspath(path)))
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{where}: no such file", os.fspath(path)) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _is_batch(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _images(images: Images) -> tuple[list[ImageFile | str], bool]:
    """Each image as local data or an API string (``_image_item``), and whether ``images`` is a batch."""
    if _is_batch(images):
        return [_image_item(im, f"images[{i}]") for i, im in enumerate(images)], True
    return [_image_item(images, "images")], False  # type: ignore[arg-type]


def _wire(items: list[ImageFile | str]) -> list[str]:
    return [item if isinstance(item, str) else _b64(item.data) for item in items]


def _texts(texts: Texts) -> list[str]:
    # A lone string is one text, not a sequence of characters.
    return [texts] if isinstance(texts, str) else list(texts)


def _form(items: list[ImageFile | str], batch: bool, parameters: dict[str, Any],
          texts: list[str] | None = None) -> Form | None:
    """The call as a multipart form when every image is local data: its bytes travel as they are, a quarter
    smaller than base64. None (JSON) when any image is a URL or string, or a list is empty: a form has no empty
    list, so the server's answer to one is JSON's."""
    local = [item for item in items if isinstance(item, ImageFile)]
    if not items or len(local) < len(items) or texts == []:
        return None
    options = json.dumps(parameters, ensure_ascii=False) if parameters else ""
    try:
        fields_ok = all(isinstance(t, str) and len(t.encode()) <= MAX_FIELD_BYTES for t in texts or ())
        fields_ok = fields_ok and len(options.encode()) <= MAX_FIELD_BYTES
    except UnicodeEncodeError:  # a lone surrogate (os.fsdecode's): JSON escapes it, a form field cannot carry it
        fields_ok = False
    if not fields_ok:
        # Past what the server reads from one form field (or not text at all): JSON, which answers as JSON does.
        return None
    # "images" is a batch even of one (the server answers in the batch shape), "image" one input.
    field = "images" if batch else "image"
    files = tuple((field, (item.name or _file_name(item.data, i), item.data)) for i, item in enumerate(local))
    fields: dict[str, str | list[str]] = {"parameters": options} if parameters else {}
    if texts is not None:
        fields["texts"] = texts
    return Form(files, fields)


# Leading bytes of the formats the service takes: a name for bytes without one (the server goes by the content;
# the name is what its error messages call the file).
_SIGNATURES = ((0, b"\xff\xd8\xff", "jpg"), (0, b"\x89PNG", "png"), (0, b"GIF8", "gif"), (8, b"WEBP", "webp"),
               (0, b"BM", "bmp"))


def _file_name(data: bytes, index: int) -> str:
    ext = next((f".{ext}" for at, magic, ext in _SIGNATURES if data[at:at + len(magic)] == magic), "")
    return f"image-{index}{ext}"


def zero_shot_call(images: Images, labels: Texts | None, *, hypothesis_template: str | None = None,
                   function_to_apply: str | None = None, top_k: int | None = None,
                   max_num_patches: int | None = None) -> Call[list[LabelScore] | list[list[LabelScore]]]:
    items, batch = _images(images)
    options = {"candidate_labels": None if labels is None else _texts(labels),
               "hypothesis_template": hypothesis_template, "function_to_apply": function_to_apply, "top_k": top_k,
               "max_num_patches": max_num_patches}
    # Unset options are left out so the server's defaults apply (and labels=None gets the server's own message).
    parameters = {k: v for k, v in options.items() if v is not None}

    def parse(raw: Any) -> list[LabelScore] | list[list[LabelScore]]:
        if not batch:
            return _validate(_RANKING, raw, "zero_shot")
        rankings = _validate(_RANKINGS, raw, "zero_shot")
        _expect(len(rankings) == len(items), "zero_shot", f"{len(rankings)} rankings for {len(items)} images")
        return rankings

    form = _form(items, batch, parameters)
    inputs = None if form else (_wire(items) if batch else _wire(items)[0])
    return Call("zero_shot", inputs, parameters, parse, form)


def _patch_budget(max_num_patches: int | None) -> dict[str, Any]:
    return {} if max_num_patches is None else {"max_num_patches": max_num_patches}


def image_embedding_call(images: Images, *, max_num_patches: int | None = None) -> Call[np.ndarray]:
    items, _ = _images(images)
    parameters = _patch_budget(max_num_patches)
    # Always a batch on the wire: one answer shape, and the per-mode endpoint needs no auto-detection.
    form = _form(items, True, parameters)
    return Call("image_embedding", None if form else _wire(items), parameters,
                lambda raw: _embeddings(raw, len(items), "image_embedding"), form)


def text_embedding_call(texts: Texts) -> Call[np.ndarray]:
    wire = _texts(texts)
    return Call("text_embedding", wire, {}, lambda raw: _embeddings(raw, len(wire), "text_embedding"))


def similarity_call(images: Images, texts: Texts, *, max_num_patches: int | None = None) -> Call[np.ndarray]:
    items, _ = _images(images)
    wire_texts = _texts(texts)
    parameters = _patch_budget(max_num_patches)

    def parse(raw: Any) -> np.ndarray:
        result = _validate(_SIMILARITY, raw, "similarity")
        scores = np.asarray(result.similarity_scores, dtype=np.float32)
        want = (len(items), len(wire_texts))
        _expect(scores.shape == want, "similarity", f"a {scores.shape} matrix for {want[0]} images x "
                                                    f"{want[1]} texts")
        return scores

    form = _form(items, True, parameters, wire_texts)
    inputs = None if form else {"images": _wire(items), "texts": wire_texts}
    return Call("similarity", inputs, parameters, parse, form)


# ---------------------------------------------------------------------------------------------------------------
# response parsing and errors (pure)
# ---------------------------------------------------------------------------------------------------------------
def _validate(adapter: TypeAdapter[T], raw: Any, api: str) -> T:
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        raise _unexpected(api, str(exc).splitlines()[0]) from None


def _embeddings(raw: Any, count: int, api: str) -> np.ndarray:
    rows = _validate(_EMBEDDINGS, raw, api)
    _expect(len(rows) == count, api, f"{len(rows)} embeddings for {count} inputs")
    sizes = {len(r.embedding) for r in rows}
    _expect(len(sizes) == 1, api, f"embeddings of different sizes {sorted(sizes)}")
    return np.asarray([r.embedding for r in rows], dtype=np.float32)


def _expect(ok: bool, api: str, got: str) -> None:
    if not ok:
        raise _unexpected(api, got)


def _unexpected(api: str, detail: str) -> SiglipError:
    # The server said 200 but not what this API answers: not retryable, so not status None.
    return SiglipError(200, f"unexpected answer from /{api}: {detail}")


def error_text(body: str) -> str:
    """The ``{"error": ...}`` text of an error body, or the body itself when it is anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return body.strip()


def error_from_bentoml(exc: BentoMLException) -> SiglipError:
    """BentoML's client raises error answers as BentoMLException(body text, error_code=status)."""
    return SiglipError(int(exc.error_code), error_text(str(exc)))


def unreachable(url: str, exc: BaseException) -> SiglipError:
    return SiglipError(None, f"no answer from {url}: {type(exc).__name__}: {exc}".rstrip(": "))


def schema_error(url: str, status: int, body: str) -> SiglipError:
    """Why BentoML's client could not read /schema.json (it only says "Failed to fetch schema")."""
    if status < 400:
        # It failed, then worked when asked again: the server is (re)starting. Worth a retry.
        return SiglipError(None, f"{url}/schema.json could not be read; the server may be restarting")
    return SiglipError(status, error_text(body))


def connect_error(url: str, exc: Exception) -> SiglipError:
    """A transport failure, or a /schema.json that is not BentoML's, while BentoML's client reads the schema."""
    if isinstance(exc, httpx.HTTPError):
        return unreachable(url, exc)
    return not_siglip(url, f"/schema.json is not a BentoML API schema ({type(exc).__name__}: {exc})")


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _bento_kwargs(token: str | None, timeout: float) -> dict[str, Any]:
    # token="" rather than None: BentoML falls back to $BENTO_CLOUD_API_KEY for None, and a BentoCloud key
    # must not leak to this server. server_ready_timeout=0: BentoML's own readiness wait polls /readyz in a
    # loop without pausing; readiness is ready()/wait_ready() here.
    return {"token": token or "", "timeout": timeout, "server_ready_timeout": 0}


def _check_apis(url: str, client: Any) -> None:
    missing = [api for api in APIS if api not in client.endpoints]
    if missing:
        raise not_siglip(url, f"its API has no {', '.join(missing)}")


def not_siglip(url: str, detail: str) -> SiglipError:
    # /schema.json answered 200, but not with this service's schema: not retryable, so not status None.
    return SiglipError(200, f"{url} is not the SigLIP service: {detail}")


def _not_ready(url: str, timeout: float, last: SiglipError | None) -> SiglipError:
    why = f"; last answer: {last}" if last else ""
    return SiglipError(last.status if last else None, f"{url} not ready after {timeout:g} s{why}")


def _probe_timeout(timeout: float, deadline: float) -> float:
    return max(0.1, min(timeout, deadline - time.monotonic()))


def json_answer(resp: httpx.Response, api: str) -> Any:
    """The JSON of an answer from ``/{api}``; any other status than 200 as ``SiglipError`` (its status and error
    text): the API answers 200 or an error."""
    if resp.status_code != 200:
        raise SiglipError(resp.status_code, error_text(resp.text))
    try:
        return resp.json()
    except ValueError:
        raise _unexpected(api, f"not JSON: {resp.text[:200]!r}") from None


INFO_DOC = """What the server serves (``GET /info``), as a dict: ``model`` and ``revision``, ``family`` ("SigLIP" /
        "SigLIP 2"), ``naflex``, ``image_height``/``image_width`` (fixed resolution) or ``max_num_patches`` and
        ``max_num_patches_limit`` (NaFlex), ``patch_size``, ``embed_dim``, ``text_length``, ``dtype``, ``backend``,
        ``device``, ``vision_path``, ``jpeg_decode`` and the request ``limits``. Retried like the other calls."""


def _readyz_answer(resp: httpx.Response) -> SiglipError | None:
    return None if resp.status_code == 200 else SiglipError(resp.status_code, error_text(resp.text))


# ---------------------------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------------------------
class SiglipClient:
    """Blocking client. ``url`` is the service's base URL; ``token`` is sent as ``Authorization: Bearer``
    (servers started with ``SIGLIP_API_TOKEN``); ``timeout`` (seconds) bounds connecting and each wait for
    the answer's bytes (not the whole call: raise it for big batches on a CPU); ``retries``: how often a call
    answered 429 or 503 is sent again (after 1-2, 2-4, 4-8, 8-16, 10-20 s: 25-50 s in all) before ``SiglipError``
    is raised.

    Nothing is sent at construction: the first call reads the service's API schema (BentoML's client needs
    it), so a client made before the server is up works once it is; until then calls raise ``SiglipError``
    with status None. Thread-safe; use ``with`` or ``close()``.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0, retries: int = 5):
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.backoff = Backoff(attempts=retries + 1)
        self._rng = random.Random()
        self._token = token
        self._bento: bentoml.SyncHTTPClient | None = None
        # follow_redirects: as BentoML's client does (a proxy's http -> https, a trailing slash)
        self._probe = httpx.Client(base_url=self.url, headers=_auth(token), timeout=self.timeout,
                                   follow_redirects=True)
        self._lock = threading.Lock()
        self._closed = False

    # -- API ----------------------------------------------------------------------------------------------------
    @overload
    def zero_shot(self, images: list[ImageLike] | tuple[ImageLike, ...], labels: Texts, *,
                  hypothesis_template: str | None = None, function_to_apply: str | None = None,
                  top_k: int | None = None, max_num_patches: int | None = None) -> list[list[LabelScore]]: ...

    @overload
    def zero_shot(self, images: ImageLike, labels: Texts, *, hypothesis_template: str | None = None,
                  function_to_apply: str | None = None, top_k: int | None = None,
                  max_num_patches: int | None = None) -> list[LabelScore]: ...

    def zero_shot(self, images, labels, *, hypothesis_template=None, function_to_apply=None, top_k=None,
                  max_num_patches=None):
        """Classify one image (-> ``list[LabelScore]``, best first) or a list of images (-> one such list per
        image, in input order) against ``labels``. ``hypothesis_template`` (default "This is a photo of {}."),
        ``function_to_apply`` ("softmax" (default, sums to 1), "sigmoid", "none") and ``top_k`` are the API's
        parameters; None leaves the server's default. At most 64 images and 1024 labels per call by default.
        ``max_num_patches`` (here, ``image_embedding`` and ``similarity``): NaFlex checkpoints' patch budget per
        image for this call (``info()["max_num_patches_limit"]`` at most); a 400 on fixed-resolution ones."""
        return self._run(zero_shot_call(images, labels, hypothesis_template=hypothesis_template,
                                        function_to_apply=function_to_apply, top_k=top_k,
                                        max_num_patches=max_num_patches))

    def image_embedding(self, images: Images, *, max_num_patches: int | None = None) -> np.ndarray:
        """L2-normalized embeddings, float32 (N, D), one row per image in input order (N=1 for one image).
        At most 64 images per call by default."""
        return self._run(image_embedding_call(images, max_num_patches=max_num_patches))

    def text_embedding(self, texts: Texts) -> np.ndarray:
        """L2-normalized embeddings, float32 (N, D), one row per text (N=1 for one string). At most 1024 texts
        per call by default."""
        return self._run(text_embedding_call(texts))

    def similarity(self, images: Images, texts: Texts, *, max_num_patches: int | None = None) -> np.ndarray:
        """Cosine similarities, float32 (n_images, n_texts): ``[i, j]`` is image i against text j."""
        return self._run(similarity_call(images, texts, max_num_patches=max_num_patches))

    def info(self) -> dict[str, Any]:
        return self._retry(lambda: self._get_info())

    info.__doc__ = INFO_DOC

    def _get_info(self) -> dict[str, Any]:
        try:
            return json_answer(self._probe.get("/info"), "info")
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (model loaded and warmed up); False while loading or unreachable."""
        try:
            return _readyz_answer(self._probe.get("/readyz")) is None
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Poll ``/readyz`` until it answers 200; ``SiglipError`` (the last status, or None) after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                last = _readyz_answer(self._probe.get("/readyz", timeout=_probe_timeout(self.timeout, deadline)))
            except httpx.HTTPError as exc:
                last = unreachable(self.url, exc)
            if last is None:
                return
            if time.monotonic() + interval > deadline:
                raise _not_ready(self.url, timeout, last)
            time.sleep(interval)

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _run(self, call: Call[T]) -> T:
        return self._retry(lambda: self._run_once(call))

    def _retry(self, attempt: Callable[[], T]) -> T:
        for retry in range(self.backoff.attempts):
            try:
                return attempt()
            except SiglipError as exc:
                if exc.status not in RETRY_STATUSES or retry == self.backoff.attempts - 1:
                    raise
            time.sleep(self.backoff.delay(retry, self._rng))
        raise AssertionError("unreachable")

    def _run_once(self, call: Call[T]) -> T:
        client = self._client()  # forms too: the schema read is what tells a SigLIP service from another server
        try:
            if call.form is not None:
                # BentoML's client sends JSON only; the probe client has the same URL, token and timeout.
                resp = self._probe.post(f"/{call.api}", files=call.form.files, data=call.form.fields)
                raw = json_answer(resp, call.api)
            else:
                raw = client.call(call.api, inputs=call.inputs, parameters=call.parameters)
        except BentoMLException as exc:
            raise error_from_bentoml(exc) from exc
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc
        return call.parse(raw)

    def _client(self) -> bentoml.SyncHTTPClient:
        with self._lock:
            if self._closed:
                raise RuntimeError("SiglipClient is closed")
            if self._bento is None:
                self._bento = self._connect()
            return self._bento

    def _connect(self) -> bentoml.SyncHTTPClient:
        try:
            client = bentoml.SyncHTTPClient(self.url, **_bento_kwargs(self._token, self.timeout))  # reads schema
        except BentoMLException as exc:
            raise self._schema_failure() from exc
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise connect_error(self.url, exc) from exc
        try:
            _check_apis(self.url, client)
        except SiglipError:
            client.close()
            raise
        return client

    def _schema_failure(self) -> SiglipError:
        try:
            resp = self._probe.get("/schema.json")
        except httpx.HTTPError as exc:
            return unreachable(self.url, exc)
        return schema_error(self.url, resp.status_code, resp.text)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._bento is not None:
                self._bento.close()
            self._probe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSiglipClient:
    """The asyncio twin of ``SiglipClient`` (same arguments, methods and errors; ``await`` each call,
    ``async with`` or ``await aclose()``). Use it from one event loop."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0, retries: int = 5):
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.backoff = Backoff(attempts=retries + 1)
        self._rng = random.Random()
        self._token = token
        self._bento: bentoml.AsyncHTTPClient | None = None
        self._probe = httpx.AsyncClient(base_url=self.url, headers=_auth(token), timeout=self.timeout,
                                        follow_redirects=True)
        self._lock = asyncio.Lock()
        self._closed = False

    @overload
    async def zero_shot(self, images: list[ImageLike] | tuple[ImageLike, ...], labels: Texts, *,
                        hypothesis_template: str | None = None, function_to_apply: str | None = None,
                        top_k: int | None = None, max_num_patches: int | None = None) -> list[list[LabelScore]]: ...

    @overload
    async def zero_shot(self, images: ImageLike, labels: Texts, *, hypothesis_template: str | None = None,
                        function_to_apply: str | None = None, top_k: int | None = None,
                        max_num_patches: int | None = None) -> list[LabelScore]: ...

    async def zero_shot(self, images, labels, *, hypothesis_template=None, function_to_apply=None, top_k=None,
                        max_num_patches=None):
        """See ``SiglipClient.zero_shot``."""
        return await self._run(zero_shot_call(images, labels, hypothesis_template=hypothesis_template,
                                              function_to_apply=function_to_apply, top_k=top_k,
                                              max_num_patches=max_num_patches))

    async def image_embedding(self, images: Images, *, max_num_patches: int | None = None) -> np.ndarray:
        """See ``SiglipClient.image_embedding``."""
        return await self._run(image_embedding_call(images, max_num_patches=max_num_patches))

    async def text_embedding(self, texts: Texts) -> np.ndarray:
        """See ``SiglipClient.text_embedding``."""
        return await self._run(text_embedding_call(texts))

    async def similarity(self, images: Images, texts: Texts, *, max_num_patches: int | None = None) -> np.ndarray:
        """See ``SiglipClient.similarity``."""
        return await self._run(similarity_call(images, texts, max_num_patches=max_num_patches))

    async def info(self) -> dict[str, Any]:
        return await self._retry(self._get_info)

    info.__doc__ = INFO_DOC

    async def _get_info(self) -> dict[str, Any]:
        try:
            return json_answer(await self._probe.get("/info"), "info")
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc

    async def ready(self) -> bool:
        """See ``SiglipClient.ready``."""
        try:
            return _readyz_answer(await self._probe.get("/readyz")) is None
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """See ``SiglipClient.wait_ready``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = await self._probe.get("/readyz", timeout=_probe_timeout(self.timeout, deadline))
                last = _readyz_answer(resp)
            except httpx.HTTPError as exc:
                last = unreachable(self.url, exc)
            if last is None:
                return
            if time.monotonic() + interval > deadline:
                raise _not_ready(self.url, timeout, last)
            await asyncio.sleep(interval)

    async def _run(self, call: Call[T]) -> T:
        return await self._retry(lambda: self._run_once(call))

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for retry in range(self.backoff.attempts):
            try:
                return await attempt()
            except SiglipError as exc:
                if exc.status not in RETRY_STATUSES or retry == self.backoff.attempts - 1:
                    raise
            await asyncio.sleep(self.backoff.delay(retry, self._rng))
        raise AssertionError("unreachable")

    async def _run_once(self, call: Call[T]) -> T:
        client = await self._client()  # see SiglipClient._run_once
        try:
            if call.form is not None:
                resp = await self._probe.post(f"/{call.api}", files=call.form.files, data=call.form.fields)
                raw = json_answer(resp, call.api)
            else:
                raw = await client.call(call.api, inputs=call.inputs, parameters=call.parameters)
        except BentoMLException as exc:
            raise error_from_bentoml(exc) from exc
        except httpx.HTTPError as exc:
            raise unreachable(self.url, exc) from exc
        return call.parse(raw)

    async def _client(self) -> bentoml.AsyncHTTPClient:
        if self._closed:
            raise RuntimeError("AsyncSiglipClient is closed")
        if self._bento is None:
            async with self._lock:
                if self._bento is None:
                    self._bento = await self._connect()
        return self._bento

    async def _connect(self) -> bentoml.AsyncHTTPClient:
        client = bentoml.AsyncHTTPClient(self.url, **_bento_kwargs(self._token, self.timeout))
        try:
            try:
                await client.__aenter__()  # reads /schema.json
            except BentoMLException as exc:
                raise await self._schema_failure() from exc
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                raise connect_error(self.url, exc) from exc
            _check_apis(self.url, client)
        except BaseException:
            await client.close()
            raise
        return client

    async def _schema_failure(self) -> SiglipError:
        try:
            resp = await self._probe.get("/schema.json")
        except httpx.HTTPError as exc:
            return unreachable(self.url, exc)
        return schema_error(self.url, resp.status_code, resp.text)

    async def aclose(self) -> None:
        self._closed = True
        if self._bento is not None:
            await self._bento.close()
        await self._probe.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

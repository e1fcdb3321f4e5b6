"""``siglip.client`` (SiglipClient / AsyncSiglipClient) against a real ``bentoml serve``: every method through
both clients, every kind of image input, parity with the transformers reference, the server's errors verbatim,
auth, and transport failures (a loopback TCP relay that refuses, resets, drops or stalls connections).

All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import pickle
import socket
import struct
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TOKENS, ImageServer, b64, cosine_rows, encode, free_port, make_image
from PIL import Image, ImageOps
from pydantic import ValidationError

from siglip.client import (
    AsyncSiglipClient,
    LabelScore,
    SiglipClient,
    SiglipError,
    encode_pil,
    image_embedding_call,
    image_to_wire,
    similarity_call,
    zero_shot_call,
)

EMBED_DIM = 32  # the tiny checkpoint
COS_MIN = 0.9999
LABELS = ["ceramic floor tile", "wood laminate plank", "heat pump outdoor unit", "company logo"]
TEXTS = ["glossy white porcelain tile", "rustic oak wood flooring", "inverter heat pump 12kW"]
TOKEN = TOKENS[1]  # the second of the shared auth server's tokens
KINDS = ["path-str", "pathlib", "bytes", "pil-png", "pil-jpeg", "pil-generated", "url", "base64", "data-uri"]


# ---------------------------------------------------------------------------------------------------------------
# clients: each test runs against SiglipClient and AsyncSiglipClient
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Blocking:
    """An AsyncSiglipClient whose coroutine methods are run to completion on one event loop, so that the same
    test body exercises the async client."""

    def __init__(self, client: AsyncSiglipClient, loop: asyncio.AbstractEventLoop):
        self.client, self.loop = client, loop

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kw: self.loop.run_until_complete(attr(*args, **kw))

    def close(self):
        self.loop.run_until_complete(self.client.aclose())


@pytest.fixture(params=["sync", "async"])
def connect(request, loop):
    made = []

    def make(url: str, **kw):
        if request.param == "sync":
            client = SiglipClient(url, **kw)
        else:
            client = Blocking(AsyncSiglipClient(url, **kw), loop)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(connect, service):
    return connect(service.url)


# ---------------------------------------------------------------------------------------------------------------
# pictures in every input kind
# ---------------------------------------------------------------------------------------------------------------
class Pictures:
    def __init__(self, root: Path, image_server):
        self.png = encode(make_image(801, (100, 80)), "PNG")
        self.jpeg = encode(make_image(802, (96, 64)), "JPEG", quality=90)
        self.png_path = root / "pic.png"
        self.png_path.write_bytes(self.png)
        self.jpeg_path = root / "pic.jpg"
        self.jpeg_path.write_bytes(self.jpeg)
        self.url = image_server.add("/siglip-client/pic.png", self.png)
        self.generated = make_image(803, (80, 80))

    def kind(self, kind: str):
        """(the image as the caller passes it, the picture the reference must see)."""
        png_img, jpeg_img = _open(self.png), _open(self.jpeg)
        return {
            "path-str": (str(self.jpeg_path), jpeg_img),
            "pathlib": (self.png_path, png_img),
            "bytes": (self.jpeg, jpeg_img),
            "pil-png": (Image.open(self.png_path), png_img),
            "pil-jpeg": (Image.open(self.jpeg_path), jpeg_img),
            "pil-generated": (self.generated, self.generated),
            "url": (self.url, png_img),
            "base64": (b64(self.jpeg), jpeg_img),
            "data-uri": ("data:image/png;base64," + b64(self.png), png_img),
        }[kind]


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def pics(tmp_path_factory, image_server) -> Pictures:
    return Pictures(tmp_path_factory.mktemp("client-pics"), image_server)


def _assert_ranking(result, expected, k: int | None = None) -> None:
    assert all(isinstance(x, LabelScore) for x in result)
    want = expected[:k] if k else expected
    assert [x.label for x in result] == [label for label, _ in want]
    np.testing.assert_allclose([x.score for x in result], [s for _, s in want], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# every method, every input kind, parity with the reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_zero_shot_one_image_of_each_kind(client, pics, reference, kind):
    image, seen = pics.kind(kind)
    result = client.zero_shot(image, LABELS)
    assert isinstance(result, list) and len(result) == len(LABELS)
    assert abs(sum(x.score for x in result) - 1) < 1e-5
    _assert_ranking(result, reference.zero_shot(seen, LABELS))


def test_image_embedding_batch_of_every_kind_keeps_order(client, pics, reference):
    images, seen = zip(*(pics.kind(k) for k in KINDS))
    emb = client.image_embedding(list(images))
    assert emb.dtype == np.float32 and emb.shape == (len(KINDS), EMBED_DIM)
    cos = cosine_rows(emb, reference.image_embeds(list(seen)))
    assert (cos > COS_MIN).all(), dict(zip(KINDS, cos.round(6)))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_image_embedding_of_one_image_is_2d(client, pics, reference):
    image, seen = pics.kind("pathlib")
    emb = client.image_embedding(image)
    assert emb.shape == (1, EMBED_DIM) and emb.dtype == np.float32
    assert cosine_rows(emb, reference.image_embeds([seen]))[0] > COS_MIN
    assert client.image_embedding((image,)).shape == (1, EMBED_DIM)  # a tuple is a batch too


def test_zero_shot_batch_and_options(client, pics, reference):
    (a, seen_a), (b, seen_b) = pics.kind("url"), pics.kind("bytes")
    batch = client.zero_shot([a, b], LABELS)
    assert len(batch) == 2
    _assert_ranking(batch[0], reference.zero_shot(seen_a, LABELS))
    _assert_ranking(batch[1], reference.zero_shot(seen_b, LABELS))

    template = "a catalog photo of {}"
    result = client.zero_shot(a, LABELS, hypothesis_template=template, function_to_apply="sigmoid", top_k=2)
    _assert_ranking(result, reference.zero_shot(seen_a, LABELS, template=template, fn="sigmoid"), k=2)
    # One label may be given as a plain string.
    assert [x.label for x in client.zero_shot(a, "ceramic floor tile")] == ["ceramic floor tile"]


def test_label_scores_are_frozen(client, pics):
    result = client.zero_shot(pics.kind("url")[0], LABELS)
    with pytest.raises(ValidationError):
        result[0].score = 2.0


def test_text_embedding(client, reference):
    emb = client.text_embedding(TEXTS)
    assert emb.dtype == np.float32 and emb.shape == (3, EMBED_DIM)
    assert (cosine_rows(emb, reference.text_embeds(TEXTS)) > COS_MIN).all()
    one = client.text_embedding("a photo of ceramic floor tiles")
    assert one.shape == (1, EMBED_DIM)
    assert cosine_rows(one, reference.text_embeds(["a photo of ceramic floor tiles"]))[0] > COS_MIN
    assert client.text_embedding(tuple(TEXTS)).shape == (3, EMBED_DIM)


def test_similarity(client, pics, reference):
    (a, seen_a), (b, seen_b) = pics.kind("path-str"), pics.kind("pil-generated")
    scores = client.similarity([a, b], TEXTS)
    assert scores.dtype == np.float32 and scores.shape == (2, 3)
    expected = reference.image_embeds([seen_a, seen_b]) @ reference.text_embeds(TEXTS).T
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    one = client.similarity(a, TEXTS[0])
    assert one.shape == (1, 1)
    np.testing.assert_allclose(one[0, 0], expected[0, 0], atol=1e-4)


def test_pil_image_keeps_its_exif_orientation(client, tmp_path, reference):
    """A JPEG tagged "rotate 90" embeds the same whether passed as a file or as the PIL image opened from it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    make_image(804, (96, 64)).save(path, "JPEG", quality=92, exif=exif)
    pil = Image.open(path)
    upright = ImageOps.exif_transpose(_open(path.read_bytes()))
    unrotated = Image.fromarray(np.asarray(_open(path.read_bytes())))  # the pixels without the EXIF tag
    assert cosine_rows(reference.image_embeds([unrotated]), reference.image_embeds([upright]))[0] < 0.999
    emb = client.image_embedding([path, pil])
    assert (cosine_rows(emb, reference.image_embeds([upright, upright])) > COS_MIN).all()


# ---------------------------------------------------------------------------------------------------------------
# local images travel as multipart forms: the answers JSON gets, the server's errors naming the file
# ---------------------------------------------------------------------------------------------------------------
def _sent_forms(client) -> list[str]:
    """Content types of what goes through the client's own httpx client (forms; BentoML's client sends JSON)."""
    inner = getattr(client, "client", client)  # Blocking wraps the async client
    seen: list[str] = []

    def note(request: httpx.Request) -> None:
        seen.append(request.headers["content-type"].split(";")[0])

    async def note_async(request: httpx.Request) -> None:
        note(request)

    inner._probe.event_hooks["request"].append(note_async if isinstance(inner, AsyncSiglipClient) else note)
    return seen


def test_local_images_as_forms_answer_as_json_does(client, pics):
    sent = _sent_forms(client)
    pil = pics.kind("pil-png")[0]
    local = [pics.jpeg_path, pics.jpeg, pil]
    as_json = [b64(pics.jpeg), b64(pics.jpeg), b64(encode_pil(pil))]  # base64 strings keep the JSON path
    emb = client.image_embedding(local)
    assert emb.shape == (3, EMBED_DIM) and (cosine_rows(emb, client.image_embedding(as_json)) > COS_MIN).all()
    one = client.zero_shot(local[0], LABELS)
    _assert_ranking(one, [(x.label, x.score) for x in client.zero_shot(as_json[0], LABELS)])
    batch_of_one = client.zero_shot([local[1]], LABELS)
    assert len(batch_of_one) == 1 and all(isinstance(x, LabelScore) for x in batch_of_one[0])
    _assert_ranking(batch_of_one[0], [(x.label, x.score) for x in client.zero_shot([as_json[1]], LABELS)[0]])
    texts = [*TEXTS, "céramique émaillée", ""]  # texts as form fields: non-ASCII and empty ones arrive intact
    sim = client.similarity([local[0], local[2]], texts)
    assert sim.shape == (2, len(texts))
    np.testing.assert_allclose(sim, client.similarity([as_json[0], as_json[2]], texts), atol=1e-5)
    assert sent == ["multipart/form-data"] * 4


def test_form_errors_keep_the_status_and_name_the_file(client, service, pics, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated: not really a JPEG")
    raw = httpx.post(service.url + "/image_embedding", timeout=60,
                     files=[("images", ("a.jpg", pics.jpeg)), ("images", ("image-1", b"not an image"))])
    errors = []
    for images in ([pics.jpeg, b"not an image"], [pics.png_path, broken]):
        with pytest.raises(SiglipError) as info:
            client.image_embedding(images)
        errors.append(info.value)
    assert [e.status for e in errors] == [raw.status_code, 400] == [400, 400]
    assert errors[0].message == raw.json()["error"] and errors[0].message.startswith("inputs[1] (image-1): ")
    assert errors[1].message.startswith("inputs[1] (broken.jpg): "), errors[1]


# ---------------------------------------------------------------------------------------------------------------
# how inputs are put on the wire (no server)
# ---------------------------------------------------------------------------------------------------------------
def test_wire_form_of_each_input_kind(pics, tmp_path):
    assert image_to_wire(pics.url) == pics.url
    uri = "data:image/png;base64," + b64(pics.png)
    assert image_to_wire(uri) == uri
    assert image_to_wire(b64(pics.png)) == b64(pics.png)
    assert base64.b64decode(image_to_wire(str(pics.jpeg_path))) == pics.jpeg  # file bytes untouched
    assert base64.b64decode(image_to_wire(pics.png_path)) == pics.png
    assert base64.b64decode(image_to_wire(bytearray(pics.jpeg))) == pics.jpeg
    # PIL images go lossless as PNG, JPEG-sourced ones too: the server gets exactly the caller's pixels.
    for img in (pics.generated, Image.open(pics.jpeg_path)):
        png = Image.open(io.BytesIO(encode_pil(img)))
        assert png.format == "PNG" and np.array_equal(np.asarray(png), np.asarray(img))
    cmyk = Image.open(io.BytesIO(encode_pil(pics.generated.convert("CMYK"))))
    assert cmyk.format == "PNG" and cmyk.mode == "RGB"


def test_bad_inputs_fail_before_sending(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images\[1\]: no such file"):
        image_to_wire(tmp_path / "missing.png", "images[1]")
    with pytest.raises(FileNotFoundError, match="not an http"):
        image_to_wire("photos/missing.jpg")  # not base64 either ('.'), so it must be a mistyped path
    with pytest.raises(TypeError, match="unsupported image type NoneType"):
        image_to_wire(None)
    # No server is needed to find out.
    with SiglipClient(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(TypeError, match=r"images\[0\]"):
        c.image_embedding([42])


def test_local_images_go_as_a_form_and_any_string_makes_it_json(pics):
    one = zero_shot_call(str(pics.jpeg_path), LABELS, top_k=2)
    assert one.inputs is None and one.form.files == (("image", ("pic.jpg", pics.jpeg)),)
    assert json.loads(one.form.fields["parameters"]) == {"candidate_labels": LABELS, "top_k": 2}
    batch = image_embedding_call([pics.png_path, bytearray(pics.jpeg), pics.generated])
    assert [(field, name) for field, (name, _) in batch.form.files] == [
        ("images", "pic.png"), ("images", "image-1.jpg"), ("images", "image-2.png")]
    assert batch.form.files[1][1][1] == pics.jpeg and batch.form.files[2][1][1] == encode_pil(pics.generated)
    assert zero_shot_call([pics.jpeg], LABELS).form.files[0][0] == "images"  # a list of one is a batch
    sim = similarity_call(pics.jpeg, TEXTS)
    assert sim.form.fields == {"texts": TEXTS} and sim.form.files[0][0] == "images"
    for string in (pics.url, b64(pics.png), "data:image/png;base64," + b64(pics.png)):
        call = image_embedding_call(string)
        assert call.form is None and call.inputs == [string]
    mixed = image_embedding_call([pics.jpeg, pics.url])  # one URL makes the whole call JSON, the bytes base64
    assert mixed.form is None and mixed.inputs == [b64(pics.jpeg), pics.url]
    # a form cannot carry an empty list: JSON, so the server's answer to it is the JSON one
    assert similarity_call(pics.jpeg, []).form is None and image_embedding_call([]).form is None
    # non-ASCII options travel as UTF-8; past the server's 1 MB per form field, a lone surrogate or a text that is
    # not a string, the call is JSON (which answers, or refuses, as JSON does)
    assert json.loads(zero_shot_call(pics.jpeg, ["tuile céramique"]).form.fields["parameters"]) == {
        "candidate_labels": ["tuile céramique"]}
    assert "céramique" in zero_shot_call(pics.jpeg, ["tuile céramique"]).form.fields["parameters"]
    assert zero_shot_call(pics.jpeg, ["é" * 1000] * 600).form is None
    assert zero_shot_call(pics.jpeg, ["\udcff"]).form is None
    assert similarity_call(pics.jpeg, ["ok", 1]).form is None


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
def test_missing_labels_is_the_spec_error(client, pics):
    with pytest.raises(SiglipError) as info:
        client.zero_shot(pics.url, None)
    assert info.value.status == 400
    assert info.value.message == "candidate_labels is required for zero-shot classification"


@pytest.mark.parametrize("case", ["missing-url", "not-an-image", "empty-batch", "bad-option"])
def test_server_errors_are_raised_verbatim(client, service, image_server, case):
    missing = image_server.url("/siglip-client/missing.png")
    call, route, body = {
        "missing-url": (lambda c: c.image_embedding(missing), "/image_embedding", {"inputs": [missing]}),
        "not-an-image": (lambda c: c.image_embedding(b64(b"not an image")), "/image_embedding",
                         {"inputs": [b64(b"not an image")]}),
        "empty-batch": (lambda c: c.text_embedding([]), "/text_embedding", {"inputs": []}),
        "bad-option": (lambda c: c.zero_shot(missing, LABELS, function_to_apply="tanh"), "/zero_shot",
                       {"inputs": missing, "parameters": {"candidate_labels": LABELS, "function_to_apply": "tanh"}}),
    }[case]
    raw = service.post(route, body)
    with pytest.raises(SiglipError) as info:
        call(client)
    assert info.value.status == raw.status_code == 400
    assert info.value.message == raw.json()["error"]
    assert str(info.value) == f"HTTP 400: {raw.json()['error']}"
    if case == "missing-url":
        assert missing in info.value.message


def test_siglip_error_pickles():
    err = pickle.loads(pickle.dumps(SiglipError(503, "model is loading")))
    assert (err.status, err.message) == (503, "model is loading")


@pytest.fixture(scope="module")
def auth_service(authed):
    return authed


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_bad_token_is_401(connect, auth_service, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    raw = httpx.post(auth_service.url + "/text_embedding", json={"inputs": ["x"]}, headers=headers, timeout=30)
    client = connect(auth_service.url, token=token)
    assert client.ready()  # /readyz needs no token
    with pytest.raises(SiglipError) as info:
        client.text_embedding("a photo of a cat")
    assert info.value.status == raw.status_code == 401
    assert info.value.message == raw.json()["error"]
    assert "bearer token" in info.value.message
    with pytest.raises(SiglipError) as info:
        client.image_embedding(b"\x89PNG")  # a form: the client's own httpx client, the same token
    assert (info.value.status, info.value.message) == (401, raw.json()["error"])


def test_right_token_is_sent(connect, auth_service):
    client = connect(auth_service.url, token=TOKEN)
    assert client.text_embedding(TEXTS).shape == (3, EMBED_DIM)
    assert client.image_embedding(encode(make_image(805, (32, 32)))).shape == (1, EMBED_DIM)  # as a form


def test_token_from_bentocloud_env_is_not_sent(connect, auth_service, monkeypatch):
    """BentoML's client falls back to $BENTO_CLOUD_API_KEY when no token is given; ours must not."""
    monkeypatch.setenv("BENTO_CLOUD_API_KEY", TOKEN)
    with pytest.raises(SiglipError) as info:
        connect(auth_service.url).text_embedding("x")
    assert info.value.status == 401


# ---------------------------------------------------------------------------------------------------------------
# transport failures: status None
# ---------------------------------------------------------------------------------------------------------------
class Relay:
    """A TCP relay on 127.0.0.1 in front of the service. ``mode``: forward; reset (RST after reading the
    request); drop (close after reading the request, no answer); stall (read the request, never answer).
    Changing the mode cuts every open connection, as a restarting server or a flaky network would."""

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self.mode = "forward"
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.open.append(conn)
            threading.Thread(target=self._handle, args=(conn, self.mode), daemon=True).start()

    def _handle(self, conn: socket.socket, mode: str) -> None:
        if mode == "forward":
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open.append(upstream)
            threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
            _pump(conn, upstream)
            return
        try:
            conn.recv(65536)
        except OSError:
            return
        if mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        elif mode == "drop":
            conn.close()
        # stall: leave it open; set_mode/close cuts it

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        with self.lock:
            for s in self.open:
                _shut(s)
            self.open.clear()

    def close(self) -> None:
        self.set_mode("closed")
        _shut(self.listener)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shut(src)
        _shut(dst)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)  # also wakes a thread blocked in accept()/recv()
    except OSError:
        pass
    s.close()


@pytest.fixture
def relay(service):
    r = Relay(service.port)
    yield r
    r.close()


def test_nobody_listening_is_status_none(connect):
    client = connect(f"http://127.0.0.1:{free_port()}", timeout=5)
    for call in (lambda: client.text_embedding("x"), lambda: client.image_embedding(b"x"),
                 lambda: client.wait_ready(timeout=1, interval=0.2)):
        with pytest.raises(SiglipError) as info:
            call()
        assert info.value.status is None and "ConnectError" in info.value.message
    assert client.ready() is False


def test_client_made_before_the_server_is_up_works_once_it_is(connect, service):
    port = free_port()
    client = connect(f"http://127.0.0.1:{port}")
    with pytest.raises(SiglipError) as info:
        client.text_embedding("x")
    assert info.value.status is None
    relay = Relay(service.port, port=port)
    try:
        client.wait_ready(timeout=30, interval=0.1)
        assert client.text_embedding("x").shape == (1, EMBED_DIM)
    finally:
        relay.close()


@pytest.mark.parametrize("mode", ["reset", "drop", "stall"])
def test_broken_connections_are_status_none_and_the_client_recovers(connect, relay, mode):
    client = connect(relay.url, timeout=2)
    assert client.text_embedding("before").shape == (1, EMBED_DIM)  # connected: schema read, connection pooled
    relay.set_mode(mode)
    with pytest.raises(SiglipError) as info:
        client.text_embedding("during")
    assert info.value.status is None, info.value
    assert info.value.message.startswith(f"no answer from {relay.url}: ")
    relay.set_mode("forward")
    assert client.text_embedding("after").shape == (1, EMBED_DIM)


def test_schema_read_failure_is_status_none(connect, relay):
    relay.set_mode("drop")
    with pytest.raises(SiglipError) as info:
        connect(relay.url, timeout=2).text_embedding("x")
    assert info.value.status is None


def test_not_a_siglip_server(connect):
    # A server of its own: the session's image server must keep answering 404 to /schema.json for other tests.
    other = ImageServer()
    try:
        other.add("/schema.json", b'{"routes": []}')  # a BentoML-like schema without our APIs
        with pytest.raises(SiglipError) as info:
            connect(other.url("")).zero_shot(b"x", LABELS)
        assert info.value.status == 200 and "is not the SigLIP service" in info.value.message
    finally:
        other.close()


# ---------------------------------------------------------------------------------------------------------------
# lifecycle and concurrency
# ---------------------------------------------------------------------------------------------------------------
def test_context_managers_close(service, loop):
    with SiglipClient(service.url) as c:
        assert c.ready() and c.text_embedding("x").shape == (1, EMBED_DIM)
    with pytest.raises(RuntimeError, match="closed"):
        c.text_embedding("x")

    async def run():
        async with AsyncSiglipClient(service.url) as ac:
            assert await ac.ready()
            await ac.wait_ready(timeout=10)
            assert (await ac.text_embedding("x")).shape == (1, EMBED_DIM)
        with pytest.raises(RuntimeError, match="closed"):
            await ac.text_embedding("x")

    loop.run_until_complete(run())


def test_async_client_runs_calls_concurrently(service, loop, reference):
    """Many first calls at once share one schema read and one connection pool; each gets its own answer."""
    texts = [f"product {i}" for i in range(12)]

    async def run():
        async with AsyncSiglipClient(service.url) as ac:
            return await asyncio.gather(*(ac.text_embedding(t) for t in texts))

    results = loop.run_until_complete(run())
    emb = np.concatenate(results)
    assert emb.shape == (12, EMBED_DIM)
    assert (cosine_rows(emb, reference.text_embeds(texts)) > COS_MIN).all()


def test_sync_client_is_thread_safe(service, reference):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"tile {i}" for i in range(8)]
    with SiglipClient(service.url) as c, ThreadPoolExecutor(4) as pool:
        emb = np.concatenate(list(pool.map(c.text_embedding, texts)))
    assert (cosine_rows(emb, reference.text_embeds(texts)) > COS_MIN).all()

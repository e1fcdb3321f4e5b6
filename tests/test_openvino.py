"""The OpenVINO backend (``siglip.model.openvino_backend``): which backend runs, the on-disk cache of converted towers
(keyed by checkpoint and versions, written atomically), the start-up parity check and its fallback to torch,
dynamic batch sizes and concurrent calls, and a real service on OpenVINO. The embedding parity tests of
``test_preprocessing.py`` run against both backends."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    BACKGROUND,
    ROOT,
    b64,
    child_env,
    cosine_rows,
    encode,
    make_image,
    start_with_session,
    started,
    to_the_front,
)
from PIL import Image

from siglip.model import openvino_backend as ovb
from siglip.settings import Settings

pytest.importorskip("openvino")
TEXTS = ["a photo of a cat", "glossy white porcelain tile", "Rustic OAK wood flooring", ""]


def load_encoder(path, cache_dir, backend="openvino", dtype="float32"):
    from siglip.model.encoder import SiglipEncoder

    enc = SiglipEncoder(Settings(model=str(path), device="cpu", dtype=dtype, backend=backend,
                                 openvino_cache_dir=str(cache_dir)))
    enc.load()
    assert enc.error is None, enc.error
    return enc


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def ov_encoder(tiny_checkpoint, cache_dir):
    return load_encoder(tiny_checkpoint, cache_dir)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """Same architecture and files as the tiny checkpoint, other weights."""
    from siglip.model.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt-other") / "tiny-siglip", size="tiny", seed=1)


# ---------------------------------------------------------------------------------------------------------------
# which backend
# ---------------------------------------------------------------------------------------------------------------
def test_resolve_backend():
    assert ovb.resolve_backend("torch", "cpu") == "torch"
    assert ovb.resolve_backend("auto", "cpu", fast_bf16=True) == "openvino"
    assert ovb.resolve_backend("auto", "cpu", fast_bf16=False) == "torch"  # AVX2 only: it measured slower
    assert ovb.resolve_backend("auto", "cuda:0", fast_bf16=True) == "torch"  # GPUs keep torch (graphs, nvJPEG)
    assert ovb.resolve_backend("openvino", "cpu") == "openvino"
    with pytest.raises(RuntimeError, match="CPU only"):
        ovb.resolve_backend("openvino", "cuda:1")
    with pytest.raises(ValueError, match="SIGLIP_BACKEND"):
        ovb.resolve_backend("onnx", "cpu")


def test_without_openvino_auto_takes_torch_and_openvino_fails(monkeypatch, tiny_checkpoint, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what import machinery does for a missing package
    assert not ovb.installed()
    assert ovb.resolve_backend("auto", "cpu", fast_bf16=True) == "torch"
    with pytest.raises(RuntimeError, match="not installed"):
        ovb.resolve_backend("openvino", "cpu")
    assert load_encoder(tiny_checkpoint, tmp_path, backend="auto").info.backend == "torch"
    assert entries(tmp_path) == []


def test_settings():
    assert Settings.from_env({}).backend == "auto" and Settings.from_env({}).openvino_cache_dir == ""
    s = Settings.from_env({"SIGLIP_BACKEND": "openvino", "SIGLIP_OPENVINO_CACHE_DIR": "/var/cache/ov"})
    assert (s.backend, s.openvino_cache_dir) == ("openvino", "/var/cache/ov")
    with pytest.raises(ValueError, match="SIGLIP_BACKEND"):
        Settings.from_env({"SIGLIP_BACKEND": "onnx"})
    with pytest.raises(ValueError, match="SIGLIP_BACKEND=openvino"):
        Settings.from_env({"SIGLIP_BACKEND": "openvino", "SIGLIP_DEVICE": "cuda"})


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert ovb.default_cache_dir() == Path.home() / ".cache" / "siglip2-serve" / "openvino"
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert ovb.default_cache_dir() == Path("/srv/cache/siglip2-serve/openvino")


# ---------------------------------------------------------------------------------------------------------------
# the encoder on OpenVINO
# ---------------------------------------------------------------------------------------------------------------
def test_encoder_reports_openvino_and_frees_torch(ov_encoder):
    info = ov_encoder.info
    assert info.backend == "openvino" and info.dtype == "float32" and info.device == "cpu"
    assert info.to_dict()["backend"] == "openvino"  # what the gateway and /metrics read
    assert not hasattr(ov_encoder.towers, "model")  # the torch weights were released


def test_dynamic_batch_rows_are_independent(ov_encoder, reference):
    """Any batch size adaptive batching forms runs, and each row equals that image alone."""
    imgs = [make_image(40 + i, size=(64, 64)) for i in range(7)]
    pixels = np.stack([np.asarray(im) for im in imgs])
    full = ov_encoder.encode_images(pixels)
    assert full.shape == (7, 32) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    for n in (1, 3):
        np.testing.assert_allclose(ov_encoder.encode_images(pixels[:n]), full[:n], atol=1e-5)
    assert cosine_rows(full, reference.image_embeds(imgs)).min() > 0.99999
    assert ov_encoder.encode_images(pixels[:0]).shape == (0, 32)
    texts = ov_encoder.encode_texts(TEXTS)
    assert cosine_rows(texts, reference.text_embeds(TEXTS)).min() > 0.99999
    np.testing.assert_allclose(ov_encoder.encode_texts(TEXTS[1:2])[0], texts[1], atol=1e-5)


def test_concurrent_calls_from_many_threads(ov_encoder):
    """The model service runs several batches at once (SIGLIP_MODEL_THREADS): each call gets its own rows."""
    batches = [np.stack([np.asarray(make_image(60 + 3 * i + j, size=(64, 64))) for j in range(1 + i % 3)])
               for i in range(12)]
    alone = [ov_encoder.encode_images(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ov_encoder.encode_images, batches))
        texts = list(pool.map(lambda t: ov_encoder.encode_texts([t]), TEXTS * 3))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(t[0], ov_encoder.encode_texts([TEXTS[i % 4]])[0], atol=1e-6)


def test_forwarded_jpegs_on_openvino(tiny_checkpoint, cache_dir, reference):
    """SIGLIP_DEVICE_DECODE=on on CPU: decoded and resized in the model service, embedded by OpenVINO."""
    from siglip.model.encoder import SiglipEncoder

    enc = SiglipEncoder(Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", backend="openvino",
                                 openvino_cache_dir=str(cache_dir), device_decode="on"))
    enc.load()
    assert enc.error is None and enc.info.backend == "openvino" and enc.info.jpeg_decode == "pil"
    blobs = [encode(make_image(70 + i, size=(160, 120)), "JPEG", quality=95) for i in range(2)] + [b"not a jpeg"]
    out = enc.encode_jpegs([(b, 1) for b in blobs])
    want = reference.image_embeds([Image.open(io.BytesIO(b)) for b in blobs[:2]])
    assert cosine_rows(out[:2], want).min() > 0.9999
    assert np.isnan(out[2]).all()


def test_bf16_hint_reports_what_openvino_runs(tiny_checkpoint, cache_dir, reference):
    """SIGLIP_DTYPE=bfloat16 asks OpenVINO for bf16; a CPU without bf16 instructions runs f32, and the info says
    which. Either way the embeddings agree with the fp32 reference."""
    import openvino as ov

    enc = load_encoder(tiny_checkpoint, cache_dir, dtype="bfloat16")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert enc.info.backend == "openvino"
    assert enc.info.dtype == ("bfloat16" if has_bf16 else "float32")
    assert cosine_rows(enc.encode_texts(TEXTS), reference.text_embeds(TEXTS)).min() > 0.9999


# ---------------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------------
def test_second_load_reads_the_cache_instead_of_converting(tiny_checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="siglip.openvino"):
        load_encoder(tiny_checkpoint, tmp_path)
    assert "Converting" in caplog.text and "converted into" in caplog.text
    [name] = entries(tmp_path)
    entry = tmp_path / name
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "text.bin", "text.xml", "vision.bin",
                                                      "vision.xml"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["format"] == ovb.FORMAT_VERSION and set(meta["versions"]) == {"openvino", "torch", "transformers"}
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siglip.openvino"):
        enc = load_encoder(tiny_checkpoint, tmp_path)
    assert enc.info.backend == "openvino"
    assert "Converting" not in caplog.text and f"read from {entry}" in caplog.text
    assert entries(tmp_path) == [name]
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps  # nothing rewritten


def test_cache_key_follows_checkpoint_files_and_versions(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    versions = ovb.library_versions()

    def key(v=versions, size=(64, 64)):
        return ovb.cache_key(str(ckpt), ovb.checkpoint_dir(str(ckpt)), size, v)

    first = key()
    assert key() == first  # stable
    assert first.startswith("ckpt-")
    assert key(v={**versions, "openvino": "0.0.1"}) != first
    assert key(v={**versions, "transformers": "0.0.1"}) != first
    assert key(size=(128, 128)) != first
    # the tokenizer is not part of the converted graph; the weights and the config are
    (ckpt / "tokenizer_config.json").write_text((ckpt / "tokenizer_config.json").read_text() + " ")
    assert key() == first
    weights = ckpt / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = key()
    assert second != first
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + "\n")
    assert key() not in (first, second)
    # another path to the same files is another identity only if it resolves elsewhere
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    assert ovb.cache_key(str(link), ovb.checkpoint_dir(str(link)), (64, 64), versions) == key()


def test_writing_an_entry_that_exists_keeps_it(tiny_checkpoint, tmp_path):
    """The loser of two workers converting at once finds the entry written: it keeps that one, and leaves no
    temporary directory behind."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    target = tmp_path / "entry"
    target.mkdir()
    (target / "meta.json").write_text('{"written": "by the other worker"}')
    ovb.convert(model, (64, 64), 64, target)
    assert entries(tmp_path) == ["entry"]
    assert [p.name for p in target.iterdir()] == ["meta.json"]
    assert "other worker" in (target / "meta.json").read_text()


CONVERT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from siglip.model.encoder import SiglipEncoder
from siglip.settings import Settings
enc = SiglipEncoder(Settings(model={ckpt!r}, device="cpu", dtype="float32", backend="openvino", openvino_cache_dir={cache!r}))
enc.load()
assert enc.error is None, enc.error
print("BACKEND", enc.info.backend, flush=True)
"""


@start_with_session("two_starting")
def start_two_workers(request, tests: set[str]) -> tuple[Path, list[tuple[subprocess.Popen, Path]]]:
    """Two processes loading the tiny checkpoint on OpenVINO into one empty cache at once, as two model workers
    starting together do: started with the session at a lower priority (``BACKGROUND``: mostly importing, they
    run in the time the tests before leave idle)."""
    tmp = request.getfixturevalue("tmp_path_factory").mktemp("two-workers")
    script = CONVERT_SCRIPT.format(root=str(ROOT), ckpt=str(request.getfixturevalue("tiny_checkpoint")),
                                   cache=str(tmp / "cache"))
    procs = []
    for i in range(2):
        with open(tmp / f"worker{i}.out", "w") as out:  # a file: a full pipe would stall it until the test reads
            proc = subprocess.Popen([*BACKGROUND, sys.executable, "-c", script], stdout=out,
                                    stderr=subprocess.STDOUT, env=child_env())
        procs.append((proc, Path(out.name)))
        request.addfinalizer(lambda proc=proc: stop(proc))
    return tmp / "cache", procs


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def two_starting():
    cache, procs = started("two_starting")
    yield cache, procs
    for proc, _ in procs:
        stop(proc)


def test_two_workers_starting_together_share_one_entry(two_starting):
    cache, procs = two_starting
    for proc, _ in procs:
        to_the_front(proc.pid)
    for proc, out in procs:
        proc.wait(timeout=300)
        assert proc.returncode == 0 and "BACKEND openvino" in out.read_text(), out.read_text()[-3000:]
    [name] = entries(cache)  # one entry, no temporary directories left
    assert (cache / name / "meta.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# parity check and fallback
# ---------------------------------------------------------------------------------------------------------------
def test_wrong_cached_model_fails_parity_and_torch_runs(tiny_checkpoint, other_checkpoint, cache_dir, tmp_path,
                                                        reference, caplog):
    """A cache entry holding another checkpoint's towers (same shapes, other weights) is caught by the start-up
    comparison: the warning names the cosine, and torch serves correct embeddings."""
    load_encoder(tiny_checkpoint, cache_dir)  # the tiny checkpoint's entry exists
    key = ovb.cache_key(str(tiny_checkpoint), ovb.checkpoint_dir(str(tiny_checkpoint)), (64, 64),
                        ovb.library_versions())
    wrong = tmp_path / "cache"
    wrong_key = ovb.cache_key(str(other_checkpoint), ovb.checkpoint_dir(str(other_checkpoint)), (64, 64),
                              ovb.library_versions())
    shutil.copytree(cache_dir / key, wrong / wrong_key)

    with caplog.at_level(logging.WARNING, logger="siglip.openvino"):
        enc = load_encoder(other_checkpoint, wrong)
    assert enc.info.backend == "torch" and enc.info.dtype == "float32"
    [record] = [r for r in caplog.records if "differ" in r.getMessage()]
    assert record.levelno == logging.WARNING
    figure = float(record.getMessage().split("cosine ")[1].split()[0])
    assert figure < ovb.PARITY_MIN_COSINE and "running torch" in record.getMessage()
    # torch really runs the other checkpoint: its embeddings are not the tiny checkpoint's
    got = enc.encode_texts(TEXTS)
    assert cosine_rows(got, reference.text_embeds(TEXTS)).max() < 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_unreadable_cache_entry_is_converted_again(tiny_checkpoint, tmp_path, reference, caplog):
    """A damaged entry used to send every restart to torch for good; it is now replaced once."""
    key = ovb.cache_key(str(tiny_checkpoint), ovb.checkpoint_dir(str(tiny_checkpoint)), (64, 64),
                        ovb.library_versions())
    (tmp_path / key).mkdir()
    for name in ("meta.json", "vision.xml", "vision.bin", "text.xml", "text.bin"):
        (tmp_path / key / name).write_text("truncated")
    with caplog.at_level(logging.WARNING, logger="siglip.openvino"):
        enc = load_encoder(tiny_checkpoint, tmp_path)
    assert "could not be read" in caplog.text and "converting it again" in caplog.text
    assert enc.info.backend == "openvino"
    assert cosine_rows(enc.encode_texts(TEXTS), reference.text_embeds(TEXTS)).min() > 0.9999
    assert entries(tmp_path) == [key]  # the damaged copy is gone, the new entry in its place
    assert (tmp_path / key / "vision.xml").read_text() != "truncated"


def test_worst_cosine():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert ovb.worst_cosine(a, a) == pytest.approx(1.0)
    assert ovb.worst_cosine(a, np.array([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(2 ** -0.5)
    assert ovb.worst_cosine(a, np.array([[1.0, 0.0], [np.nan, 1.0]])) == -1.0  # NaN never passes


# ---------------------------------------------------------------------------------------------------------------
# a real service
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ov_service(start_service, ov_encoder, cache_dir):
    """A server on the cache the encoder above wrote (another process, started later: a restart's situation)."""
    return start_service(SIGLIP_DTYPE="float32", SIGLIP_BACKEND="openvino", SIGLIP_OPENVINO_CACHE_DIR=str(cache_dir))


def loaded_line(svc) -> str:
    lines = [line for line in svc.log_path.read_text(errors="replace").splitlines() if "Loaded" in line]
    assert lines, svc.log()[-3000:]
    return lines[0]


def test_service_on_openvino_matches_reference(ov_service, reference):
    svc = ov_service
    assert "backend openvino" in loaded_line(svc)
    log = svc.log()
    assert "Converting" not in log and "towers read from" in log, log[-3000:]  # the entry another process wrote
    imgs = [make_image(80 + i) for i in range(3)]
    r = svc.post("/image_embedding", {"inputs": [b64(encode(im)) for im in imgs]})
    assert r.status_code == 200, r.text
    got = np.array([row["embedding"] for row in r.json()])
    assert cosine_rows(got, reference.image_embeds(imgs)).min() > 0.99999
    r = svc.post("/text_embedding", {"inputs": TEXTS[:3]})
    assert r.status_code == 200, r.text
    got = np.array([row["embedding"] for row in r.json()])
    assert cosine_rows(got, reference.text_embeds(TEXTS[:3])).min() > 0.99999
    # concurrent single-image requests are batched together by BentoML: every answer is its own image's
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda im: svc.post("/image_embedding", {"inputs": b64(encode(im))}), imgs * 2))
    for im, r in zip(imgs * 2, answers):
        assert r.status_code == 200, r.text
        assert cosine_rows(np.array([r.json()[0]["embedding"]]), reference.image_embeds([im])).min() > 0.99999


def test_service_with_backend_torch(in_process, tmp_path):
    svc = in_process(SIGLIP_DTYPE="float32", SIGLIP_BACKEND="torch", SIGLIP_OPENVINO_CACHE_DIR=str(tmp_path))
    assert svc.client.get("/info").json()["backend"] == "torch"
    assert entries(tmp_path) == []


def test_thread_count_is_passed_to_openvino(tiny_checkpoint, cache_dir, caplog):
    from siglip.model.encoder import SiglipEncoder

    enc = SiglipEncoder(Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", backend="openvino",
                                 openvino_cache_dir=str(cache_dir), openvino_threads=1))
    with caplog.at_level(logging.INFO, logger="siglip.openvino"):
        enc.load()
    assert enc.error is None and enc.info.backend == "openvino"
    assert "float32, 1 threads" in caplog.text
    assert Settings.from_env({"SIGLIP_OPENVINO_THREADS": "3"}).openvino_threads == 3
    with pytest.raises(ValueError, match="SIGLIP_OPENVINO_THREADS"):
        Settings.from_env({"SIGLIP_OPENVINO_THREADS": "-1"})

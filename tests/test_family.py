"""The SigLIP family: one tiny random checkpoint per structural class, each served exactly as transformers' own
processor + model compute it (``../shared/notes/siglip-family.md``).

Classes: SigLIP 2 fixed resolution at other sizes and patches (one whose grid leaves pixels unused, like
so400m-patch14-384's 378 of 384), SigLIP 1 (SentencePiece tokenizer, its own canonicalization, bicubic, and the
16-token text tower of siglip-so400m-patch14-224 with no ``architectures`` in its config), unequal tower widths with
a text projection (giant-opt), and NaFlex at several aspect ratios and patch budgets, alone and mixed in one batch.
Each is checked at model level on every backend that serves it, and the process boundary (every mode, the OpenAI
route, ``/info``, the client, the indexer and the playground in a real browser) over a real ``bentoml serve`` for
the classes whose wire format or text length differ.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Reference, b64, cosine, cosine_rows, encode, make_image, server_fixture
from PIL import Image
from test_playground import add_files, open_page, playwright_driver, set_labels, shown_bars  # noqa: F401 (fixtures)

from siglip.api.images import ImageSpec, PatchGrid, load_pixels, naflex_size, to_patches
from siglip.client import AsyncSiglipClient, SiglipClient
from siglip.settings import Settings

TEXTS = ["a photo of a cat", "Glossy WHITE porcelain tile!!", "rustic oak, wood   flooring.", "",
         "a photo of a cat on a white ceramic floor tile near the wooden door " * 6]
SIZES = [(96, 72), (40, 200), (300, 100), (17, 23), (640, 480)]
# name -> build_checkpoint keyword arguments
CLASSES = {
    "siglip2-48-p8": {"family": "siglip2", "image_size": 48, "patch_size": 8},
    "siglip2-66-p14": {"family": "siglip2", "image_size": 66, "patch_size": 14},  # 4x4 grid: 56 of 66 px, like 378/384
    "siglip1": {"family": "siglip1", "resample": 3},
    "siglip1-16-tokens": {"family": "siglip1", "text_length": 16, "drop_architectures": True},
    "projection": {"family": "siglip2", "text_hidden": 24},  # text 24 wide -> 32, like giant-opt 1152 -> 1536
    "naflex": {"family": "naflex"},
}
FIXED = [name for name in CLASSES if name != "naflex"]


_BUILT: dict[str, Path] = {}


def checkpoint(name: str, tmp_path_factory) -> Path:
    """The family member ``name``, built once per session (the naflex server may start before this module's tests)."""
    if name not in _BUILT:
        from siglip.model.checkpoint import build_checkpoint

        _BUILT[name] = build_checkpoint(tmp_path_factory.mktemp("family") / name, **CLASSES[name])
    return _BUILT[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: checkpoint(name, tmp_path_factory) for name in CLASSES}


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: Reference(path) for name, path in checkpoints.items()}


def load(path, backend: str = "torch", **settings):
    from siglip.model.encoder import SiglipEncoder

    enc = SiglipEncoder(Settings(model=str(path), device="cpu", dtype="float32", backend=backend, **settings))
    enc.load()
    assert enc.error is None, enc.error
    return enc


@pytest.fixture(scope="module")
def encoders(checkpoints):
    return {name: load(path) for name, path in checkpoints.items()}


def spec_of(enc, max_num_patches: int | None = None) -> ImageSpec:
    i = enc.info
    return ImageSpec(i.image_height, i.image_width, i.resample, patch_size=i.patch_size,
                     max_num_patches=max_num_patches or i.max_num_patches)


def embed_images(enc, images, max_num_patches: int | None = None) -> np.ndarray:
    """Through the gateway's preprocessing (bytes -> pixels or patch rows) and the model service's encoder."""
    prepared = [load_pixels(encode(im), f"inputs[{i}]", spec_of(enc, max_num_patches), 10**9)
                for i, im in enumerate(images)]
    if enc.info.naflex:
        return enc.encode_patches([(p.patches, p.rows, p.cols) for p in prepared])
    return enc.encode_images(np.stack(prepared))


# -- what each checkpoint says about itself -------------------------------------------------------------------
def test_spec_comes_from_the_checkpoint(encoders):
    info = {name: enc.info for name, enc in encoders.items()}
    assert (info["siglip2-48-p8"].image_height, info["siglip2-48-p8"].patch_size) == (48, 8)
    assert (info["siglip2-66-p14"].image_width, info["siglip2-66-p14"].patch_size) == (66, 14)
    assert info["siglip2-48-p8"].family == "SigLIP 2" and info["siglip1"].family == "SigLIP"
    assert info["siglip1"].resample == 3 and info["siglip2-48-p8"].resample == 2
    assert info["siglip1-16-tokens"].text_length == 16 and info["siglip1"].text_length == 64
    assert info["projection"].embed_dim == 32
    nf = info["naflex"]
    assert nf.naflex and nf.model_type == "siglip2" and nf.family == "SigLIP 2"
    assert nf.image_height is None and nf.max_num_patches == 64 and nf.max_num_patches_limit == 1024
    assert nf.jpeg_decode is None  # NaFlex images are resized in the gateway, never forwarded as JPEG
    assert all(i.to_dict()["naflex"] == (name == "naflex") for name, i in info.items())


def test_config_without_architectures_loads_by_model_type(checkpoints):
    import json

    config = json.loads((checkpoints["siglip1-16-tokens"] / "config.json").read_text())
    assert "architectures" not in config and config["model_type"] == "siglip"


def test_unsupported_model_type_is_refused_with_its_name(tmp_path):
    from siglip.model.spec import read_spec

    class Config:
        model_type = "clip"

    with pytest.raises(ValueError, match="model_type 'clip' is not a SigLIP"):
        read_spec(Config(), None, None)


# -- parity with transformers, per class ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLASSES))
def test_text_parity(name, encoders, references):
    got = encoders[name].encode_texts(TEXTS)
    # SigLIP 1's tokenizer and NaFlex's Siglip2Tokenizer canonicalize by themselves: their processors get the raw,
    # cased, punctuated text; SigLIP 2 fixed-resolution was trained on lowercased text its tokenizer does not make.
    want = references[name].text_embeds(TEXTS, lower=CLASSES[name]["family"] == "siglip2")
    assert cosine_rows(got, want).min() > 0.99999


@pytest.mark.parametrize("name", FIXED)
def test_image_parity_fixed_resolution(name, encoders, references):
    images = [make_image(i, size=s) for i, s in enumerate(SIZES)]
    got = embed_images(encoders[name], images)
    assert cosine_rows(got, references[name].image_embeds(images)).min() > 0.9999


def test_siglip1_text_rules(encoders, references):
    """SigLIP 1's tokenizer drops punctuation and case by itself; the 16-token member truncates at 16, EOS kept."""
    enc = encoders["siglip1"]
    same = enc.encode_texts(["A photo, of a CAT!", "a photo of a cat"])
    assert cosine(same[0], same[1]) > 0.99999
    short = encoders["siglip1-16-tokens"]
    ids = short.tokenize([TEXTS[-1]])
    assert ids.shape == (1, 16) and ids[0, -1] == short._tokenizer.eos_token_id
    assert short.count_tokens([TEXTS[-1], "a cat"])[0] == 16


def test_token_counts_follow_each_checkpoint(encoders):
    long = TEXTS[-1]
    assert encoders["siglip2-48-p8"].count_tokens([long]) == [64]
    assert encoders["siglip1-16-tokens"].count_tokens([long]) == [16]


# -- NaFlex -------------------------------------------------------------------------------------------------
def test_naflex_size_matches_transformers():
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    for h, w in [(100, 300), (480, 640), (1, 1), (17, 4000), (512, 512), (333, 777), (9, 16)]:
        for patch in (14, 16):
            for budget in (1, 16, 64, 256, 576, 1024):
                assert naflex_size(h, w, patch, budget) == get_image_size_for_max_num_patches(h, w, patch, budget)
    assert naflex_size(100, 300, 16, 256) == (144, 432)  # the note's 9x27 grid
    assert naflex_size(480, 640, 16, 256) == (224, 288)  # 14x18


def test_to_patches_matches_transformers():
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    want = convert_image_to_patches(pixels.transpose(2, 0, 1), 16)
    np.testing.assert_array_equal(to_patches(pixels, 16), want)


@pytest.mark.parametrize("budget", [None, 16, 36, 256])
def test_naflex_parity_at_several_budgets(budget, encoders, references):
    images = [make_image(i, size=s) for i, s in enumerate(SIZES)]
    got = embed_images(encoders["naflex"], images, budget)
    # Explicit even for the default: Siglip2Processor's own call default is 256 whatever preprocessor_config.json
    # says (AutoImageProcessor, which the service reads, takes the file's 64); hub checkpoints say 256 in both.
    want = references["naflex"].image_embeds(images, max_num_patches=budget or 64)
    assert cosine_rows(got, want).min() > 0.9999
    grid = load_pixels(encode(images[2]), "x", spec_of(encoders["naflex"], budget), 10**9)
    assert isinstance(grid, PatchGrid) and grid.rows * grid.cols <= (budget or 64)
    assert grid.cols > grid.rows  # 300x100 keeps its aspect ratio


def test_naflex_mixed_batch_equals_each_alone(encoders):
    """Aspect ratios and budgets mixed in one batch (padded per bucket, with the mask) change no embedding."""
    enc = encoders["naflex"]
    items = []
    for i, (size, budget) in enumerate(zip(SIZES * 2, [64, 16, 256, 36, 64, 1024, 9, 144, 64, 100])):
        grid = load_pixels(encode(make_image(i, size=size)), "x", spec_of(enc, budget), 10**9)
        items.append((grid.patches, grid.rows, grid.cols))
    together = enc.encode_patches(items)
    alone = np.concatenate([enc.encode_patches([item]) for item in items])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_naflex_budget_setting_and_limit(checkpoints, references):
    enc = load(checkpoints["naflex"], max_num_patches=36, max_num_patches_limit=100)
    assert enc.info.max_num_patches == 36 and enc.info.max_num_patches_limit == 100
    image = make_image(3, size=(300, 100))
    got = embed_images(enc, [image])
    assert cosine(got[0], references["naflex"].image_embeds([image], max_num_patches=36)[0]) > 0.9999
    with pytest.raises(ValueError, match="item 0: 121 patches, over SIGLIP_MAX_NUM_PATCHES_LIMIT=100"):
        enc.encode_patches([(np.zeros((121, 16 * 16 * 3), np.uint8), 11, 11)])
    with pytest.raises(ValueError, match="SIGLIP_MAX_NUM_PATCHES"):
        Settings(max_num_patches=2000).validate()


# -- backends ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["siglip2-66-p14", "siglip1-16-tokens", "projection"])
def test_openvino_serves_fixed_resolution_members(name, checkpoints, references, tmp_path):
    enc = load(checkpoints[name], backend="openvino", openvino_cache_dir=str(tmp_path))
    assert enc.info.backend == "openvino"
    images = [make_image(i, size=s) for i, s in enumerate(SIZES[:3])]
    assert cosine_rows(embed_images(enc, images), references[name].image_embeds(images)).min() > 0.9999
    assert cosine_rows(enc.encode_texts(TEXTS), references[name].text_embeds(TEXTS)).min() > 0.9999


def test_naflex_on_openvino_runs_torch_and_says_so(checkpoints, references, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="siglip"):
        enc = load(checkpoints["naflex"], backend="openvino", openvino_cache_dir=str(tmp_path))
    assert enc.info.backend == "torch" and "NaFlex checkpoint runs on torch" in caplog.text
    image = make_image(5, size=(40, 200))
    want = references["naflex"].image_embeds([image], max_num_patches=64)[0]
    assert cosine(embed_images(enc, [image])[0], want) > 0.9999


def test_naflex_device_decode_is_off_with_a_log_line(checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="siglip"):
        enc = load(checkpoints["naflex"], device_decode="on")
    assert enc.info.jpeg_decode is None and "SIGLIP_DEVICE_DECODE does not apply to NaFlex" in caplog.text


def test_naflex_cuda_graphs_are_off_with_a_log_line(checkpoints, caplog):
    """On a CUDA device (only named here: nothing is captured or run), graphs stay off for NaFlex."""
    import torch

    from siglip.model.backends import BackendChoice, build_towers
    from siglip.model.encoder import load_checkpoint
    from siglip.model.spec import read_spec
    from siglip.model.towers import TorchTowers

    model, processor, tokenizer = load_checkpoint(str(checkpoints["naflex"]), torch.float32)
    choice = BackendChoice(backend="torch", backend_setting="auto", device=torch.device("cuda"), dtype=torch.float32,
                           dtype_setting="float32", compile=False, cuda_graphs_max_batch=8, openvino_cache_dir="",
                           openvino_threads=0)
    with caplog.at_level(logging.WARNING, logger="siglip"):
        towers = build_towers(read_spec(model.config, processor, tokenizer), model, "naflex", choice, lambda t: None)
    assert isinstance(towers, TorchTowers) and towers.path == "eager"
    assert "SIGLIP_CUDA_GRAPHS=1 is off for NaFlex checkpoints" in caplog.text


def test_bicubic_checkpoint_decodes_jpegs_in_the_gateway(checkpoints, caplog):
    """The device resize is bilinear: a SigLIP 1 (bicubic) checkpoint keeps PIL's resize for every image."""
    with caplog.at_level(logging.INFO, logger="siglip"):
        enc = load(checkpoints["siglip1"], device_decode="on")
    assert enc.info.resample == 3 and enc.info.jpeg_decode is None
    assert "resizes with PIL filter 3" in caplog.text


def test_pad_length():
    from siglip.model.encoder import pad_length

    assert [pad_length(n, 1024) for n in (1, 64, 65, 252, 256, 972, 1024)] == [64, 64, 128, 256, 256, 1024, 1024]
    assert pad_length(90, 100) == 100 and pad_length(30, 36) == 36


def test_naflex_rotated_and_drafted_jpegs(encoders, references):
    """EXIF orientation is applied before the grid is chosen (a portrait photo gets a portrait grid), and a JPEG
    draft (SIGLIP_JPEG_DRAFT_FACTOR) keeps the grid of the full-size image."""
    import io

    enc = encoders["naflex"]
    image = make_image(9, size=(640, 240))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees: 240 wide, 640 tall
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    grid = load_pixels(data, "x", spec_of(enc), 10**9)
    assert grid.rows > grid.cols
    got = enc.encode_patches([(grid.patches, grid.rows, grid.cols)])[0]
    assert cosine(got, references["naflex"].image_embeds([Image.open(io.BytesIO(data))], max_num_patches=64)[0]) \
        > 0.9999
    drafted = load_pixels(data, "x", ImageSpec(None, None, 2, 2.0, 16, 64), 10**9)
    assert (drafted.rows, drafted.cols) == (grid.rows, grid.cols)
    assert cosine(enc.encode_patches([(drafted.patches, drafted.rows, drafted.cols)])[0], got) > 0.99


def test_hub_id_from_the_cache_reports_its_revision(checkpoints, tmp_path, monkeypatch):
    """A hub id served from the hub cache (offline) loads, and /info's revision is the snapshot's commit."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--google--siglip2-tiny-test"
    shutil.copytree(checkpoints["siglip2-48-p8"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    enc = load("google/siglip2-tiny-test")
    assert enc.info.revision == commit and enc.info.model == "google/siglip2-tiny-test"


# -- over HTTP ------------------------------------------------------------------------------------------------
naflex_service = server_fixture(
    "naflex_service", SIGLIP_MODEL=lambda tmp_path_factory: str(checkpoint("naflex", tmp_path_factory)),
    SIGLIP_DTYPE="float32", SIGLIP_BACKEND="torch", SIGLIP_MAX_NUM_PATCHES_LIMIT="256")


@pytest.fixture(scope="module")
def siglip1_service(in_process, checkpoints):
    return in_process(SIGLIP_MODEL=str(checkpoints["siglip1-16-tokens"]), SIGLIP_DTYPE="float32")


def test_naflex_every_mode_over_http(naflex_service, references):
    ref = references["naflex"]
    images = [make_image(i, size=s) for i, s in enumerate(SIZES[:3])]
    wire = [b64(encode(im)) for im in images]
    got = naflex_service.post("/image_embedding", {"inputs": wire}).json()
    want = ref.image_embeds(images, max_num_patches=64)
    assert cosine_rows([r["embedding"] for r in got], want).min() > 0.9999

    texts = naflex_service.post("/", {"inputs": ["A Photo Of A Cat", "tile"]}).json()
    assert cosine_rows([r["embedding"] for r in texts], ref.text_embeds(["a photo of a cat", "tile"])).min() > 0.99999

    sim = naflex_service.post("/similarity", {"inputs": {"images": wire, "texts": ["cat", "tile"]}}).json()
    np.testing.assert_allclose(sim["similarity_scores"], want @ ref.text_embeds(["cat", "tile"]).T, atol=1e-4)

    labels = ["cat", "dog", "tile"]
    zs = naflex_service.post("/zero_shot", {"inputs": wire[0], "parameters": {"candidate_labels": labels}}).json()
    expected = ref.zero_shot(images[0], labels, max_num_patches=64)
    assert [r["label"] for r in zs] == [label for label, _ in expected]
    np.testing.assert_allclose([r["score"] for r in zs], [s for _, s in expected], atol=1e-4)


def test_naflex_per_request_budget_over_http(naflex_service, references):
    image = make_image(7, size=(300, 100))
    resp = naflex_service.post("/image_embedding", {"inputs": b64(encode(image)),
                                                    "parameters": {"max_num_patches": 16}})
    assert resp.status_code == 200, resp.text
    want = references["naflex"].image_embeds([image], max_num_patches=16)[0]
    assert cosine(resp.json()[0]["embedding"], want) > 0.9999
    with SiglipClient(naflex_service.url) as client:
        assert cosine(client.image_embedding(image, max_num_patches=16)[0], want) > 0.9999
        ranked = client.zero_shot(image, ["cat", "tile"], max_num_patches=16)
        assert math.isclose(sum(r.score for r in ranked), 1.0, rel_tol=1e-5)
    over = naflex_service.post("/image_embedding", {"inputs": b64(encode(image)),
                                                    "parameters": {"max_num_patches": 257}})
    assert over.status_code == 400
    assert "parameters.max_num_patches must be between 1 and 256" in over.json()["error"]


def test_naflex_openai_usage_counts_real_patches(naflex_service, references):
    images = [make_image(1, size=(300, 100)), make_image(2, size=(64, 64))]
    body = {"model": "naflex", "input": ["data:image/png;base64," + b64(encode(im)) for im in images],
            "modality": "image", "max_num_patches": 36}
    resp = naflex_service.post("/v1/embeddings", body)
    assert resp.status_code == 200, resp.text
    grids = [naflex_size(im.height, im.width, 16, 36) for im in images]
    assert resp.json()["usage"]["prompt_tokens"] == sum((h // 16) * (w // 16) for h, w in grids) == 27 + 36
    want = references["naflex"].image_embeds(images, max_num_patches=36)
    assert cosine_rows([d["embedding"] for d in resp.json()["data"]], want).min() > 0.9999


def test_info_names_what_is_served(naflex_service, siglip1_service, checkpoints):
    info = httpx.get(f"{naflex_service.url}/info", timeout=10).json()
    assert info["model"] == str(checkpoints["naflex"]) and info["naflex"] is True
    assert (info["family"], info["patch_size"], info["max_num_patches"], info["max_num_patches_limit"]) == \
        ("SigLIP 2", 16, 64, 256)
    assert info["embed_dim"] == 32 and info["text_length"] == 64 and info["backend"] == "torch"
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["vision_path"] == "eager"
    assert info["limits"]["max_images_per_request"] == 64
    line = next(x for x in naflex_service.log().splitlines() if "Loaded " in x)
    assert "NaFlex, up to 64 patches of 16 px" in line and "on cpu (float32)" in line

    async def info_async():
        async with AsyncSiglipClient(naflex_service.url) as client:
            return await client.info()

    with SiglipClient(naflex_service.url) as client:
        assert client.info() == asyncio.run(info_async()) == info
    got = siglip1_service.client.get("/info").json()
    assert got["family"] == "SigLIP" and got["text_length"] == 16 and got["naflex"] is False
    assert (got["image_height"], got["image_width"]) == (64, 64)


def test_siglip1_short_text_tower_over_http(siglip1_service, references):
    ref = references["siglip1-16-tokens"]
    resp = siglip1_service.post("/v1/embeddings", {"model": "siglip1-16-tokens", "input": [TEXTS[-1], "a cat"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert cosine_rows([d["embedding"] for d in body["data"]], ref.text_embeds([TEXTS[-1], "a cat"])).min() > 0.99999
    assert body["usage"]["prompt_tokens"] == 16 + siglip1_service.post(
        "/v1/embeddings", {"model": "siglip1-16-tokens", "input": "a cat"}).json()["usage"]["prompt_tokens"]
    fixed = siglip1_service.post("/image_embedding", {"inputs": b64(encode(make_image(1))),
                                                      "parameters": {"max_num_patches": 16}})
    assert fixed.status_code == 400 and "NaFlex checkpoints only" in fixed.json()["error"]
    zs = siglip1_service.post("/", {"inputs": b64(encode(make_image(2))),
                                    "parameters": {"candidate_labels": ["cat", "dog"]}}).json()
    assert math.isclose(sum(r["score"] for r in zs), 1.0, rel_tol=1e-5)


def test_naflex_image_of_one_pixel_row(encoders, references):
    """Extreme aspect ratios keep at least one patch per side (the processor's own rule)."""
    image = Image.new("RGB", (900, 3), (200, 10, 10))
    got = embed_images(encoders["naflex"], [image])
    assert cosine(got[0], references["naflex"].image_embeds([image], max_num_patches=64)[0]) > 0.9999


def test_indexer_on_a_naflex_checkpoint(naflex_service, references, tmp_path, capsys):
    """siglip-index builds and searches through a NaFlex server: its vectors are the reference's at the default
    budget, whatever each image's aspect ratio."""
    import json

    from siglip.index.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    images = {f"{i}.png": make_image(i, size=size) for i, size in enumerate(SIZES)}
    for name, image in images.items():
        (folder / name).write_bytes(encode(image))
    def cli(*args: str) -> int:
        return main(list(args))

    db = tmp_path / "db"
    assert cli("build", str(folder), "--db", str(db), "--server", naflex_service.url, "--quiet", "--json") == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(images)
    assert cli("search", "--db", str(db), "--server", naflex_service.url, "--image", str(folder / "2.png"),
               "--top-k", "2", "--json") == 0
    matches = json.loads(capsys.readouterr().out)
    assert matches[0]["id"] == "2.png" and matches[0]["score"] == pytest.approx(1.0, abs=1e-4)

    from test_index import contents

    ids, _, vectors = contents(db)
    got = np.stack([vectors[ids.index(name)] for name in images])
    want = references["naflex"].image_embeds(list(images.values()), max_num_patches=64)
    assert cosine_rows(got, want).min() > 0.9999


# Last in this module: its Playwright driver (module-scoped, sync API) keeps an event loop running in the main thread
# until the module ends, and a later test calling asyncio.run (the indexer CLI does) would fail.
def test_playground_on_a_naflex_checkpoint(naflex_service, open_page):  # noqa: F811 (the fixture)
    b = open_page(naflex_service)
    b.page.wait_for_selector("#status:has-text('NaFlex')")
    assert "(SigLIP 2, NaFlex, up to 64 patches per image, 32-dim embeddings)" in b.page.inner_text("#status")
    add_files(b, [("wide.png", encode(make_image(4, size=(300, 100))), "image/png")])
    set_labels(b, "#labels", ["a cat", "a tile"])
    assert b.submit("#zero-shot-form button") == "done"
    path, body = b.last_post()
    answer = naflex_service.post(path, body).json()
    [bars] = shown_bars(b)
    assert [label for label, _ in bars] == [s["label"] for s in answer]
    assert b.errors == [] and b.foreign_requests() == []


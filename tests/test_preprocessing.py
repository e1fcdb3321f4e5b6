"""Each preprocessing pitfall of google/siglip2-base-patch16-512 (shared notes), pinned against direct
transformers calls on the tiny checkpoint: the service's own code paths (``siglip.model.text``, ``siglip.api.images``,
``siglip.api.scoring``, ``SiglipEncoder``) must agree with the reference, and must measurably disagree with the
tempting mistake."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import b64, cosine, encode, make_image
from PIL import Image, ImageOps

from siglip.api import scoring
from siglip.api.images import ImageSpec, load_pixels
from siglip.api.requests import parse_request
from siglip.api.schemas import DEFAULT_TEMPLATE
from siglip.model.text import tokenize
from siglip.settings import Settings

BIG = 10**9  # max_pixels that never refuses
LONG_TEXT = "a photo of a cat on a white ceramic floor tile near the wooden door " * 20
TEXTS = ["a photo of a cat", "glossy white porcelain tile", "Rustic OAK wood flooring", "heat pump outdoor unit"]


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------
def _loaded_encoder(path, dtype: str, backend: str = "torch", cache_dir: str = ""):
    from siglip.model.encoder import SiglipEncoder

    enc = SiglipEncoder(Settings(model=str(path), device="cpu", dtype=dtype, backend=backend,
                                 openvino_cache_dir=cache_dir))
    enc.load()
    assert enc.error is None, enc.error
    assert enc.info.backend == backend  # no silent fallback: these parity tests are for this backend
    return enc


@pytest.fixture(scope="module")
def torch_encoder(tiny_checkpoint):
    return _loaded_encoder(tiny_checkpoint, "float32")


@pytest.fixture(scope="module", params=["torch", "openvino"])
def encoder(request, torch_encoder, tiny_checkpoint, tmp_path_factory):
    """The fp32 encoder on each backend: every parity test below runs on both."""
    if request.param == "torch":
        return torch_encoder
    pytest.importorskip("openvino")
    return _loaded_encoder(tiny_checkpoint, "float32", "openvino", str(tmp_path_factory.mktemp("ov-cache")))


@pytest.fixture(scope="module")
def encoder_bf16(tiny_checkpoint):
    return _loaded_encoder(tiny_checkpoint, "bfloat16")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def spec(torch_encoder) -> ImageSpec:
    info = torch_encoder.info
    return ImageSpec(info.image_height, info.image_width, resample=info.resample)


def text_features(reference, **tokenizer_kwargs_and_texts) -> np.ndarray:
    """Reference text embeddings of raw tokenizer output, optionally with the attention mask passed."""
    torch = reference.torch
    texts = tokenizer_kwargs_and_texts.pop("texts")
    use_mask = tokenizer_kwargs_and_texts.pop("use_mask", False)
    enc = reference.processor.tokenizer(texts, return_tensors="pt", **tokenizer_kwargs_and_texts)
    kwargs = {"input_ids": enc["input_ids"]}
    if use_mask:
        kwargs["attention_mask"] = enc["attention_mask"]
    with torch.no_grad():
        out = reference.model.get_text_features(**kwargs).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def image_features(reference, pixel_values: np.ndarray) -> np.ndarray:
    torch = reference.torch
    with torch.no_grad():
        out = reference.model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def reference_pixels(reference, img: Image.Image) -> np.ndarray:
    """The processor's pixel_values (3, H, W) for an image converted as the model card says."""
    rgb = ImageOps.exif_transpose(img).convert("RGB")
    return reference.processor(images=[rgb], return_tensors="np")["pixel_values"][0]


def service_pixels(data: bytes, spec: ImageSpec) -> np.ndarray:
    """load_pixels' uint8 (H, W, 3), rescaled and normalized as the encoder does on the device, as (3, H, W)."""
    px = load_pixels(data, "inputs", spec, BIG)
    assert px.dtype == np.uint8 and px.shape == (spec.height, spec.width, 3)
    return ((px.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------------------
# text: lowercase, 64-token max_length padding, no attention mask
# ---------------------------------------------------------------------------------------------------------------
def test_text_is_lowercased(encoder, reference, tokenizer):
    text = "A Photo Of A CAT"
    service = encoder.encode_texts([text])[0]
    assert cosine(service, reference.text_embeds([text.lower()])[0]) > 0.99999

    # the tokenizer itself does not lowercase: the raw text gives other ids and another embedding
    assert tokenize(tokenizer, [text], 64).tolist() == tokenize(tokenizer, [text.lower()], 64).tolist()
    raw_ids = tokenizer([text], padding="max_length", max_length=64, truncation=True)["input_ids"][0]
    lower_ids = tokenizer([text.lower()], padding="max_length", max_length=64, truncation=True)["input_ids"][0]
    assert raw_ids != lower_ids
    assert tokenize(tokenizer, [text], 64)[0].tolist() == lower_ids
    cased = text_features(reference, texts=[text], padding="max_length", max_length=64, truncation=True)[0]
    assert cosine(service, cased) < 0.999


def test_tokenize_pads_to_64_on_the_right_and_keeps_eos(tokenizer):
    ids = tokenize(tokenizer, ["a cat", LONG_TEXT, ""], 64)
    assert ids.shape == (3, 64)
    assert ids.dtype == np.int64
    eos, pad = 1, 0
    assert tokenizer.eos_token_id == eos and tokenizer.pad_token_id == pad

    short = ids[0].tolist()
    n = short.index(eos) + 1  # content, then EOS, then padding only
    assert 1 < n < 64
    assert all(t != pad for t in short[:n]) and short[n:] == [pad] * (64 - n)
    assert tokenizer.bos_token_id not in short  # no BOS

    long = ids[1].tolist()
    assert len(tokenizer(LONG_TEXT.lower())["input_ids"]) > 64  # it really was truncated
    assert long[-1] == eos and pad not in long

    empty = ids[2].tolist()
    assert empty[0] == eos and empty[1:] == [pad] * 63


def test_text_embedding_is_batch_independent(encoder, reference):
    alone = encoder.encode_texts(["a cat"])[0]
    with_long = encoder.encode_texts(["a cat", LONG_TEXT])[0]
    with_others = encoder.encode_texts(["Heat pump indoor unit", "a cat", "x"])[1]
    np.testing.assert_allclose(alone, with_long, atol=1e-5)
    np.testing.assert_allclose(alone, with_others, atol=1e-5)
    assert cosine(alone, reference.text_embeds(["a cat"])[0]) > 0.99999

    # padding="longest" (what a generic pipeline does) gives a different, batch-dependent embedding
    longest_alone = text_features(reference, texts=["a cat"], padding="longest")[0]
    longest_batch = text_features(reference, texts=["a cat", "heat pump indoor unit outdoor unit"],
                                  padding="longest")[0]
    assert cosine(alone, longest_alone) < 0.999
    assert cosine(longest_alone, longest_batch) < 0.999


def test_no_attention_mask(encoder, reference, tokenizer):
    # tokenize produces ids only: there is no mask to pass by mistake
    out = tokenize(tokenizer, ["a photo of a dog"], 64)
    assert isinstance(out, np.ndarray) and out.shape == (1, 64)

    service = encoder.encode_texts(["a photo of a dog"])[0]
    no_mask = text_features(reference, texts=["a photo of a dog"], padding="max_length", max_length=64,
                            truncation=True)[0]
    masked = text_features(reference, texts=["a photo of a dog"], padding="max_length", max_length=64,
                           truncation=True, use_mask=True)[0]
    assert cosine(service, no_mask) > 0.99999
    assert cosine(service, masked) < 0.999


# ---------------------------------------------------------------------------------------------------------------
# images: EXIF, RGB conversion, resize
# ---------------------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(reference, spec, encoder):
    img = make_image(3, size=(96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    assert opened(data).getexif().get(0x0112) == 6

    service = service_pixels(data, spec)
    transposed = ImageOps.exif_transpose(opened(data))
    assert transposed.size == (64, 96)  # the transpose is real: portrait after rotation
    expected = reference.processor(images=[transposed.convert("RGB")], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(service, expected, atol=1e-5)

    ignored = reference.processor(images=[opened(data).convert("RGB")], return_tensors="np")["pixel_values"][0]
    assert np.abs(service - ignored).mean() > 0.05
    e_service = encoder.encode_images(load_pixels(data, "x", spec, BIG)[None])[0]
    assert cosine(e_service, image_features(reference, ignored[None])[0]) < 0.9999
    assert cosine(e_service, image_features(reference, expected[None])[0]) > 0.99999


def _png_p(transparency: bool) -> bytes:
    img = make_image(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if transparency:
        return encode(img, "PNG", transparency=3)
    return encode(img, "PNG")


def _rgba() -> Image.Image:
    img = make_image(5).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, img.width, dtype=np.uint8), (img.height, 1))
    img.putalpha(Image.fromarray(alpha, "L"))
    return img


def _la() -> Image.Image:
    img = make_image(6).convert("LA")
    img.putalpha(128)
    return img


MODE_CASES = {
    "RGBA": lambda: encode(_rgba(), "PNG"),
    "LA": lambda: encode(_la(), "PNG"),
    "L": lambda: encode(make_image(7, mode="L"), "PNG"),
    "P": lambda: _png_p(transparency=False),
    "P+transparency": lambda: _png_p(transparency=True),
    "CMYK": lambda: encode(make_image(8, mode="CMYK"), "JPEG", quality=95),
    "1": lambda: encode(make_image(9, mode="1"), "PNG"),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_mode_converted_to_rgb_like_reference(case, reference, spec):
    data = MODE_CASES[case]()
    expected_mode = case.split("+")[0]
    assert opened(data).mode == expected_mode
    np.testing.assert_allclose(service_pixels(data, spec), reference_pixels(reference, opened(data)), atol=1e-5)


def test_animated_gif_uses_first_frame(reference, spec):
    frames = [make_image(10).convert("P"), make_image(11).convert("P")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gif = opened(data)
    assert gif.n_frames == 2
    service = service_pixels(data, spec)
    np.testing.assert_allclose(service, reference_pixels(reference, opened(data)), atol=1e-5)

    second = opened(data)
    second.seek(1)
    assert np.abs(service - reference_pixels(reference, second)).mean() > 0.05


def test_16_bit_png_is_scaled_not_clipped(spec):
    h, w = 72, 96
    arr = np.tile(np.linspace(0, 65535, w), (h, 1)).astype(np.uint16)  # black -> white, left to right
    data = encode(Image.fromarray(arr), "PNG")
    assert opened(data).mode.startswith("I")

    px = load_pixels(data, "inputs", spec, BIG).astype(np.int32)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # grey
    assert px.min() <= 5 and px.max() >= 250  # full range kept
    assert 110 < px.mean() < 145  # a gradient averages mid-grey; PIL's own convert clips to white
    assert np.all(np.diff(px[..., 0], axis=1) >= 0)  # still left-to-right increasing
    clipped = np.asarray(opened(data).convert("RGB"))
    assert clipped.mean() > 240  # the pitfall this guards against


def test_resize_math_matches_processor_and_not_other_filters(reference, spec, encoder):
    img = make_image(12, size=(150, 90))  # non-square: squashed, not cropped
    # the checkpoint says resample=2 (bilinear), and that is also ImageSpec's default
    assert spec.resample == ImageSpec(1, 1).resample == Image.Resampling.BILINEAR == 2
    data = encode(img, "PNG")
    service = service_pixels(data, spec)
    expected = reference_pixels(reference, img)
    assert expected.shape == (3, spec.height, spec.width)
    np.testing.assert_allclose(service, expected, atol=1e-5)
    assert service.min() >= -1 and service.max() <= 1

    e_ref = image_features(reference, expected[None])[0]
    for resample in (Image.Resampling.NEAREST, Image.Resampling.BICUBIC):
        other = service_pixels(data, ImageSpec(spec.height, spec.width, resample=resample))
        assert np.abs(other - expected).max() > 0.1, resample
        assert cosine(image_features(reference, other[None])[0], e_ref) < 0.99999, resample

    # centre-crop instead of squash also differs
    side = min(img.size)
    left = (img.width - side) // 2
    cropped = encode(img.crop((left, 0, left + side, side)), "PNG")
    assert np.abs(service_pixels(cropped, spec) - expected).mean() > 0.05


# ---------------------------------------------------------------------------------------------------------------
# embeddings and scores
# ---------------------------------------------------------------------------------------------------------------
def _images() -> list[Image.Image]:
    return [make_image(20), make_image(21, size=(64, 64)), make_image(22, size=(40, 120)),
            make_image(23, size=(200, 150))]


def test_image_embeddings_match_reference(encoder, reference, spec):
    imgs = _images()
    pixels = np.stack([load_pixels(encode(im), f"inputs[{i}]", spec, BIG) for i, im in enumerate(imgs)])
    service = encoder.encode_images(pixels)
    expected = reference.image_embeds(imgs)
    assert service.shape == expected.shape == (len(imgs), encoder.info.embed_dim)
    assert service.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(service, axis=1), 1.0, atol=1e-5)
    for i in range(len(imgs)):
        assert cosine(service[i], expected[i]) > 0.99999, i
    # the images are distinguishable, so the agreement above means something
    assert cosine(service[0], service[1]) < 0.9999
    # batch independence for images too
    np.testing.assert_allclose(encoder.encode_images(pixels[2:3])[0], service[2], atol=1e-5)


def test_text_embeddings_match_reference(encoder, reference):
    service = encoder.encode_texts(TEXTS)
    expected = reference.text_embeds(TEXTS)
    assert service.shape == (len(TEXTS), encoder.info.embed_dim) and service.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(service, axis=1), 1.0, atol=1e-5)
    for i in range(len(TEXTS)):
        assert cosine(service[i], expected[i]) > 0.99999, TEXTS[i]
    assert cosine(service[0], service[1]) < 0.9999


def test_zero_shot_softmax_and_sigmoid_match_reference(encoder, reference, spec):
    img = make_image(30)
    labels = ["cat", "dog", "ceramic tile", "heat pump"]
    parsed = parse_request(b64(encode(img)), {"candidate_labels": labels})
    assert parsed.mode == "zero_shot"
    image_emb = encoder.encode_images(load_pixels(encode(img), "inputs", spec, BIG)[None])
    text_emb = encoder.encode_texts(list(parsed.texts))
    cosine = scoring.cosine_matrix(image_emb, text_emb)
    assert cosine.shape == (1, len(labels))

    scale, bias = reference.logit_scale, reference.logit_bias
    assert encoder.info.logit_scale == pytest.approx(scale) and encoder.info.logit_bias == pytest.approx(bias)
    ref_cos = reference.image_embeds([img]) @ reference.text_embeds([DEFAULT_TEMPLATE.format(x) for x in labels]).T
    ref_logits = ref_cos[0].astype(np.float64) * np.exp(scale) + bias

    soft = scoring.zero_shot_scores(cosine, encoder.info.logit_scale, encoder.info.logit_bias)[0]
    ref_soft = np.exp(ref_logits - ref_logits.max())
    ref_soft /= ref_soft.sum()
    np.testing.assert_allclose(soft, ref_soft, atol=1e-5)
    assert soft.sum() == pytest.approx(1.0, abs=1e-9)
    assert soft.max() - soft.min() > 1e-3  # not uniform: logit_scale is in effect

    sig = scoring.zero_shot_scores(cosine, encoder.info.logit_scale, encoder.info.logit_bias, "sigmoid")[0]
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-ref_logits)), rtol=1e-4, atol=1e-9)
    assert abs(sig.sum() - 1.0) > 0.01  # independent, not normalized
    assert np.all((sig > 0) & (sig < 1))

    raw = scoring.zero_shot_scores(cosine, encoder.info.logit_scale, encoder.info.logit_bias, "none")[0]
    np.testing.assert_allclose(raw, ref_logits, atol=1e-4)
    with pytest.raises(ValueError):
        scoring.zero_shot_scores(cosine, scale, bias, "relu")

    ranked = scoring.rank_labels(parsed.labels, soft)
    expected = reference.zero_shot(img, labels)
    assert [r["label"] for r in ranked] == [label for label, _ in expected]
    for got, (_, score) in zip(ranked, expected):
        assert got["score"] == pytest.approx(score, abs=1e-5)


def test_softmax_ignores_bias_sigmoid_does_not():
    cosine = np.array([[0.3, 0.1, -0.2]], dtype=np.float32)
    a = scoring.zero_shot_scores(cosine, 2.0, -10.0)
    b = scoring.zero_shot_scores(cosine, 2.0, 5.0)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(scoring.zero_shot_scores(cosine, 2.0, -10.0, "sigmoid"),
                           scoring.zero_shot_scores(cosine, 2.0, 5.0, "sigmoid"))
    # numerically stable for huge logits
    huge = scoring.zero_shot_scores(np.array([[1.0, -1.0]], np.float32), 10.0, 0.0)
    assert np.isfinite(huge).all() and huge[0, 0] == pytest.approx(1.0)


def test_rank_labels_sorting_ties_and_top_k():
    labels = ["a", "b", "c", "d", "e"]
    scores = np.array([0.1, 0.4, 0.1, 0.3, 0.1])
    ranked = scoring.rank_labels(labels, scores)
    assert [r["label"] for r in ranked] == ["b", "d", "a", "c", "e"]  # ties keep the input order
    assert all(isinstance(r["score"], float) for r in ranked)
    assert [r["score"] for r in ranked] == sorted(scores.tolist(), reverse=True)
    assert [r["label"] for r in scoring.rank_labels(labels, scores, top_k=2)] == ["b", "d"]
    assert len(scoring.rank_labels(labels, scores, top_k=1)) == 1
    assert len(scoring.rank_labels(labels, scores, top_k=99)) == 5


def test_l2_normalize_and_cosine_matrix():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    n = scoring.l2_normalize(x)
    np.testing.assert_allclose(n[0], [0.6, 0.8])
    assert np.isfinite(n).all() and not n[1].any()
    m = scoring.cosine_matrix(n[:1], np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    np.testing.assert_allclose(m, [[0.6, 0.8, 1.0]], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# template
# ---------------------------------------------------------------------------------------------------------------
def test_default_template_is_applied(encoder, reference):
    parsed = parse_request("https://example.com/x.jpg", {"candidate_labels": ["cat", "Wood Floor"]})
    assert DEFAULT_TEMPLATE == "This is a photo of {}."
    assert parsed.texts == ("This is a photo of cat.", "This is a photo of Wood Floor.")
    assert parsed.labels == ("cat", "Wood Floor")
    used = encoder.encode_texts(list(parsed.texts))
    templated = reference.text_embeds(["This is a photo of cat.", "This is a photo of wood floor."])
    bare = reference.text_embeds(["cat", "wood floor"])
    for i in range(2):
        assert cosine(used[i], templated[i]) > 0.99999
        assert cosine(used[i], bare[i]) < 0.999


def test_custom_template_changes_text_embeddings(encoder, reference):
    labels = ["cat", "dog"]
    default = parse_request("https://example.com/x.jpg", {"candidate_labels": labels})
    custom = parse_request("https://example.com/x.jpg",
                           {"candidate_labels": labels, "hypothesis_template": "a drawing of a {}"})
    assert custom.texts == ("a drawing of a cat", "a drawing of a dog")
    assert custom.labels == default.labels == ("cat", "dog")
    e_default = encoder.encode_texts(list(default.texts))
    e_custom = encoder.encode_texts(list(custom.texts))
    for i in range(2):
        assert cosine(e_custom[i], e_default[i]) < 0.999
        assert cosine(e_custom[i], reference.text_embeds([f"a drawing of a {labels[i]}"])[0]) > 0.99999


# ---------------------------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------------------------
def test_bf16_close_to_fp32(encoder, encoder_bf16, spec):
    assert encoder_bf16.info.dtype == "bfloat16" and encoder.info.dtype == "float32"
    imgs = _images()
    pixels = np.stack([load_pixels(encode(im), "x", spec, BIG) for im in imgs])
    img32, img16 = encoder.encode_images(pixels), encoder_bf16.encode_images(pixels)
    txt32, txt16 = encoder.encode_texts(TEXTS), encoder_bf16.encode_texts(TEXTS)
    assert img16.dtype == np.float32 and txt16.dtype == np.float32  # returned as fp32
    np.testing.assert_allclose(np.linalg.norm(img16, axis=1), 1.0, atol=1e-5)
    for a, b in [*zip(img32, img16), *zip(txt32, txt16)]:
        assert cosine(a, b) > 0.9999

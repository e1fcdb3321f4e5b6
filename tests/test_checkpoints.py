"""The random test/benchmark checkpoints of ``siglip.model.checkpoint``, one per structural class of the SigLIP
family: each must load offline through the Auto classes as the hub checkpoint it stands for does (shared notes,
siglip-family.md), with the configuration that was asked for. Full-size presets are checked by config only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from siglip.model import checkpoint as ckpt
from siglip.model.checkpoint import build_checkpoint, config_for, preprocessor_for


def _load(path: Path):
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

    return (AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path), AutoProcessor.from_pretrained(path))


def _json(path: Path, name: str) -> dict:
    return json.loads((path / name).read_text())


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)["input_ids"]


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "siglip2")


@pytest.fixture(scope="module")
def siglip1(tmp_path_factory) -> Path:
    # The google/siglip-so400m-patch14-224 quirks: 16 text positions; a SigLIP 1 file that says bicubic; a config
    # without "architectures".
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "siglip1", family="siglip1", text_length=16,
                            resample=3, drop_architectures=True)


@pytest.fixture(scope="module")
def naflex(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "naflex", family="naflex")


@pytest.fixture(scope="module")
def narrow_text(tmp_path_factory) -> Path:
    # giant-opt in miniature: a text tower narrower than the embedding, and a patch size that does not divide the image.
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "narrow", text_hidden=48, image_size=60, patch_size=14)


# ---------------------------------------------------------------------------------------------------------------
# tiny checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_default_is_the_fixed_res_siglip2_checkpoint(siglip2):
    model, tokenizer, image_processor, processor = _load(siglip2)
    assert type(model).__name__ == "SiglipModel"
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    assert type(image_processor).__name__.startswith("SiglipImageProcessor")
    assert type(processor).__name__ == "SiglipProcessor"
    config = _json(siglip2, "config.json")
    assert config["model_type"] == "siglip" and config["architectures"] == ["SiglipModel"]
    assert config["vision_config"]["image_size"] == 64 and config["vision_config"]["patch_size"] == 16
    text = config["text_config"]
    assert (text["hidden_size"], text["max_position_embeddings"], text["vocab_size"]) == (32, 64, len(tokenizer))
    assert (text["pad_token_id"], text["eos_token_id"]) == (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert _json(siglip2, "preprocessor_config.json") == {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"height": 64, "width": 64}}
    # The Gemma tokenizer leaves case alone (the service lowercases), appends EOS and right-pads with 0.
    ids = _ids(tokenizer, "Photo")
    assert ids != _ids(tokenizer, "photo")
    assert len(ids) == 64 and ids[ids.index(1) + 1:] == [0] * (63 - ids.index(1))


def test_siglip1_loads_a_sentencepiece_tokenizer_that_agrees_with_the_config(siglip1):
    model, tokenizer, image_processor, processor = _load(siglip1)
    assert type(model).__name__ == "SiglipModel"  # from model_type: the config has no "architectures"
    assert type(tokenizer).__name__ == "SiglipTokenizer"
    assert type(image_processor).__name__.startswith("SiglipImageProcessor")
    assert type(processor).__name__ == "SiglipProcessor"
    assert (siglip1 / "spiece.model").is_file() and not (siglip1 / "tokenizer.json").exists()
    config = _json(siglip1, "config.json")
    assert "architectures" not in config and config["model_type"] == "siglip"
    text = config["text_config"]
    assert text["max_position_embeddings"] == tokenizer.model_max_length == 16
    assert text["vocab_size"] == len(tokenizer) == ckpt._SPIECE_VOCAB
    # SigLIP 1 pads with </s>: pad and eos are the same id, and the config says so too.
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert text["pad_token_id"] == text["eos_token_id"] == tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    assert _json(siglip1, "preprocessor_config.json")["resample"] == 3

    # Lowercases, drops punctuation, collapses whitespace; EOS then pad ids up to max_length.
    ids = _ids(tokenizer, "A  Photo, of the CAT!!")
    assert ids == _ids(tokenizer, "a photo of the cat")
    assert len(ids) == 16 and 2 not in ids  # every word in the training corpus: no <unk>
    n = len(tokenizer("a photo of the cat")["input_ids"])
    assert ids[n - 1:] == [1] * (17 - n)
    assert ids[:n - 1] == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a photo of the cat"))

    with torch.no_grad():
        image = model.get_image_features(**image_processor(images=[Image.new("RGB", (80, 50))], return_tensors="pt"))
        text_features = model.get_text_features(input_ids=torch.tensor([ids]))
    assert image.pooler_output.shape == text_features.pooler_output.shape == (1, 32)


def test_spiece_training_is_deterministic():
    assert ckpt._train_spiece() == ckpt._train_spiece()


def test_naflex_loads_as_siglip2_with_a_patch_budget(naflex):
    model, tokenizer, image_processor, processor = _load(naflex)
    assert type(model).__name__ == "Siglip2Model"
    assert type(tokenizer).__name__ == "Siglip2Tokenizer"
    assert type(image_processor).__name__.startswith("Siglip2ImageProcessor")
    assert type(processor).__name__ == "Siglip2Processor"
    config = _json(naflex, "config.json")
    assert config["model_type"] == "siglip2" and config["architectures"] == ["Siglip2Model"]
    assert "image_size" not in config["vision_config"]
    assert config["vision_config"]["num_patches"] == ckpt.TINY_NUM_PATCHES == 64
    assert config["vision_config"]["patch_size"] == 16
    assert _json(naflex, "preprocessor_config.json") == {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Siglip2ImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "max_num_patches": 64, "patch_size": 16, "processor_class": "Siglip2Processor", "resample": 2,
        "rescale_factor": 0.00392156862745098}
    assert _json(naflex, "tokenizer_config.json")["tokenizer_class"] == "Siglip2Tokenizer"
    assert _json(naflex, "tokenizer_config.json")["padding_side"] == "right"

    # Siglip2Tokenizer lowercases by itself, keeps punctuation, appends EOS and pads right with 0
    # (the class default is left: the file must win).
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 64
    ids = _ids(tokenizer, "A Photo of a CAT")
    assert ids == _ids(tokenizer, "a photo of a cat") and ids != _ids(tokenizer, "a photo of a cat!")
    end = ids.index(1)
    assert end > 0 and ids[end + 1:] == [0] * (63 - end) and 2 not in ids

    inputs = image_processor(images=[Image.new("RGB", (300, 100), "red")], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 64, 3 * 16 * 16)
    assert inputs["pixel_attention_mask"].shape == (1, 64)
    rows, cols = inputs["spatial_shapes"][0].tolist()
    assert (rows, cols) == (4, 12) and int(inputs["pixel_attention_mask"].sum()) == rows * cols
    smaller = image_processor(images=[Image.new("RGB", (300, 100))], max_num_patches=16, return_tensors="pt")
    assert smaller["pixel_values"].shape == (1, 16, 768)
    with torch.no_grad():
        features = model.get_image_features(**inputs).pooler_output
        text_features = model.get_text_features(input_ids=torch.tensor([ids])).pooler_output
    assert features.shape == text_features.shape == (1, 32) and torch.isfinite(features).all()


def test_naflex_patch_gain_scales_the_linear_patch_embedding(naflex, tmp_path):
    from transformers import AutoModel

    plain = build_checkpoint(tmp_path / "plain", family="naflex", patch_gain=1.0)
    gained = AutoModel.from_pretrained(naflex).vision_model.embeddings.patch_embedding
    assert isinstance(gained, torch.nn.Linear)
    weight = AutoModel.from_pretrained(plain).vision_model.embeddings.patch_embedding.weight
    torch.testing.assert_close(gained.weight, weight * 10.0)


def test_a_narrow_text_tower_projects_to_the_vision_width(narrow_text):
    model, *_ = _load(narrow_text)
    config = _json(narrow_text, "config.json")
    assert config["text_config"]["hidden_size"] == 48 and config["text_config"]["projection_size"] == 32
    assert config["vision_config"]["image_size"] == 60 and config["vision_config"]["patch_size"] == 14
    assert _json(narrow_text, "preprocessor_config.json")["size"] == {"height": 60, "width": 60}
    with torch.no_grad():
        text = model.get_text_features(input_ids=torch.tensor([[5, 6, 1]])).pooler_output
        image = model.get_image_features(pixel_values=torch.zeros(1, 3, 60, 60)).pooler_output
    assert text.shape == image.shape == (1, 32)


def test_cli_flags_reach_the_checkpoint(tmp_path):
    ckpt.main([str(tmp_path / "cli"), "--family", "naflex", "--patch-size", "8", "--max-num-patches", "16",
               "--text-length", "12"])
    config, pre = _json(tmp_path / "cli", "config.json"), _json(tmp_path / "cli", "preprocessor_config.json")
    assert config["vision_config"]["patch_size"] == pre["patch_size"] == 8 and pre["max_num_patches"] == 16
    assert config["text_config"]["max_position_embeddings"] == 12
    assert _json(tmp_path / "cli", "tokenizer_config.json")["model_max_length"] == 12


# ---------------------------------------------------------------------------------------------------------------
# full-size presets: configs only (building the weights takes seconds to minutes and gigabytes)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, image, patch", [(None, 512, 16), ("base-512", 512, 16), ("base-224", 224, 16)])
def test_base_presets(preset, image, patch):
    config = config_for("full", preset=preset)
    assert config.model_type == "siglip"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (image, patch)
    for tower in (config.text_config, config.vision_config):
        assert (tower.hidden_size, tower.intermediate_size, tower.num_hidden_layers, tower.num_attention_heads) \
            == (768, 3072, 12, 12)
    assert config.text_config.vocab_size == 256000 and config.text_config.max_position_embeddings == 64
    assert preprocessor_for(config)["size"] == {"height": image, "width": image}


def test_so400m_preset():
    config = config_for("full", preset="so400m-384")
    for tower in (config.text_config, config.vision_config):
        assert (tower.hidden_size, tower.intermediate_size, tower.num_hidden_layers, tower.num_attention_heads) \
            == (1152, 4304, 27, 16)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (384, 14)
    assert config.text_config.vocab_size == 256000 and config.text_config.max_position_embeddings == 64
    assert config.text_config.projection_size == 1152
    # The google/siglip-so400m-patch14-224 analogue: SigLIP 1 tokenizer ids, 16 text positions.
    small = config_for("full", preset="so400m-384", family="siglip1", image_size=224, text_length=16)
    assert small.vision_config.image_size == 224 and small.text_config.max_position_embeddings == 16
    assert small.text_config.pad_token_id == small.text_config.eos_token_id == 1


def test_naflex_base_preset():
    config = config_for("full", preset="naflex-base")
    assert config.model_type == "siglip2" and type(config).__name__ == "Siglip2Config"
    assert config.vision_config.num_patches == 256 and config.vision_config.patch_size == 16
    assert config.vision_config.hidden_size == config.text_config.hidden_size == 768
    assert config.text_config.vocab_size == 256000
    pre = preprocessor_for(config)
    assert pre["max_num_patches"] == 256 and pre["patch_size"] == 16 and "size" not in pre


def test_giant_opt_like_projection():
    config = config_for("full", preset="so400m-384", text_hidden=1024)
    assert config.text_config.hidden_size == 1024 and config.text_config.projection_size == 1152


@pytest.mark.parametrize("kwargs", [
    {"size": "tiny", "preset": "base-224"},
    {"size": "full", "preset": "nope"},
    {"size": "huge"},
    {"family": "clip"},
    {"family": "naflex", "image_size": 128},
    {"family": "naflex", "num_patches": 50},
    {"family": "siglip2", "num_patches": 64},
    {"size": "full", "preset": "naflex-base", "family": "siglip2"},
    {"size": "full", "preset": "base-224", "family": "naflex"},
])
def test_contradictory_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        config_for(**kwargs)


def test_max_num_patches_is_naflex_only():
    with pytest.raises(ValueError):
        preprocessor_for(config_for("full"), max_num_patches=64)

"""Build random-weight SigLIP checkpoints laid out exactly like the hub ones, one per structural class of the family.

The hub is unreachable from CI and from the benchmark hosts, so tests and benchmarks build their own checkpoint:
``tiny`` (32-dim towers, seconds to build) for tests, ``full`` (a real architecture, picked with ``preset``) for
benchmarks, whose timings do not depend on weight values.

Classes (``family``), each differing in what a loader must get right:

- ``siglip2`` (default): SigLIP 2 fixed resolution, like google/siglip2-base-patch16-512. ``config.json`` +
  ``model.safetensors`` (``model_type: siglip``, SiglipModel), ``preprocessor_config.json`` (SiglipImageProcessor,
  the hub file's keys, including ``do_convert_rgb: null``), ``tokenizer.json`` + ``tokenizer_config.json`` (a
  Gemma-style byte-fallback BPE that does not lowercase: no BOS, EOS appended, right padding with id 0).
- ``siglip1``: SigLIP 1, like google/siglip-base-patch16-224. The same SiglipModel and image processor, but a
  SentencePiece ``SiglipTokenizer`` (``spiece.model``) that lowercases, strips punctuation and pads with ``</s>``.
- ``naflex``: SigLIP 2 NaFlex, like google/siglip2-base-patch16-naflex. ``model_type: siglip2`` (Siglip2Model: a
  Linear patch embedding and a learned position grid of ``num_patches`` resized per image), Siglip2ImageProcessor
  (``patch_size`` + ``max_num_patches``, no ``size``), and the Gemma BPE declared as ``Siglip2Tokenizer``, which
  lowercases by itself.

Presets for ``size="full"`` (:data:`PRESETS`): ``base-224``, ``base-512`` (the default), ``so400m-384`` and
``naflex-base``. Keyword arguments vary what distinguishes hub checkpoints from each other (image and patch size,
text length, a text tower narrower than the embedding, resample, a missing ``architectures`` key).
:func:`config_for` gives the model config without building weights, so tests can check full-size configs cheaply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Words to train the test tokenizers on: enough merges that labels tokenize into several real tokens.
_CORPUS = ["a", "photo", "of", "a", "cat", "dog", "bird", "car", "tile", "floor", "wall", "wood", "stone", "ceramic", "porcelain", "mosaic", "glass", "vinyl", "laminate", "this", "is", "a", "photo", "of", "the", "heat", "pump", "indoor", "outdoor", "unit", "technical", "diagram", "company", "logo", "matte", "glossy", "finish", "white", "black", "red", "green", "blue", "yellow", "gray", "beige", "rustic", "oak", "natural", "rough", "texture", "colorful", "product", "catalog", "image", "picture", "drawing", "painting", "sketch", "person", "people", "man", "woman", "child", "house", "street", "city", "tree", "flower", "sky"]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]

FAMILIES = ("siglip2", "siglip1", "naflex")

TINY = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 64},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "image_size": 64, "patch_size": 16},
}
# An 8x8 position grid: as on the hub, the default patch budget equals the grid, so a square image at the budget
# uses the learned grid unresized.
TINY_NUM_PATCHES = 64

# google/siglip2-base-patch16-512: SiglipConfig defaults plus these (see shared notes).
FULL = {
    "text": {"vocab_size": 256000},
    "vision": {"image_size": 512},
}
_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}
# Real architectures for benchmarks. Unnamed fields are the SiglipConfig / Siglip2Config defaults (the base tower:
# 768 wide, MLP 3072, 12 layers, 12 heads, patch 16, 64 text positions), as in the hub configs.
PRESETS = {
    "base-224": {"family": "siglip2", "text": {"vocab_size": 256000}, "vision": {"image_size": 224}},
    "base-512": {"family": "siglip2", **FULL},
    # google/siglip2-so400m-patch14-384: both towers So400m; 384 is not a multiple of 14, so the grid is 27x27.
    "so400m-384": {"family": "siglip2", "text": {"vocab_size": 256000, **_SO400M},
                   "vision": {**_SO400M, "image_size": 384, "patch_size": 14}},
    "naflex-base": {"family": "naflex", "text": {"vocab_size": 256000}, "vision": {"num_patches": 256}},
}
DEFAULT_PRESET = "base-512"

# Token ids the config must agree with, by tokenizer layout. The Gemma vocabulary starts <pad> <eos> <bos>;
# the SentencePiece model is trained with <pad> </s> <unk> and SiglipTokenizer pads with </s>, as SigLIP 1 does.
_TOKEN_IDS = {
    "gemma": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
    "spiece": {"pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None},
}
_SPIECE_VOCAB = 96


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + byte_tokens,
                                  show_progress=False)
    sentences = [" ".join(_CORPUS[i:i + 8]) for i in range(0, len(_CORPUS), 3)]
    tok.train_from_iterator(sentences * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _train_spiece(vocab_size: int = _SPIECE_VOCAB) -> bytes:
    """A serialized SentencePiece unigram model with SigLIP 1's special-token layout (no BOS)."""
    import io

    import sentencepiece as spm

    sentences = [" ".join(_CORPUS[i:i + 8]) for i in range(0, len(_CORPUS), 3)]
    out = io.BytesIO()
    # One thread: the trainer's result may otherwise depend on scheduling, and tests compare builds.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 4), model_writer=out, model_type="unigram",
                                   vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return out.getvalue()


def _tokenizer_layout(family: str) -> str:
    return "spiece" if family == "siglip1" else "gemma"


def _tiny_vocab_size(family: str) -> int:
    if _tokenizer_layout(family) == "spiece":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_proto=_train_spiece()).get_piece_size()
    return len(_train_tokenizer(vocab_size=1000)[0])


def _resolve(size: str, family: str | None, preset: str | None) -> tuple[str, dict]:
    """The family and the base tower dimensions that ``size`` / ``preset`` / ``family`` name."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if size == "tiny":
        if preset is not None:
            raise ValueError("preset names a real architecture: use it with size='full'")
        family = family or "siglip2"
        dims = {"text": dict(TINY["text"]), "vision": dict(TINY["vision"])}
        if family == "naflex":
            del dims["vision"]["image_size"]
            dims["vision"]["num_patches"] = TINY_NUM_PATCHES
        return family, dims
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
    spec = PRESETS[preset]
    # SigLIP 1 and fixed-res SigLIP 2 share the architecture, so either can take the other's preset; NaFlex cannot.
    if family is not None and (family == "naflex") != (spec["family"] == "naflex"):
        raise ValueError(f"preset {preset!r} is a {spec['family']} architecture, not {family}")
    return family or spec["family"], {"text": dict(spec["text"]), "vision": dict(spec["vision"])}


def config_for(size: str = "tiny", *, family: str | None = None, preset: str | None = None,
               image_size: int | None = None, patch_size: int | None = None, text_length: int | None = None,
               text_hidden: int | None = None, num_patches: int | None = None, vocab_size: int | None = None):
    """The model config :func:`build_checkpoint` writes for these arguments (a SiglipConfig or Siglip2Config).

    ``vocab_size`` overrides the text vocabulary; left out, a tiny config takes its test tokenizer's (trained here,
    well under a second) and a full one the preset's.
    """
    family, dims = _resolve(size, family, preset)
    text, vision = dims["text"], dims["vision"]
    if family == "naflex":
        if image_size is not None:
            raise ValueError("NaFlex checkpoints have no image size: set num_patches / max_num_patches")
        if num_patches is not None:
            vision["num_patches"] = num_patches
        if math.isqrt(vision.get("num_patches", 256)) ** 2 != vision.get("num_patches", 256):
            raise ValueError(f"num_patches must be a square (the position grid), not {vision['num_patches']}")
    else:
        if num_patches is not None:
            raise ValueError("num_patches is the NaFlex position grid: fixed-resolution towers take image_size")
        if image_size is not None:
            vision["image_size"] = image_size
    if patch_size is not None:
        vision["patch_size"] = patch_size
    if text_length is not None:
        text["max_position_embeddings"] = text_length
    if text_hidden is not None:
        text["hidden_size"] = text_hidden
        vision_hidden = vision.get("hidden_size", 768)
        if text_hidden != vision_hidden:
            # Both embeddings must share one space: the text head projects up, as giant-opt's does (1152 -> 1536).
            text["projection_size"] = vision_hidden
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    elif size == "tiny":
        text["vocab_size"] = _tiny_vocab_size(family)
    text.update(_TOKEN_IDS[_tokenizer_layout(family)])
    if family == "naflex":
        from transformers import Siglip2Config

        return Siglip2Config(text_config=text, vision_config=vision)
    from transformers import SiglipConfig

    return SiglipConfig(text_config=text, vision_config=vision)


def preprocessor_for(config, *, resample: int | None = None, max_num_patches: int | None = None) -> dict:
    """``preprocessor_config.json`` for a model config from :func:`config_for`, with the hub files' keys.

    ``resample`` defaults to 2 (bilinear, SigLIP 2's); ``max_num_patches`` (NaFlex only) to the position grid size,
    as on the hub (256 and 256).
    """
    vision = config.vision_config
    common = {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2 if resample is None else resample,
        "rescale_factor": 0.00392156862745098,
    }
    if config.model_type == "siglip2":
        return {**common,
                "image_processor_type": "Siglip2ImageProcessor",
                "max_num_patches": vision.num_patches if max_num_patches is None else max_num_patches,
                "patch_size": vision.patch_size,
                "processor_class": "Siglip2Processor"}
    if max_num_patches is not None:
        raise ValueError("max_num_patches is a NaFlex setting; fixed-resolution processors resize to image_size")
    return {**common,
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "SiglipProcessor",
            "size": {"height": vision.image_size, "width": vision.image_size}}


def _write_json(path: Path, data: dict) -> None:
    # transformers' own layout, so a rewritten file reads like one save_pretrained wrote.
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _save_tokenizer(path: Path, family: str, text_length: int) -> None:
    if family == "siglip1":
        from transformers import SiglipTokenizer

        # save_pretrained keeps a vocab file already in place, so spiece.model is written once, here.
        (path / "spiece.model").write_bytes(_train_spiece())
        SiglipTokenizer(vocab_file=str(path / "spiece.model"), model_max_length=text_length).save_pretrained(path)
        return
    from transformers import GemmaTokenizer

    vocab, merges = _train_tokenizer(vocab_size=1000)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True,
                               padding_side="right", model_max_length=text_length)
    tokenizer.save_pretrained(path)
    if family == "naflex":
        # The NaFlex hub repos ship the plain Gemma tokenizer.json (no lowercasing in it); Siglip2Tokenizer adds the
        # lowercasing when it loads the file. Its class default is left padding: the file's "right" overrides it.
        config_file = path / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text())
        tokenizer_config["tokenizer_class"] = "Siglip2Tokenizer"
        _write_json(config_file, tokenizer_config)


def build_checkpoint(path: str | Path, size: str = "tiny", seed: int = 0, patch_gain: float = 10.0, *,
                     family: str | None = None, preset: str | None = None, image_size: int | None = None,
                     patch_size: int | None = None, text_length: int | None = None, text_hidden: int | None = None,
                     resample: int | None = None, max_num_patches: int | None = None,
                     num_patches: int | None = None, drop_architectures: bool = False) -> Path:
    """Write a random SigLIP checkpoint to ``path`` and return it.

    ``family`` is ``siglip2`` (default, or the preset's), ``siglip1`` or ``naflex``; ``preset`` (full only) one of
    :data:`PRESETS`. ``None`` elsewhere means the preset's value. ``text_length`` sets both the text positions and
    the tokenizer's ``model_max_length``; ``drop_architectures`` removes that key from config.json, as some hub
    configs lack it.

    ``patch_gain`` scales the patch-embedding weights of the tiny model: with plain random init every image looks
    alike to the model, and preprocessing mistakes (wrong resize, missing EXIF transpose) would hide in cosines
    of 0.9999. Scaled up, they show.
    """
    import torch

    family, _ = _resolve(size, family, preset)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    config = config_for(size, family=family, preset=preset, image_size=image_size, patch_size=patch_size,
                        text_length=text_length, text_hidden=text_hidden, num_patches=num_patches)
    preprocessor = preprocessor_for(config, resample=resample, max_num_patches=max_num_patches)
    _save_tokenizer(path, family, config.text_config.max_position_embeddings)

    if family == "naflex":
        from transformers import Siglip2Model as model_class
    else:
        from transformers import SiglipModel as model_class
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        # SigLIP's own initial temperature and bias (the paper's t'=log 10, b=-10); transformers' random init
        # leaves both at 0, which would make every softmax nearly uniform.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
        if size == "tiny" and patch_gain != 1.0:
            # A Conv2d for fixed resolution, a Linear over flattened patches for NaFlex: scaling works the same.
            model.vision_model.embeddings.patch_embedding.weight.mul_(patch_gain)
    model.save_pretrained(path)
    if drop_architectures:
        config_file = path / "config.json"
        saved = json.loads(config_file.read_text())
        saved.pop("architectures", None)
        _write_json(config_file, saved)

    # Sorted keys, no trailing newline: the layout this file has always had, so existing checkpoints compare equal.
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True))
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the checkpoint into")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="checkpoint class (default: siglip2, or the preset's)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help=f"real architecture for --size full (default: {DEFAULT_PRESET})")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--text-length", type=int, default=None,
                        help="text positions and tokenizer model_max_length")
    parser.add_argument("--text-hidden", type=int, default=None,
                        help="text tower width; a projection head maps it to the vision width")
    parser.add_argument("--resample", type=int, default=None, help="preprocessor resample (2 bilinear, 3 bicubic)")
    parser.add_argument("--max-num-patches", type=int, default=None, help="NaFlex patch budget")
    parser.add_argument("--num-patches", type=int, default=None, help="NaFlex position grid (a square)")
    parser.add_argument("--drop-architectures", action="store_true", help="omit 'architectures' from config.json")
    args = parser.parse_args(argv)
    out = build_checkpoint(args.path, size=args.size, seed=args.seed, family=args.family, preset=args.preset,
                           image_size=args.image_size, patch_size=args.patch_size, text_length=args.text_length,
                           text_hidden=args.text_hidden, resample=args.resample,
                           max_num_patches=args.max_num_patches, num_patches=args.num_patches,
                           drop_architectures=args.drop_architectures)
    family, _ = _resolve(args.size, args.family, args.preset)
    label = args.size if args.size == "tiny" else args.preset or DEFAULT_PRESET
    print(f"wrote {label} {family} SigLIP checkpoint to {out}")


if __name__ == "__main__":
    main()

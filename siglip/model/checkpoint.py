"""Build random-weight SigLIP checkpoints laid out exactly like google/siglip2-base-patch16-512.

The hub is unreachable from CI and from the benchmark hosts, so tests and benchmarks build their own checkpoint:
``tiny`` (64x64 images, 32-dim embeddings, seconds to build) for tests, ``full`` (the real architecture,
375.8 M parameters) for benchmarks, whose timings do not depend on weight values.

The files written are the ones the hub repository has: ``config.json`` + ``model.safetensors`` (SiglipModel),
``preprocessor_config.json`` (SiglipImageProcessor, same keys as the hub file, including ``do_convert_rgb: null``),
``tokenizer.json`` + ``tokenizer_config.json`` (a Gemma-style byte-fallback BPE: no BOS, EOS appended, right
padding with id 0), so everything loads through the Auto classes and the transformers pipeline, offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Words to train the test tokenizer on: enough merges that labels tokenize into several real tokens.
_CORPUS = ["a", "photo", "of", "a", "cat", "dog", "bird", "car", "tile", "floor", "wall", "wood", "stone", "ceramic", "porcelain", "mosaic", "glass", "vinyl", "laminate", "this", "is", "a", "photo", "of", "the", "heat", "pump", "indoor", "outdoor", "unit", "technical", "diagram", "company", "logo", "matte", "glossy", "finish", "white", "black", "red", "green", "blue", "yellow", "gray", "beige", "rustic", "oak", "natural", "rough", "texture", "colorful", "product", "catalog", "image", "picture", "drawing", "painting", "sketch", "person", "people", "man", "woman", "child", "house", "street", "city", "tree", "flower", "sky"]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]

TINY = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 64},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "image_size": 64, "patch_size": 16},
}
# google/siglip2-base-patch16-512: SiglipConfig defaults plus these (see shared notes).
FULL = {
    "text": {"vocab_size": 256000},
    "vision": {"image_size": 512},
}


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


def build_checkpoint(path: str | Path, size: str = "tiny", seed: int = 0, patch_gain: float = 10.0) -> Path:
    """Write a random SigLIP checkpoint to ``path`` and return it.

    ``patch_gain`` scales the patch-embedding weights of the tiny model: with plain random init every image looks
    alike to the model, and preprocessing mistakes (wrong resize, missing EXIF transpose) would hide in cosines
    of 0.9999. Scaled up, they show.
    """
    import torch
    from transformers import GemmaTokenizer, SiglipConfig, SiglipModel

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dims = TINY if size == "tiny" else FULL

    vocab, merges = _train_tokenizer(vocab_size=1000)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True,
                               padding_side="right", model_max_length=64)
    tokenizer.save_pretrained(path)

    text = dict(dims["text"])
    text.setdefault("vocab_size", len(vocab))
    # Token ids of the tokenizer above (pad 0, eos 1, bos 2), so the config agrees with it.
    text.update(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = SiglipConfig(text_config=text, vision_config=dict(dims["vision"]))
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        # SigLIP's own initial temperature and bias (the paper's t'=log 10, b=-10); transformers' random init
        # leaves both at 0, which would make every softmax nearly uniform.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
        if size == "tiny" and patch_gain != 1.0:
            model.vision_model.embeddings.patch_embedding.weight.mul_(patch_gain)
    model.save_pretrained(path)

    image_size = config.vision_config.image_size
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    }, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the checkpoint into")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_checkpoint(args.path, size=args.size, seed=args.seed)
    print(f"wrote {args.size} SigLIP checkpoint to {out}")


if __name__ == "__main__":
    main()

"""What a checkpoint is, read once from its own files: the facts every other part of the service works from.

Every SigLIP and SigLIP 2 checkpoint is described by its config, its image processor and its tokenizer, never by
constants: image size, patch size, resample, mean/std, embedding width and text length all come from there
(``../shared/notes/siglip-family.md``). Two structural kinds exist:

- fixed resolution (``model_type: siglip``: SigLIP 1 and the fixed-resolution SigLIP 2 checkpoints): every image is
  squashed to one square size;
- NaFlex (``model_type: siglip2``): each image keeps its aspect ratio within a patch budget and arrives as rows of
  patches with a mask and its grid shape.

Loading dispatches on ``model_type`` (AutoModel does; some hub configs lack ``architectures``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL_TYPES = ("siglip", "siglip2")
# Tokenizers of the SigLIP 2 family (Gemma's vocabulary); SiglipTokenizer (SentencePiece) is SigLIP 1's.
SIGLIP2_TOKENIZERS = ("GemmaTokenizer", "Siglip2Tokenizer")


@dataclass(frozen=True)
class CheckpointSpec:
    model_type: str  # "siglip" (fixed resolution) | "siglip2" (NaFlex)
    family: str  # "SigLIP" | "SigLIP 2"
    tokenizer: str  # the tokenizer's class name, e.g. GemmaTokenizerFast, SiglipTokenizer
    patch_size: int
    embed_dim: int  # both towers' output width (the text head projects to it where the text tower is narrower)
    text_length: int  # tokens every text is padded/truncated to: the text tower's max_position_embeddings
    resample: int  # PIL resample filter of the processor
    rescale: float  # 1/255 normally; 1.0 when the processor does not rescale
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int] | None = None  # (height, width): fixed resolution only
    max_num_patches: int | None = None  # NaFlex only: the checkpoint's default patch budget

    @property
    def naflex(self) -> bool:
        return self.model_type == "siglip2"

    def describe(self, max_num_patches: int | None = None) -> str:
        """One line for logs; ``max_num_patches``: the budget in force when it is not the checkpoint's."""
        if self.naflex:
            shape = f"NaFlex, up to {max_num_patches or self.max_num_patches} patches of {self.patch_size} px"
        else:
            h, w = self.image_size or (0, 0)
            shape = f"{h}x{w} images, patch {self.patch_size}"
        return f"{self.family} ({shape}), {self.embed_dim}-dim embeddings, {self.text_length}-token text"


def read_spec(config: Any, processor: Any, tokenizer: Any) -> CheckpointSpec:
    """The spec of a checkpoint from its loaded config, image processor and tokenizer (transformers objects;
    any objects with the same attributes do)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a SigLIP dual encoder (expected one of "
                         f"{', '.join(MODEL_TYPES)})")
    vision, text = config.vision_config, config.text_config
    embed_dim = int(vision.hidden_size)
    text_width = int(getattr(text, "projection_size", None) or text.hidden_size)
    if text_width != embed_dim:
        raise ValueError(f"the text tower projects to {text_width} dims but the vision tower gives {embed_dim}: "
                         "its embeddings cannot be compared")
    tokenizer_class = type(tokenizer).__name__
    naflex = model_type == "siglip2"
    family = "SigLIP 2" if naflex or tokenizer_class.startswith(SIGLIP2_TOKENIZERS) else "SigLIP"
    patch = int(getattr(processor, "patch_size", None) or vision.patch_size) if naflex else int(vision.patch_size)
    if naflex and int(vision.patch_size) != patch:
        raise ValueError(f"the image processor cuts {patch}-px patches but the vision tower takes "
                         f"{vision.patch_size}-px ones")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(processor, "do_normalize", True):
        mean = _three(processor.image_mean, "image_mean")
        std = _three(processor.image_std, "image_std")
    return CheckpointSpec(
        model_type=model_type, family=family, tokenizer=tokenizer_class, patch_size=patch, embed_dim=embed_dim,
        text_length=int(text.max_position_embeddings),
        resample=2 if getattr(processor, "resample", None) is None else int(processor.resample),
        rescale=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0,
        mean=mean, std=std,
        image_size=None if naflex else fixed_size(processor, vision),
        max_num_patches=int(getattr(processor, "max_num_patches", None) or 256) if naflex else None,
    )


def fixed_size(processor: Any, vision: Any) -> tuple[int, int]:
    """(height, width) the processor resizes to, checked against the vision tower's position grid."""
    size = processor.size
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    height, width = get("height"), get("width")
    if not (height and width):
        raise ValueError(f"image processor size {size!r} is neither a fixed height/width nor a NaFlex patch budget")
    if int(height) != int(vision.image_size) or int(width) != int(vision.image_size):
        # The tower's learned positions cover image_size / patch per side; another size fails deep in the model.
        raise ValueError(f"the image processor resizes to {height}x{width} but the vision tower was built for "
                         f"{vision.image_size}x{vision.image_size} images")
    return int(height), int(width)


def _three(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = [values] * 3
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"image processor {name} must have 3 values, not {values}")
    return values[0], values[1], values[2]

"""The typed request parameters (validated in ``siglip.api.requests``) and the names of the modes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MODES = ("zero_shot", "image_embedding", "text_embedding", "similarity")

DEFAULT_TEMPLATE = "This is a photo of {}."


class Parameters(BaseModel):
    """``parameters`` of a request. Unknown keys are ignored, as the HF endpoint contract does."""

    model_config = ConfigDict(extra="ignore", strict=True)

    mode: str | None = Field(None, description="zero_shot | image_embedding | text_embedding | similarity; "
                                               "auto-detected when absent")
    candidate_labels: list[str] | None = Field(None, description="zero_shot: labels to classify against")
    hypothesis_template: str = Field(DEFAULT_TEMPLATE, description="zero_shot: each label is put into this "
                                                                   "template ({} is replaced by the label)")
    function_to_apply: Literal["softmax", "sigmoid", "none"] = Field(
        "softmax", description="zero_shot: softmax over the labels (sum to 1, the default), sigmoid (SigLIP's "
                              "native independent probabilities) or none (raw logits)")
    top_k: int | None = Field(None, ge=1, description="zero_shot: return only the k best labels")
    max_num_patches: int | None = Field(None, ge=1, description="NaFlex checkpoints: patches per image for this "
                                                                 "request (default SIGLIP_MAX_NUM_PATCHES, at most "
                                                                 "SIGLIP_MAX_NUM_PATCHES_LIMIT; GET /info has both)")

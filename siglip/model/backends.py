"""Which ``Towers`` run a loaded checkpoint: torch, OpenVINO on CPUs, CUDA graphs around torch's vision tower.

Each backend builds and checks itself against torch and answers None (or the torch towers) when it cannot serve
this checkpoint; the reason is logged. What serves is what ``Towers.backend`` / ``Towers.path`` say.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siglip.model.spec import CheckpointSpec
from siglip.model.towers import TorchTowers, Towers

logger = logging.getLogger("siglip.backends")


@dataclass(frozen=True)
class BackendChoice:
    """The backend settings, resolved for this host (``SIGLIP_BACKEND``, ``SIGLIP_COMPILE``, ...)."""

    backend: str  # "torch" | "openvino" (resolve_backend's answer)
    backend_setting: str  # SIGLIP_BACKEND as given: auto | torch | openvino
    device: Any  # torch.device
    dtype: Any  # torch dtype for torch towers
    dtype_setting: str  # SIGLIP_DTYPE as given: OpenVINO maps it to its own precision hint
    compile: bool
    cuda_graphs_max_batch: int  # 0: no CUDA graphs
    openvino_cache_dir: str  # empty: openvino_backend.default_cache_dir()
    openvino_threads: int  # 0: OpenVINO's default


def build_towers(spec: CheckpointSpec, model: Any, model_id: str, choice: BackendChoice,
                 text_ids: Callable[[Sequence[str]], np.ndarray]) -> Towers:
    """The towers that serve ``model`` (fp32 when ``choice.backend`` is openvino: it converts from fp32)."""
    import torch

    if choice.backend == "openvino":
        from siglip.model import openvino_backend

        if spec.naflex:
            # A warning only when the operator asked for OpenVINO; "auto" choosing torch here is the expected case.
            logger.log(logging.WARNING if choice.backend_setting == "openvino" else logging.INFO,
                       "OpenVINO converts fixed-resolution checkpoints only; this NaFlex checkpoint runs on torch")
        else:
            reference = TorchTowers(model, torch.float32)
            cache_dir = (Path(choice.openvino_cache_dir) if choice.openvino_cache_dir
                         else openvino_backend.default_cache_dir())
            towers = openvino_backend.OpenVinoTowers.build(
                reference, model_id, cache_dir, spec.image_size, spec.text_length, spec.embed_dim,
                choice.dtype_setting, choice.openvino_threads, text_ids)
            if towers is not None:
                return towers
    towers: Towers = TorchTowers(model, choice.dtype, compile=choice.compile)
    if choice.cuda_graphs_max_batch:
        if choice.device.type != "cuda":
            logger.warning("SIGLIP_CUDA_GRAPHS=1 needs a CUDA device; the vision tower runs eager on %s", choice.device)
        elif spec.naflex:
            # A graph replays fixed shapes; NaFlex batches vary in patch count as well as in size.
            logger.warning("SIGLIP_CUDA_GRAPHS=1 is off for NaFlex checkpoints: the vision tower runs %s", towers.path)
        else:
            from siglip.model.graphs import CudaGraphTowers

            towers = CudaGraphTowers.build(torch, towers, spec.image_size, choice.cuda_graphs_max_batch,
                                           choice.device)
    return towers

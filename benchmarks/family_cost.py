"""What each SigLIP family member costs per image and per text at model level, on this machine.

Builds a random-weight checkpoint of each real architecture (``siglip.model.checkpoint`` presets; timings do not
depend on weight values), loads it with the service's own encoder, and times one image (the gateway's
preprocessing untimed, as the service splits it) and one text, after one warm-up, median of ``--calls``.
NaFlex is timed at several patch budgets. Used for the family table in docs/family.md and in
``benchmarks/gpu_run.sh``.

    python benchmarks/family_cost.py --root /tmp/family-ckpts [--dtype float32] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import log, meta, write_json

# (preset, NaFlex patch budgets timed; None for fixed resolution)
MEMBERS = [("base-224", None), ("base-512", None), ("so400m-384", None), ("naflex-base", (256, 1024))]


def timed(fn, calls: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def time_member(enc, preset: str, budgets, jpeg: bytes, calls: int) -> list[dict]:
    from siglip.api.images import ImageSpec, load_pixels

    info, rows = enc.info, []
    text_ms = timed(lambda: enc.encode_texts(["a photo of a cat"]), calls)
    for budget in budgets or (None,):
        spec = ImageSpec(info.image_height, info.image_width, info.resample, patch_size=info.patch_size,
                         max_num_patches=budget)
        prepared = load_pixels(jpeg, "image", spec, 10**9)
        if budget:
            def run(p=prepared):
                return enc.encode_patches([(p.patches, p.rows, p.cols)])
            tokens, shape = prepared.rows * prepared.cols, f"NaFlex {budget} ({prepared.rows}x{prepared.cols})"
        else:
            def run(p=prepared):
                return enc.encode_images(p[None])
            grid = info.image_height // info.patch_size
            tokens, shape = grid * grid, f"{info.image_height} px / {info.patch_size}"
        image_ms = timed(run, calls)
        rows.append({"member": preset, "shape": shape, "image_tokens": tokens, "embed_dim": info.embed_dim,
                     "dtype": info.dtype, "backend": info.backend, "image_ms": round(image_ms, 1),
                     "text_ms": round(text_ms, 1)})
        print(f"{preset:12} {shape:24} {tokens:5} tokens  {info.embed_dim:5}-dim  {info.dtype:8}  "
              f"image {image_ms:8,.0f} ms  text {text_ms:6,.0f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder for the checkpoints (built once, reused)")
    parser.add_argument("--members", default=",".join(p for p, _ in MEMBERS), help="presets to time")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="SIGLIP_DTYPE (auto: bf16 on CPUs with bf16, and GPUs)")
    parser.add_argument("--backend", default="torch", help="SIGLIP_BACKEND (default torch: OpenVINO converts "
                                                           "fixed-resolution members only)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from siglip.model.checkpoint import build_checkpoint
    from siglip.model.encoder import SiglipEncoder
    from siglip.settings import Settings

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    import io

    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    rows = []
    for preset, budgets in MEMBERS:
        if preset not in args.members.split(","):
            continue
        path = Path(args.root) / preset
        if not (path / "config.json").exists():
            log(f"building {preset} into {path} ...")
            build_checkpoint(path, size="full", preset=preset)
        enc = SiglipEncoder(Settings(model=str(path), device=args.device, dtype=args.dtype, backend=args.backend,
                                     max_num_patches_limit=max(budgets or (1024,))), warmup_batch_sizes=())
        enc.load()
        if enc.info is None:
            raise SystemExit(f"{preset} did not load: {enc.error}")
        rows += time_member(enc, preset, budgets, jpeg, args.calls)
        del enc
        gc.collect()
    write_json(args.json, {"meta": meta("family_cost", device=args.device, dtype=args.dtype), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One image through the service's encoder against the naive handler's whole request, in one process.

Separates the forward from the serving path: if these two agree but the service's one-image latency over HTTP is
higher, the difference is spent between the gateway and the model worker, not in the model. Calls alternate, after
one warm-up each, so both see the same host.

    python benchmarks/model_vs_naive.py --model /tmp/ckpt-full --calls 5 [--json out.json]

The encoder runs fp32, as the naive handler does (the service's SIGLIP_DTYPE=auto takes bf16 on CPUs with bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import naive_handler
from common import log, meta, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--calls", type=int, default=5, help="timed calls of each (default: 5)")
    parser.add_argument("--backend", default="torch", help="the encoder's SIGLIP_BACKEND (default: torch)")
    parser.add_argument("--json", metavar="PATH", help="write the timings as JSON")
    args = parser.parse_args(argv)

    import torch

    from siglip.api.images import ImageSpec, decode_image_string, load_pixels
    from siglip.model.encoder import SiglipEncoder
    from siglip.settings import Settings

    log(f"torch threads {torch.get_num_threads()}; loading {args.model} twice (encoder, naive handler) ...")
    encoder = SiglipEncoder(Settings(model=args.model, device="cpu", dtype="float32", backend=args.backend),
                            warmup_batch_sizes=())
    encoder.load()
    if encoder.info is None:
        raise SystemExit(f"the encoder did not load: {encoder.error}")
    handler = naive_handler.EndpointHandler(args.model, "cpu")
    pool = naive_handler.jpeg_b64_pool(1)
    body = naive_handler.request_json("image_embedding", pool, 0)
    # The gateway's work (decode + the checkpoint's resize to uint8), untimed, as the service splits it.
    info = encoder.info
    jpeg = decode_image_string(pool[0], "image", 1 << 30)
    pixels = load_pixels(jpeg, "image", ImageSpec(info.image_height, info.image_width, info.resample), 10**9)[None]
    encoder.encode_images(pixels)
    handler(body)
    ours, naive = [], []
    for _ in range(args.calls):
        t = time.perf_counter()
        encoder.encode_images(pixels)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        handler(body)
        naive.append(time.perf_counter() - t)
    results = {}
    for key, name, times in (("encoder", "encoder.encode_images, 1 image", ours),
                             ("naive", "naive handler, whole request", naive)):
        results[key] = {"median_ms": round(statistics.median(times) * 1000, 1),
                        "calls_ms": [round(x * 1000, 1) for x in times]}
        print(f"{name}: median {statistics.median(times) * 1000:,.0f} ms "
              f"({', '.join(f'{x * 1000:,.0f}' for x in times)})")
    write_json(args.json, {"meta": meta("model_vs_naive", model=args.model, backend=encoder.info.backend,
                                        dtype=encoder.info.dtype, torch_threads=torch.get_num_threads()),
                           **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

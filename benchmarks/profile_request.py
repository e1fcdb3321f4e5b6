"""Where the milliseconds of one request go: every stage of the request path timed in-process.

Stages (one 800x600 JPEG, base64, as in latency.py): JSON parse of the body, base64 decode, JPEG header check
(the forwarded-JPEG path), PIL decode + resize (the gateway path), the model service's work for one image
(nvJPEG decode + resize on the device, or uint8 pixels -> device), the bf16 vision tower alone at batch 1 and 32
(and replayed from CUDA graphs with --cuda-graphs),
the text tower for 10 labels, and JSON encoding of the answer. Each row is the median of --repeat runs, with the
device synchronized. It also runs the encoder call from a worker thread (as BentoML does) to expose threading
costs. Compare the sum with latency.py's end-to-end p50 to get the serving overhead (HTTP, IPC, batching).

    python benchmarks/profile_request.py --model /tmp/ckpt [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from common import log, make_jpeg, meta, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    for _ in range(3):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", default="torch", choices=["torch", "openvino", "auto"],
                        help="as SIGLIP_BACKEND (openvino: both towers converted, cached in --openvino-cache-dir)")
    parser.add_argument("--openvino-cache-dir", default="", help="as SIGLIP_OPENVINO_CACHE_DIR")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="load as SIGLIP_CUDA_GRAPHS=1 does and also time the graph replays")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    from siglip.api.images import ImageSpec, JpegPayload, decode_image_string, load_pixels, prepare_image
    from siglip.model.encoder import SiglipEncoder
    from siglip.settings import Settings

    log(f"loading {args.model} ...")
    enc = SiglipEncoder(Settings(model=args.model, device=args.device, dtype=args.dtype, device_decode="auto",
                                 cuda_graphs=args.cuda_graphs, backend=args.backend,
                                 openvino_cache_dir=args.openvino_cache_dir))
    enc.load()
    if enc.info is None:
        log(f"load failed: {enc.error}")
        return 1
    info = enc.info
    cuda = info.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spec = ImageSpec(info.image_height, info.image_width, info.resample)
    jpeg = make_jpeg(1)
    b64 = base64.b64encode(jpeg).decode()
    body = orjson.dumps({"inputs": b64, "parameters": {"mode": "image_embedding"}})
    pixels = load_pixels(jpeg, "x", spec, 10**9)
    labels = [f"this is a photo of label number {i}." for i in range(10)]
    x1 = torch.zeros((1, 3, info.image_height, info.image_width), dtype=enc.towers.input_dtype, device=enc._device)
    x32 = x1.expand(32, -1, -1, -1).contiguous()
    emb = enc.encode_images(pixels[None])

    rows: list[tuple[str, str, float]] = []

    def add(where: str, stage: str, fn: Callable[[], object], repeat: int = args.repeat) -> None:
        ms = timed(fn, repeat, sync)
        rows.append((where, stage, ms))
        log(f"{stage}: {ms:.2f} ms")

    add("gateway", "JSON parse of a 1-image body (orjson)", lambda: orjson.loads(body))
    add("gateway", "base64 decode", lambda: decode_image_string(b64, "x", 1 << 30))
    add("gateway", "JPEG header check (forwarded path)", lambda: prepare_image(jpeg, "x", spec, 10**9, True))
    add("gateway", "PIL decode + resize to model size (gateway path)", lambda: load_pixels(jpeg, "x", spec, 10**9))
    add("gateway", "JSON encode of 1 embedding (orjson)",
        lambda: orjson.dumps([{"embedding": emb[0]}], option=orjson.OPT_SERIALIZE_NUMPY))
    with torch.inference_mode():
        if info.backend == "openvino":
            add("model", "vision tower + normalize (OpenVINO), batch 1", lambda: enc.towers.vision(pixel_values=x1))
            add("model", "vision tower + normalize (OpenVINO), batch 32 (per call)", lambda: enc.towers.vision(pixel_values=x32), 10)
        else:
            add("model", "vision tower alone, batch 1", lambda: enc.towers.model.get_image_features(pixel_values=x1))
            add("model", "vision tower alone, batch 32 (per call)", lambda: enc.towers.model.get_image_features(pixel_values=x32), 10)
        if info.cuda_graphs:
            add("model", "vision tower + normalize from CUDA graphs, batch 1", lambda: enc.towers.vision(pixel_values=x1))
            add("model", "vision tower + normalize from CUDA graphs, batch 32 (per call)", lambda: enc.towers.vision(pixel_values=x32), 10)
    add("model", "encode_images: 1 image as uint8 pixels (all model-side work)",
        lambda: enc.encode_images(pixels[None]))
    if info.jpeg_decode:
        payload = prepare_image(jpeg, "x", spec, 10**9, True)
        assert isinstance(payload, JpegPayload)
        add("model", f"encode_jpegs: 1 JPEG ({info.jpeg_decode} decode + resize + vision)",
            lambda: enc.encode_jpegs([(payload.data, payload.orientation)]))
        add("model", f"{info.jpeg_decode} decode alone, 1 JPEG", lambda: enc._decode_jpegs([payload.data]))
        add("model", f"{info.jpeg_decode} decode alone, 32 JPEGs (per call)",
            lambda: enc._decode_jpegs([payload.data] * 32), 10)
        add("model", "encode_jpegs: 32 JPEGs (per call)",
            lambda: enc.encode_jpegs([(payload.data, payload.orientation)] * 32), 10)
    add("model", "encode_texts: 10 labels", lambda: enc.encode_texts(labels))
    with ThreadPoolExecutor(1) as pool:
        add("model", "encode_images: 1 image, called from a worker thread",
            lambda: pool.submit(enc.encode_images, pixels[None]).result())

    print_table(f"where the time of one request goes ({info.device}, {info.dtype}, {info.backend}, "
                f"median of {args.repeat})",
                ["side", "stage", "ms"], [(w, s, f"{ms:.2f}") for w, s, ms in rows])
    write_json(args.json, {"meta": meta("profile_request", model=args.model, device=info.device, dtype=info.dtype,
                                        backend=info.backend, jpeg_decode=info.jpeg_decode, cuda_graphs=info.cuda_graphs),
                           "stages": [{"side": w, "stage": s, "ms": ms} for w, s, ms in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

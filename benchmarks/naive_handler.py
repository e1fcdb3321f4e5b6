"""The baseline: a plain Hugging Face Inference Endpoints-style handler for SigLIP 2, timed in-process.

``EndpointHandler`` is what a straightforward custom handler does: fp32, ``AutoProcessor`` + ``AutoModel``, the
processor run on every request, one request at a time (no batching across requests), no text-embedding cache
(zero-shot re-runs the text tower on every call), base64 -> PIL decode on every call. It is the "before" figure
the service's numbers are compared with (``latency.py --baseline-json``).

The CLI times it on the same inputs latency.py sends (800x600 JPEGs, quality 90, base64):
  single     1 image -> embedding
  batch10    10 images -> 10 embeddings (one processor + one forward call)
  zero_shot  1 image x 10 labels -> softmax scores

    python benchmarks/naive_handler.py --model /tmp/siglip-full --device cuda --json /tmp/bench-out/naive.json
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from typing import Any

from common import (
    CASES,
    LABELS,
    MODES,
    arg_parser,
    jpeg_b64_pool,
    latency_stats,
    log,
    meta,
    pick_names,
    print_table,
    request_json,
    write_json,
)


class EndpointHandler:
    """HF Inference Endpoints custom-handler shape: ``__init__(path)`` and ``__call__({"inputs", "parameters"})``."""

    def __init__(self, path: str = "", device: str = "auto"):
        import torch
        from transformers import AutoModel, AutoProcessor

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()

    def __call__(self, data: dict[str, Any]) -> Any:
        inputs = data["inputs"]
        parameters = data.get("parameters") or {}
        images = [self._decode(x) for x in (inputs if isinstance(inputs, list) else [inputs])]
        labels = parameters.get("candidate_labels")
        if labels:
            return self._zero_shot(images, labels, parameters.get("hypothesis_template", "This is a photo of {}."))
        return self._embed(images)

    def _decode(self, value: str):
        from PIL import Image

        if value.startswith("data:"):
            value = value.partition(",")[2]
        return Image.open(io.BytesIO(base64.b64decode(value))).convert("RGB")

    def _embed(self, images: list) -> list[dict[str, list[float]]]:
        torch = self.torch
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            feats = self.model.get_image_features(pixel_values=pixel_values).pooler_output
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return [{"embedding": row} for row in feats.cpu().tolist()]

    def _zero_shot(self, images: list, labels: list[str], template: str) -> Any:
        torch = self.torch
        texts = [template.format(label).lower() for label in labels]
        enc = self.processor(text=texts, images=images, padding="max_length", max_length=64, truncation=True,
                             return_tensors="pt")
        with torch.no_grad():
            out = self.model(input_ids=enc["input_ids"].to(self.device),
                             pixel_values=enc["pixel_values"].to(self.device))
            probs = out.logits_per_image.softmax(dim=-1).cpu().tolist()
        ranked = [sorted(({"label": label, "score": s} for label, s in zip(labels, row)), key=lambda d: -d["score"])
                  for row in probs]
        return ranked if len(images) > 1 else ranked[0]


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__, url=False)
    parser.add_argument("--model", default=os.environ.get("SIGLIP_MODEL"),
                        help="checkpoint directory (default: $SIGLIP_MODEL)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per case (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per case first (default: 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop a case early once it has run this long (default: 120)")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or $SIGLIP_MODEL) is required")
    cases = pick_names(parser, args.cases, CASES)

    import torch

    log(f"building {args.distinct_images} synthetic 800x600 JPEGs ...")
    pool = jpeg_b64_pool(args.distinct_images)
    log(f"loading {args.model} (fp32) on {args.device} ...")
    t0 = time.perf_counter()
    handler = EndpointHandler(args.model, args.device)
    load_s = time.perf_counter() - t0
    device_name = torch.cuda.get_device_name(handler.device) if handler.device.type == "cuda" else "cpu"
    log(f"loaded in {load_s:.1f} s on {device_name}")

    results: dict[str, Any] = {}
    for case in cases:
        for i in range(args.warmup):
            handler(request_json(CASES[case], pool, i))
        times: list[float] = []
        started = time.perf_counter()
        for i in range(args.requests):
            body = request_json(CASES[case], pool, i)
            t = time.perf_counter()
            out = handler(body)  # returns Python lists: the device work is complete
            times.append(time.perf_counter() - t)
            if i == 0:
                expect = 10 if case == "batch10" else len(LABELS) if case == "zero_shot" else 1
                if len(out) != expect:
                    raise SystemExit(f"{case}: handler returned {len(out)} items, expected {expect}")
            if time.perf_counter() - started > args.max_seconds:
                log(f"{case}: stopping after {len(times)} requests (--max-seconds {args.max_seconds:g})")
                break
        stats = latency_stats(times)
        n_img = MODES[CASES[case]][1]
        stats["images_per_request"] = n_img
        stats["images_per_s"] = round(n_img * len(times) / sum(times), 2)
        results[case] = stats
        log(f"{case}: p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms over {stats['n']} requests")

    print_table(f"naive HF handler (fp32, processor per request, no batching) on {device_name}",
                ["case", "n", "p50 ms", "p99 ms", "mean ms", "images/s"],
                [[c, r["n"], r["p50_ms"], r["p99_ms"], r["mean_ms"], r["images_per_s"]] for c, r in results.items()])
    write_json(args.json, {"meta": meta("naive_handler", model=args.model, device=str(handler.device),
                                        device_name=device_name, torch=torch.__version__, load_s=round(load_s, 2)),
                           "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a random-weight SigLIP checkpoint for benchmarks (thin CLI over ``siglip.model.checkpoint.build_checkpoint``).

``--size full`` has the exact google/siglip2-base-patch16-512 architecture (375.8 M parameters, 512x512 images,
768-dim embeddings; about 1.5 GB fp32); latency does not depend on weight values. ``--size tiny`` (64x64 images,
32-dim embeddings) is for smoke runs.

    python benchmarks/make_checkpoint.py /tmp/siglip-full --size full
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import ROOT, log, meta, print_table, write_json

FULL_PARAMS = 375_823_874  # google/siglip2-base-patch16-512


def count_parameters(path: Path) -> dict[str, int]:
    """Parameter counts read from model.safetensors headers (no need to load the weights)."""
    counts = {"total": 0, "vision": 0, "text": 0, "other": 0}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            part = "vision" if name.startswith("vision_model.") else "text" if name.startswith("text_model.") \
                else "other"
            counts[part] += n
            counts["total"] += n
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("path", help="directory to write the checkpoint into (created if missing)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="default: full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from siglip.model.checkpoint import build_checkpoint

    log(f"building a random {args.size} SigLIP checkpoint in {args.path} ...")
    t0 = time.perf_counter()
    out = build_checkpoint(args.path, size=args.size, seed=args.seed)
    seconds = time.perf_counter() - t0
    counts = count_parameters(out)
    config = json.loads((out / "config.json").read_text())
    size_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    result = {
        "meta": meta("make_checkpoint"), "path": str(out), "size": args.size, "seconds": round(seconds, 1),
        "params": counts["total"], "params_M": round(counts["total"] / 1e6, 1),
        "vision_params_M": round(counts["vision"] / 1e6, 1), "text_params_M": round(counts["text"] / 1e6, 1),
        "image_size": config["vision_config"].get("image_size"), "bytes": size_bytes,
    }
    print_table(f"checkpoint {out}", ["size", "params (M)", "vision (M)", "text (M)", "image", "MB", "build s"],
                [[args.size, result["params_M"], result["vision_params_M"], result["text_params_M"],
                  result["image_size"], round(size_bytes / 1e6, 1), result["seconds"]]])
    write_json(args.json, result)
    if args.size == "full" and counts["total"] != FULL_PARAMS:
        log(f"WARNING: {counts['total']:,} parameters, expected {FULL_PARAMS:,} for google/siglip2-base-patch16-512")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Packaging for `bentoml build`: the image variant a bento is built for, and weights baked into the bento.

- ``image(settings)``: the ``bentoml.images.Image`` of both services. ``SIGLIP_IMAGE=gpu`` (default)
  installs ``requirements/gpu.txt`` (PyPI's torch with the CUDA 13 runtime, torchvision for nvJPEG),
  ``SIGLIP_IMAGE=cpu`` installs ``requirements/cpu.txt`` (torch+cpu and OpenVINO, no CUDA wheels);
  ``SIGLIP_BASE_IMAGE`` replaces the default ``python:3.11-slim``. Both files are fully pinned, so the build
  does not lock them (locking resolves against PyPI: the build then needs no network).
- ``python -m siglip.bento bake DIR [--tag NAME:VERSION]``: copies a ``save_pretrained`` folder into BentoML's
  model store; list the tag under ``models:`` in a bentofile and the bento (``bentoml export``, and the image
  ``bentoml containerize`` builds) carries the weights, at ``<bento>/models/NAME/VERSION``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bentoml

    from siglip.settings import Settings

PYTHON_VERSION = "3.11"
REQUIREMENTS_DIR = Path(__file__).resolve().parents[1] / "requirements"
DEFAULT_MODEL_TAG = "siglip2-base-patch16-512:baked"


def requirements_file(variant: str) -> Path:
    """The locked requirements of an image variant (``gpu`` or ``cpu``)."""
    path = REQUIREMENTS_DIR / f"{variant}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"SIGLIP_IMAGE={variant}: {path} does not exist")
    return path


def image(settings: Settings) -> bentoml.images.Image:
    import bentoml

    # Locking (the default) resolves against PyPI at build time: the requirements are locked already.
    base = bentoml.images.Image(python_version=PYTHON_VERSION, base_image=settings.base_image,
                                lock_python_packages=False)
    path = requirements_file(settings.image)
    # BentoML takes only paths relative to, and inside, the working directory; the service is also imported
    # from elsewhere (`bentoml serve` of a bento runs in its src/).
    with contextlib.chdir(REQUIREMENTS_DIR.parent):
        return base.requirements_file(str(path.relative_to(REQUIREMENTS_DIR.parent)))


def bake(source: Path, tag: str) -> str:
    """Copy the checkpoint folder ``source`` into the model store as ``tag``; returns the stored tag."""
    import bentoml

    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a save_pretrained folder: it has no config.json")
    with bentoml.models.create(tag, labels={"source": source.name}) as model:
        shutil.copytree(source, model.path, dirs_exist_ok=True)
    return str(model.tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m siglip.bento", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bake_cmd = sub.add_parser("bake", help="copy a save_pretrained folder into BentoML's model store")
    bake_cmd.add_argument("source", type=Path, help="folder written by save_pretrained (model and processor)")
    bake_cmd.add_argument("--tag", default=DEFAULT_MODEL_TAG,
                          help=f"NAME:VERSION (default {DEFAULT_MODEL_TAG})")
    args = parser.parse_args(argv)
    try:
        tag = bake(args.source, args.tag)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name, version = tag.split(":")
    print(f"stored {tag}; list it under `models:` in a bentofile, build, and serve with SIGLIP_MODEL="
          f"<bento>/models/{name}/{version} (in the container: /home/bentoml/bento/models/{name}/{version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

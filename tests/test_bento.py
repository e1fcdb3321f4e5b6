"""The bento: built with no network at all, holding only the service's files and fully pinned requirements
for each image variant, and complete: exported, installed into a fresh venv from its own requirements, and
served from the extracted copy inside a network namespace with nothing else around (empty BENTOML_HOME,
another working directory, HF_HUB_OFFLINE=1), through SIGTERM with requests in flight.

Needs `unshare -n` (root, or user namespaces); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import b64, child_env, cosine, encode, loopback_namespace, make_image
from packaging.requirements import Requirement
from packaging.version import Version

from siglip.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("bento_probe.py")
TORCH_CPU_PAGE = "--find-links https://download.pytorch.org/whl/cpu/torch/"
BAKED_TAG = "tiny-siglip:test"
PIN = re.compile(r"^[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+$")
COS_MIN = 0.9999


def _unshare_works() -> bool:
    try:
        proc = subprocess.run(["unshare", "-n", "true"], check=False, capture_output=True, timeout=10)
        return proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -n` (root or user namespaces)")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without SIGLIP_* (the build reads them), plus ``extra``."""
    env = {k: v for k, v in child_env().items() if not k.startswith("SIGLIP_")}
    return {**env, "BENTOML_DO_NOT_TRACK": "True", **extra}


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (f"{cmd} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Bento:
    tag: str
    path: Path

    @property
    def spec(self) -> dict:
        return yaml.safe_load((self.path / "bento.yaml").read_text())

    @property
    def dockerfile(self) -> str:
        return (self.path / "env/docker/Dockerfile").read_text()

    def requirement_lines(self) -> list[str]:
        text = (self.path / "env/python/requirements.txt").read_text()
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    def service(self, name: str) -> dict:
        return next(s for s in self.spec["services"] if s["name"] == name)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An empty BentoML home for every build of this module."""
    return tmp_path_factory.mktemp("bentoml-home")


def build(store: Path, bentofile: Path | None = None, **siglip_env: str) -> Bento:
    """`bentoml build` from the repo root inside a network namespace with no interfaces at all."""
    # Without uv in the build venv, BentoML runs `pip install uv` (network) first.
    assert importlib.util.find_spec("uv"), "the dev venv needs uv (pyproject dev extras: uv==0.13.9)"
    args = ["-f", str(bentofile)] if bentofile else []
    cmd = ["unshare", "-n", sys.executable, "-m", "bentoml", "build", "--output", "tag", *args, str(ROOT)]
    proc = run(cmd, timeout=300, cwd=ROOT, env=clean_env(BENTOML_HOME=str(store), **siglip_env))
    tag = re.search(r"__tag__:(\S+)", proc.stdout).group(1)
    name, version = tag.split(":")
    return Bento(tag, store / "bentos" / name / version)


@pytest.fixture(scope="module")
def gpu_bento(store) -> Bento:
    """The default variant, asking BentoML for one GPU for the model service."""
    return build(store, SIGLIP_GPUS="1")


@pytest.fixture(scope="module")
def cpu_bento(store, tiny_checkpoint, tmp_path_factory) -> Bento:
    """The CPU variant, with the tiny checkpoint baked in (`python -m siglip.bento bake`, then a bentofile
    that lists the model) and a non-default autoscaling target."""
    run([sys.executable, "-m", "siglip.bento", "bake", str(tiny_checkpoint), "--tag", BAKED_TAG], timeout=120,
        cwd=ROOT, env=clean_env(BENTOML_HOME=str(store)))
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    bentofile = tmp_path_factory.mktemp("bentofile") / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump({**config, "models": [BAKED_TAG]}))
    return build(store, bentofile, SIGLIP_IMAGE="cpu", SIGLIP_TARGET_CONCURRENCY="8")


# ---------------------------------------------------------------------------------------------------------------
# what the bento holds
# ---------------------------------------------------------------------------------------------------------------
def test_services_traffic_and_resources(gpu_bento, cpu_bento):
    defaults = Settings()
    assert defaults.target_concurrency == 32  # deploy/ configs read this default
    for bento, concurrency, gpus in ((gpu_bento, 32, 1), (cpu_bento, 8, None)):
        spec = bento.spec
        assert spec["entry_service"] == "SiglipGateway"
        assert {s["name"] for s in spec["services"]} == {"SiglipGateway", "SiglipModel"}
        gateway, model = bento.service("SiglipGateway"), bento.service("SiglipModel")
        assert [d["service"] for d in gateway["dependencies"]] == ["SiglipModel"]
        assert gateway["config"]["traffic"] == {"timeout": defaults.request_timeout_s + 10,
                                                "concurrency": concurrency}
        assert model["config"]["traffic"] == {"timeout": defaults.request_timeout_s + 30,
                                              "concurrency": concurrency}
        assert "resources" not in gateway["config"]
        assert model["config"].get("resources") == ({"gpu": gpus} if gpus else None)
        # Settings come from the serving environment: none is declared, so none is baked into the image.
        assert spec["envs"] == []
        assert "ARG SIGLIP_" not in bento.dockerfile and "ENV SIGLIP_" not in bento.dockerfile
        # The store's bento directory never holds weights; a bentofile's `models:` adds them to exports.
        assert not (bento.path / "models").exists()
    assert gpu_bento.spec["models"] == []  # by default the weights come from SIGLIP_MODEL at serve time
    assert [m["tag"] for m in cpu_bento.spec["models"]] == [BAKED_TAG]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_requirements_are_locked_and_installed_by_the_dockerfile(variant, gpu_bento, cpu_bento):
    bento = {"gpu": gpu_bento, "cpu": cpu_bento}[variant]
    lines = bento.requirement_lines()
    options = [line for line in lines if line.startswith("-")]
    packages = [line for line in lines if not line.startswith("-")]
    assert all(PIN.match(line) for line in packages), [line for line in packages if not PIN.match(line)]
    committed = [line.strip() for line in (ROOT / f"requirements/{variant}.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    assert set(lines) == set(committed) | {"bentoml==1.4.40"}  # BentoML appends its own pin
    pins = dict(line.split("==") for line in packages)
    assert len(pins) > 80 and pins["transformers"] == "5.23.0" and pins["bentoml"] == "1.4.40"

    docker = bento.dockerfile
    assert "FROM python:3.11-slim AS base-container" in docker
    assert "uv venv --python 3.11 /app/.venv" in docker
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in docker
    if variant == "gpu":
        assert options == []
        assert pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0"
        assert pins["nvidia-cuda-runtime"].startswith("13.") and "nvidia-cudnn-cu13" in pins
        assert "openvino" not in pins
    else:
        assert options == [TORCH_CPU_PAGE]
        assert pins["torch"] == "2.13.0+cpu" and pins["openvino"] == "2026.4.1"
        cuda = [p for p in pins if p.startswith(("nvidia-", "cuda-", "triton", "torchvision"))]
        assert cuda == ["nvidia-ml-py"]  # BentoML's NVML bindings (pure Python, for GPU metrics), no CUDA


CPU_ONLY = {"openvino"}  # the CPU backend: `make serve` installs it everywhere, the GPU image need not carry it


def test_locks_agree_with_pyproject_and_their_inputs():
    """Every runtime dependency of pyproject.toml (CPU-only ones in the CPU lock), and every line of the .in
    files, is met by the locks."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for variant in ("gpu", "cpu"):
        lines = (ROOT / f"requirements/{variant}.txt").read_text().splitlines()
        locked = {k.lower(): Version(v) for k, v in (line.split("==") for line in lines if "==" in line)}
        wanted = [d for d in deps if variant == "cpu" or Requirement(d).name.lower() not in CPU_ONLY]
        for name in ("base.in", f"{variant}.in"):
            text = (ROOT / "requirements" / name).read_text()
            wanted += [line.split("#")[0].strip() for line in text.splitlines()
                       if line.split("#")[0].strip() and not line.startswith("-")]
        for raw in wanted:
            req = Requirement(raw)
            if req.marker and not req.marker.evaluate({"sys_platform": "linux"}):
                continue
            key = req.name.lower().replace("_", "-")
            assert key in locked, f"{variant}: {req.name} is not locked"
            assert req.specifier.contains(locked[key], prereleases=True), f"{variant}: {raw} vs {locked[key]}"


def test_src_holds_only_the_service_files(gpu_bento, cpu_bento):
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "siglip").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    locks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "requirements").glob("*")
             if p.suffix in (".in", ".txt")}
    expected = package | locks | {"service.py", "README.md", "bentofile.yaml"}
    assert any(not name.endswith(".py") for name in package)  # the UI's static files, for one
    for bento in (gpu_bento, cpu_bento):
        src = bento.path / "src"
        held = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
        assert held == expected, {"unexpected": sorted(held - expected), "missing": sorted(expected - held)}


# ---------------------------------------------------------------------------------------------------------------
# the exported bento, on its own
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted(cpu_bento, store, tmp_path_factory) -> Path:
    """`bentoml export` of the CPU bento with baked weights, unpacked somewhere else."""
    out = tmp_path_factory.mktemp("export")
    run([sys.executable, "-m", "bentoml", "export", cpu_bento.tag, str(out / "siglip2.bento")], timeout=300,
        env=clean_env(BENTOML_HOME=str(store)))
    target = out / "siglip2"
    with tarfile.open(out / "siglip2.bento") as archive:
        archive.extractall(target, filter="data")
    name, version = BAKED_TAG.split(":")
    assert (target / "models" / name / version / "config.json").is_file()
    return target


def pip_find_links() -> list[str]:
    """The machine's pip find-links (PIP_FIND_LINKS, pip.conf): where a local torch+cpu wheel lies."""
    out = run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    values = re.findall(r"find-links='([^']*)'", out)
    return sorted({link for value in values for link in value.split()})


@pytest.fixture(scope="module")
def fresh_venv(extracted, tmp_path_factory) -> Path:
    """A new venv with exactly the bento's env/python/requirements.txt, installed by uv as the image's
    Dockerfile does (pip takes minutes for the same set), then `pip check`.

    The one line pointing at download.pytorch.org is dropped (tests reach no public host): torch+cpu comes
    from the machine's pip find-links (/opt/wheels here), the rest from the package index, via uv's cache."""
    lines = (extracted / "env/python/requirements.txt").read_text().splitlines()
    assert TORCH_CPU_PAGE in lines
    local = tmp_path_factory.mktemp("reqs") / "requirements.txt"
    local.write_text("\n".join(line for line in lines if line != TORCH_CPU_PAGE) + "\n")
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    links = [arg for link in pip_find_links() for arg in ("--find-links", link)]
    t0 = time.monotonic()
    run([sys.executable, "-m", "uv", "pip", "install", "--python", str(venv / "bin/python"), "--quiet",
         "--native-tls", "-r", str(local), *links], timeout=900)
    print(f"fresh venv install: {time.monotonic() - t0:.0f} s")
    run([str(venv / "bin/python"), "-m", "pip", "check"], timeout=120)
    return venv


def test_exported_bento_serves_offline_and_drains_on_sigterm(extracted, fresh_venv, reference, tmp_path):
    image = make_image(7)
    img = b64(encode(image))
    labels = ["a cat", "a dog", "a tile"]
    texts = ["a photo of a cat", "rustic oak flooring"]
    zero_shot = {"candidate_labels": labels}
    requests = [
        {"name": "zero_shot", "path": "/zero_shot", "body": {"inputs": img, "parameters": zero_shot}},
        {"name": "image_embedding", "path": "/image_embedding", "body": {"inputs": [img]}},
        {"name": "text_embedding", "path": "/text_embedding", "body": {"inputs": texts}},
        {"name": "similarity", "path": "/similarity", "body": {"inputs": {"image": img, "texts": texts}}},
        {"name": "auto_text", "path": "/", "body": {"inputs": texts}},
        {"name": "auto_zero_shot", "path": "/", "body": {"inputs": img, "parameters": zero_shot}},
    ]
    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    for d in (home / "bentoml", cwd):
        d.mkdir(parents=True)
    name, version = BAKED_TAG.split(":")
    env = {
        "PATH": f"{fresh_venv / 'bin'}:/usr/bin:/bin", "HOME": str(home),
        "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "True", "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"),
        "SIGLIP_MODEL": str(extracted / "models" / name / version),  # the weights baked into the bento
        "SIGLIP_DTYPE": "float32", "SIGLIP_ALLOW_PRIVATE_URLS": "1",  # the slow image server is on loopback
    }
    plan = {
        "serve": {"cmd": [str(fresh_venv / "bin/bentoml"), "serve", str(extracted), "--host", "127.0.0.1",
                          "--port", "3000"], "cwd": str(cwd), "env": env, "log": str(tmp_path / "serve.log")},
        "port": 3000, "ready_timeout_s": 300, "requests": requests,
        "inflight": {"count": 8, "path": "/image_embedding", "png_b64": img, "delay_s": 2.0},
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result_path = tmp_path / "result.json"
    # Both the server and its clients live in one new network namespace: loopback only.
    run([*loopback_namespace(), str(fresh_venv / "bin/python"), str(PROBE), str(tmp_path / "plan.json"),
         str(result_path)], timeout=600, cwd=cwd, env=env)
    result = json.loads(result_path.read_text())
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "error" not in result, f"{result['error']}\n{log[-6000:]}"
    assert result["readyz"] == 200

    got = {k: v["body"] for k, v in result["responses"].items()}
    assert all(v["status"] == 200 for v in result["responses"].values()), result["responses"]
    image_ref = reference.image_embeds([image])[0]
    text_ref = reference.text_embeds(texts)
    assert cosine(got["image_embedding"][0]["embedding"], image_ref) > COS_MIN
    for body in (got["text_embedding"], got["auto_text"]):
        assert [cosine(item["embedding"], ref) > COS_MIN for item, ref in zip(body, text_ref)] == [True, True]
    expected = reference.zero_shot(image, labels)
    for body in (got["zero_shot"], got["auto_zero_shot"]):
        assert [x["label"] for x in body] == [label for label, _ in expected]
        np.testing.assert_allclose([x["score"] for x in body], [s for _, s in expected], atol=1e-4)
    np.testing.assert_allclose(got["similarity"]["similarity_scores"], [image_ref @ text_ref.T], atol=1e-4)

    assert result["metrics"]["status"] == 200
    assert 'bentoml_service_request_total{' in result["metrics"]["text"]
    assert 'endpoint="/zero_shot"' in result["metrics"]["text"]
    # the service's own series, from the extracted copy: requests by mode, and what runs
    assert 'siglip_requests_total{mode="zero_shot",route="/zero_shot",status="200"}' in result["metrics"]["text"]
    assert 'siglip_model_info{backend="' in result["metrics"]["text"]
    assert 'jpeg_decode="gateway"' in result["metrics"]["text"]

    # SIGTERM to the main process with 8 requests inside the service: each is answered, then a clean exit.
    assert result["inflight_started"] == 8
    statuses = [a["status"] for a in result["inflight"]]
    assert statuses == [200] * 8, f"{result['inflight']}\n{log[-6000:]}"
    for a in result["inflight"]:
        assert cosine(a["body"][0]["embedding"], image_ref) > COS_MIN
    assert result["exit_code"] == 0, log[-6000:]
    shutil.rmtree(home, ignore_errors=True)

"""The API page's curl examples (docs/api.md), run as written with bash against a real server, on a photo too big
for a command line.

A newcomer pastes these first: they must work for any photo up to the limits (a base64 image inside ``-d '...'``
fails with "Argument list too long" past ~128 KB, the kernel's limit on one argument).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ROOT, encode, make_image
from PIL import Image

MAX_ARG_STRLEN = 131072  # Linux: the longest single argument execve accepts
LOOPBACK = re.compile(r"https?://(localhost|127\.0\.0\.1)[:/]")


def api_blocks() -> list[str]:
    """The bash blocks of docs/api.md's API section (moved there from the README), in order."""
    page = (ROOT / "docs" / "api.md").read_text()
    section = page[page.index("\n## API"):page.index("\n### Auto-detection")]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def big_photo() -> bytes:
    rng = np.random.default_rng(7)
    base = np.asarray(make_image(31, (1400, 1000)), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(noisy), "JPEG", quality=95)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed for the docs/api.md examples (apt-get install curl)")
    d = tmp_path_factory.mktemp("readme")
    (d / "photo.jpg").write_bytes(big_photo())
    (d / "other.png").write_bytes(encode(make_image(32)))
    return d


def run(block: str, setup: str, svc, cwd) -> object:
    script = (setup + "\n" + block).replace("localhost:3000", f"127.0.0.1:{svc.port}")
    for url in re.findall(r"https?://[^\s'\"]+", script):
        assert LOOPBACK.match(url), f"docs/api.md example would leave the machine: {url}"
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"{block}\n{out.stderr}"
    return json.loads(out.stdout)


def test_readme_api_examples_work_as_written_for_a_large_photo(service, reference, workdir):
    blocks = api_blocks()
    setup, zero_shot, image_emb, text_emb, similarity, files = blocks
    assert "IMG=" in setup and len(blocks) == 6
    photo = (workdir / "photo.jpg").read_bytes()
    assert len(photo) * 4 / 3 > MAX_ARG_STRLEN, "the photo must be too big to pass on a command line"
    img = Image.open(io.BytesIO(photo))
    other = Image.open(workdir / "other.png")

    ranked = run(zero_shot, setup, service, workdir)
    labels = ["ceramic floor tile", "wood laminate plank", "heat pump outdoor unit"]
    expected = reference.zero_shot(img, labels)
    assert [x["label"] for x in ranked] == [label for label, _ in expected]
    np.testing.assert_allclose([x["score"] for x in ranked], [s for _, s in expected], atol=1e-4)

    embeds = run(image_emb, setup, service, workdir)
    assert len(embeds) == 2
    ref = reference.image_embeds([img, other])
    for got, want in zip(embeds, ref):
        assert float(np.dot(got["embedding"], want)) > 0.9999

    texts = run(text_emb, setup, service, workdir)
    want = reference.text_embeds(["matte finish ceramic tile 60x60cm", "rustic oak wood flooring"])
    assert [round(float(np.dot(t["embedding"], w)), 4) for t, w in zip(texts, want)] == [1.0, 1.0]

    sim = run(similarity, setup, service, workdir)
    assert sim["image_count"] == 1 and sim["text_count"] == 2
    expected = reference.image_embeds([img]) @ reference.text_embeds(
        ["beige ceramic floor tile", "white glossy porcelain wall tile"]).T
    np.testing.assert_allclose(sim["similarity_scores"], expected, atol=1e-4)

    # The same photos as files: one command per line, each printing one JSON answer.
    script = files.replace("\\\n", "")
    answers = [json.loads(line) for line in run_lines(script, service, workdir)]
    raw, zs, sim_files = answers
    assert float(np.dot(raw[0]["embedding"], ref[0])) > 0.9999
    expected = reference.zero_shot(img, ["ceramic floor tile", "wood laminate plank"])
    assert [x["label"] for x in zs[0]] == [label for label, _ in expected]
    assert sim_files["image_count"] == 1 and sim_files["text_count"] == 2


def run_lines(block: str, svc, cwd) -> list[str]:
    """Each line of ``block`` run as written (against ``svc``); their outputs."""
    script = block.replace("localhost:3000", f"127.0.0.1:{svc.port}")
    outputs = []
    for line in script.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", line], check=False, cwd=cwd, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, f"{line}\n{out.stderr}"
        outputs.append(out.stdout)
    return outputs

#!/usr/bin/env bash
# Containerize the CPU bento with podman and check one real answer from the image, with no network at all.
#
#   sudo tests/container/test_container.sh      # `make test-container`; needs podman buildah runc debootstrap
#
# 1. a local base image: Debian bookworm (its python3 is 3.11) built with debootstrap from the configured Debian
#    mirror, with the host's CA bundle and uv, imported into podman (no registry needed);
# 2. `bentoml build` of the CPU variant (SIGLIP_IMAGE=cpu) on that base (SIGLIP_BASE_IMAGE), then
#    `bentoml containerize --backend podman`: the image's `uv pip install` fetches the pinned packages from the
#    package index; torch+cpu comes from a local wheel when TORCH_CPU_WHEEL names one (default: the one in
#    /opt/wheels, for machines that cannot reach download.pytorch.org), else from the bento's find-links page;
# 3. `podman run --network none` with a tiny random checkpoint mounted read-only at /models/tiny
#    (SIGLIP_MODEL=/models/tiny, HF_HUB_OFFLINE=1): /readyz, a text embedding and a zero-shot answer compared with
#    transformers on the host, then `podman stop` (SIGTERM) and exit status 0.
#
# WORK (default /tmp/siglip-container) keeps the base rootfs and image between runs; KEEP_IMAGE=1 keeps the app
# image. Prints the wall time of each step.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:-/tmp/siglip-container}
BASE=${BASE:-localhost/bookworm-py311:local}
APP=${APP:-localhost/siglip2-cpu:test}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_CPU_WHEEL=${TORCH_CPU_WHEEL-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl 2>/dev/null || true)}
NAME=siglip2-container-test
export BENTOML_HOME=$WORK/bentoml BENTOML_DO_NOT_TRACK=True

for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install podman buildah runc debootstrap" >&2; exit 2; }
done
mkdir -p "$WORK"
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# Sandboxes without CAP_SYS_RESOURCE cannot raise podman's default ulimits, and crun fails on hybrid cgroups.
export CONTAINERS_CONF=$WORK/containers.conf
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF

cleanup() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    [ "${KEEP_IMAGE:-0}" = 1 ] || podman rmi -f "$APP" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if ! podman image exists "$BASE"; then
    step "debootstrap bookworm -> $BASE"
    rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    # build-essential and git: the bento's Dockerfile apt-installs them; present already, that step is quick.
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,build-essential,git,gnupg2 \
        bookworm "$rootfs" "$MIRROR" > "$WORK/debootstrap.log"
    # The host's CA bundle (it trusts the package proxy) under its own name: the Dockerfile's apt step
    # regenerates /etc/ssl/certs/ca-certificates.crt.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/host-ca-bundle.crt"
    UV_BIN=$("$PY" -c 'import uv, sys; sys.stdout.write(uv.find_uv_bin())')
    install -m 0755 "$UV_BIN" "$rootfs/usr/local/bin/uv"
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE" > /dev/null
    rm -rf "$rootfs"
fi
podman run --rm --network none "$BASE" sh -c 'python3 --version && uv --version && command -v groupadd' \
    || { echo "$BASE lacks python3, uv or groupadd: podman rmi $BASE and rerun" >&2; exit 1; }

step "bentoml build (SIGLIP_IMAGE=cpu, SIGLIP_BASE_IMAGE=$BASE)"
cd "$ROOT"
TAG=$(SIGLIP_IMAGE=cpu SIGLIP_BASE_IMAGE=$BASE "$PY" -m bentoml build --output tag | sed -n 's/^__tag__://p')
BENTO=$BENTOML_HOME/bentos/${TAG%%:*}/${TAG##*:}
grep -q "^FROM $BASE " "$BENTO/env/docker/Dockerfile"
if [ -n "$TORCH_CPU_WHEEL" ]; then
    # The image build cannot reach download.pytorch.org here: hand it the wheel inside the build context.
    mkdir -p "$BENTO/env/python/wheels"
    cp "$TORCH_CPU_WHEEL" "$BENTO/env/python/wheels/"
    sed -i 's|^--find-links https://download.pytorch.org/whl/cpu/torch/$|--find-links /home/bentoml/bento/env/python/wheels|' \
        "$BENTO/env/python/requirements.txt"
    grep -q '^--find-links /home/bentoml/bento/env/python/wheels$' "$BENTO/env/python/requirements.txt"
fi

step "bentoml containerize $TAG --backend podman"
"$PY" -m bentoml containerize "$TAG" --backend podman -t "$APP" > "$WORK/containerize.log" 2>&1 \
    || { tail -40 "$WORK/containerize.log"; exit 1; }
podman image inspect "$APP" --format 'image size: {{.Size}} bytes'

step "tiny checkpoint, podman run --network none"
CKPT=$WORK/tiny-siglip
[ -f "$CKPT/config.json" ] || "$PY" -m siglip.model.checkpoint "$CKPT" > /dev/null
chmod -R a+rX "$CKPT"  # the image runs as uid 1034
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" --network none -v "$CKPT:/models/tiny:ro" \
    -e SIGLIP_MODEL=/models/tiny -e HF_HUB_OFFLINE=1 -e BENTOML_DO_NOT_TRACK=True "$APP" > /dev/null

# The container has no network: ask from inside it, with the image's own Python.
cat > "$WORK/ask.py" <<'EOF'
import json, sys, time, urllib.request
def call(path, body=None):
    req = urllib.request.Request("http://127.0.0.1:3000" + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read()
deadline = time.time() + 300
while True:
    try:
        if call("/readyz")[0] == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("not ready after 300 s")
    time.sleep(1)
texts = ["a photo of a cat", "rustic oak flooring"]
_, emb = call("/text_embedding", {"inputs": texts})
_, zs = call("/", {"inputs": "a photo of a cat", "parameters": {"mode": "text_embedding"}})
print(json.dumps({"texts": texts, "embeddings": [e["embedding"] for e in json.loads(emb)],
                  "auto": json.loads(zs)[0]["embedding"]}))
EOF
podman cp "$WORK/ask.py" "$NAME:/tmp/ask.py"
podman exec "$NAME" python /tmp/ask.py > "$WORK/answer.json" || { podman logs "$NAME" | tail -40; exit 1; }

step "compare with transformers on the host"
"$PY" - "$WORK/answer.json" "$CKPT" <<'EOF'
import json, sys
import numpy as np
import torch
from transformers import AutoModel, AutoProcessor
answer = json.load(open(sys.argv[1]))
model = AutoModel.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(sys.argv[2])
enc = proc(text=[t.lower() for t in answer["texts"]], padding="max_length", max_length=64, truncation=True,
           return_tensors="pt")
with torch.no_grad():
    ref = torch.nn.functional.normalize(model.get_text_features(input_ids=enc["input_ids"]).pooler_output, dim=-1)
got = np.asarray(answer["embeddings"])
cos = (got / np.linalg.norm(got, axis=1, keepdims=True)) @ ref.numpy().T
print("cosine to the reference:", np.diag(cos).round(6).tolist())
assert (np.diag(cos) > 0.999).all(), cos
assert np.allclose(answer["auto"], answer["embeddings"][0], atol=1e-3)
EOF

step "podman stop (SIGTERM)"
podman stop -t 30 "$NAME" > /dev/null
STATUS=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$STATUS" = 0 ] || { podman logs "$NAME" | tail -40; echo "exit status $STATUS" >&2; exit 1; }
step "OK: image $APP built from $TAG on $BASE, answered offline, stopped with status 0"

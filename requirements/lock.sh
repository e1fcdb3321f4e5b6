#!/usr/bin/env bash
# Regenerate the fully pinned requirements/gpu.txt and requirements/cpu.txt from the *.in files, for the bento
# image's platform (Linux x86_64, CPython 3.11). Needs uv (`pip install uv==0.13.9`).
#
#   requirements/lock.sh                          # torch+cpu from PyTorch's CPU index (what a user runs)
#   TORCH_CPU_WHEELS=/opt/wheels requirements/lock.sh   # machines without download.pytorch.org: a folder holding
#                                                 # torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
set -euo pipefail
cd "$(dirname "$0")"
UV=${UV:-uv}
TORCH_CPU_PAGE=https://download.pytorch.org/whl/cpu/torch/
COMMON=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate --quiet)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

header() {
    printf '# Locked from requirements/%s.in by requirements/lock.sh (uv pip compile, Linux x86_64, CPython 3.11).\n' "$1"
    printf '# Do not edit: change the .in file and rerun the script.\n'
}

"$UV" pip compile gpu.in "${COMMON[@]}" -o "$tmp"
{ header gpu; cat "$tmp"; } > gpu.txt

# PyPI does not carry "+cpu" builds. A find-links page, unlike --extra-index-url, is read once (not once per
# package), and only torch comes from it, so every other package still resolves from PyPI alone.
if [ -n "${TORCH_CPU_WHEELS:-}" ]; then
    cpu_source=(--find-links "$TORCH_CPU_WHEELS")
else
    cpu_source=(--find-links "$TORCH_CPU_PAGE")
fi
"$UV" pip compile cpu.in "${COMMON[@]}" "${cpu_source[@]}" -o "$tmp"
{ header cpu; printf -- '--find-links %s\n' "$TORCH_CPU_PAGE"; cat "$tmp"; } > cpu.txt
echo "wrote $(pwd)/gpu.txt and $(pwd)/cpu.txt"

#!/usr/bin/env bash
# The GPU check (omni_grpc/bench/gpu_check.py), on a CUDA machine with no network whose python3 (3.12)
# has torch: from the repository root, with .gpu-wheels/ (made by scripts/gpu_wheels.sh) carried along,
#   bash scripts/gpu_check.sh [--smoke] [--out DIR]
# A virtual environment on top of that python3 takes the pinned wheels; the check then prints its table
# (and writes gpu-check.{md,json} into --out, default $OUT or gpu-check/). Within 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPU_CHECK_VENV:-/tmp/omni-gpu-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
  # --no-deps: everything else they need is already there (numpy, pillow, regex, requests, ...).
  "$venv/bin/python" -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
    || echo "$PWD" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/omni-grpc.pth"
fi
"$venv/bin/python" -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__)'
out=${OUT:-gpu-check}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$venv/bin/python" -m omni_grpc.bench.gpu_check --out "$out" "$@"

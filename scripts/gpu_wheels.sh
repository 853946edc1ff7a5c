#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh, for a CUDA machine with no network whose python3 (3.12) already has torch:
# the pinned versions (constraints.txt) of what the check imports beyond torch, into .gpu-wheels/ (ignored
# by git; carry it). Run here, where the package registries can be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(diffusers transformers huggingface_hub tokenizers hf-xet peft protobuf grpcio grpcio-status
  grpcio-health-checking grpcio-reflection googleapis-common-protos safetensors prometheus-client msgspec)
specs=()
for name in "${pins[@]}"; do
  line=$(grep -i -E "^${name//-/[-_]}==" constraints.txt) || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  specs+=("$line")
done
rm -rf .gpu-wheels
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .gpu-wheels "${specs[@]}"
du -sh .gpu-wheels

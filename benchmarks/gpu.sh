#!/usr/bin/env bash
# One-GPU benchmark of ctmae vs MONAI's MaskedAutoEncoderViT (bf16, SDPA flash, torch.compile off/on, ViT-B 160³).
# Writes benchmarks/gpu_results.md, which `python -m benchmarks.run` includes in BENCHMARKS.md.
#   bash benchmarks/gpu.sh                  # defaults: --size base --crop 160 --batch 32
#   bash benchmarks/gpu.sh --batch 16 --compile off
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
exec python -m benchmarks.gpu "$@"

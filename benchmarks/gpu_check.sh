#!/usr/bin/env bash
# The GPU checks in one short run (a few minutes on one GPU), every result written under OUT:
#   client_step-cuda.json   OPT-125M-shaped (P=2, 32×128) and ResNet-18 (P=5, 64×3×32×32)
#                           client parts: inference, forward+backward, naive loop, hosfl's
#                           verbs with CPU Gaussian and with on-device Rademacher directions
#   cross_device-*.json     CPU and CUDA Rademacher bits compared; θ_c drift between a CPU
#                           and a CUDA replica after 1000 replayed steps
#
# Runs from the repository root with the project venv's python, or else python3 with src/ on
# the path (a GPU machine with torch and transformers installed needs no set-up):
#   bash benchmarks/gpu_check.sh OUT           # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT cpu       # the same script, CPU dry run
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [cuda|cpu]}
device=${2:-cuda}
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import torch, sys; d = sys.argv[1]; d == 'cpu' or torch.cuda.is_available() \
  or sys.exit('gpu_check: torch sees no CUDA device; pass cpu for the dry run')" "$device"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
"$py" benchmarks/client_step.py --device "$device" --parts opt,resnet18 --repeat 5 --out "$out" \
  | tee "$out/client_step.txt"
"$py" benchmarks/cross_device.py --device "$device" --steps 1000 --out "$out" \
  | tee "$out/cross_device.txt"

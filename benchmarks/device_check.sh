#!/usr/bin/env bash
# The GPU path on a bare machine with one CUDA device (sized for one H200 and 10 minutes):
#   1. installs the project's pinned environment with pip (into $BGD_VENV, default .venv-gpu; an
#      existing one is reused),
#   2. the tests marked `gpu` (PQ modules, statistics and k-means on cuda == CPU; Ray actors sharing
#      the GPU, whose distillation group falls back from NCCL to gloo),
#   3. the demo pipeline with its actors on the GPU: phase times next to the README's CPU figures,
#      box/mask AP within 0.01 of the CPU run,
#   4. the ResNet-50 distillation step (batch 64, bf16 autocast off/on): steps/s, student/dense ratio.
# Usage: bash benchmarks/device_check.sh [OUT_DIR]      (logs and reports go to OUT_DIR, default runs/device)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/device}}
VENV=${BGD_VENV:-.venv-gpu}
PY="$VENV/bin/python"
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - t0 )) s)"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "import bgd_dist, ray.job_submission, pytest" 2>/dev/null; then
    # torch and torchvision must be a matching pair (see README); the CUDA wheels come from PyPI
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$PY" -m pip install -q -e '.[dev]'
fi
"$PY" - <<'EOF'
import torch, ray
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} "
      f"devices={torch.cuda.device_count()} ray {ray.__version__}")
assert torch.cuda.is_available(), "torch sees no CUDA device"
EOF

step "tests marked gpu"
timeout 240 "$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || echo "gpu tests: FAILED"

step "demo pipeline on the GPU (2 actors sharing it)"
timeout 240 "$PY" benchmarks/gpu_demo.py --out "$OUT/demo" 2>&1 | tee "$OUT/gpu_demo.log" | grep -v "^\s*$" | tail -25 \
    || echo "gpu demo: FAILED (see $OUT/gpu_demo.log)"

step "ResNet-50 distillation step, batch 64"
timeout 120 "$PY" benchmarks/gpu_distill_step.py --batch 64 --steps 10 2>&1 | tee "$OUT/distill_step.log" || echo "distill step: FAILED"

step "done"

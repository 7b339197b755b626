#!/usr/bin/env bash
# The GPU checks, on a CUDA machine, in under 10 minutes: the GPU-marked tests, then the
# training roofline and the streaming evaluation (its CUDA cases) on the device. Run from a clone after `make setup`:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY - <<'PYEOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA GPU here; run this on a CUDA machine")
print(f"gpu_check: {torch.cuda.get_device_name()} · torch {torch.__version__} · CUDA {torch.version.cuda}")
PYEOF
echo "== GPU-marked tests"
timeout 240 $PY -m pytest -q -m gpu tests/test_gpu.py
echo "== training step against the bf16 GEMM rate"
timeout 150 $PY benchmarks/bench_train.py --device cuda --steps 20
echo "== evaluation kernels on the device (streaming metrics, top-k)"
timeout 150 $PY -m pytest -q tests/test_streaming_eval.py

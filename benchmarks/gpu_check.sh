#!/usr/bin/env bash
# One GPU session: the test suite (CUDA tests included) and the GPU benchmarks, logs to $OUT.
# Expects pyro/arviz wheels in .whl/ (bash ../shared/device/wheels.sh) on a machine whose
# Python already has torch.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 60 python3 benchmarks/bench_evaluate.py --device cuda --profile 2>&1 | tee "$OUT/bench_evaluate.txt"
timeout 150 python3 benchmarks/bench_importance_gpu.py --device cuda --modes graph,eager --repeats 3 \
  2>&1 | tee "$OUT/bench_importance.txt"
timeout 90 python3 benchmarks/bench_importance_gpu.py --device cuda --modes graph --repeats 3 \
  --max-elements 134217728 --skip-plain --skip-pyro 2>&1 | tee "$OUT/bench_importance_default_budget.txt"
timeout 60 python3 benchmarks/bench_ppca_stratified.py --device cuda --dtype float32 --repeats 5 \
  2>&1 | tee "$OUT/bench_ppca_cuda.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -25 | tee "$OUT/pytest.txt"

#!/usr/bin/env bash
# The benchmark set on one CUDA GPU, fp32 and bf16 autocast, in about 4 minutes with start-up on
# an H100/H200: one process per autocast mode (each case's methods in it, `probe.py
# --one-process`, the default on CUDA), JSON written after every case so that a run cut off by
# the time limit keeps what it measured. Tables go to stdout, JSON to benchmarks/results/*_cuda*.json.
#   PY=python bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIMIT=${LIMIT:-100}  # seconds per process
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
timeout 60 "$PY" benchmarks/device_check.py --device cuda  # the second derivatives on the device's kernels
timeout 30 "$PY" benchmarks/optimizer_overhead.py --device cuda --repeats 200
for autocast in none bf16; do
  timeout "$LIMIT" "$PY" benchmarks/probe.py --device cuda --autocast "$autocast" --repeats 10 \
    --cases mlp,resnet18,transformer4,gpt2,llama,mlp_4096 \
    --methods train_step,naive_reg,vmap_reg,reg,reg_grad,projection,opacus_reg,backpack_reg
done

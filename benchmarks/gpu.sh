#!/usr/bin/env bash
# The benchmark set on one CUDA GPU, fp32 and bf16 autocast (meant to fit in about 5 minutes on
# an H100/H200). Tables go to stdout, JSON to benchmarks/results/*_cuda*.json.
#   PY=python bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
"$PY" benchmarks/optimizer_overhead.py --device cuda --repeats 200
for autocast in none bf16; do
  "$PY" benchmarks/probe.py --device cuda --autocast "$autocast" --repeats 10 \
    --cases mlp,mlp_4096,resnet18,transformer4 \
    --methods train_step,naive_reg,vmap_reg,reg,reg_grad,projection,opacus_reg,backpack_reg
done

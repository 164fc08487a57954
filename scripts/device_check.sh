#!/usr/bin/env bash
# The conformance suite on a GPU machine (the device tool's machines: no registry,
# torch and JAX preinstalled). Each step has its own time limit so that a slow
# compile cannot eat the whole lease; logs go to $OUT.
set -u
OUT=${OUT:-/tmp/kvquant-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { local limit=$1 name=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -45; echo "=== $name exit ${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . -e examples/kvquant-example-backend 2>&1 | tail -2
python3 -c "import torch, jax, numpy, ml_dtypes; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| numpy', numpy.__version__, '| ml_dtypes', ml_dtypes.__version__)"
step 120 torch-eager-cuda python3 -m kvquant.cli conformance --backend torch --variant eager --device cuda:0 --show 8 --json "$OUT/torch-eager-cuda.json"
step 150 jax-jit-gpu python3 -m kvquant.cli conformance --backend jax --variant jit --show 8 --json "$OUT/jax-jit-gpu.json"
step 90 torch-compile-cuda-golden python3 -m kvquant.cli conformance --backend torch --variant compile --device cuda:0 --family golden --family fp8-boundary --family exhaustive16 --show 8
step 60 jax-eager-gpu-golden python3 -m kvquant.cli conformance --backend jax --variant eager --family golden --show 8

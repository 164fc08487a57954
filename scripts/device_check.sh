#!/usr/bin/env bash
# The conformance suite on a GPU machine (the device tool's machines: no registry,
# torch and JAX preinstalled). Each step has its own time limit so that a slow
# compile cannot eat the whole lease; logs go to $OUT.
set -u
OUT=${OUT:-/tmp/kvquant-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { local limit=$1 name=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; grep -E "^FAIL|passed, " "$OUT/$name.log" | head -12; grep -A3 "^FAIL" "$OUT/$name.log" | grep "first mismatch" | head -4; echo "=== $name exit $rc"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . -e examples/kvquant-example-backend 2>&1 | tail -2
python3 -c "import torch, jax, numpy, ml_dtypes; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| numpy', numpy.__version__, '| ml_dtypes', ml_dtypes.__version__)"
step ${T_TORCH_EAGER:-100} torch-eager-cuda python3 -m kvquant.cli conformance --backend torch --variant eager --device cuda:0 --show 8
step ${T_JAX_JIT:-150} jax-jit-gpu-golden python3 -m kvquant.cli conformance --backend jax --variant jit --family golden --family exhaustive16 --family fp8-boundary --show 8
step ${T_TORCH_COMPILE:-150} torch-compile-cuda python3 -m kvquant.cli conformance --backend torch --variant compile --device cuda:0 --family golden --family fp8-boundary --family exhaustive16 --show 8
step ${T_JAX_EAGER:-60} jax-eager-gpu python3 -m kvquant.cli conformance --backend jax --variant eager --family fp8-boundary --family exhaustive16 --family rounding-ties --show 8

#!/usr/bin/env bash
# kvquant on a lent GPU (the device tool's machines: no registry, torch and JAX
# preinstalled), in one call of at most 8 minutes: the conformance suite on CUDA, the
# cache in generate on a CUDA model, attention's accuracy contract on CUDA and
# benchmarks/bench_attention.py on the GPU. Each step has its own time limit so that
# a slow compile cannot eat the whole lease; logs go to $OUT, one file per step.
#
#   bash scripts/device_check.sh                 # on the GPU machine
#   DEVICE=cpu bash scripts/device_check.sh      # a dry run here: the same steps on the CPU
set -u
OUT=${OUT:-/tmp/kvquant-device}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { local limit=$1 name=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; grep -E "^FAIL|passed, |: .*(ok|FAIL|True|False)$|tokens agreeing|ratio|x  " "$OUT/$name.log" | head -40; grep -A3 "^FAIL" "$OUT/$name.log" | grep "first mismatch" | head -4; echo "=== $name exit $rc"; }
start=$(date +%s)
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -m pip install -q --no-deps --no-build-isolation -e . -e examples/kvquant-example-backend 2>&1 | tail -2
  PY=python3
else
  PY=${PY:-.venv/bin/python}
fi
$PY -c "import torch, jax, numpy, ml_dtypes; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| numpy', numpy.__version__, '| ml_dtypes', ml_dtypes.__version__)"
step ${T_TORCH_EAGER:-60} torch-eager "$PY" -m kvquant.cli conformance --backend torch --variant eager --device "$DEVICE" --show 8
step ${T_JAX_JIT:-50} jax-jit-golden "$PY" -m kvquant.cli conformance --backend jax --variant jit --family golden --family exhaustive16 --family fp8-boundary --show 8
step ${T_TORCH_COMPILE:-90} torch-compile "$PY" -m kvquant.cli conformance --backend torch --variant compile --device "$DEVICE" --family golden --family fp8-boundary --family exhaustive16 --show 8
step ${T_JAX_EAGER:-30} jax-eager "$PY" -m kvquant.cli conformance --backend jax --variant eager --family fp8-boundary --family exhaustive16 --family rounding-ties --show 8
step ${T_GENERATE:-50} generate "$PY" scripts/device_checks.py generate --device "$DEVICE"
step ${T_ACCURACY:-40} accuracy "$PY" scripts/device_checks.py accuracy --device "$DEVICE"
# Ratios to SDPA over float32 and bfloat16 histories, 4k to 64k tokens, both shapes: kvquant
# attention compiled (torch.compile's kernels on a GPU) and dequantize-then-SDPA.
step ${T_BENCH:-110} bench-attention "$PY" benchmarks/bench_attention.py --device "$DEVICE" --tokens 4096 --tokens 16384 --tokens 65536 --repeats 9 --only compiled --only "cpu kernel" --only dequantize --json "$OUT/bench-attention.json"
echo "device check done in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# kvquant as users get it: build the sdist, build the wheel from that sdist, install the
# wheel (not editable) into a fresh venv, and run scripts/smoke_installed.py and the
# command from a directory outside the checkout, with an empty cache directory.
# Usage: scripts/check_wheel.sh [python]   (CI runs it from .ci/run)
set -euo pipefail
checkout=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
"$python" -m venv "$work/build-env"
"$work/build-env/bin/pip" install -q -c "$checkout/constraints.txt" build
"$work/build-env/bin/python" -m build -q --outdir "$work/dist" "$checkout" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls "$work/dist"
# Listings read whole (grep -q would close the pipe early, which pipefail counts as failure).
[[ $(tar -tzf "$work"/dist/*.tar.gz) == *backends/cpu_kernel/decode_attention.cpp* ]] || { echo "the sdist lacks the kernel's source"; exit 1; }
[[ $("$python" -m zipfile -l "$work"/dist/*.whl) == *kvquant/backends/cpu_kernel/decode_attention.cpp* ]] || { echo "the wheel lacks the kernel's source"; exit 1; }
[[ $("$python" -m zipfile -l "$work"/dist/*.whl) == *kvquant/backends/cpu_kernel/jax_ffi.cpp* ]] || { echo "the wheel lacks the JAX kernel's source"; exit 1; }
"$python" -m venv "$work/venv"
wheel=$(ls "$work"/dist/*.whl)
"$work/venv/bin/pip" install -q -c "$checkout/constraints.txt" "${wheel}[torch,jax]"
mkdir "$work/elsewhere" && cd "$work/elsewhere"
export XDG_CACHE_HOME="$work/cache" KVQUANT_CHECKOUT="$checkout"
"$work/venv/bin/python" "$checkout/scripts/smoke_installed.py"
"$work/venv/bin/kvquant" conformance --backend numpy --family golden > "$work/golden.log" 2>&1 || { cat "$work/golden.log"; exit 1; }
tail -n 3 "$work/golden.log"
"$work/venv/bin/kvquant" eval --help > /dev/null
echo "wheel check passed in $(( $(date +%s) - start ))s"

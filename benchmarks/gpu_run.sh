#!/usr/bin/env bash
# The prepared GPU measurement (docs/benchmarks.md, "GPU"): MFU of the training step of 125M, 350M
# and 1.4B (bf16, cuDNN attention) with AdamW; decode of the 1.4B model in bf16 at batch 1 and 8
# (benchmarks/decode.py, jaxtrain's side; then batch 8 with XLA:CPU's cache windows, to see
# whether they would pay on a GPU); then MFU with Muon while time is left. One command, so a
# lent machine's minutes go to measuring. Results (tables, JSON lines, the machine's versions) go
# to $OUT where that is set (the device tool's result folder), else runs/gpu.
#
#   bash benchmarks/gpu_run.sh fetch   # here, with network: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_run.sh         # there: installs .whl/*.whl (if any) into /tmp/site, runs
#   bash benchmarks/gpu_run.sh --set train.batch_size_per_device=16   # arguments go to both gpu_mfu.py runs
#
# The lent H200's image (no network) has jax (0.11), flax, optax and orbax-checkpoint but not
# ml-collections, which `fetch` downloads (a pure-Python wheel) for the run to carry. On a machine
# where `pip install -e ".[cuda]"` worked, plain `bash benchmarks/gpu_run.sh` needs nothing else.
# BUDGET (seconds, default 500) bounds the whole run: decode runs if 150 s are left after AdamW,
# and the Muon part gets what is left after that. DECODE_SIZE (default 1.4b) is for dry runs.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == fetch ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl ml-collections==1.1.0
fi

out=${OUT:-runs/gpu}
mkdir -p "$out"
source benchmarks/gpu_env.sh
gpu_setup "$out/env.txt" || exit 1
budget=${BUDGET:-500}

python3 benchmarks/gpu_mfu.py --sizes=125m,350m,1.4b --json="$out/gpu_mfu.jsonl" --timeout=240 \
  "$@" 2>&1 | tee "$out/adamw.md"
left=$((budget - SECONDS))
if ((left > 150)); then
  decode=(python3 benchmarks/decode.py --size="${DECODE_SIZE:-1.4b}" --dtype=bfloat16 --sides=jax
          --repeats=3)
  timeout 120 "${decode[@]}" 2>&1 | tee "$out/decode.md"
  timeout 60 "${decode[@]}" --batches=8 --windows=eighths 2>&1 | tee "$out/decode_windows.md"
fi
left=$((budget - SECONDS))
if ((left > 90)); then
  timeout "$left" python3 benchmarks/gpu_mfu.py --sizes=125m,350m,1.4b --optimizers=muon \
    --json="$out/gpu_mfu.jsonl" --timeout=240 "$@" 2>&1 | tee "$out/muon.md"
fi
echo "done in ${SECONDS} s"

#!/usr/bin/env bash
# The prepared GPU optimizer study (docs/optimizers.md, "GPU"): `jaxtrain study` of AdamW against
# Muon at 35M (then 125M, given a second lease), bf16 on one GPU, sized for a 15-minute device
# budget. The reports (study.md, study.json, study.png) and the machine's versions go to $OUT
# where that is set (the device tool's result folder), else runs/gpu_study; the runs themselves
# (checkpoints: too large to bring back) stay in /tmp/gpu_study.
#
#   bash benchmarks/gpu_run.sh fetch     # here, with network: the ml-collections wheel -> .whl/
#   bash benchmarks/gpu_study.sh         # there: 35M, 2 seeds, 3 lrs per optimizer (+1 if at an edge)
#   bash benchmarks/gpu_study.sh 125m    # a second lease: 125M, 1 seed
#   DRY=1 bash benchmarks/gpu_study.sh   # CPU dry run of this script (configs/study.py, 6 steps)
#
# BUDGET (seconds, default 720) bounds the study: at the limit it stops; the report written after
# AdamW's grid (study writes one after every optimizer) is then what comes back, and re-running
# on the same disk continues where it stopped.
set -uo pipefail
cd "$(dirname "$0")/.."

size=${1:-35m}
out=${OUT:-runs/gpu_study}
runs=${RUNS:-/tmp/gpu_study}
mkdir -p "$out"
source benchmarks/gpu_env.sh
gpu_setup "$out/env_$size.txt" || exit 1
budget=${BUDGET:-720}

case "$size" in
  # 35M: 300 steps of 32 x 1024 tokens (9.8M tokens, ~14 tokens per parameter of the model).
  35m) args=(--config=configs/llama.py:35m,h200 --seeds=2 --steps=300
             --lrs=adamw:1.5e-3,3e-3,6e-3/muon:3e-3,6e-3,1.2e-2) ;;
  # 125M: 300 steps of 32 x 1024 tokens, one seed (what one lease allows).
  125m) args=(--config=configs/llama.py:125m,h200 --seeds=1 --steps=300
              --lrs=adamw:1e-3,2e-3,4e-3/muon:2e-3,4e-3,8e-3) ;;
  *) echo "usage: bash benchmarks/gpu_study.sh [35m|125m]" >&2; exit 2 ;;
esac
common=(--config.data.seq_len=1024 --config.model.max_seq_len=1024
        --config.train.batch_size_per_device=32 --config.train.eval_every=30
        --config.train.eval_batches=4 --config.train.log_every=10
        --config.optimizer.warmup_steps=30 --config.checkpoint.every=100000
        --optimizers=adamw,muon --max-extend=1)
if [[ -n "${DRY:-}" ]]; then  # the same flow on CPU, in seconds
  args=(--config=configs/study.py --seeds=1 --steps=6 --lrs=2e-3,4e-3)
  common=(--config.optimizer.warmup_steps=2 --optimizers=adamw,muon --max-extend=0)
fi

timeout "$budget" python3 -m jaxtrain.cli study "${args[@]}" "${common[@]}" \
  --workdir="$runs/$size" 2>&1 | grep -v "^{" | tee "$out/study_$size.log"
for f in study.md study.json study.png; do
  [[ -f "$runs/$size/$f" ]] && cp "$runs/$size/$f" "$out/${f/study/study_$size}"
done
echo "done in ${SECONDS} s"

#!/usr/bin/env bash
# Measured peak memory per worker (live tensors, CPU) of each issue-18 recipe against DDP, on the
# study's three models: a few steps of each (memory does not depend on the run's length), with
# the full phase at half of the budget so that both phases run. Each run's summary.json holds
# peak_memory_per_worker (per phase, per worker); scripts/study_tables.py tabulates them.
#
#   bash scripts/memory_per_worker.sh                       # all three tasks, 4 simulated workers
#   TASKS=llama_shakespeare RECIPES="ddp b-sdp" LAUNCH="--workers 4" OUT=/tmp/m bash scripts/memory_per_worker.sh
set -euo pipefail
OUT="${OUT:-results/memory}"; TASKS="${TASKS:-resnet18_fashion_mnist vit_fashion_mnist llama_shakespeare}"
RECIPES="${RECIPES:-}"  # names to run (default: all)
LAUNCH="${LAUNCH:---workers 4 --simulate}"; STEPS="${STEPS:-8}"  # at least 4: two steps of each phase
common=(--set run.steps="$STEPS" --set run.schedule=flops --set run.eval_interval=0 --set run.checkpoint_interval=0
        --set run.log_interval=1 --set eval.max_batches=1 --set eval.recalibrate_norm_batches=1 --no-progress)
full=(--set strategy.full_phase=0.5 --set strategy.full_phase_checkpointing=true)
recipes=(
  "ddp|--set strategy.name=ddp"
  "ddp-ckpt|--set strategy.name=ddp --set strategy.checkpointing=true"
  "b-sdp|--set strategy.name=sdp --set strategy.coverage=0.5"
  "b-sdp-shard|--set strategy.name=sdp --set strategy.coverage=0.5 --set strategy.shard=true"
  "b-sdp-redraw|--set strategy.name=sdp --set strategy.coverage=0.5 --set strategy.redraw_every=2"
  "b-sdp-full-ddp|--set strategy.name=sdp --set strategy.coverage=0.5 --set strategy.full_phase=0.5 --set strategy.full_phase_shard=false"
  "n-sdp-full-ddp|--set strategy.name=sdp --set strategy.level=neuron --set strategy.coverage=0.5 --set strategy.full_phase=0.5 --set strategy.full_phase_shard=false"
  "b-sdp-full-replicated|--set strategy.name=sdp --set strategy.coverage=0.5 ${full[*]} --set strategy.full_phase_shard=false"
  "b-sdp-full-sharded|--set strategy.name=sdp --set strategy.coverage=0.5 ${full[*]}"
  "b-sdp-redraw-full-sharded|--set strategy.name=sdp --set strategy.coverage=0.5 --set strategy.redraw_every=2 ${full[*]}"
  "b-sdp-shard-full-sharded|--set strategy.name=sdp --set strategy.coverage=0.5 --set strategy.shard=true ${full[*]}"
  "b-sdp-ckpt-full-sharded|--set strategy.name=sdp --set strategy.coverage=0.5 --set strategy.checkpointing=true ${full[*]}"
  "n-sdp-ckpt-full-sharded|--set strategy.name=sdp --set strategy.level=neuron --set strategy.coverage=0.5 --set strategy.checkpointing=true ${full[*]}"
  "n-sdp-full-sharded|--set strategy.name=sdp --set strategy.level=neuron --set strategy.coverage=0.5 ${full[*]}"
)
for task in $TASKS; do
  for recipe in "${recipes[@]}"; do
    name="${recipe%%|*}"; sets="${recipe#*|}"
    [ -n "$RECIPES" ] && [[ " $RECIPES " != *" $name "* ]] && continue
    dir="$OUT/$task/$name"
    [ -f "$dir/summary.json" ] && { echo "done: $dir"; continue; }
    echo "== $task $name"
    # shellcheck disable=SC2086 - the recipe's --set pairs are split on purpose
    subnetdp train "configs/study/$task.toml" $LAUNCH --out "$dir" "${common[@]}" $sets > /dev/null
    python3 -c "import json; m = json.load(open('$dir/summary.json'))['peak_memory_per_worker']; \
print({k: round(v / 2**20, 2) for k, v in m.items() if isinstance(v, int)}, 'MiB')"
  done
done

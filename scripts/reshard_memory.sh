#!/usr/bin/env bash
# Peak memory per process when a run resumes on another number of workers (issue 19):
# a LLaMA run trained on 4 workers for one step, resumed on 3, against a fresh 3-worker run of the
# same length. Each figure is the largest resident set of any one process (GNU time's %M), in KiB.
#   bash scripts/reshard_memory.sh results/reshard-memory        # PRESET=134m by default
set -euo pipefail
OUT=${1:-results/reshard-memory}
PRESET=${PRESET:-134m}
mkdir -p "$OUT"
common=(--set "model.preset=$PRESET" --set data.seq_len=64 --set data.batch_size=1 --set eval.batch_size=1
        --set eval.max_batches=1 --set eval.periodic_max_batches=1 --set run.checkpoint_interval=1
        --set run.eval_interval=1000 --set run.log_interval=1 --set strategy.full_phase=0 --no-progress)
train=(subnetdp train configs/llama_shakespeare.toml "${common[@]}")
rss() { /usr/bin/time -f %M -o "$OUT/$1.maxrss_kib" "${@:2}"; echo "$1: $(cat "$OUT/$1.maxrss_kib") KiB"; }
rss trained4 "${train[@]}" --workers 4 --out "$OUT/run" --set run.steps=1
rss fresh3 "${train[@]}" --workers 3 --out "$OUT/fresh3" --set run.steps=2
rss resumed3 "${train[@]}" --workers 3 --out "$OUT/run" --resume --set run.steps=2

#!/usr/bin/env bash
# Issue 11's GPU measurements with the final engine, and issue 20's sharded shared weights (-shard-shared): LLaMA-134m and the 1b preset on one GPU, each
# rank of a fake process group of 4 measured in turn, bf16, the chunked loss for every strategy
# (so ratios stay fair). Each strategy runs in its own process, so one cannot starve the next,
# and a leak would show as cuda_allocated_at_start_bytes > 0 on a later rank.
#
#   OUT=runs/gpu bash benchmarks/gpu/bench_final.sh                  # on the GPU machine
#   OUT=/tmp/x DEVICE=cpu PRESETS=debug SEQ=32 VOCAB=256 BATCH=2 bash benchmarks/gpu/bench_final.sh
#
# The second line is what tests/app/test_bench.py runs on CPU. Budget: about 10 minutes on an H100.
set -uo pipefail
OUT="${OUT:-runs/gpu}"; DEVICE="${DEVICE:-cuda}"; PRESETS="${PRESETS:-134m 1b}"
SEQ="${SEQ:-1024}"; VOCAB="${VOCAB:-32000}"; BATCH="${BATCH:-8}"; CHUNK="${CHUNK:-1024}"
STEPS="${STEPS:-4}"; WARMUP="${WARMUP:-1}"; LIMIT="${LIMIT:-240}"
export PYTHONUNBUFFERED=1
BF16=$([ "$DEVICE" = cuda ] && echo "--autocast bfloat16" || true)
STRATEGIES_134m="ddp ddp-ckpt fsdp sdp-block-fwd@0.5 sdp-block-fwd-shard@0.5 sdp-block-fwd-shard-shared@0.5
  sdp-block-fwd-ckpt@0.5 sdp-block-fwd-ckpt-shard@0.5 sdp-block-fwd-ckpt-shard-shared@0.5 sdp-block-fwd@0.25
  sdp-block-fwd-shard@0.25 sdp-block-fwd-shard-shared@0.25 ddp-sd@0.5"
STRATEGIES_1b="ddp ddp-ckpt sdp-block-fwd@0.5 sdp-block-fwd-shard@0.5 sdp-block-fwd-shard-shared@0.5
  sdp-block-fwd-ckpt-shard@0.5 sdp-block-fwd-ckpt-shard-shared@0.5 sdp-block-fwd@0.25 sdp-block-fwd-ckpt-shard@0.25"
for preset in $PRESETS; do
  var="STRATEGIES_$preset"; list="${!var:-$STRATEGIES_134m}"
  dir="$OUT/llama-$preset"; mkdir -p "$dir"
  args=(--model llama --preset "$preset" --vocab "$VOCAB" --seq-len "$SEQ" --batch-size "$BATCH" --workers 4
        --device "$DEVICE" --backend fake $BF16 --loss-chunk "$CHUNK" --steps "$STEPS" --warmup "$WARMUP")
  for s in $list; do
    echo "== $preset $s"
    timeout "$LIMIT" python3 -m subnetdp.app.cli bench "${args[@]}" --strategies "$s" --out "$dir" 2>&1 \
      | grep -v "it/s\]\|run/s\]" | grep "^| $s \|failed\|Error" || true
  done
  python3 -m subnetdp.app.cli bench "${args[@]}" --strategies "$(echo $list | tr ' ' ,)" --out "$dir" --report-only \
    | grep -v "it/s\]\|run/s\]" | tail -25
  python3 -c "
import json; b = json.load(open('$dir/bench.json'))
print('allocated at start (MiB):', {r['strategy']: [round((x.get('cuda_allocated_at_start_bytes') or 0) / 2**20)
      for x in r['ranks']] for r in b['results']})"
done

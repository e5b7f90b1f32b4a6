#!/usr/bin/env bash
# Part 2 of bench_llama134m.sh alone (no resume check): the LLaMA-134m benchmark on a fake process
# group of 4, bf16, within about 2 minutes on an H200. Writes to $OUT (default runs/gpu).
OUT="${OUT:-runs/gpu}"; mkdir -p "$OUT"
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
timeout 230 python3 -m subnetdp.app.cli bench --model llama --preset 134m --vocab 32000 --seq-len 1024 \
  --batch-size 8 --workers 4 --device cuda --backend fake --autocast bfloat16 --steps 6 --warmup 2 \
  --strategies ddp,sdp-block-fwd@0.5,fsdp,ddp-ckpt,sdp-block-fwd-ckpt@0.5,ddp-sd@0.5,sdp-block-fwd@0.25,sdp-neuron-fwd@0.5,sdp-block-bwd@0.5,sdp-neuron-bwd@0.5 \
  --out "$OUT/llama134m" 2>&1 | grep -v "it/s\]\|run/s\]" | tail -32
python3 -c "
import json; b=json.load(open('$OUT/llama134m/bench.json'))
print('allocated at start (MiB):', {r['strategy']: [round((x['cuda_allocated_at_start_bytes'] or 0)/2**20) for x in r['ranks']] for r in b['results']})"
tar czf "$OUT/llama134m_raw.tgz" -C "$OUT" llama134m/raw
cp "$OUT/llama134m/bench.md" "$OUT/llama134m/bench.json" "$OUT/llama134m/bench.log" "$OUT/" 2>/dev/null
cp "$OUT/llama134m/"*.png "$OUT/" 2>/dev/null

#!/usr/bin/env bash
# GPU benchmark (issue 4), at most about 5 minutes on one H100/H200: LLaMA-134m preset, bf16 autocast,
# 8 x 1024 synthetic tokens (vocab 32000) per worker, N = 4 workers, AdamW.
#
# Several ranks cannot share one GPU through NCCL, so each of the 4 ranks is measured in turn in one
# process, in a *fake* process group of 4 (`--backend fake`): the model, plan, shards and buffers are
# exactly those of that rank at N = 4, collectives do nothing. Per-rank peak memory
# (torch.cuda.max_memory_allocated) is therefore exact; step time is compute only (no communication
# time); bytes handed to collectives are still counted.
#
# Also re-checks `subnetdp train --resume` on the GPU (2 gloo ranks sharing it), which failed in the
# first GPU run of issue 3 (fixed: checkpoints load on CPU).
#   OUT=runs/gpu bash benchmarks/gpu/bench_llama134m.sh
set -uo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# 1. resume on GPU (issue 3): 2 gloo ranks sharing the GPU, killed run simulated by deleting the last checkpoint
CFG=/tmp/llama134m.toml
cat > $CFG <<'TOML'
[run]
steps = 10
log_interval = 1
checkpoint_interval = 5
autocast = "bfloat16"
threads = 4
[model]
name = "llama"
preset = "134m"
[data]
name = "synthetic-text"
batch_size = 8
vocab_size = 32000
seq_len = 1024
[optim]
name = "adamw"
lr = 3e-4
grad_clip = 1.0
[eval]
batch_size = 8
max_batches = 4
TOML
R() { timeout 120 python3 -m subnetdp.app.cli train $CFG --no-progress --workers 2 --out /tmp/resume "$@" 2>&1 | tail -2; }
{ R; cp /tmp/resume/metrics.jsonl /tmp/full.jsonl; rm -rf /tmp/resume/checkpoints/step-00000010
  R --resume; python3 - <<'PY'
import json
a = [json.loads(l) for l in open("/tmp/full.jsonl")]; b = [json.loads(l) for l in open("/tmp/resume/metrics.jsonl")]
key = lambda rows: [(r["step"], r.get("loss"), json.dumps(r.get("eval"), sort_keys=True)) for r in rows]
print("resumed from", json.load(open("/tmp/resume/summary.json"))["resumed_from"], "| losses identical to the uninterrupted run:",
      key(a) == key(b), "| max abs loss difference:",
      max(abs((x["loss"] or 0) - (y["loss"] or 0)) for x, y in zip(a, b) if "loss" in x))
PY
} 2>&1 | tee "$OUT/resume.txt"

# 2. the benchmark
timeout 330 python3 -m subnetdp.app.cli bench --model llama --preset 134m --vocab 32000 --seq-len 1024 \
  --batch-size 8 --workers 4 --device cuda --backend fake --autocast bfloat16 --steps 6 --warmup 2 \
  --strategies ddp,sdp-block-fwd@0.5,fsdp,ddp-ckpt,sdp-block-fwd-ckpt@0.5,ddp-sd@0.5,sdp-block-fwd@0.25,sdp-neuron-fwd@0.5,sdp-block-bwd@0.5,sdp-neuron-bwd@0.5 \
  --out "$OUT/llama134m" 2>&1 | grep -v "it/s\]\|run/s\]" | tail -40
tar czf "$OUT/llama134m_raw.tgz" -C "$OUT" llama134m/raw
cp "$OUT/llama134m/bench.md" "$OUT/bench.md" 2>/dev/null
cp "$OUT/llama134m/bench.json" "$OUT/bench.json" 2>/dev/null

#!/usr/bin/env bash
# GPU check of `subnetdp train` (issue 3): LLaMA-134m preset, bf16 autocast, synthetic tokens
# (vocab 32000, 1024 tokens), 8 sequences per worker. Runs from the repo root with the machine's
# own torch (PYTHONPATH=.), writes logs and summaries to $OUT (default runs/gpu-check).
#   1. DDP, 1 rank, NCCL (one GPU per rank)
#   2. B-SDP fwd C=0.5, --workers 4 --simulate on the one GPU (4 virtual workers, one process)
#   3. B-SDP fwd C=0.5, 2 gloo ranks sharing the GPU (NCCL refuses two ranks on one GPU),
#      with a checkpoint, a resume and an export
#   4. (issue 20) the same with shard = true and shard_shared_weights = true: the CUDA path of the
#      freed shared weights (storage resize on CUDA, the weight group), its memory beside run 3's
set -uo pipefail
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
cat > "$OUT/llama134m.toml" <<'TOML'
[run]
name = "gpu-check"
steps = 30
log_interval = 5
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
warmup_steps = 5
grad_clip = 1.0
[eval]
batch_size = 8
max_batches = 4
TOML
T() { timeout "$1" python3 -m subnetdp.app.cli train "$OUT/llama134m.toml" --no-progress "${@:2}"; echo "exit $?"; }
T 120 --workers 1 --out "$OUT/ddp1" --overwrite --set strategy.name=ddp 2>&1 | tail -4 | tee "$OUT/ddp1.log"
T 150 --workers 4 --simulate --out "$OUT/sim4" --overwrite 2>&1 | tail -3 | tee "$OUT/sim4.log"
T 150 --workers 2 --out "$OUT/sdp2" --overwrite --set run.steps=20 --set run.checkpoint_interval=10 2>&1 | tail -3 | tee "$OUT/sdp2.log"
rm -rf "$OUT/sdp2/checkpoints/step-00000020"
T 150 --workers 2 --out "$OUT/sdp2" --set run.steps=20 --set run.checkpoint_interval=10 --resume 2>&1 | tail -2 | tee -a "$OUT/sdp2.log"
python3 -m subnetdp.app.cli export "$OUT/sdp2" --out /tmp/sdp2.safetensors 2>&1 | tail -1 | tee -a "$OUT/sdp2.log"
T 150 --workers 2 --out "$OUT/zero3" --overwrite --set run.steps=20 --set strategy.shard=true \
  --set strategy.shard_shared_weights=true 2>&1 | tail -3 | tee "$OUT/zero3.log"
python3 - "$OUT" <<'PY' | tee "$OUT/table.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("ddp1", "sim4", "sdp2", "zero3"):
    p = out / name / "summary.json"
    if not p.exists():
        print(name, "no summary"); continue
    s = json.loads(p.read_text())
    r = s["per_rank"]
    print(f"{name:5s} {s['strategy']:16s} workers {s['workers']} steps {s['steps']} resumed {s['resumed_from']} "
          f"eval {s['final_eval']} median step {s['median_step_s']*1000:.1f} ms "
          f"cuda max alloc GiB {[round(x.get('cuda_max_allocated_bytes', 0)/2**30, 2) for x in r]} "
          f"params MiB {[round(x['trainable_param_bytes']/2**20, 1) for x in r]} "
          f"comm MiB/step {[round(x['comm_bytes_per_step']/2**20, 1) for x in r]} device {s['machine']['device']}")
PY
for d in ddp1 sim4 sdp2 zero3; do cp "$OUT/$d/summary.json" "$OUT/$d.summary.json" 2>/dev/null; done

"""subnetdp.integrations.hf_trainer: the README's Trainer example, run on 2 gloo ranks (with gradient
accumulation, 2 micro-batches per optimizer step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")


@pytest.mark.slow
def test_trainer_example_trains_with_sdp_syncs_once_per_accumulated_step_and_saves_a_loadable_full_model(
        tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    out = tmp_path / "hf"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "examples/hf_trainer.py", "--out", str(out), "--steps", "6", "--grad-accum", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "sdp_report.json").read_text())
    assert report["wrapped_as"] == "LlamaForCausalLM"  # not DistributedDataParallel: SDP syncs
    assert report["sdp_bytes_rank0"] > 0 and report["embedding_same_on_every_rank"]
    # only what rank 0 holds: the shared embedding, norm and head plus 2 of the 4 layers
    assert report["optimizer_params_rank0"] < report["full_params"] and len(report["held_units_rank0"]) == 2
    assert report["losses"][-1] < report["losses"][0]
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # gradient accumulation: the first micro-batch of each step accumulates under no_sync and sends
    # nothing; the step sends one sync, the same bytes as without accumulation: the fp32 gradients
    # of what both ranks hold (each layer has a single holder here, so nothing of it is sent) and
    # the clip norm (one float64). Syncing every micro-batch would send the gradients twice.
    shared = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("model.layers."))
    assert report["sdp_bytes_before_last_micro_batch_rank0"] == [0] * 6
    assert report["sdp_bytes_per_step_rank0"] == [4 * shared + 8] * 6
    torch.manual_seed(0)
    initial = LlamaForCausalLM(model.config)  # the example's initial model
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert any(k.startswith("model.layers.3.") for k in changed) and "model.embed_tokens.weight" in changed
    # each rank's subnetwork, a Hugging Face folder of its own (2 of the 4 layers), and their ensemble
    import subnetdp
    tokens = torch.arange(16)[None] % 64
    members = []
    for rank in range(2):
        folder = out / "subnetworks" / f"member-{rank}"
        member, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert member.config.num_hidden_layers == 2 and (folder / "README.md").is_file()
        assert torch.equal(member.model.embed_tokens.weight, model.model.embed_tokens.weight)  # shared, synced
        members.append(member.eval())
    with torch.no_grad():
        mean = sum(torch.softmax(m(tokens).logits, -1) for m in members) / 2
        assert torch.allclose(subnetdp.load_ensemble(out / "subnetworks")(tokens), mean.log(), atol=1e-6)


def test_checkpoints_mid_run_are_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from subnetdp import SDPConfigError
    from subnetdp.integrations.hf_trainer import SDPTrainer

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], save_strategy="steps")
    with pytest.raises(SDPConfigError, match="save_strategy='no'"):
        SDPTrainer(model=LlamaForCausalLM(config), args=args, sdp={"blocks": "model.layers"})

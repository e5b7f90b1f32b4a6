"""A Hugging Face LlamaForCausalLM trained with SDP through transformers' Trainer (gloo, CPU).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/hf_trainer.py --out runs/hf-trainer

A small randomly initialised model (no download) learns a synthetic next-token task; each of the
2 workers trains half of the decoder layers (B-SDP, C = 0.5) plus the shared embeddings and head.
At the end `save_model` writes the assembled full model, which `from_pretrained` loads,
`save_subnetworks` each worker's subnetwork (OUT/subnetworks/member-R, 2 of the 4 layers each, a
Hugging Face folder with a model card; `subnetdp.load_ensemble(OUT/subnetworks)` is their
ensemble), and rank 0 writes `sdp_report.json` (parameters each optimizer steps, losses, SDP's
bytes per optimizer step).
`--grad-accum K` splits each worker's batch of 8 per optimizer step into K micro-batches
(`gradient_accumulation_steps=K`): gradients are averaged once per step, so a step sends the same
bytes as without accumulation. Needs `pip install "subnetdp[hf]"`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from subnetdp import SubnetworkDataParallel
from subnetdp.integrations.hf_trainer import SDPTrainer


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable in a few steps."""

    def __init__(self, size: int, seq_len: int, vocab: int) -> None:
        starts = torch.randint(0, vocab, (size, 1), generator=torch.Generator().manual_seed(0))
        self.tokens = (starts + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class SDPBytes(TrainerCallback):
    """SDP's bytes per optimizer step on this rank, and those sent before the step's last
    micro-batch (none: the micro-batches before it accumulate under ``no_sync``)."""

    def __init__(self, sdp: SubnetworkDataParallel) -> None:
        self.sdp, self.per_step, self.before_last_micro_batch = sdp, [], []

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = self.before_last = self.sdp.comm_bytes

    def on_substep_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.before_last = self.sdp.comm_bytes  # after a micro-batch that is not the step's last

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.per_step.append(self.sdp.comm_bytes - self.start)
        self.before_last_micro_batch.append(self.before_last - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (the assembled model, sdp_report.json)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--coverage", type=float, default=0.5, help="SDP coverage C (default 0.5)")
    parser.add_argument("--grad-accum", type=int, default=1, choices=(1, 2, 4, 8),
                        help="micro-batches per optimizer step (each worker's batch of 8 split in K; default 1)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    full_params = sum(p.numel() for p in model.parameters())
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps,
                                 per_device_train_batch_size=8 // args.grad_accum,
                                 gradient_accumulation_steps=args.grad_accum,
                                 learning_rate=3e-3, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0)
    trainer = SDPTrainer(model=model, args=training, train_dataset=CountingTokens(512, 32, 64),
                         sdp={"blocks": "model.layers", "coverage": args.coverage})
    sdp_bytes = SDPBytes(trainer.sdp)
    trainer.add_callback(sdp_bytes)
    trainer.train()
    stepped = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    # the shared embedding after training, on every rank: identical when SDP averaged its gradients
    embedding = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(embedding, trainer.model.model.embed_tokens.weight.detach().clone())
    trainer.save_model(args.out)
    trainer.save_subnetworks(str(Path(args.out) / "subnetworks"))  # member-R folders: from_pretrained each
    if trainer.args.should_save:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        report = {"full_params": full_params, "optimizer_params_rank0": stepped, "losses": losses,
                  "held_units_rank0": trainer.sdp.held_units, "wrapped_as": type(trainer.model_wrapped).__name__,
                  "sdp_bytes_rank0": trainer.sdp.comm_bytes, "grad_accum": args.grad_accum,
                  "sdp_bytes_per_step_rank0": sdp_bytes.per_step,
                  "sdp_bytes_before_last_micro_batch_rank0": sdp_bytes.before_last_micro_batch,
                  "embedding_same_on_every_rank": all(torch.equal(e, embedding[0]) for e in embedding)}
        (Path(args.out) / "sdp_report.json").write_text(json.dumps(report, indent=1))
        print(f"rank 0 optimizer steps {stepped:,} of {full_params:,} parameters; loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}; SDP bytes per optimizer step {sdp_bytes.per_step[-1]:,} ({args.grad_accum} "
              f"micro-batches); assembled model written to {args.out}")


if __name__ == "__main__":
    main()

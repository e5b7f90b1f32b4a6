"""Train a Hugging Face ``transformers`` model with SDP through ``Trainer``, under torchrun.

    from subnetdp.integrations.hf_trainer import SDPTrainer
    trainer = SDPTrainer(model=model, args=TrainingArguments(..., save_strategy="no"),
                         train_dataset=dataset, sdp={"blocks": "model.layers", "coverage": 0.5})
    trainer.train()
    trainer.save_model("out")        # the assembled full model: from_pretrained("out") loads it
    trainer.save_subnetworks("out/subnetworks")   # each worker's subnetwork (member-R), and the ensemble

What changes against the stock Trainer:
- the model is wrapped in ``SubnetworkDataParallel`` when the Trainer is built (collective: every
  rank builds it), and cut in place: ``trainer.model`` is this worker's subnetwork, still the
  Hugging Face model class, so its forward signature, config and loss work as before;
- Accelerate does not wrap it in DDP: SDP averages each gradient over its holders during backward;
- gradient accumulation (``gradient_accumulation_steps=K``): the micro-batches before the last of
  each optimizer step run under ``sdp.no_sync()`` (the Trainer's ``accelerator.no_sync``, which
  falls back to a null context for a model not in DDP), so gradients add up locally and the last
  micro-batch's backward averages the sum once: one sync per optimizer step, as DDP under Trainer
  (``sync_each_batch=True`` in ``gradient_accumulation_kwargs`` syncs every micro-batch instead);
- the optimizer (Trainer's own, with its weight-decay groups) sees only what this worker holds;
- gradient clipping uses the full model's norm (``sdp.clip_grad_norm_``), the same on every rank;
- ``save_model`` assembles the full model (collective) and rank 0 writes it with
  ``save_pretrained``. Intermediate checkpoints would need every rank's optimizer state, which the
  Trainer saves from rank 0 only, so ``save_strategy`` must be ``"no"``.

Evaluation runs each worker's subnetwork on its share of the data; assemble the model
(``save_model``) to evaluate the full one. ``save_subnetworks`` writes each worker's subnetwork as
a Hugging Face folder of its own (``save_pretrained`` with fewer layers, or fewer heads and
neurons: ``from_pretrained`` loads it, ``push_to_hub`` uploads it) and the ensemble's index, which
``subnetdp.load_ensemble`` reads. Example: examples/hf_trainer.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import Trainer

from ..engine import SDPConfigError, SubnetworkDataParallel
from ..export import member_name, save_subnetwork, standalone_subnetwork, write_ensemble_index


class SDPTrainer(Trainer):
    """``transformers.Trainer`` whose data parallelism is SDP. ``sdp``: the keyword arguments of
    :class:`~subnetdp.SubnetworkDataParallel` (``blocks=`` or ``neurons=``, ``coverage``, ...)."""

    def __init__(self, *args: Any, sdp: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if str(self.args.save_strategy).split(".")[-1].lower() != "no":
            raise SDPConfigError("SDPTrainer: set save_strategy='no' (each rank holds its own optimizer state, which "
                                 "Trainer checkpoints save from rank 0 only) and call trainer.save_model() at the end")
        if not torch.distributed.is_initialized():
            raise SDPConfigError("SDPTrainer: torch.distributed is not initialised; launch with torchrun "
                                 "(gloo on CPU: TrainingArguments(use_cpu=True, ddp_backend='gloo'))")
        if sdp.get("shard"):  # the Trainer builds its optimizer over self.model's parameters, not the shards
            raise SDPConfigError("SDPTrainer: shard=True is not supported (transformers.Trainer steps the model's "
                                 "parameters; sharded SDP steps sdp.parameters())")
        self.sdp = SubnetworkDataParallel(self.model, **sdp)  # cuts self.model in place
        accelerator = self.accelerator
        prepare_model = accelerator.prepare_model

        def prepare_without_ddp(model: torch.nn.Module, device_placement: bool | None = None,
                                evaluation_mode: bool = False) -> torch.nn.Module:
            # SDP already syncs gradients through hooks on the parameters: no DDP around it
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        def clip_full_norm(parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
            if norm_type != 2:
                raise SDPConfigError("SDPTrainer clips by the full model's 2-norm only")
            return self.sdp.clip_grad_norm_(max_norm)

        def no_sync_sdp(model: torch.nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
            # the Trainer enters accelerator.no_sync(model) (accelerator.accumulate in older releases)
            # for every micro-batch but the last of an accumulation window; accelerate's falls back
            # to a null context for a model not in DDP, which would average every micro-batch
            return self.sdp.no_sync()

        accelerator.prepare_model = prepare_without_ddp  # type: ignore[method-assign]
        accelerator.clip_grad_norm_ = clip_full_norm  # type: ignore[method-assign]
        accelerator.no_sync = no_sync_sdp  # type: ignore[method-assign]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The assembled full model (collective: call it on every rank); rank 0 writes it with
        ``save_pretrained``, so ``from_pretrained(output_dir)`` loads the plain model."""
        output_dir = output_dir or self.args.output_dir
        state = self.sdp.full_state_dict()
        if self.args.should_save:
            self.model.save_pretrained(output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()

    def save_subnetworks(self, output_dir: str) -> None:
        """Each rank writes its subnetwork to ``output_dir/member-R`` (a Hugging Face folder with
        a model card, checked on one training example to compute what the rank's cut model
        computes); rank 0 then writes ensemble.json and the ensemble's card (collective)."""
        from pathlib import Path

        out, rank = Path(output_dir), self.sdp.rank
        example = None
        if self.train_dataset is not None and len(self.train_dataset) > 0:  # type: ignore[arg-type]
            first = self.train_dataset[0]
            ids = first.get("input_ids") if isinstance(first, dict) else None
            if isinstance(ids, torch.Tensor):
                example = ids[None].to(next(self.model.parameters()).device)
        was_training = self.model.training
        sub = standalone_subnetwork(self.sdp, example_input=example)
        self.model.train(was_training)
        plan = self.sdp.plan
        trained = (f"- transformers `Trainer` with subnetdp's `SDPTrainer`: {plan.world_size} workers, each holding "
                   f"{plan.k} of {plan.world_size} copies of every unit (plan `{plan.fingerprint()[:16]}`), "
                   f"{self.state.global_step} optimizer steps\n- worker {rank} held: "
                   + ", ".join(f"`{u}`" for u in self.sdp.held_units))
        save_subnetwork(sub, out / member_name(rank), {
            "title": f"{type(sub.model).__name__}: the subnetwork of worker {rank} of {plan.world_size}",
            "trained": trained, "evaluated": "Not evaluated by the export; evaluate it as any model of its class.",
            "json": {"step": self.state.global_step, "plan_fingerprint": plan.fingerprint()}}, overwrite=True)
        sizes: list[Any] = [None] * plan.world_size
        torch.distributed.all_gather_object(sizes, (type(sub.model).__name__, sub.num_parameters))
        if self.args.should_save:
            write_ensemble_index(out, [member_name(r) for r in range(plan.world_size)], sizes,
                                 {"title": f"Ensemble of the {plan.world_size} subnetworks",
                                  "trained": f"- transformers `Trainer` with subnetdp's `SDPTrainer`, "
                                  f"{plan.world_size} workers, {self.state.global_step} optimizer steps"})
        self.accelerator.wait_for_everyone()

"""A run's N subnetworks and their ensemble, from its checkpoint, as standalone models:
`subnetdp export --subnetwork R` and `--ensemble`.

    subnetdp export runs/r18 --subnetwork 2 --out exports/r18-w2     # worker 2's subnetwork, a folder
    subnetdp export runs/r18 --ensemble --out exports/r18-ensemble   # all N, and ensemble.json

One process, no torch.distributed: the run's N workers are rebuilt as a simulator under the plan
that wrote the checkpoint (the config it recorded, the re-drawn plan where strategy.redraw_every
drew one), and each reads its own chunks of the checkpoint (its norm statistics included). Each
worker then becomes a fresh plain model of the run's model class (subnetdp.export), checked to
compute the worker's output on one batch of the run's data, and is written as a folder that loads
without subnetdp.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...engine import SubnetworkSimulator
from ...engine.errors import DisconnectedPlanWarning
from ...export import Standalone, save_ensemble, save_subnetwork, standalone_subnetwork
from ..builders import Task, build_task
from ..config import Config, from_dict
from . import checkpoint as ckpt
from .export import ExportError, find_checkpoint
from .workers import draw_of_step, sdp_kwargs, strategy_label


@dataclass
class RunWorkers:
    """A run's workers at one checkpoint, rebuilt in this process."""

    run_dir: Path
    folder: Path
    manifest: dict[str, Any]
    config: Config
    task: Task
    simulator: SubnetworkSimulator
    skipped: list[tuple[Path, str]]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return self.simulator.plan.world_size

    def standalone(self, rank: int) -> Standalone:
        """Worker ``rank``'s subnetwork as a plain model, checked on the run's example batch."""
        if not 0 <= rank < self.world_size:
            raise ExportError(f"--subnetwork {rank}: the run has workers 0 to {self.world_size - 1}")
        return standalone_subnetwork(self.simulator.workers[rank], example_input=self.example_batch())

    def example_batch(self) -> torch.Tensor:
        return self.task.data.train_batch(0, 0, 1, 4, self.config["run.seed"])[0]

    def summary(self) -> dict[str, Any] | None:
        path = self.run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return summary if summary.get("steps") == self.step else None  # figures of this checkpoint's step only


def load_run_workers(run_dir: Path, step: int | None = None, rank: int | None = None) -> RunWorkers:
    """The run's workers as they were at checkpoint ``step`` (default: the newest complete one).
    ExportError for a run without subnetworks (DDP, a checkpoint of the full-model phase), or
    without a worker ``rank``."""
    skipped: list[tuple[Path, str]] = []
    folder, manifest = find_checkpoint(run_dir, step, skipped)
    if step is None and manifest.get("phase") == "full":  # the subnetworks as the SDP phase left them
        own = [(f, m) for f, m in ckpt.complete_checkpoints(run_dir / "checkpoints") if m.get("phase") != "full"]
        if own:
            skipped.append((folder, f"it is in the full-model phase; the subnetworks are those of step "
                                    f"{own[-1][1]['step']}, where the SDP phase ended"))
            folder, manifest = own[-1]
    config = from_dict(manifest["config"])
    if rank is not None and not 0 <= rank < manifest["virtual_world_size"]:
        raise ExportError(f"--subnetwork {rank}: the run has workers 0 to {manifest['virtual_world_size'] - 1}")
    if config["strategy.name"] != "sdp":
        raise ExportError(f"{run_dir} trained {manifest['strategy']}: it has no subnetworks (export the full model "
                          "without --subnetwork / --ensemble)")
    if manifest.get("phase") == "full":
        own = [str(m["step"]) for _, m in ckpt.complete_checkpoints(run_dir / "checkpoints", verify=False)
               if m.get("phase") != "full"]
        raise ExportError(f"checkpoint step {manifest['step']} is in the full-model phase, where every worker trains "
                          "the whole model: there are no subnetworks in it; "
                          + (f"checkpoints of the SDP phase: step {', '.join(own)}" if own else
                             "no checkpoint of the SDP phase is left (runs of subnetdp before 0.2 pruned it)")
                          + "; or export the full model without --subnetwork / --ensemble")
    from ...engine import checkpoint as sdp_checkpoint  # torch.distributed.checkpoint takes 0.7 s to import
    torch.manual_seed(config["run.seed"])
    task = build_task(config, out=run_dir)  # its data (the example batch) and the run's own tokenizer
    kwargs = {**sdp_kwargs(config, task, torch.device("cpu")), "shard": False, "shard_shared_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedPlanWarning)
        simulator = SubnetworkSimulator(task.make_model(), manifest["virtual_world_size"], **kwargs)
    if draw_of_step(config, manifest["step"] - 1) > 0:  # a re-drawn plan wrote it: draw the same one
        simulator.redraw(manifest["plan_seed_drawn"],
                         [torch.optim.SGD(w.parameters(), lr=0.0) for w in simulator.workers])
    expected = manifest.get("plan_fingerprint_drawn") or manifest.get("plan_fingerprint")
    if expected is not None and simulator.plan.fingerprint() != expected:
        raise ExportError(f"{folder}: the plan rebuilt from the run's config differs from the one that wrote the "
                          "checkpoint (a different subnetdp version?); its subnetworks cannot be told apart")
    ckpt.require_readable(manifest, folder)
    sdp_checkpoint.load(folder / ckpt.MODEL_DIR, simulator)
    for worker in simulator.workers:
        worker.eval()
    return RunWorkers(run_dir, folder, manifest, config, task, simulator, skipped)


def _trained(run: RunWorkers, rank: int | None) -> str:
    config, plan = run.config, run.simulator.plan
    lines = [f"- `subnetdp train`, {strategy_label(config)}, {run.world_size} workers"
             f"{' (simulated in one process)' if run.manifest.get('simulate') else ''}, checkpoint step {run.step}",
             f"- model `{config['model.name']}` {json.dumps(run.manifest['model_kwargs'])}, data "
             f"`{config['data.name']}`, {config['data.batch_size']} examples per worker and step, seed "
             f"{config['run.seed']}, optimizer {config['optim.name']} (lr {config['optim.lr']})",
             f"- plan `{plan.fingerprint()[:16]}`: {plan.k} of {plan.world_size} workers hold each unit"]
    if rank is not None:
        held = plan.held_units(rank)
        lines.append(f"- worker {rank} held {len(held)} of {len(plan.holders)} units: "
                     + ", ".join(f"`{u}`" for u in held[:24]) + (" ..." if len(held) > 24 else ""))
    lines.append("- Subnetwork Data Parallelism: each worker trains only its subnetwork on its own data; each "
                 "parameter's gradient is averaged over the workers that hold it")
    return "\n".join(lines)


def _evaluated(run: RunWorkers, rank: int | None) -> str:
    summary = run.summary()
    if summary is None:
        return (f"No final evaluation of step {run.step} is recorded in {run.run_dir}/summary.json; evaluate it with "
                f"`subnetdp report {run.run_dir}`.")
    per_worker = summary.get("final_subnet_by_worker")
    final = summary.get("final_eval") or {}
    if rank is None:
        figures = {k.removeprefix("ensemble_"): v for k, v in final.items() if k.startswith("ensemble_")}
        what = "the ensemble of the N subnetworks (the log of the mean of their probabilities)"
    elif per_worker:
        figures, what = per_worker[rank], f"worker {rank}'s subnetwork"
    else:
        return "This run recorded only the mean, min and max over the workers' subnetworks."
    shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
    return (f"The run's final evaluation at step {run.step}, of {what} as trained (its own norm statistics), on "
            f"the held-out split of `{run.config['data.name']}`: {shown}. The exported model computes the same "
            "(the export compared their outputs before writing it).")


def _provenance(run: RunWorkers, rank: int | None) -> dict[str, Any]:
    title = (f"{run.config['model.name']} subnetwork of worker {rank} of {run.world_size}" if rank is not None
             else f"Ensemble of the {run.world_size} {run.config['model.name']} subnetworks")
    return {"title": title, "trained": _trained(run, rank), "evaluated": _evaluated(run, rank),
            "json": {"run": str(run.run_dir), "step": run.step, "strategy": run.manifest["strategy"],
                     "plan_fingerprint": run.simulator.plan.fingerprint(), "workers": run.world_size}}


@dataclass
class ExportedModels:
    path: Path
    step: int
    parameters: list[int]
    skipped: list[tuple[Path, str]]


def export_subnetwork(run_dir: Path, rank: int, out: Path, step: int | None = None,
                      overwrite: bool = False) -> ExportedModels:
    """Worker ``rank``'s subnetwork of ``run_dir``'s checkpoint as a standalone folder ``out``."""
    _check_out(run_dir, out, overwrite)
    run = load_run_workers(run_dir, step, rank)
    sub = run.standalone(rank)
    save_subnetwork(sub, out, _provenance(run, rank), overwrite=overwrite)
    return ExportedModels(out, run.step, [sub.num_parameters], run.skipped)


def export_ensemble(run_dir: Path, out: Path, step: int | None = None, overwrite: bool = False) -> ExportedModels:
    """All N subnetworks of ``run_dir``'s checkpoint and ensemble.json, in the folder ``out``."""
    _check_out(run_dir, out, overwrite)
    run = load_run_workers(run_dir, step)
    members = [run.standalone(r) for r in range(run.world_size)]
    save_ensemble(members, out, _provenance(run, None), [_provenance(run, r) for r in range(run.world_size)],
                  overwrite=overwrite)
    return ExportedModels(out, run.step, [m.num_parameters for m in members], run.skipped)


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Before the (long) rebuild: the folder can be written, and is not the run's or above it."""
    from ...export.folder import is_export_folder
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise ExportError(f"--out {out} is the run folder or holds it: choose a folder of its own")
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists: pass --overwrite to replace it, or choose another --out")
    if out.exists() and not is_export_folder(out):
        raise ExportError(f"--out {out} exists and is not a folder subnetdp exported (it holds other files): not "
                          "replacing it")

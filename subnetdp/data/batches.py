"""Deterministic, sharded batches for the training loop.

    data = ImageClassification(*load_fashion_mnist("train"), *load_fashion_mnist("test"), pad_to=32)
    x, y = data.train_batch(step, rank, world_size, batch_size=64, seed=0)   # this rank's slice
    for x, y in data.eval_batches(256, rank, world_size): ...                # this rank's test shard
    recalibrate_norm_statistics(model, data.calibration_batches(20, 64, seed=0))

    stream = TokenStream(train_ids, val_ids, seq_len=256)                     # or TokenData.stream()
    x, y = stream.train_batch(step, rank, world_size, batch_size=16, seed=0)  # y is x shifted by one

A batch is a pure function of (seed, step, rank, world_size, batch_size): no sampler state, so a
run resumed at step s sees exactly the batches the uninterrupted run saw from step s on.

Images follow DDP's DistributedSampler: each epoch is a permutation of the train set seeded by
(seed, epoch); step s of the epoch takes the next world_size * batch_size indices of it and rank r
the r-th block of batch_size, so the ranks' batches are disjoint and make up the global batch; the
remainder of an epoch is dropped. Tokens follow nanoGPT: each rank draws random window starts from
a generator seeded by (seed, step, rank). Evaluation gives each rank a contiguous shard, and the
shards cover the test set exactly once (their sizes differ by at most one example, so ranks may
yield different numbers of batches: reduce sums and counts after the loop, not per batch). A cap
(``max_batches``) keeps the first ``max_batches * batch_size`` examples or windows before sharding,
so the evaluated set does not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .synthetic import SyntheticImages

Batch = tuple[torch.Tensor, torch.Tensor]


def _generator(*parts: object) -> torch.Generator:
    """A generator seeded by a stable hash of ``parts`` (Python's hash() differs per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _check(step: int, rank: int, world_size: int, batch_size: int) -> None:
    if step < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need step >= 0, batch_size >= 1 and 0 <= rank < world_size; got step={step}, "
                         f"batch_size={batch_size}, rank={rank}, world_size={world_size}")


def _shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items; sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def _per_channel(value: float | Sequence[float] | torch.Tensor, channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} needs 1 or {channels} values (one per channel), got {t.numel()}")
    return t.reshape(channels, 1, 1).clone()


class ImageClassification:
    """Train and test images (uint8 in [0, 255], or float) with integer labels.

    Images are [N, C, H, W] or [N, H, W] (one channel); they come out as float32
    [C, image_size, image_size], zero-padded (in pixel space, i.e. black, centred) to ``pad_to``
    and normalised per channel with ``mean``/``std`` (in [0, 1] units for uint8; computed from the
    unpadded train set when not given). ``augment`` turns on random crop (padding 4) and horizontal
    flip for training batches, drawn from (seed, step, rank).
    """

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, pad_to: int | None = None,
                 mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                 num_classes: int | None = None, augment: bool = False) -> None:
        train_images, test_images = self._nchw(train_images, "train"), self._nchw(test_images, "test")
        if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
            raise ValueError(f"images and labels differ in count: train {len(train_images)} vs "
                             f"{len(train_labels)}, test {len(test_images)} vs {len(test_labels)}")
        if train_images.shape[1:] != test_images.shape[1:]:
            raise ValueError(f"train images are {tuple(train_images.shape[1:])} but test images "
                             f"{tuple(test_images.shape[1:])}")
        channels, height, width = train_images.shape[1:]
        size = pad_to if pad_to is not None else height
        if size < max(height, width) or (pad_to is None and height != width):
            raise ValueError(f"images are {height}x{width}; pad_to={pad_to} must be at least "
                             f"{max(height, width)} (and is needed for non-square images)")
        self.in_channels, self.image_size = int(channels), int(size)
        self.train_size, self.test_size = len(train_images), len(test_images)
        self._scale = 1.0 / 255.0 if train_images.dtype == torch.uint8 else 1.0
        self.mean = _per_channel(self._channel_mean(train_images) if mean is None else mean, channels, "mean")
        self.std = _per_channel(self._channel_std(train_images) if std is None else std, channels, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {self.std.flatten().tolist()}")
        top, left = (size - height) // 2, (size - width) // 2
        pad = (left, size - width - left, top, size - height - top)
        self._train_x, self._test_x = F.pad(train_images, pad), F.pad(test_images, pad)  # stays uint8
        self._train_y = torch.as_tensor(train_labels, dtype=torch.int64)
        self._test_y = torch.as_tensor(test_labels, dtype=torch.int64)
        found = int(max(self._train_y.max(), self._test_y.max())) + 1
        self.num_classes = found if num_classes is None else num_classes
        if self.num_classes < found or int(min(self._train_y.min(), self._test_y.min())) < 0:
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, found 0..{found - 1}")
        self.augment = augment
        self._perm_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    @staticmethod
    def _nchw(images: torch.Tensor, what: str) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"{what} images must be [N, C, H, W] or [N, H, W], got {tuple(images.shape)}")
        return images

    def _channel_mean(self, images: torch.Tensor) -> torch.Tensor:
        # Chunked, in float64: the whole set as float32 would be 4x the uint8 memory.
        total = sum(c.double().sum(dim=(0, 2, 3)) for c in images.split(4096))
        return total / (images.numel() / images.shape[1]) * self._scale

    def _channel_std(self, images: torch.Tensor) -> torch.Tensor:
        mean = self._channel_mean(images).reshape(1, -1, 1, 1) / self._scale
        total = sum(((c.double() - mean) ** 2).sum(dim=(0, 2, 3)) for c in images.split(4096))
        return (total / (images.numel() / images.shape[1])).sqrt() * self._scale

    def _prepare(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = raw.float() * self._scale
        if generator is not None:
            x = self._crop_and_flip(x, generator)
        return (x - self.mean) / self.std

    @staticmethod
    def _crop_and_flip(x: torch.Tensor, g: torch.Generator, padding: int = 4) -> torch.Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x, (padding,) * 4)  # black border, as torchvision's RandomCrop(padding=4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        rows = dy[:, None] + torch.arange(h)  # [n, h]
        cols = dx[:, None] + torch.arange(w)  # [n, w]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        steps = self.train_size // (world_size * batch_size)
        if steps == 0:
            raise ValueError(f"the global batch ({world_size} x {batch_size}) is larger than the "
                             f"train set ({self.train_size} examples)")
        return steps

    def _permutation(self, seed: int, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != (seed, epoch):
            perm = torch.randperm(self.train_size, generator=_generator("epoch", seed, epoch))
            self._perm_cache = ((seed, epoch), perm)
        return self._perm_cache[1]

    def train_indices(self, step: int, rank: int, world_size: int, batch_size: int, seed: int) -> torch.Tensor:
        """Train-set indices of rank's slice of the global batch of ``step``."""
        _check(step, rank, world_size, batch_size)
        epoch, i = divmod(step, self.steps_per_epoch(world_size, batch_size))
        start = (i * world_size + rank) * batch_size
        return self._permutation(seed, epoch)[start: start + batch_size]

    def train_batch(self, step: int, rank: int, world_size: int, batch_size: int, seed: int) -> Batch:
        """(x float32 [batch_size, C, S, S], y int64 [batch_size]) for rank at ``step``."""
        idx = self.train_indices(step, rank, world_size, batch_size, seed)
        g = _generator("augment", seed, step, rank) if self.augment else None
        return self._prepare(self._train_x[idx], g), self._train_y[idx]

    def eval_size(self, batch_size: int, max_batches: int | None = None) -> int:
        """Test examples evaluated in all: the whole test set, or its first ``max_batches *
        batch_size`` examples."""
        return self.test_size if max_batches is None else min(self.test_size, max_batches * batch_size)

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1,
                     max_batches: int | None = None) -> Iterator[Batch]:
        """This rank's contiguous shard of the test set (of its first ``max_batches * batch_size``
        examples: the same examples whatever world_size), in batches of at most ``batch_size``."""
        start, end = _shard(self.eval_size(batch_size, max_batches), rank, world_size)
        for i in range(start, end, batch_size):
            j = min(i + batch_size, end)
            yield self._prepare(self._test_x[i:j]), self._test_y[i:j]

    def calibration_batches(self, count: int, batch_size: int, seed: int, rank: int = 0,
                            world_size: int = 1) -> Iterator[torch.Tensor]:
        """``count`` batches of train inputs (no labels, no augmentation), e.g. to re-estimate
        BatchNorm statistics with ``engine.evaluation.recalibrate_norm_statistics``; with
        ``world_size`` > 1, rank's share of them (batches rank, rank + world_size, ...)."""
        perm = torch.randperm(self.train_size, generator=_generator("calibration", seed))
        for b in range(rank, count, world_size):
            idx = perm[torch.arange(b * batch_size, (b + 1) * batch_size) % self.train_size]
            yield self._prepare(self._train_x[idx])


class TokenStream:
    """Next-token batches from a train and a validation token sequence (1-D int64)."""

    def __init__(self, train_tokens: torch.Tensor, val_tokens: torch.Tensor, seq_len: int,
                 vocab_size: int | None = None) -> None:
        self.train_tokens = torch.as_tensor(train_tokens, dtype=torch.int64)
        self.val_tokens = torch.as_tensor(val_tokens, dtype=torch.int64)
        for name, t in (("train", self.train_tokens), ("validation", self.val_tokens)):
            if t.dim() != 1 or len(t) <= seq_len:
                raise ValueError(f"{name} tokens must be 1-D and longer than seq_len={seq_len} "
                                 f"(a window plus its next token), got shape {tuple(t.shape)}")
        self.seq_len = seq_len
        found = int(max(self.train_tokens.max(), self.val_tokens.max())) + 1
        self.vocab_size = found if vocab_size is None else vocab_size
        if self.vocab_size < found:
            raise ValueError(f"token ids go up to {found - 1}, beyond vocab_size={vocab_size}")
        self.train_size = len(self.train_tokens)
        self._window = torch.arange(seq_len + 1)

    def train_batch(self, step: int, rank: int, world_size: int, batch_size: int, seed: int) -> Batch:
        """(x, y) int64 [batch_size, seq_len], y = x shifted by one token; random window starts
        drawn from (seed, step, rank)."""
        _check(step, rank, world_size, batch_size)
        g = _generator("tokens", seed, step, rank)
        starts = torch.randint(0, self.train_size - self.seq_len, (batch_size,), generator=g)
        w = self.train_tokens[starts[:, None] + self._window]
        return w[:, :-1], w[:, 1:]

    def eval_size(self, batch_size: int, max_batches: int | None = None) -> int:
        """Validation windows evaluated in all: every non-overlapping window, or the first
        ``max_batches * batch_size`` of them."""
        windows = (len(self.val_tokens) - 1) // self.seq_len
        return windows if max_batches is None else min(windows, max_batches * batch_size)

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1,
                     max_batches: int | None = None) -> Iterator[Batch]:
        """Non-overlapping consecutive windows of the validation tokens, this rank's contiguous
        share. ``max_batches`` caps the windows at the first ``max_batches * batch_size`` (over all
        ranks together, so the evaluated set is the same whatever world_size)."""
        start, end = _shard(self.eval_size(batch_size, max_batches), rank, world_size)
        for i in range(start, end, batch_size):
            starts = torch.arange(i, min(i + batch_size, end)) * self.seq_len
            w = self.val_tokens[starts[:, None] + self._window]
            yield w[:, :-1], w[:, 1:]


class SyntheticImageData(ImageClassification):
    """Fixed train and test sets of ``SyntheticImages`` (class templates plus noise): learnable
    within a few dozen steps, no download. Already roughly standardised, so not normalised again."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 32, train_size: int = 8192,
                 test_size: int = 1024, noise: float = 1.5, seed: int = 0, augment: bool = False) -> None:
        source = SyntheticImages(num_classes, channels, size, noise, seed)
        x_train, y_train = source.batch(train_size, step=0, split="train")
        x_test, y_test = source.batch(test_size, step=0, split="test")
        super().__init__(x_train, y_train, x_test, y_test, mean=0.0, std=1.0,
                         num_classes=num_classes, augment=augment)


class SyntheticTokenData(TokenStream):
    """A random pattern of ``period`` tokens repeated, each token replaced by a random one with
    probability ``noise``: a small model learns it (loss falls towards the noise's entropy)."""

    def __init__(self, vocab_size: int = 64, seq_len: int = 64, period: int = 16, noise: float = 0.1,
                 train_tokens: int = 65536, val_tokens: int = 8192, seed: int = 0) -> None:
        g = _generator("synthetic-tokens", seed)
        n = train_tokens + val_tokens
        pattern = torch.randint(0, vocab_size, (period,), generator=g)
        tokens = pattern.repeat(n // period + 1)[:n]
        replace = torch.rand(n, generator=g) < noise
        tokens[replace] = torch.randint(0, vocab_size, (int(replace.sum()),), generator=g)
        super().__init__(tokens[:train_tokens], tokens[train_tokens:], seq_len, vocab_size)

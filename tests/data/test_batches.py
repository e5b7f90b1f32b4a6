import pytest
import torch

from subnetdp.data import SyntheticImages
from subnetdp.data.batches import ImageClassification, SyntheticImageData, SyntheticTokenData, TokenStream


def _indexed(n_train=100, n_test=23, size=28, channels=None):
    """Images whose first pixel encodes their index, so batches can be traced back."""
    shape = (size, size) if channels is None else (channels, size, size)
    train = torch.zeros(n_train, *shape, dtype=torch.uint8)
    test = torch.zeros(n_test, *shape, dtype=torch.uint8)
    train.view(n_train, -1)[:, 0] = torch.arange(n_train, dtype=torch.uint8)
    test.view(n_test, -1)[:, 0] = torch.arange(n_test, dtype=torch.uint8)
    return train, torch.arange(n_train) % 10, test, torch.arange(n_test) % 10


def test_image_padding_and_attributes():
    data = ImageClassification(*_indexed(), pad_to=32, mean=0.0, std=1.0)
    assert (data.in_channels, data.image_size, data.num_classes, data.train_size) == (1, 32, 10, 100)
    x, y = data.train_batch(0, 0, 1, 8, seed=0)
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # zero border of 2 pixels; the image's first pixel lands at (2, 2)
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, :, -2:].abs().sum() == 0
    assert torch.allclose(x[:, 0, 2, 2] * 255, data.train_indices(0, 0, 1, 8, 0).float())


def test_normalisation_from_train_set():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    data = ImageClassification(x, torch.zeros(64), x[:4], torch.zeros(4))
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(data.mean.flatten().double(), ref.mean(1), atol=1e-6)
    assert torch.allclose(data.std.flatten().double(), ref.std(1, correction=0), atol=1e-6)
    xb = data.train_batch(0, 0, 1, 64, 0)[0]  # the whole train set: standardised per channel
    assert xb.mean(dim=(0, 2, 3)).abs().max() < 1e-5 and (xb.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-4


def test_train_batches_deterministic_disjoint_and_cover():
    data = ImageClassification(*_indexed(), pad_to=32)
    ws, bs = 4, 5
    a = data.train_batch(3, 2, ws, bs, seed=7)
    b = ImageClassification(*_indexed(), pad_to=32).train_batch(3, 2, ws, bs, seed=7)  # fresh: same
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(data.train_indices(3, 2, ws, bs, 8), data.train_indices(3, 2, ws, bs, 7))
    # The ranks' slices are disjoint; per epoch, the steps visit each index at most once.
    steps = data.steps_per_epoch(ws, bs)
    assert steps == 100 // 20
    seen = torch.cat([data.train_indices(s, r, ws, bs, 7) for s in range(steps) for r in range(ws)])
    assert len(seen) == 100 and len(set(seen.tolist())) == 100
    # The global batch is the same consecutive indices whatever the split into ranks.
    one = data.train_indices(1, 0, 1, ws * bs, 7)
    assert torch.equal(torch.cat([data.train_indices(1, r, ws, bs, 7) for r in range(ws)]), one)


def test_epoch_rollover():
    data = ImageClassification(*_indexed(n_train=50), pad_to=32)
    ws, bs = 2, 8  # 16 per step: 3 steps per epoch, 2 examples dropped
    assert data.steps_per_epoch(ws, bs) == 3
    epoch0 = torch.cat([data.train_indices(s, r, ws, bs, 0) for s in range(3) for r in range(ws)])
    epoch1 = torch.cat([data.train_indices(s, r, ws, bs, 0) for s in range(3, 6) for r in range(ws)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)  # a new permutation
    # epoch 1's order is a fixed function of (seed, epoch): the same in a fresh object (nothing
    # cached from epoch 0) and in every process and run (no Python hash(); checked under several
    # PYTHONHASHSEEDs), so a resumed run draws the batches the uninterrupted one would have
    fresh = ImageClassification(*_indexed(n_train=50), pad_to=32)
    assert torch.equal(fresh.train_indices(3, 0, ws, bs, 0), data.train_indices(3, 0, ws, bs, 0))
    assert data.train_indices(3, 0, ws, bs, 0).tolist() == [49, 31, 45, 26, 24, 8, 46, 5]
    with pytest.raises(ValueError, match="larger than the train set"):
        data.train_batch(0, 0, 8, 8, 0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        data.train_batch(0, 2, 2, 8, 0)


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_eval_shards_cover_test_set_once(world_size):
    data = ImageClassification(*_indexed(n_test=23), pad_to=32, mean=0.0, std=1.0)
    got = []
    for r in range(world_size):
        for x, y in data.eval_batches(4, r, world_size):
            assert len(x) <= 4
            got += (x[:, 0, 2, 2] * 255).round().long().tolist()
    assert got == list(range(23))


@pytest.mark.parametrize("world_size", [1, 2, 4, 6])
def test_capped_evaluation_is_the_same_examples_for_any_world_size(world_size):
    """max_batches = 2 of 4 examples: the first 8 test images, split over the ranks (not 2 batches
    of each rank's own shard, which gave 6 ranks 12 batches)."""
    data = ImageClassification(*_indexed(n_test=23), pad_to=32, mean=0.0, std=1.0)
    got = [i for r in range(world_size) for x, _ in data.eval_batches(4, r, world_size, max_batches=2)
           for i in (x[:, 0, 2, 2] * 255).round().long().tolist()]
    assert got == list(range(8)) and data.eval_size(4, max_batches=2) == 8
    assert data.eval_size(4, max_batches=10) == 23 == data.eval_size(4)


def test_calibration_batches_split_over_ranks():
    data = ImageClassification(*_indexed(), pad_to=32)
    every = list(data.calibration_batches(5, 4, seed=1))
    shares = [list(data.calibration_batches(5, 4, 1, rank, 3)) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 1]
    assert all(torch.equal(shares[b % 3][b // 3], every[b]) for b in range(5))


def test_augmentation_deterministic():
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    data = ImageClassification(x, torch.zeros(40), x[:4], torch.zeros(4), augment=True)
    plain = ImageClassification(x, torch.zeros(40), x[:4], torch.zeros(4))
    a, b = data.train_batch(2, 1, 2, 8, 0)[0], data.train_batch(2, 1, 2, 8, 0)[0]
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32)
    assert not torch.equal(a, plain.train_batch(2, 1, 2, 8, 0)[0])
    assert not torch.equal(a, data.train_batch(3, 1, 2, 8, 0)[0])
    # evaluation is never augmented
    assert torch.equal(next(data.eval_batches(4))[0], next(plain.eval_batches(4))[0])


def test_calibration_batches():
    data = ImageClassification(*_indexed(), pad_to=32)
    a = list(data.calibration_batches(3, 16, seed=1))
    assert len(a) == 3 and all(x.shape == (16, 1, 32, 32) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, data.calibration_batches(3, 16, seed=1)))


def test_token_stream():
    train, val = torch.arange(1000), torch.arange(1000, 1103)
    s = TokenStream(train, val, seq_len=10)
    x, y = s.train_batch(5, 1, 2, 4, seed=0)
    assert x.shape == y.shape == (4, 10) and torch.equal(y, x + 1)  # consecutive ids: shifted by one
    assert torch.equal(x, s.train_batch(5, 1, 2, 4, seed=0)[0])
    assert not torch.equal(x, s.train_batch(5, 0, 2, 4, seed=0)[0])
    assert not torch.equal(x, s.train_batch(6, 1, 2, 4, seed=0)[0])
    # validation: 102 // 10 = 10 windows, non-overlapping, split over ranks, each once
    for ws in (1, 3):
        windows = [row[0].item() for r in range(ws) for xb, yb in s.eval_batches(3, r, ws) for row in xb]
        assert windows == [1000 + 10 * i for i in range(10)]
    assert sum(len(xb) for r in range(3) for xb, _ in s.eval_batches(2, r, 3, max_batches=2)) == 4
    with pytest.raises(ValueError, match="longer than seq_len"):
        TokenStream(train, val[:10], seq_len=10)


def test_synthetic_image_data():
    data = SyntheticImageData(num_classes=4, channels=3, size=16, train_size=64, test_size=10, seed=0)
    assert (data.in_channels, data.image_size, data.num_classes, data.train_size) == (3, 16, 4, 64)
    x, y = data.train_batch(0, 1, 2, 8, seed=0)
    assert x.shape == (8, 3, 16, 16) and y.max() < 4
    assert sum(len(y) for _, y in data.eval_batches(3, 0, 1)) == 10
    # built on SyntheticImages, whose own interface still works
    xs, ys = SyntheticImages(num_classes=4, channels=3, size=16).batch(5, step=1, shard=0, split="test")
    assert xs.shape == (5, 3, 16, 16)


def test_synthetic_token_data_is_learnable():
    s = SyntheticTokenData(vocab_size=32, seq_len=16, period=8, noise=0.1, train_tokens=4096, val_tokens=512)
    assert s.vocab_size == 32 and len(s.val_tokens) == 512
    x, y = s.train_batch(0, 0, 1, 8, seed=0)
    # the token `period` back predicts the next one (up to noise)
    assert (x[:, 8:] == x[:, :-8]).float().mean() > 0.7

"""ZeRO-3 of the shared weights (engine/shared_weights.py, ``shard_shared_weights=True``): the same
training as ``shard=True`` bit for bit, over virtual and real ranks, with each worker keeping 1/N
of the shared weights between uses; checkpoints, loads and assembly see the whole weights; the
gathers are counted in the bytes sent; the measured peak is lower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_families import CASES as FAMILIES
from test_model_families import train_steps

import subnetdp.checkpoint as sdp_checkpoint
from subnetdp import SDPConfigError, SubnetworkDataParallel, SubnetworkSimulator
from subnetdp.app.baselines import checkpoint_blocks
from subnetdp.measure.live import WorkerPeakTracker

from _dist import run_distributed
from _models import batch_for, family_plain_mlp, loss_of, make

WORKERS = 4
CASES = {
    "mlp-block": ("mlp", dict(blocks="blocks", coverage=0.5)),
    "resnet-block": ("resnet", dict(blocks="blocks", coverage=0.5)),      # BatchNorm, shared shortcuts
    "resnet-neuron": ("resnet", dict(neurons="blocks", coverage=0.5)),
    "llama-block": ("llama", dict(blocks="model.layers", coverage=0.5)),  # embedding, final norm, head
    "mlp-backward": ("mlp", dict(blocks="blocks", coverage=0.5, masking="backward")),
    # k = N: units are held by every worker; backward masking's weight sync reads them, so only the
    # shared ones are freed (forward masking frees them all: FSDP)
    "mlp-backward-all": ("mlp", dict(blocks="blocks", coverage=1.0, masking="backward")),
    "mlp-forward-all": ("mlp", dict(blocks="blocks", coverage=1.0)),
}


def _sim(case: str, shared: bool, **extra: object) -> tuple[SubnetworkSimulator, list]:
    kind, kwargs = CASES[case]
    options = {"bucket_cap_mb": 0.002, **kwargs, **extra}
    sim = SubnetworkSimulator(make(kind), WORKERS, shard=True, shard_shared_weights=shared, **options)  # type: ignore[arg-type]
    return sim, [torch.optim.AdamW(w.parameters(), lr=1e-2, weight_decay=0.1) for w in sim.workers]


def _step(sim: SubnetworkSimulator, opts: list, kind: str, step: int) -> None:
    for rank, worker in enumerate(sim.workers):
        x, y = batch_for(kind, 100 * step + rank)
        loss_of(kind, worker, x, y).backward()
    sim.sync_gradients()
    sim.clip_grad_norm_(0.05)
    for opt in opts:
        opt.step()
        opt.zero_grad()
    sim.sync_weights()


def _all_freed(sim: SubnetworkSimulator) -> bool:
    return all(not s.gathered for w in sim.workers for s in w.freed_shards)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("case", CASES)
def test_training_equals_sharding_without_it_bit_for_bit(case: str) -> None:
    kind = CASES[case][0]
    plain, plain_opts = _sim(case, shared=False)
    zero3, zero3_opts = _sim(case, shared=True)
    freed = zero3.workers[0].freed_shards
    assert freed and _all_freed(zero3)
    for step in range(3):
        _step(plain, plain_opts, kind, step)
        _step(zero3, zero3_opts, kind, step)
        assert _all_freed(zero3), f"step {step}: a shared buffer outlived the step"
        _assert_same(zero3.full_state_dict(), plain.full_state_dict())
    assert _all_freed(zero3)  # the assembly gathered them and freed them again
    # each worker keeps 1/N of the shared weights: the optimizer steps that part, nothing more
    shared = sum(s.bucket.numel for s in freed)
    assert sum(s.param.numel() for s in freed) == sum(s.size for s in freed) <= shared // WORKERS + len(freed)
    held = zero3.workers[0].held_bytes()["all_params"]  # float32: 4 bytes an entry
    assert held == plain.workers[0].held_bytes()["all_params"] - 4 * shared + 4 * sum(s.size for s in freed)


@pytest.mark.parametrize("family", [c for c in FAMILIES if c[1] is not family_plain_mlp], ids=lambda c: c[0])
def test_models_we_did_not_write_train_as_with_shard_alone(family: tuple) -> None:
    """Hugging Face LLaMA, GPT-2 (tied head), BERT and ViT, our ResNet, ViT (a class token and
    position embedding owned by a module) and LLaMA: two steps, the same weights bit for bit."""
    _, builder, path = family
    results = []
    for shared in (False, True):
        model, batch, loss = builder(0)
        model.train()
        sim = SubnetworkSimulator(model, WORKERS, blocks=path, coverage=0.5, shard=True, shard_shared_weights=shared)
        train_steps(sim, batch, loss, steps=2)
        results.append(sim.full_state_dict())
    assert sim.workers[0].freed_shards and _all_freed(sim)
    _assert_same(results[1], results[0])


def test_every_gathered_buffer_is_freed_after_an_evaluation_forward() -> None:
    sim, _ = _sim("llama-block", shared=True)
    worker = sim.workers[1]
    x, _ = batch_for("llama", 0)
    with torch.no_grad():
        worker.eval()
        out = worker(x).logits
        worker.train()
    assert torch.isfinite(out).all()
    assert _all_freed(sim)


def test_the_next_shared_module_is_prefetched_and_an_embedding_is_not_gathered_in_backward() -> None:
    """From the second step on, a module's gather starts the next one the previous pass needed
    (the head's starts at the final norm); backward gathers the head (its backward reads the
    weight) but not the embedding (an embedding's backward reads only the indices)."""
    sim, opts = _sim("llama-block", shared=True, bucket_cap_mb=25.0)
    worker = sim.workers[0]
    shared = worker.shared_weights
    assert shared is not None
    by_module = {name: next(s for s in worker.freed_shards if any(seg.tensor is p for seg in s.bucket.segments))
                 for name, p in [("embed", worker.module.model.embed_tokens.weight),
                                 ("head", worker.module.lm_head.weight)]}
    seen: list[tuple[int, bool]] = []
    worker.module.model.norm.register_forward_pre_hook(
        lambda module, args: seen.append((len(seen), by_module["head"].gathered)))
    gathers: list[tuple[str, str]] = []
    gather = shared.gather_fn

    def recording(shard):  # noqa: ANN001, ANN202 - a test double of the gather function
        name = next((n for n, s in by_module.items() if s is shard), "other")
        gathers.append((name, "backward" if torch._C._current_graph_task_id() != -1 else "forward"))
        return gather(shard)
    shared.gather_fn = recording
    for step in range(2):
        _step(sim, opts, "llama", step)
    assert [gathered for _, gathered in seen] == [False, True]  # prefetched on the second pass only
    per_step = len(gathers) // 2
    assert gathers[:per_step].count(("head", "backward")) == 1
    assert ("embed", "backward") not in gathers
    assert _all_freed(sim)


@pytest.mark.parametrize("case", ["resnet-block", "resnet-neuron"])
def test_activation_checkpointing_with_shared_weights_inside_the_blocks(case: str) -> None:
    """ResNet shortcuts are shared parameters inside blocks. Block level (k < N): only holders run
    and checkpoint a block, so its shortcut stays whole. Neuron level: every worker runs and
    checkpoints every block, the shortcuts are freed, and the recomputation in backward gathers
    them again. The result is unchanged either way."""
    results = []
    for shared in (False, True):
        sim, opts = _sim(case, shared=shared)
        for worker in sim.workers:
            blocks = ([p for p in worker.units.blocks if p in worker.held_units] if worker.level == "block"
                      else sorted({site.block for site in worker.units.sites}))
            checkpoint_blocks(worker.module, blocks)
        for step in range(2):
            _step(sim, opts, "resnet", step)
        results.append(sim.full_state_dict())
        if shared:
            assert _all_freed(sim)
            freed = {id(s.tensor) for shard in sim.workers[0].freed_shards for s in shard.bucket.segments}
            shortcut = dict(sim.workers[0].module.named_parameters())["blocks.2.downsample.0.weight"]
            assert (id(shortcut) in freed) == (case == "resnet-neuron")
    _assert_same(results[1], results[0])


def test_state_dict_loads_and_dcp_checkpoints_resume_exactly(tmp_path: Path) -> None:
    reference, ref_opts = _sim("llama-block", shared=True)
    for step in range(3):
        _step(reference, ref_opts, "llama", step)

    old, old_opts = _sim("llama-block", shared=True)
    for step in range(2):
        _step(old, old_opts, "llama", step)
    sdp_checkpoint.save(tmp_path / "ckpt", old, old_opts)
    assert _all_freed(old)
    new, new_opts = _sim("llama-block", shared=True)
    sdp_checkpoint.load(tmp_path / "ckpt", new, new_opts)
    assert _all_freed(new)
    _assert_same(new.full_state_dict(), old.full_state_dict())
    _step(new, new_opts, "llama", 2)
    _assert_same(new.full_state_dict(), reference.full_state_dict())

    # the same checkpoint loads without ZeRO-3, and a full state dict loads into ZeRO-3 workers
    plain, plain_opts = _sim("llama-block", shared=False)
    sdp_checkpoint.load(tmp_path / "ckpt", plain, plain_opts)
    _assert_same(plain.full_state_dict(), old.full_state_dict())
    fresh, _ = _sim("llama-block", shared=True)
    fresh.load_full_state_dict(reference.full_state_dict())
    assert _all_freed(fresh)
    _assert_same(fresh.full_state_dict(), reference.full_state_dict())


def test_the_peak_of_each_worker_is_lower() -> None:
    """Measured (WorkerPeakTracker, live tensors): the shared embedding and head are most of the
    tiny LLaMA's parameters, so keeping 1/N of them lowers each worker's peak."""
    peaks = {}
    for shared in (False, True):
        sim, opts = _sim("llama-block", shared=shared)
        _step(sim, opts, "llama", 0)
        state = {w.rank: list(w.module.parameters()) + list(w.parameters())
                 + [t for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
                 for w, o in zip(sim.workers, opts)}
        tracker = WorkerPeakTracker(state, {w.rank: list(w.module.parameters()) + list(w.parameters())
                                            for w in sim.workers})
        with tracker:
            for rank, worker in enumerate(sim.workers):
                with tracker.worker(rank):
                    x, y = batch_for("llama", rank)
                    loss_of("llama", worker, x, y).backward()
            sim.sync_gradients()
            for rank, opt in enumerate(opts):
                with tracker.worker(rank):
                    opt.step()
                    opt.zero_grad()
            sim.sync_weights()
        peaks[shared] = tracker.peaks
    for rank in range(WORKERS):
        assert peaks[True][rank] < peaks[False][rank], (rank, peaks)


def test_shard_shared_weights_needs_shard() -> None:
    with pytest.raises(SDPConfigError, match="shard=True too"):
        SubnetworkSimulator(make("mlp"), WORKERS, blocks="blocks", coverage=0.5, shard_shared_weights=True)


def _train_ranks(rank: int, world: int, case: str, folder: str, checkpointing: bool = False) -> dict:
    kind, kwargs = CASES[case]
    sdp = SubnetworkDataParallel(make(kind), shard=True, shard_shared_weights=True, bucket_cap_mb=0.002,
                                 timeout=60, **kwargs)
    if checkpointing:  # as `subnetdp train` and bench do: the blocks this worker holds
        checkpoint_blocks(sdp.module, [p for p in sdp.units.blocks if p in sdp.held_units])
    freed = sdp.freed_shards
    opt = torch.optim.AdamW(sdp.parameters(), lr=1e-2, weight_decay=0.1)
    # a forward gathers each shared buffer once and sends this worker's part of it
    before = sdp.comm_bytes
    with torch.no_grad():
        sdp.eval()  # BatchNorm statistics untouched: the simulator's workers run no such forward
        sdp(batch_for(kind, 0)[0])
        sdp.train()
    gathered = sdp.comm_bytes - before
    for step in range(3):
        x, y = batch_for(kind, 100 * step + rank)
        loss_of(kind, sdp, x, y).backward()
        sdp.clip_grad_norm_(0.05)
        opt.step()
        opt.zero_grad()
    # a DCP checkpoint of the real ranks loads into fresh ones with the same weights and moments
    sdp_checkpoint.save(folder, sdp, opt)
    again = SubnetworkDataParallel(make(kind), shard=True, shard_shared_weights=True, bucket_cap_mb=0.002,
                                   timeout=60, **kwargs)
    again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2, weight_decay=0.1)
    sdp_checkpoint.load(folder, again, again_opt)
    reloaded = again.full_state_dict()
    return {"full": sdp.full_state_dict(), "reloaded": reloaded, "gathered": gathered, "wire": sdp.wire_bytes,
            "part_bytes": sum(s.param.numel() * s.param.element_size() for s in freed),
            "freed": all(not s.gathered for s in freed)}


@pytest.mark.slow
@pytest.mark.parametrize("case,checkpointing", [("llama-block", False), ("resnet-block", True)])
def test_real_ranks_equal_the_simulator_count_the_gathers_and_checkpoint(tmp_path: Path, case: str,
                                                                         checkpointing: bool) -> None:
    """ResNet: shared shortcuts inside blocks that only some workers hold and recompute
    (activation checkpointing): every rank still issues the same gathers."""
    results = run_distributed(_train_ranks, WORKERS, case, str(tmp_path / "ckpt"), checkpointing)
    kind = CASES[case][0]
    sim, opts = _sim(case, shared=True)
    for worker in sim.workers if checkpointing else []:  # recomputing a block updates its BatchNorm again
        checkpoint_blocks(worker.module, [p for p in worker.units.blocks if p in worker.held_units])
    for step in range(3):
        _step(sim, opts, kind, step)
    expected = sim.full_state_dict()
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["full"], expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
        # (num_batches_tracked: recomputation counts a checkpointed block's batches twice on its
        # holders only, and a checkpoint keeps the count averaged over holders, not each worker's)
        _assert_same({k: v for k, v in result["reloaded"].items() if not k.endswith("num_batches_tracked")},
                     {k: v for k, v in result["full"].items() if not k.endswith("num_batches_tracked")})
        assert result["freed"]
        assert result["gathered"] == result["part_bytes"] > 0
        assert result["wire"] > 0

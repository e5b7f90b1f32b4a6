"""The single-process simulator: full-state round trips and C = 1 as plain large-batch training."""

from __future__ import annotations

import copy

import pytest
import torch

from subnetdp import SubnetworkSimulator

from _models import batch_for, loss_of, make


@pytest.mark.parametrize("kind,level,masking", [("resnet", "blocks", "forward"), ("llama", "neurons", "forward"),
                                                ("llama", "neurons", "backward"), ("mlp", "blocks", "backward")])
def test_full_state_round_trip(kind: str, level: str, masking: str) -> None:
    container = "model.layers" if kind == "llama" else "blocks"
    source = make(kind, seed=5).state_dict()
    sim = SubnetworkSimulator(make(kind, seed=0), 4, coverage=0.5, masking=masking, **{level: container})
    sim.load_full_state_dict(source)
    assembled = sim.full_state_dict()
    assert assembled.keys() == source.keys()
    for key in source:
        torch.testing.assert_close(assembled[key], source[key].to(assembled[key].dtype), msg=key)


def test_coverage_one_equals_large_batch_training() -> None:
    model = make("mlp")
    reference = copy.deepcopy(model)
    sim = SubnetworkSimulator(model, 3, blocks="blocks", coverage=1.0)
    opts = [torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9) for w in sim.workers]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        batches = [batch_for("mlp", 100 * step + r) for r in range(3)]
        for worker, (x, y) in zip(sim.workers, batches):
            loss_of("mlp", worker, x, y).backward()
        sim.sync_gradients()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss_of("mlp", reference, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for key, value in sim.full_state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_recalibration_sets_running_stats_to_the_batch_average() -> None:
    from subnetdp import recalibrate_norm_statistics
    model = make("resnet")
    batches = [batch_for("resnet", s)[0] for s in range(3)]
    assert recalibrate_norm_statistics(model, batches) == 3
    assert not model.training
    stem_bn = model.stem[1]
    with torch.no_grad():
        means = [model.stem[0](x).mean(dim=(0, 2, 3)) for x in batches]
    torch.testing.assert_close(stem_bn.running_mean, sum(means) / 3, rtol=1e-4, atol=1e-6)
    assert stem_bn.momentum == 0.1  # restored


def test_a_disconnected_plan_warns_and_a_connected_one_does_not() -> None:
    """k = 1 (C = 0.25 on 4 workers): no two workers share a unit; legal, said once at wrap time."""
    import warnings

    from subnetdp import DisconnectedPlanWarning
    from subnetdp.models import resnet18
    with pytest.warns(DisconnectedPlanWarning, match=r"coverage 0.25 on 4 workers gives k = 1 holder per unit"):
        SubnetworkSimulator(resnet18(width=4, in_channels=1), 4, blocks="blocks", coverage=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DisconnectedPlanWarning)
        SubnetworkSimulator(resnet18(width=4, in_channels=1), 4, blocks="blocks", coverage=0.5)

"""The ensemble of the N subnetworks as one module (subnetdp/export/ensemble.py): what the
simulator's ``ensemble_log_probs`` evaluates, sequential or in threads, saved and loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from subnetdp import Ensemble, SubnetworkSimulator, load_ensemble, save_ensemble, standalone_subnetwork
from subnetdp.models import vit

from _models import family_hf_llama


def _simulator() -> tuple[SubnetworkSimulator, torch.Tensor]:
    torch.manual_seed(0)
    model = vit("tiny32", image_size=16, dim=32, depth=4, heads=4, num_classes=5)
    return SubnetworkSimulator(model, 4, coverage=0.5, blocks="blocks"), torch.randn(6, 3, 16, 16)


@torch.no_grad()
def test_the_ensemble_equals_what_training_evaluates_in_sequence_and_in_threads() -> None:
    sim, x = _simulator()
    for w in sim.workers:
        w.eval()
    expected = sim.ensemble_log_probs([w(x) for w in sim.workers])
    members = [standalone_subnetwork(w).model for w in sim.workers]
    sequential = Ensemble(members)(x)
    parallel = Ensemble(members, parallel=True)(x)
    assert torch.allclose(sequential, expected, atol=1e-6)
    assert torch.equal(sequential, parallel)
    assert torch.allclose(sequential.exp().sum(-1), torch.ones(6))
    # the threads run under the caller's no_grad: no member builds an autograd graph
    assert not any(out.requires_grad for out in Ensemble(members, parallel=True).member_outputs(x))


@torch.no_grad()
def test_an_ensemble_folder_round_trips_and_each_member_loads_alone(tmp_path: Path) -> None:
    sim, x = _simulator()
    subs = [standalone_subnetwork(w, example_input=x) for w in sim.workers]
    out = save_ensemble(subs, tmp_path / "ens", {"title": "four", "trained": "here", "json": {"step": 3}})
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["members"] == [f"member-{r}" for r in range(4)] and spec["step"] == 3
    assert spec["parameters"] == sum(s.num_parameters for s in subs)
    ensemble = load_ensemble(out)
    assert not ensemble.training
    assert torch.equal(ensemble(x), Ensemble([s.model for s in subs])(x))
    assert torch.equal(load_ensemble(out, parallel=True)(x), ensemble(x))
    for r in range(4):
        assert (out / f"member-{r}" / "README.md").is_file() and (out / f"member-{r}" / "modeling_vit.py").is_file()
    assert "load_ensemble" in (out / "README.md").read_text()


@torch.no_grad()
def test_hugging_face_members_average_their_logits(tmp_path: Path) -> None:
    model, batch, _ = family_hf_llama(0)
    sim = SubnetworkSimulator(model, 2, coverage=0.5, blocks="model.layers")
    x = batch(1)[0]
    for w in sim.workers:
        w.eval()
    expected = sim.ensemble_log_probs([w(x).logits for w in sim.workers])
    out = save_ensemble([standalone_subnetwork(w, example_input=x) for w in sim.workers], tmp_path / "hf")
    assert torch.allclose(load_ensemble(out)(x), expected, atol=1e-6)


def test_threads_run_under_the_callers_autocast() -> None:
    members = [torch.nn.Linear(4, 3) for _ in range(2)]
    x = torch.randn(2, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = Ensemble(members, parallel=True).member_outputs(x)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 2


def test_refusals() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(FileNotFoundError, match="not an exported ensemble"):
        load_ensemble(Path("/nonexistent"))

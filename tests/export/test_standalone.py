"""A worker's subnetwork as a standalone plain model of its own class (subnetdp/export): it computes
exactly what the worker computed, loads strictly, and its folder loads without subnetdp
(Hugging Face: ``from_pretrained`` with no missing or unexpected keys)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetdp import SDPConfigError, SubnetworkSimulator, load_subnetwork, save_subnetwork, standalone_subnetwork
from subnetdp.export.standalone import pad_sites
from subnetdp.models import Llama, ResNet, ViT, llama, resnet18, vit

from _models import (
    family_bert,
    family_gpt2,
    family_hf_llama,
    family_hf_vit,
    family_llama,
    family_resnet18,
    family_vit,
    train_steps,
)

FAMILIES = [(family_resnet18, "blocks"), (family_vit, "blocks"), (family_llama, "layers"),
            (family_hf_llama, "model.layers"), (family_gpt2, "transformer.h"), (family_bert, "bert.encoder.layer"),
            (family_hf_vit, "vit.layers")]
NEURON_FAMILIES = FAMILIES[:4]  # the classes that can take fewer heads of the same size


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def trained(family, container: str, level: str = "block", workers: int = 4, **kwargs) -> tuple:
    """A simulator after two Adam steps (weights and norm statistics moved off their init) and a batch."""
    model, batch, loss = family(0)
    where = {("blocks" if level == "block" else "neurons"): container}
    sim = SubnetworkSimulator(model, workers, coverage=0.5, **where, **kwargs)
    train_steps(sim, batch, loss, train_mode=True)
    return sim, batch(7)[0]


@pytest.mark.parametrize("family,container", FAMILIES, ids=lambda v: getattr(v, "__name__", v))
def test_every_family_at_block_level_computes_what_each_worker_computed(family, container) -> None:
    sim, x = trained(family, container)
    for w in sim.workers:
        sub = standalone_subnetwork(w, example_input=x)
        assert sub.max_abs_difference == 0.0  # the same operations on the same weights
        assert type(sub.model) is type(w.module)
        held = set(w.held_units)
        assert [e.source for e in sub.blocks if e.kind == "block"] == [u for u in w.units.blocks if u in held]
        assert sub.num_parameters < sum(p.numel() for p in family(0)[0].parameters())


@pytest.mark.parametrize("family,container", NEURON_FAMILIES, ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("masking,scale", [("forward", "none"), ("forward", "inverse-coverage"), ("backward", "none")])
def test_neuron_level_and_backward_masking_and_train_time_scaling(family, container, masking, scale) -> None:
    sim, x = trained(family, container, "neuron", masking=masking, scale=scale)
    full = sum(p.numel() for p in family(0)[0].parameters())
    for w in sim.workers:
        sub = standalone_subnetwork(w, example_input=x)
        assert sub.max_abs_difference <= 1e-5
        # backward masking: the worker's forward runs the whole model, so its subnetwork is the whole model
        assert (sub.num_parameters == full) == (masking == "backward")


def test_a_resnet_subnetwork_keeps_the_projection_of_a_dropped_downsampling_block() -> None:
    sim, x = trained(family_resnet18, "blocks")
    shortcuts = 0
    for w in sim.workers:
        sub = standalone_subnetwork(w, example_input=x)
        kwargs = sub.config["kwargs"]
        assert sub.config["class"] == "ResNet" and isinstance(sub.model, ResNet)
        assert sum(kwargs["layers"]) == len(sub.blocks)
        assert kwargs["projection_blocks"] == [i for i, e in enumerate(sub.blocks) if e.kind == "shortcut"]
        shortcuts += len(kwargs["projection_blocks"])
        rebuilt = ResNet(**kwargs)
        rebuilt.load_state_dict(sub.model.state_dict(), strict=True)
    assert shortcuts > 0  # 3 downsampling blocks, each dropped by 2 of the 4 workers


def test_layers_holding_fewer_units_are_zero_padded_and_compute_the_same() -> None:
    # 3 workers, 3 layers of 2 KV heads: a worker holds 1 or 2 KV heads depending on the layer
    torch.manual_seed(0)
    model = llama("debug", n_layers=3, vocab_size=50, max_seq_len=16)
    sim = SubnetworkSimulator(model, 3, coverage=0.5, neurons="layers")
    x = torch.randint(0, 50, (2, 16))
    padded_any = False
    for w in sim.workers:
        sub = standalone_subnetwork(w, example_input=x)
        assert sub.max_abs_difference == 0.0
        padded_any |= bool(sub.padded_units)
        assert isinstance(sub.model, Llama)
    assert padded_any


def test_pad_sites_appends_zero_units_to_each_segment_of_a_fused_tensor() -> None:
    model = vit("tiny32", image_size=16, dim=32, depth=2, heads=4, num_classes=3)
    sim = SubnetworkSimulator(model, 3, coverage=0.5, neurons="blocks")
    state = {k: v.clone() for k, v in sim.workers[0].module.state_dict().items()}
    widths = [state[f"blocks.{i}.attn.qkv.weight"].shape[0] for i in range(2)]
    padded = pad_sites(state, sim.workers[0].units.sites)
    after = [state[f"blocks.{i}.attn.qkv.weight"].shape[0] for i in range(2)]
    assert len(set(after)) == 1 and max(widths) == after[0]
    for site, missing in padded.items():
        qkv = state[f"{site}.qkv.weight"] if site.endswith("attn") else None
        if qkv is not None:  # the zero rows end each of the q, k and v segments
            seg = qkv.shape[0] // 3
            for s in range(3):
                assert qkv[s * seg + seg - missing * 8: (s + 1) * seg].abs().sum() == 0


def test_a_class_that_cannot_take_fewer_heads_is_refused_by_name() -> None:
    sim, x = trained(family_gpt2, "transformer.h", "neuron")
    with pytest.raises(SDPConfigError, match="GPT2Config has no head_dim.*block level"):
        standalone_subnetwork(sim.workers[0], example_input=x)


def test_a_model_of_no_known_family_is_refused() -> None:
    from _models import make
    sim = SubnetworkSimulator(make("mlp"), 2, coverage=0.5, blocks="blocks")
    with pytest.raises(SDPConfigError, match="no exporter for ResidualMLP"):
        standalone_subnetwork(sim.workers[0])


def test_a_subnetwork_differing_from_the_worker_is_an_error() -> None:
    sim, x = trained(family_vit, "blocks")
    worker = sim.workers[0]
    sub = standalone_subnetwork(worker)
    with torch.no_grad():
        sub.model.head.bias.add_(1.0)
    from subnetdp.export.standalone import compare
    with pytest.raises(SDPConfigError, match="computes something else"):
        compare(worker, sub.model, x)


@pytest.mark.parametrize("family,container", [(family_hf_llama, "model.layers")], ids=["hf-llama"])
@pytest.mark.parametrize("level", ["block", "neuron"])
def test_a_hugging_face_subnetwork_loads_with_from_pretrained_and_no_missing_keys(family, container, level,
                                                                                  tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    sim, x = trained(family, container, level)
    sub = standalone_subnetwork(sim.workers[1], example_input=x)
    out = save_subnetwork(sub, tmp_path / "w1", {"title": "t", "trained": "trained here", "evaluated": "not"})
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    loaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((out / "config.json").read_text())
    layers = len(sub.blocks) if level == "block" else 2
    assert config["num_hidden_layers"] == layers
    if level == "neuron":
        assert config["num_key_value_heads"] * 2 == config["num_attention_heads"] < 4
        assert config["intermediate_size"] < 64
    with torch.no_grad():
        expected = _logits(sim.workers[1].module.eval()(x))
        assert torch.allclose(_logits(loaded.eval()(x)), expected, atol=1e-5)
        assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(out).eval()(x)), expected, atol=1e-5)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: \"transformers\"") and "trained here" in card
    assert "from_pretrained" in card


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize("make,container,x", [
    (lambda: resnet18(10, 1, 4), "blocks", torch.randn(2, 1, 16, 16)),
    (lambda: vit("tiny32", image_size=16, dim=32, depth=3, heads=4, num_classes=3), "blocks",
     torch.randn(2, 3, 16, 16)),
    (lambda: llama("debug", vocab_size=40, max_seq_len=16, tie_embeddings=True), "layers",
     torch.randint(0, 40, (2, 8))),
], ids=["resnet", "vit", "llama-tied"])
def test_our_models_load_from_their_folder_without_subnetdp(make, container, x, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sim = SubnetworkSimulator(make(), 3, coverage=0.5, blocks=container)
    sub = standalone_subnetwork(sim.workers[2], example_input=x)
    out = save_subnetwork(sub, tmp_path / "w2")
    assert isinstance(load_subnetwork(out), (ResNet, ViT, Llama))
    # as `subnetdp export`'s single files: the builder and its kwargs in the safetensors metadata
    from safetensors import safe_open
    from safetensors.torch import load_file

    from subnetdp.app.builders import rebuild_model
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    rebuild_model(meta["model"], json.loads(meta["model_kwargs"])).load_state_dict(
        load_file(str(out / "model.safetensors")), strict=True)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(_logits(sub.model(x)), tmp_path / "expected.pt")
    # the model card's own snippet, run where subnetdp cannot be imported
    code = ("import sys\nsys.modules['subnetdp'] = None\nimport torch\n" + _snippet((out / "README.md").read_text())
            + f"\nx = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"assert torch.equal(model(x), torch.load({str(tmp_path / 'expected.pt')!r}))\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_existing_folder_is_replaced_only_when_asked_and_only_if_it_is_an_export(tmp_path: Path) -> None:
    sim, x = trained(family_vit, "blocks")
    sub = standalone_subnetwork(sim.workers[0])
    out = save_subnetwork(sub, tmp_path / "w0")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_subnetwork(sub, out)
    save_subnetwork(sub, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0"]  # nothing left beside it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "config.json").write_text("{}")  # a run folder, someone's model: a config.json alone is no export
    with pytest.raises(FileExistsError, match="not a folder subnetdp exported"):
        save_subnetwork(sub, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    (out / "extra.txt").write_text("mine")  # an export with a file of the user's in it is kept too
    with pytest.raises(FileExistsError, match="not a folder subnetdp exported"):
        save_subnetwork(sub, out, overwrite=True)

"""A standalone model as a folder that loads without subnetdp, and back.

    save_subnetwork(sub, "exports/r18-w2", card={...})    # config.json, model.safetensors, README.md
    model = load_subnetwork("exports/r18-w2")              # the plain model, eval mode

Hugging Face models: ``save_pretrained`` writes config.json and model.safetensors, so
``AutoModelForCausalLM.from_pretrained(folder)`` (or the class's own) loads it with no missing or
unexpected keys, and the folder is what ``push_to_hub`` uploads. Models of ``subnetdp.models``:
config.json names the class and its constructor arguments, and a copy of the class's source file
(``modeling_<family>.py``, torch only) lies beside the weights, so the folder loads with or without
subnetdp installed (README.md shows both). Every folder has a model card (README.md) saying how the
model was trained and evaluated.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.errors import SDPConfigError
from .standalone import Standalone

FORMAT = 1  # config.json's "subnetdp_export" for models of subnetdp.models
_WRITTEN = ("*.json", "*.safetensors", "README.md", "modeling_*.py")  # the files of an export folder


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an export this package wrote (its marker file), and nothing else
    but what an export writes: only such a folder is ever replaced."""
    def marked(path: Path, key: str) -> bool:
        try:
            return key in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            return False

    def written(path: Path) -> bool:  # what an export writes (save_pretrained: also sharded weights, indexes)
        return path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in _WRITTEN)

    if not folder.is_dir():
        return False
    if marked(folder / "ensemble.json", "subnetdp_ensemble"):
        return all(written(p) or (p.is_dir() and p.name.startswith("member-") and is_export_folder(p))
                   for p in folder.iterdir())
    return (marked(folder / "config.json", "subnetdp_export") or (folder / "subnetdp_export.json").is_file()) \
        and all(written(p) for p in folder.iterdir())


def _writable(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that exists unless ``overwrite`` and it is an export folder
    (``is_export_folder``): a run folder, a model of someone else's or any other files are never
    replaced."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it, or choose "
                                  "another folder")
        if not is_export_folder(out):
            raise FileExistsError(f"{out} exists and is not a folder subnetdp exported (it holds other files): not "
                                  "replacing it")


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` (complete) renamed to ``out``; an old ``out`` is removed only after that succeeded,
    and put back if it did not."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _card(front: dict[str, Any], title: str, sections: list[tuple[str, str]]) -> str:
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items()] + ["---", "", f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", body.strip(), ""]
    return "\n".join(lines)


def _load_snippet(folder: str, sub: Standalone, modeling: str | None) -> str:
    if modeling is None:
        cls = (sub.config.get("architectures") or [type(sub.model).__name__])[0]
        return (f"```python\nfrom transformers import {cls}\n\nmodel = {cls}.from_pretrained(\"{folder}\")  "
                "# no subnetdp needed\n```")
    cfg = sub.config
    build = (f"mod.{cfg['class']}(mod.{cfg['config_class']}(**config[\"kwargs\"]))" if "config_class" in cfg
             else f"mod.{cfg['class']}(**config[\"kwargs\"])")
    return f"""```python
import importlib.util, json, sys
import safetensors.torch

config = json.load(open("{folder}/config.json"))
# the model's source, copied beside the weights (torch only): no subnetdp needed
spec = importlib.util.spec_from_file_location("{modeling[:-3]}", "{folder}/{modeling}")
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
# with subnetdp installed, instead: import {cfg['module']} as mod
model = {build}
model.load_state_dict(safetensors.torch.load_file("{folder}/model.safetensors"))  # strict
model.eval()
```
Or `subnetdp.load_subnetwork("{folder}")`, which does the same."""


def model_card(sub: Standalone, folder_name: str, provenance: dict[str, Any] | None = None,
               modeling: str | None = None) -> str:
    """A Hugging Face model card: what the model is, how it was trained and evaluated (from
    ``provenance``: "trained", "evaluated" and "title", markdown), and how to load it."""
    provenance = provenance or {}
    what = [f"- class `{type(sub.model).__name__}`, {sub.num_parameters:,} parameters"]
    if sub.rank is not None:
        what.append(f"- worker {sub.rank}'s subnetwork of a model trained with Subnetwork Data Parallelism (SDP)")
    if sub.blocks:
        kept = ", ".join(f"`{e.source}`" + (" (its shortcut only)" if e.kind == "shortcut" else "") for e in sub.blocks)
        what.append(f"- blocks kept, in order: {kept}")
    if sub.removed:
        what.append(f"- blocks removed (this worker did not hold them): {', '.join(f'`{p}`' for p in sub.removed)}")
    if sub.padded_units:
        what.append(f"- zero-padded units (exactly zero output; counted in the parameters): {sub.padded_units}")
    front = {"library_name": "transformers" if modeling is None else "pytorch",
             "tags": ["subnetdp", "subnetwork-data-parallelism"]}
    sections = [("What this is", "\n".join(what))]
    if provenance.get("trained"):
        sections.append(("How it was trained", provenance["trained"]))
    if provenance.get("evaluated"):
        sections.append(("How it was evaluated", provenance["evaluated"]))
    sections.append(("Load it", _load_snippet(folder_name, sub, modeling)))
    return _card(front, provenance.get("title", f"{type(sub.model).__name__} subnetwork"), sections)


def _safetensors() -> Any:
    """``safetensors.torch``: the one package the folders need beyond torch (the ``app`` extra)."""
    try:
        import safetensors.torch
    except ImportError as exc:
        raise SDPConfigError("exported folders hold safetensors weights: pip install safetensors "
                             "(or 'subnetdp[app]')") from exc
    return safetensors.torch


def _write(sub: Standalone, tmp: Path, folder_name: str, provenance: dict[str, Any] | None) -> None:
    save_file = _safetensors().save_file
    tmp.mkdir(parents=True)
    info = {"rank": sub.rank, "blocks": [e.__dict__ for e in sub.blocks], "removed": sub.removed,
            "padded_units": sub.padded_units, "parameters": sub.num_parameters, **(provenance or {}).get("json", {})}
    if sub.family.name == "huggingface":
        # transformers 5 writes only on rank 0 of an initialised process group; this is the rank's own model
        sub.model.should_save_on_this_rank = lambda is_main_process: True  # type: ignore[assignment]
        try:
            sub.model.save_pretrained(str(tmp))  # type: ignore[operator]
        finally:
            del sub.model.should_save_on_this_rank
        (tmp / "subnetdp_export.json").write_text(json.dumps(info, indent=1))
        modeling = None
    else:
        source = Path(inspect.getsourcefile(type(sub.model)) or "")
        modeling = f"modeling_{sub.family.name}.py"
        shutil.copyfile(source, tmp / modeling)
        config = {"subnetdp_export": FORMAT, "family": sub.family.name, **sub.config, "modeling_file": modeling,
                  "subnetwork": info}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        # clones: tied tensors (one storage under two keys) are written twice, so load_state_dict reads both
        # the metadata `subnetdp export`'s single files carry too: subnetdp.app.builders.rebuild_model(model,
        # model_kwargs), or subnetdp.models.<model>(**model_kwargs), builds the model they load into
        save_file({k: v.detach().contiguous().clone() for k, v in sub.model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt", "model": sub.config["builder"],
                                                            "model_kwargs": json.dumps(sub.config["kwargs"])})
    (tmp / "README.md").write_text(model_card(sub, folder_name, provenance, modeling))


def save_subnetwork(sub: Standalone, out: str | Path, provenance: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``sub`` as a folder ``out`` (written beside it, then renamed into place). An existing
    ``out`` is replaced only with ``overwrite`` and only if it is an export folder."""
    given, out = Path(out), Path(out).resolve()  # resolved: "." has no name to write beside
    _writable(out, overwrite)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        _write(sub, tmp, str(given), provenance)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _import_class(folder: Path, config: dict[str, Any]) -> Any:
    try:
        return importlib.import_module(config["module"])
    except ImportError:  # subnetdp not installed: the copy of the source beside the weights
        spec = importlib.util.spec_from_file_location(config["modeling_file"][:-3], folder / config["modeling_file"])
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module


def load_subnetwork(folder: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """The plain model in an export folder, in eval mode: a ``subnetdp.models`` class from
    config.json and model.safetensors, or a Hugging Face model through its class's ``from_pretrained``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported model (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if "subnetdp_export" in config:
        load_file = _safetensors().load_file
        module = _import_class(folder, config)
        cls = getattr(module, config["class"])
        model = (cls(getattr(module, config["config_class"])(**config["kwargs"])) if "config_class" in config
                 else cls(**config["kwargs"]))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    else:
        try:
            import transformers
        except ImportError as exc:
            raise SDPConfigError(f"{folder} is a Hugging Face model: pip install transformers to load it") from exc
        architecture = (config.get("architectures") or [None])[0]
        if architecture is None or not hasattr(transformers, architecture):
            raise SDPConfigError(f"{folder}/config.json names no transformers class (architectures: "
                                 f"{config.get('architectures')})")
        # the dtype it was saved in (transformers 4 loads float32 unless asked; 5 renamed the argument)
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = getattr(transformers, architecture).from_pretrained(str(folder), **{dtype_arg: "auto"})
    if device is not None:
        model.to(device)
    return model.eval()

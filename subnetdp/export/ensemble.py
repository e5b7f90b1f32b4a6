"""The ensemble of the N subnetworks as one module: the log of the mean of their predicted
probabilities, what ``SubnetworkDataParallel.ensemble_log_probs`` evaluates during training.

    save_ensemble([standalone_subnetwork(w) for w in sim.workers], "exports/r18-ensemble")
    ensemble = load_ensemble("exports/r18-ensemble")            # members one after another
    ensemble = load_ensemble("exports/r18-ensemble", parallel=True)   # members in threads
    log_probs = ensemble(x)                                       # [..., classes]

The folder holds one export folder per member (``member-R``, each loadable on its own: folder.py)
and ensemble.json, which lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .folder import _card, _replace, _writable, _write, load_subnetwork
from .standalone import Standalone

FORMAT = 1


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


class Ensemble(nn.Module):
    """Members evaluated on the same input; ``forward`` returns the log of the mean of their
    softmax probabilities (float32; a probability that underflows to 0 in every member is the
    smallest positive float, not -inf). ``parallel``: each member in a thread of its own (torch
    releases the GIL inside its operators), else one after another."""

    def __init__(self, members: Sequence[nn.Module], parallel: bool = False) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.parallel = parallel

    def member_outputs(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Each member's logits, in member order."""
        if not self.parallel or len(self.members) == 1:
            return [_logits(m(*args, **kwargs)) for m in self.members]
        # grad, inference and autocast modes are per thread: each member runs under the caller's
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        casts = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]

        def run(member: nn.Module) -> Any:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode(inference))
                stack.enter_context(torch.set_grad_enabled(grad))
                for device, dtype in casts:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                return member(*args, **kwargs)

        with ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            futures = [pool.submit(run, m) for m in self.members]
            return [_logits(f.result()) for f in futures]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.combine(self.member_outputs(*args, **kwargs))

    @staticmethod
    def combine(logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The log of the mean of the softmax probabilities of ``logits`` (one per member, summed
        in member order, as the simulator's sum), float32, clamped off zero."""
        total: torch.Tensor | None = None
        for member in logits:
            probs = torch.softmax(member.float(), dim=-1)
            total = probs if total is None else total + probs
        if total is None:
            raise ValueError("an ensemble needs at least one member")
        mean = total / len(logits)
        return mean.clamp_min_(torch.finfo(mean.dtype).tiny).log_()


def save_ensemble(members: Sequence[Standalone], out: str | Path, provenance: dict[str, Any] | None = None,
                  member_provenance: Sequence[dict[str, Any]] | None = None, overwrite: bool = False) -> Path:
    """Write the members (``member-R`` folders) and ensemble.json and a model card to ``out``."""
    given, out = Path(out), Path(out).resolve()  # resolved: "." has no name to write beside
    _writable(out, overwrite)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        names = []
        for i, member in enumerate(members):
            name = member_name(member.rank if member.rank is not None else i)
            _write(member, tmp / name, str(given / name), (member_provenance or [{}] * len(members))[i])
            names.append(name)
        write_ensemble_index(tmp, names, [(type(m.model).__name__, m.num_parameters) for m in members], provenance,
                             shown_as=given)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def member_name(rank: int) -> str:
    return f"member-{rank}"


def write_ensemble_index(folder: Path, names: list[str], members: list[tuple[str, int]],
                         provenance: dict[str, Any] | None = None, shown_as: Path | None = None) -> None:
    """ensemble.json and the model card of an ensemble whose member folders ``names`` (each
    (class name, parameters) in ``members``) are already in ``folder``: what ``load_ensemble``
    reads. Each rank of a real run writes its own member folder first (SDPTrainer.save_subnetworks)."""
    provenance = provenance or {}
    shown = shown_as or folder
    (folder / "ensemble.json").write_text(json.dumps(
        {"subnetdp_ensemble": FORMAT, "members": names, "parameters": sum(p for _, p in members),
         "combine": "log of the mean of the members' softmax probabilities", **provenance.get("json", {})}, indent=1))
    rows = "\n".join(f"| `{n}` | `{cls}` | {params:,} |" for n, (cls, params) in zip(names, members))
    sections = [("What this is", f"{len(members)} models whose predictions are averaged: the log of the mean of "
                 "their softmax probabilities.\n\n| member | class | parameters |\n|---|---|---|\n" + rows)]
    sections += [(h, provenance[k]) for h, k in (("How it was trained", "trained"),
                                                 ("How it was evaluated", "evaluated")) if provenance.get(k)]
    sections.append(("Load it", f"""```python
import subnetdp
ensemble = subnetdp.load_ensemble("{shown}")            # parallel=True: members in threads
log_probs = ensemble(x)
```
Each `member-R` folder also loads on its own (its README.md says how), without subnetdp; the
ensemble is the log of the mean of their softmax outputs."""))
    (folder / "README.md").write_text(_card({"library_name": "pytorch", "tags": ["subnetdp", "ensemble"]},
                                            provenance.get("title", f"Ensemble of {len(members)} subnetworks"),
                                            sections))


def load_ensemble(folder: str | Path, parallel: bool = False, device: str | torch.device | None = None) -> Ensemble:
    """The ensemble in ``folder`` (written by ``save_ensemble`` / ``subnetdp export --ensemble``)."""
    folder = Path(folder)
    if not (folder / "ensemble.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported ensemble (no ensemble.json)")
    spec = json.loads((folder / "ensemble.json").read_text())
    return Ensemble([load_subnetwork(folder / name, device) for name in spec["members"]], parallel=parallel).eval()

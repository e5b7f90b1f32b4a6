"""A run's processes: rank, world, device and the collectives `subnetdp train` needs beyond the
model's (``Context``), and the error a diverged run stops with."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ...engine.errors import CollectiveError
from ..config import Config, ConfigError
from ..runtime import choose_device


class DivergedError(RuntimeError):
    """The training loss or gradient norm became NaN or infinite: the run stops before that step's
    update, so nothing non-finite is applied or checkpointed."""

# ---------------------------------------------------------------------------------------------
# set-up


@dataclass
class Context:
    """Where this process sits: a real rank of a process group, or the one process of a simulation."""

    rank: int
    world_size: int                  # workers (virtual ones under --simulate)
    local_rank: int
    device: torch.device
    simulate: bool
    backend: str | None = None
    timeout: float | None = None     # run.timeout: how long a collective may take (named in its error)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """A collective that fails (a dead peer, or a stuck one past the timeout) raises one
        CollectiveError naming it, as the engine's collectives do."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes one clear error
            within = f" within {self.timeout:g}s" if self.timeout is not None else ""
            raise CollectiveError(f"rank {self.rank}: {what} over workers {list(range(self.world_size))} failed or "
                                  f"did not complete{within}; a peer has probably died or is stuck. "
                                  f"Backend said: {exc}") from exc

    @property
    def processes(self) -> int:
        """Processes of the run: the world size, or the one that plays every virtual worker."""
        return 1 if self.simulate else self.world_size

    def barrier(self) -> None:
        if not self.simulate:
            with self._collective("barrier"):
                dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (collective), on CPU."""
        if self.simulate:
            return values
        values = values.to(self.device if self.backend == "nccl" else "cpu")  # NCCL reduces GPU tensors only
        with self._collective("all_reduce of logged figures"):
            dist.all_reduce(values)
        return values.cpu()

    def gather(self, local: list[Any]) -> list[Any]:
        """Every worker's value in rank order, from this process's values of its local workers:
        a simulation holds them all; a real rank contributes its one (collective)."""
        if self.simulate:
            return local
        gathered: list[Any] = [None] * self.world_size
        with self._collective("all_gather of per-rank figures"):
            dist.all_gather_object(gathered, local[0])
        return gathered


def setup_context(config: Config, simulate: int | None) -> Context:
    run = config.section("run")
    torch.set_num_threads(run["threads"])
    if run["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[run] device = 'cuda' but torch sees no CUDA device")
    if simulate is not None:
        return Context(0, simulate, 0, choose_device(run["device"]), simulate=True)
    if "RANK" not in os.environ:
        raise ConfigError("not started by torchrun: use `subnetdp train CONFIG --workers N` (it calls "
                          "torchrun), `torchrun ... -m subnetdp.app.cli train CONFIG`, or --workers N --simulate")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = choose_device(run["device"], local_rank)
    cuda = device.type == "cuda"
    backend = run["backend"]
    if backend == "auto":  # NCCL refuses several ranks on one GPU ("Duplicate GPU detected")
        backend = "nccl" if cuda and local_world <= torch.cuda.device_count() else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError("[run] backend = 'nccl' needs CUDA devices; use gloo on CPU")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=run["timeout"]),
                            device_id=device if backend == "nccl" else None)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, simulate=False, backend=backend,
                   timeout=run["timeout"])

"""Multi-process training with PyTorch's process groups (``torchrun``; gloo on CPU, NCCL on CUDA).

Under DP every rank owns every ``world``-th privacy unit and puts each of its units into a
step's batch independently with probability q, from its own stream: the union over ranks is
exactly one Poisson batch of the whole training split at that q, so the accountant's history
and eps are those of the single-process run. Each rank clips its per-sample gradients and sums
them; Opacus' distributed optimizers add the Gaussian noise on rank 0 only (once for the
global batch) and all-reduce the sums (:func:`.trainer.make_private`). Non-private runs use
``DistributedDataParallel`` on slices of one shuffled batch. Rank 0 alone evaluates, writes the
run record and checkpoints; the others read checkpoints when resuming.

``dpskin train --nproc N`` re-launches itself under ``torchrun`` on 127.0.0.1 (:func:`launch`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process' place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process evaluates and writes the record (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (e.g. the run's secret DP seed, a stop decision)."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
        dist.broadcast(t, 0)
        return int(t.item())

    def sum(self, value: float) -> float:
        """The sum of ``value`` over ranks."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current(device: str = "auto") -> World:
    """The world from torchrun's environment, joining its process group if not yet joined.

    Outside torchrun (no ``WORLD_SIZE``, or 1) this is the single-process world and nothing
    is initialised. The backend is NCCL when every rank can have its own CUDA device and the
    config does not ask for the CPU, else gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() > local
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local)


def wrap_private(model: nn.Module, world: World) -> nn.Module:
    """Opacus' DPDDP (parameters broadcast from rank 0; gradients are synchronised by the DP
    optimizer after clipping, not by the module) when distributed, else the model."""
    if not world.distributed:
        return model
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    return DPDDP(model)


def wrap_plain(model: nn.Module, world: World) -> nn.Module:
    """PyTorch's DistributedDataParallel (mean gradient over ranks) when distributed."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside Opacus' GradSampleModule and DPDDP / DDP wrappers."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    while True:
        if hasattr(model, "_module"):         # Opacus' GradSampleModule
            model = model._module
        elif isinstance(model, DDP) or type(model).__name__ == "DifferentiallyPrivateDistributedDataParallel":
            model = model.module
        else:
            return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the rendezvous of the processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: List[str], port: Optional[int] = None,
                     module: bool = True) -> List[str]:
    """The ``torchrun`` command running ``python -m <args>`` (``module=False``: the script
    ``args[0]``) in ``nproc`` processes on this machine, rendezvous on 127.0.0.1 only."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--rdzv-backend", "static",
            "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()),
            *(["-m"] if module else []), *args]


def local_env() -> dict:
    """The environment for the processes: one CPU thread each unless set (they share the
    cores), and the loopback interface for gloo's and NCCL's sockets (no outside traffic)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def launch(nproc: int, module_args: List[str]) -> int:
    """Run ``python -m <module_args>`` under torchrun in ``nproc`` processes; their exit code."""
    return subprocess.call(torchrun_command(nproc, module_args), env=local_env())


__all__ = ["World", "current", "free_port", "launch", "local_env", "torchrun_command", "unwrap",
           "wrap_plain", "wrap_private"]

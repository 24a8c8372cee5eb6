"""Start-up of one training process: torchrun's environment, SLURM's (``srun``, one task
per GPU), or a single plain process.

    torchrun:  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    srun:      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NNODES; MASTER_ADDR and
               MASTER_PORT exported by the batch script (scripts/slurm/)
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    """rank, world_size, local_rank and this process's device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launch_environment(env: dict[str, str] | None = None) -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, spans several nodes) from torchrun's variables, else
    SLURM's, else one process. Raises ValueError naming a variable that is not a number."""
    env = dict(os.environ) if env is None else env

    def number(name: str, default: int) -> int:
        value = env.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: the launcher's variable should be an integer, got "
                             f"{value!r}") from None

    if "RANK" in env or "WORLD_SIZE" in env:
        world = number("WORLD_SIZE", 1)
        local_world = number("LOCAL_WORLD_SIZE", world)
        return number("RANK", 0), world, number("LOCAL_RANK", 0), world > local_world
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return (number("SLURM_PROCID", 0), number("SLURM_NTASKS", 1),
                number("SLURM_LOCALID", 0), number("SLURM_NNODES", 1) > 1)
    return 0, 1, 0, False


def check_rendezvous(host: str, multi_node: bool) -> None:
    """Raises ValueError when a run over several nodes would meet at a loopback address
    (each node would wait for itself: the classic hang of a copied single-node script)."""
    if not multi_node:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as err:
        raise ValueError(f"MASTER_ADDR: {host!r} does not resolve ({err}); set it to the "
                         f"first node's hostname") from err
    loopback = sorted(a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if loopback:
        raise ValueError(f"MASTER_ADDR: {host!r} resolves to the loopback address "
                         f"{loopback[0]} on a multi-node run: the other nodes cannot reach "
                         f"it. Use the first node's hostname (scripts/slurm/ shows how)")


def local_device(device: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its node, for the ``device`` option:
    "auto" (the GPU of the local rank when there is one, else the CPU), "cpu" or "cuda".
    Raises ValueError naming ``device`` when it cannot be had. Changes nothing."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for, but torch sees no GPU")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_process(device: str = "auto") -> Process:
    """Joins the process group the launcher describes; a plain ``python`` run is one
    process with no group.

    device: as :func:`local_device` takes it. The backend is NCCL (RCCL on ROCm) for GPUs,
    gloo for the CPU.
    """
    rank, world, local_rank, multi_node = launch_environment()
    dev = local_device(device, local_rank)
    use_gpu = dev.type == "cuda"
    if use_gpu:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        host = os.environ.get("MASTER_ADDR")
        if host is None or "MASTER_PORT" not in os.environ:
            raise ValueError("MASTER_ADDR: set MASTER_ADDR and MASTER_PORT (torchrun does; "
                             "under srun the batch script exports them)")
        check_rendezvous(host, multi_node)
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_gpu else None)
    return Process(rank, world, local_rank, dev)


def shutdown() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()

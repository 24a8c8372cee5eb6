"""Start-up of one training process: torchrun's environment, SLURM's (``srun``, one task
per GPU), or a single plain process.

    torchrun:  RANK, WORLD_SIZE, LOCAL_RANK (all three), LOCAL_WORLD_SIZE, MASTER_ADDR,
               MASTER_PORT
    srun:      a job step: SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_LOCALID,
               SLURM_STEP_NUM_NODES; MASTER_ADDR and MASTER_PORT exported by the batch
               script (scripts/slurm/)
    otherwise: one process. That includes the batch shell of an sbatch job (or an salloc
               shell): SLURM exports SLURM_PROCID and SLURM_NTASKS (the job's tasks) there
               too, but only a step started by srun has SLURM_STEP_NUM_TASKS.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# What torchrun sets for each worker; a launcher must set all three or none.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Set in a SLURM job step (srun), never in the batch shell that runs the job script.
SLURM_STEP_VARIABLE = "SLURM_STEP_NUM_TASKS"
# A launcher that gives each task its own GPU sets one of these per task (srun with
# --gpus-per-task, SLURM's gres binding, a wrapper script); without one, every process on the
# node sees the same GPUs.
VISIBLE_DEVICES_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


@dataclass(frozen=True)
class Process:
    """rank, world_size, local_rank and this process's device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclass(frozen=True)
class Launch:
    """How this process was started.

    Attributes:
        launcher: "torchrun", "srun" (a SLURM job step), "batch-shell" (a SLURM job's batch
            or salloc shell, outside any step: one process) or "python" (one process).
        rank, world_size, local_rank: this process's place (0, 1, 0 for one process).
        multi_node: the processes span several nodes (torchrun: WORLD_SIZE above
            LOCAL_WORLD_SIZE, else SLURM's node count when torchrun runs inside a job;
            srun: SLURM_STEP_NUM_NODES > 1). False when nothing tells.
        job_tasks: in a batch shell, the tasks the SLURM job holds (SLURM_NTASKS), which
            an ``srun`` in it would start; None elsewhere.
        local_world_size: the most processes on one node (torchrun: LOCAL_WORLD_SIZE; srun:
            the largest count of SLURM_STEP_TASKS_PER_NODE), or None when nothing tells.
    """

    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    multi_node: bool = False
    job_tasks: int | None = None
    local_world_size: int | None = None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """The :class:`Launch` that ``env`` (default ``os.environ``) describes.

    Raises:
        ValueError: naming the variable: a launcher variable that is not a number, that is
            out of range, or is missing from a set that comes together (torchrun's RANK,
            WORLD_SIZE, LOCAL_RANK; srun's SLURM_PROCID, SLURM_LOCALID).
    """
    env = dict(os.environ) if env is None else env

    def number(name: str, minimum: int = 0) -> int | None:
        value = env.get(name)
        if value is None:
            return None
        try:
            result = int(value)
        except ValueError:
            raise ValueError(f"{name}: the launcher's variable should be an integer, got "
                             f"{value!r}") from None
        if result < minimum:
            raise ValueError(f"{name}: the launcher's variable should be >= {minimum}, got "
                             f"{result}")
        return result

    nodes = number("SLURM_STEP_NUM_NODES", 1)
    if nodes is None:
        nodes = number("SLURM_NNODES", 1)
    present = [name for name in TORCHRUN_VARIABLES if name in env]
    if present:
        rank, world, local_rank = (number(name, 1 if name == "WORLD_SIZE" else 0)
                                   for name in TORCHRUN_VARIABLES)
        missing = [name for name in TORCHRUN_VARIABLES if name not in env]
        if missing:
            # A batch script that exports WORLD_SIZE alone (as some guides do) would otherwise
            # make every srun task rank 0 on GPU 0.
            raise ValueError(
                f"{missing[0]}: torchrun's variables come together, but {' and '.join(present)}"
                f" {'is' if len(present) == 1 else 'are'} set and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not. Set all of "
                f"{', '.join(TORCHRUN_VARIABLES)} (torchrun does) or none of them (under srun, "
                f"eurocore reads SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS)")
        _check_rank("RANK", rank, "WORLD_SIZE", world)
        local_world = number("LOCAL_WORLD_SIZE", 1)
        if local_world is not None:
            _check_rank("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
            multi_node = world > local_world
        else:  # torchrun inside a SLURM job or step tells the nodes; otherwise one node
            multi_node = nodes is not None and nodes > 1
        return Launch("torchrun", rank, world, local_rank, multi_node,
                      local_world_size=local_world)
    if SLURM_STEP_VARIABLE in env:
        world = number(SLURM_STEP_VARIABLE, 1)
        for name in ("SLURM_PROCID", "SLURM_LOCALID"):
            if name not in env:
                raise ValueError(f"{name}: {SLURM_STEP_VARIABLE} is set (an srun step) but "
                                 f"{name} is not; srun sets both for each task")
        rank, local_rank = number("SLURM_PROCID"), number("SLURM_LOCALID")
        _check_rank("SLURM_PROCID", rank, SLURM_STEP_VARIABLE, world)
        return Launch("srun", rank, world, local_rank, nodes is not None and nodes > 1,
                      local_world_size=_most_tasks_per_node(env))
    if "SLURM_NTASKS" in env or "SLURM_PROCID" in env:
        number("SLURM_PROCID")  # named if malformed, though one process ignores it
        return Launch("batch-shell", job_tasks=number("SLURM_NTASKS", 1))
    return Launch("python")


def _most_tasks_per_node(env: Mapping[str, str]) -> int | None:
    """The largest count of SLURM_STEP_TASKS_PER_NODE ("8(x2)", "3,2", "4(x2),3"), or None
    when it is not set. Raises ValueError naming it when it is malformed."""
    value = env.get("SLURM_STEP_TASKS_PER_NODE")
    if value is None:
        return None
    counts = [re.fullmatch(r"(\d+)(\(x\d+\))?", part) for part in value.split(",")]
    if not all(counts):
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE: expected counts like 8(x2) or 3,2, got "
                         f"{value!r}")
    return max(int(match.group(1)) for match in counts)


def _check_rank(name: str, rank: int, size_name: str, size: int) -> None:
    if rank >= size:
        raise ValueError(f"{name}: {rank} is not below {size_name} = {size}")


def launch_environment(env: Mapping[str, str] | None = None) -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, spans several nodes) of :func:`detect_launch`:
    torchrun's variables, else an srun step's, else one process. Raises ValueError naming
    the variable that is wrong."""
    launch = detect_launch(env)
    return launch.rank, launch.world_size, launch.local_rank, launch.multi_node


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


def local_device(device: str, local_rank: int, env: Mapping[str, str] | None = None,
                 local_world_size: int | None = None) -> torch.device:
    """The device of the process with ``local_rank`` on its node, for the ``device`` option:
    "auto" (the GPU of the local rank when there is one, else the CPU), "cpu" or "cuda".

    Each process takes GPU ``local_rank`` of those it sees (every task sees all of the
    node's GPUs, as on LUMI, where per-task GPU cgroups break RCCL's peer access), or GPU 0
    when it sees one GPU that its launcher chose for it (one of VISIBLE_DEVICES_VARIABLES
    set in ``env``, default ``os.environ``: srun --gpus-per-task=1). ``local_world_size``
    (:attr:`Launch.local_world_size`), when known, lets every rank of an oversubscribed node
    fail alike, not only those beyond the last GPU (the others would wait for them).

    Raises:
        ValueError: naming ``device`` when it cannot be had, or when the node's ranks
            outnumber its GPUs (two ranks on one GPU would share its memory and serialise,
            or run out of memory far into the run). Changes nothing.
    """
    env = os.environ if env is None else env
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for, but torch sees no GPU")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    ranks = max(local_rank + 1, local_world_size or 0)  # on this node, at least
    if ranks <= visible:
        return torch.device("cuda", local_rank)
    chosen = [name for name in VISIBLE_DEVICES_VARIABLES if env.get(name)]
    if visible == 1 and chosen:  # the launcher gave this task its own GPU
        return torch.device("cuda", 0)
    how = (f"{chosen[0]}={env[chosen[0]]!r}" if chosen
           else "none of CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES set by the launcher")
    raise ValueError(f"device: {ranks} ranks on this node (local rank {local_rank}) but "
                     f"{visible} GPU{'s' if visible != 1 else ''} visible ({how}): two ranks "
                     f"would share one GPU. Start one task per GPU (--ntasks-per-node or "
                     f"--nproc-per-node = the node's GPUs, 8 GCDs on LUMI-G), or --device cpu")


def init_process(device: str = "auto") -> Process:
    """Joins the process group the launcher describes; a plain ``python`` run is one
    process with no group.

    device: as :func:`local_device` takes it. The backend is NCCL (RCCL on ROCm) for GPUs,
    gloo for the CPU.
    """
    launch = detect_launch()
    rank, world, local_rank = launch.rank, launch.world_size, launch.local_rank
    dev = local_device(device, local_rank, local_world_size=launch.local_world_size)
    use_gpu = dev.type == "cuda"
    if use_gpu:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        host = os.environ.get("MASTER_ADDR")
        if host is None or "MASTER_PORT" not in os.environ:
            raise ValueError("MASTER_ADDR: set MASTER_ADDR and MASTER_PORT (torchrun does; "
                             "under srun the batch script exports them)")
        check_rendezvous(host, launch.multi_node)
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_gpu else None)
    return Process(rank, world, local_rank, dev)


def shutdown() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()

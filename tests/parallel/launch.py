"""The one launcher of multi-process tests: ``world_size`` CPU processes on gloo."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(fn: Callable[..., None], world_size: int, *args) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in a
    gloo process group; an assertion failing on any rank fails the calling test with that
    rank's traceback. ``fn`` must be importable (a module-level function)."""
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # no rank tears its group down while another still has work in flight on it (a
        # gloo pair closed under FSDP's pending collectives once aborted a finished test);
        # only on success: a failed rank must not wait for the others
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""The process groups of one rank: tensor-, pipeline- and data-parallel, from a DeviceMesh.

Layers take the group they need as an argument (never a global), so other trainers can use
them with their own groups. The mesh is (pp, dp, tp) with tp varying fastest: the ranks of a
tensor-parallel group are adjacent, so with ``torchrun``/``srun`` placing consecutive ranks
on one node, a TP group never leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from eurocore.utils.checks import check_int


@dataclass(frozen=True)
class ParallelGroups:
    """Sizes, this rank's coordinates and the groups of a tp x pp x dp layout.

    A size-1 dimension has no group (None): its collectives are identities, and with every
    size 1 nothing needs ``torch.distributed`` at all (see :meth:`single`).
    """

    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    mesh: DeviceMesh | None = None
    # pp > 1: a second group over the same pipeline ranks that carries gradients only (NCCL
    # matches point-to-point messages per communicator in issue order, so activations and
    # gradients travelling between the same two ranks must not share one), and the group of
    # the first and last stages, which share a tied embedding.
    pp_grad_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    pp_ranks: tuple[int, ...] = ()

    @classmethod
    def single(cls) -> ParallelGroups:
        """One process: every size 1, no groups; needs no initialised process group."""
        return cls()

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: int | None = None, *,
              device_type: str = "cpu") -> ParallelGroups:
        """The layout over the current world (``torch.distributed`` initialised, or one
        process). dp None takes the ranks left over: world // (tp · pp).

        Raises:
            ValueError: naming the size to change, when tp · pp · dp is not the world size.
        """
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
            if size is None and name == "dp":
                continue
            check_int(name, size, minimum=1)
        if dp is None:
            if world % (tp * pp):
                raise ValueError(
                    f"tp: tp x pp = {tp} x {pp} = {tp * pp} does not divide the world size "
                    f"{world}; choose tp and pp whose product divides {world}")
            dp = world // (tp * pp)
        if tp * pp * dp != world:
            raise ValueError(
                f"dp: tp x pp x dp = {tp} x {pp} x {dp} = {tp * pp * dp} but the world size is "
                f"{world}; leave dp unset to use the {world // (tp * pp) or 1} left over, or "
                f"launch {tp * pp * dp} processes")
        if world == 1:
            return cls.single()
        mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))

        def group(name: str, size: int) -> dist.ProcessGroup | None:
            return mesh[name].get_group() if size > 1 else None

        dp_rank, tp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
        pp_ranks = tuple(mesh.mesh[:, dp_rank, tp_rank].tolist())
        pp_grad_group = embedding_group = None
        if pp > 1:  # every rank creates every group, in the same order
            for d in range(dp):
                for t in range(tp):
                    ranks = mesh.mesh[:, d, t].tolist()
                    grad_group = dist.new_group(ranks)
                    tied_group = dist.new_group([ranks[0], ranks[-1]])
                    if (d, t) == (dp_rank, tp_rank):
                        pp_grad_group, embedding_group = grad_group, tied_group
        return cls(tp_size=tp, pp_size=pp, dp_size=dp,
                   tp_rank=tp_rank, pp_rank=mesh.get_local_rank("pp"), dp_rank=dp_rank,
                   tp_group=group("tp", tp), pp_group=group("pp", pp), dp_group=group("dp", dp),
                   mesh=mesh, pp_grad_group=pp_grad_group, embedding_group=embedding_group,
                   pp_ranks=pp_ranks)

    def require_divisible_by_tp(self, what: str, value: int) -> None:
        """Raises ValueError naming ``what`` when ``value`` does not split over tp."""
        if value % self.tp_size:
            fits = [t for t in range(1, value + 1) if value % t == 0]
            raise ValueError(f"{what}: {value} is not divisible by tp = {self.tp_size}; "
                             f"tp must divide it (one of {fits})")

"""Launch environments (torchrun, srun, plain python) and the multi-node loopback check."""

from __future__ import annotations

import pytest

from eurocore.train.distributed import check_rendezvous, launch_environment


def test_plain_python_is_one_process():
    assert launch_environment({}) == (0, 1, 0, False)


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launch_environment(env) == (5, 8, 1, True)
    env["LOCAL_WORLD_SIZE"] = "8"
    assert launch_environment(env) == (5, 8, 1, False)


def test_slurm_variables_one_task_per_gpu():
    env = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
           "SLURM_NNODES": "2"}
    assert launch_environment(env) == (11, 16, 3, True)
    # torchrun inside an allocation wins over the allocation's variables
    assert launch_environment({**env, "RANK": "0", "WORLD_SIZE": "2"})[:2] == (0, 2)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_loopback_rendezvous_fails_loudly_across_nodes(host):
    with pytest.raises(ValueError, match=r"^MASTER_ADDR: .* loopback address .* multi-node"):
        check_rendezvous(host, multi_node=True)
    check_rendezvous(host, multi_node=False)  # one node: fine


def test_unresolvable_rendezvous_is_named():
    with pytest.raises(ValueError, match=r"^MASTER_ADDR: .* does not resolve"):
        check_rendezvous("no-such-host.invalid", multi_node=True)


def test_a_routable_rendezvous_passes():
    check_rendezvous("10.1.2.3", multi_node=True)

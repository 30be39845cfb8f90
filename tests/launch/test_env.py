"""Rank, world size and rendezvous discovery from synthetic launcher environments."""

import pytest

from megalm.errors import MegalmError
from megalm.launch.env import Discovered, discover, first_slurm_host, resolve_rendezvous


def test_torchrun_and_deepspeed_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == (3, 8, 1, "node7", 29400)
    assert d.how.startswith("torchrun/deepspeed")


def test_srun_environment():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-006],cpu1", "SLURM_JOB_ID": "123456"}  # fmt: skip
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank) == (5, 8, 1)  # the step's tasks, not the allocation's
    assert d.master_addr == "gpu003" and d.master_port == 20000 + 123456 % 20000
    assert d.how.startswith("srun")


def test_sbatch_batch_step_without_srun_is_not_mistaken_for_a_task():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    assert discover(env).world_size == 1


@pytest.mark.parametrize(
    "nodelist, first",
    [("n1", "n1"), ("gpu[003-005,009]", "gpu003"), ("a[7,9],b[1-2]", "a7"), ("node-12,node-13", "node-12")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_open_mpi_and_mpich_environments():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    d = discover(ompi)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr) == (2, 4, 0, None)
    assert "Open MPI" in d.how
    mpich = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    d = discover(mpich)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == (1, 2, 1, "h0", 1234)
    assert "MPICH" in d.how


def test_no_launcher_is_one_process_on_a_free_port():
    d = resolve_rendezvous(discover({}))
    assert (d.rank, d.world_size, d.master_addr) == (0, 1, "127.0.0.1") and d.master_port > 0


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 4 is not below"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not a non-negative integer"),
    ],
)
def test_bad_environments_are_clear_errors(env, message):
    with pytest.raises(MegalmError, match=message):
        discover(env)


def test_missing_master_address_for_several_processes():
    d = Discovered(1, 2, 1, None, None, "torchrun/deepspeed (RANK, WORLD_SIZE)")
    with pytest.raises(MegalmError, match="MASTER_ADDR is not set"):
        resolve_rendezvous(d)
    d = Discovered(1, 2, 1, "h0", None, "torchrun/deepspeed (RANK, WORLD_SIZE)")
    assert resolve_rendezvous(d).master_port == 29500


@pytest.mark.parametrize("ranks, text", [([0], "0"), ([0, 1, 2, 5], "0-2,5"), ([1, 3, 4], "1,3-4")])
def test_rank_ranges(ranks, text):
    from megalm.launch.env import _ranges

    assert _ranges(ranks) == text

"""A rank that dies makes the others stop with a message naming it, instead of hanging."""

import subprocess
import sys
import time

import pytest

from megalm.launch.local import free_port
from tests.helpers import REPO, read_metrics, subprocess_env, tiny_config

pytestmark = pytest.mark.multiprocess


def start_ranks(config, world: int) -> list[subprocess.Popen]:
    """`world` bare processes that find each other through RANK/WORLD_SIZE/MASTER_* (as srun tasks do)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(subprocess_env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        cmd = [sys.executable, str(REPO / "launcher" / "pretrain.py"), "--config", str(config)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_a_rank_stops_the_other_with_its_name(dataset, tmp_path, victim):
    config = tiny_config(tmp_path, dataset, train={"max_steps": 100000, "eval_interval": 0, "log_interval": 1,
                                                   "collective_timeout_s": 60})  # fmt: skip
    run_dir = tmp_path / "runs" / "tiny"
    procs = start_ranks(config, 2)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (
            (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3
        ):
            assert all(p.poll() is None for p in procs), "a rank ended before the kill"
            time.sleep(0.2)
        procs[victim].kill()
        killed_at = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=90)
        took = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
    assert survivor.returncode == 2, err
    expected = "stopped: rank 1" if victim == 1 else "stopped: rank 0 (it hosts the rendezvous store"
    assert expected in err, err
    assert "Traceback" not in err
    print(f"survivor exited {took:.1f} s after the kill: {err.strip().splitlines()[-1]}")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_group_that_cannot_form_is_one_clear_error(dataset, tmp_path, rank):
    """Rank 1 with no master listening, or rank 0 whose peer never comes: a clear error after the timeout."""
    config = tiny_config(tmp_path, dataset, train={"collective_timeout_s": 5})
    env = dict(subprocess_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))  # fmt: skip
    cmd = [sys.executable, str(REPO / "launcher" / "pretrain.py"), "--config", str(config)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"rank {rank} of 2 could not join the process group at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr

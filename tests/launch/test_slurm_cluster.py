"""The generated sbatch script on a real one-node SLURM cluster (localhost, 2 CPU tasks)."""

import sys
import time

import pytest

from megalm.training.signals import PREEMPTED_EXIT_CODE
from tests.helpers import REPO, read_metrics, subprocess_env, tiny_config, train_losses
from tests.slurm import SlurmCluster

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    why = c.missing()
    if why:
        pytest.skip(f"no SLURM cluster on this machine: {why}")
    c.env = dict(subprocess_env(), SLURM_CONF=str(c.conf))
    try:
        c.start()
    except Exception as e:  # noqa: BLE001 - any start failure means the cluster is not available here
        c.stop()
        pytest.skip(f"SLURM would not start here: {e}")
    yield c
    c.stop()


def write_job(tmp_path, config, *overrides: str):
    import argparse

    from megalm.launch.slurm import add_slurm_args, log_dir, render

    parser = argparse.ArgumentParser()
    add_slurm_args(parser)
    args = parser.parse_args(["--config", str(config), "--nodes", "1", "--gpus-per-node", "0",
                              "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10:00",
                              "--signal-seconds", "30", "--python", sys.executable, "--workdir", str(REPO),
                              *overrides])  # fmt: skip
    script = tmp_path / "job.sbatch"
    script.write_text(render(args))
    log_dir(args).mkdir(parents=True, exist_ok=True)
    return script


def test_sbatch_script_trains_with_two_srun_tasks(cluster, one_process_losses, tmp_path):
    config, reference = one_process_losses
    run_dir = tmp_path / "run"
    job = cluster.sbatch(write_job(tmp_path, config, f"train.run_dir={run_dir}"))
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "2 process(es) [sbatch script" in log and "done: step 6" in log
    losses = train_losses(run_dir)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, loss, losses[step])


def _rows(run_dir) -> int:
    return len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else 0


def test_usr1_checkpoints_exits_75_and_the_job_requeues_and_resumes(cluster, dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, train={"max_steps": 150, "eval_interval": 0, "log_interval": 1})
    run_dir = tmp_path / "runs" / "tiny"
    job = cluster.sbatch(write_job(tmp_path, config))
    cluster.wait(job, ("RUNNING",), timeout=120)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (
        (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3
    ):
        time.sleep(0.2)
    cluster.scancel("--signal=USR1", job)
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info.get("Restarts", "0")) == 1, info
    assert f"preempted (exit {PREEMPTED_EXIT_CODE}): requeueing" in log
    stopped_at = int(log.split("preempted at step ")[1].split(":")[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in log
    assert "done: step 150" in log
    assert sorted(train_losses(run_dir)) == list(range(1, 151))

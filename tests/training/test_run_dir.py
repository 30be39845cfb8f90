"""Start-up and the run directory: a SIGTERM during start-up exits 75; a second run into a directory in use is
refused naming the holder, a dead run's lock is taken over, and train.resume=none refuses a checkpoint directory
that holds another run's checkpoints."""

from __future__ import annotations

import time

import pytest

from megalm.errors import MegalmError
from megalm.training import rundir
from tests.helpers import read_metrics, run_pretrain, start_pretrain, tiny_config


def test_the_lock_is_exclusive_and_released(tmp_path):
    logs: list[str] = []
    rundir.lock_run_dir(tmp_path / "run", log=logs.append)
    rundir.lock_run_dir(tmp_path / "run", log=logs.append)  # this process holds it already: nothing to do
    assert '"pid"' in (tmp_path / "run" / rundir.LOCK).read_text() and logs == []
    rundir.release_run_dir(tmp_path / "run")
    assert (tmp_path / "run" / rundir.LOCK).read_text() == ""  # released at a normal end: nothing to take over
    rundir.lock_run_dir(tmp_path / "run", log=logs.append)
    rundir.release_run_dir(tmp_path / "run")
    assert logs == []


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, train={"max_steps": 100_000, "eval_interval": 0, "log_interval": 1})
    run_dir = tmp_path / "runs" / "tiny"
    first = start_pretrain(config)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and read_metrics(run_dir)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = run_pretrain(config, "train.max_steps=2")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"run directory {run_dir} is in use by another run (pid {first.pid} on host" in second.stderr
        rows = len(read_metrics(run_dir))
    finally:
        first.kill()
        first.communicate()
    assert len(read_metrics(run_dir)) >= rows  # the refused run wrote nothing into it
    third = run_pretrain(config, "train.max_steps=2")
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"taking over the lock of a run that ended without releasing it (pid {first.pid}" in third.stdout


def test_resume_none_refuses_a_directory_holding_checkpoints(dataset, tmp_path):
    from megalm.training import checkpoint

    config = tiny_config(tmp_path, dataset, train={"max_steps": 2, "eval_interval": 0})
    assert run_pretrain(config).returncode == 0
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints"
    before = sorted(p.name for p in ckpt.iterdir())
    again = run_pretrain(config, "train.resume=none")
    assert again.returncode == 2
    assert f"train.resume=none, but {ckpt} holds the checkpoints of an earlier run (step_00000002)" in again.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before
    with pytest.raises(MegalmError, match="Give this run its own train.run_dir"):
        checkpoint.resolve_resume("none", ckpt)
    assert checkpoint.resolve_resume("none", tmp_path / "elsewhere") is None


def test_a_sigterm_during_start_up_exits_75_before_the_first_step(dataset, tmp_path):
    """SLURM requeues on 75; a SIGTERM that lands in the imports or the engine build used to kill with 143."""
    import signal

    config = tiny_config(tmp_path, dataset, train={"max_steps": 5, "eval_interval": 0})
    proc = start_pretrain(config)
    time.sleep(1.5)  # inside the imports of torch and DeepSpeed, long before the first step
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out + err
    assert "stop signal during start-up (SIGTERM): exiting before the first step" in out
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    assert not metrics.exists() or read_metrics(tmp_path / "runs" / "tiny") == []  # no step ran

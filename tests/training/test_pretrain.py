"""End-to-end runs of launcher/pretrain.py as a user starts it: one process, resumed, and 2 processes."""

import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from megalm.training.signals import PREEMPTED_EXIT_CODE
from tests.helpers import free_port, read_metrics, run_pretrain, start_pretrain, tiny_config, train_losses
from tests.helpers import ok as _ok


def test_single_process_run_trains_evaluates_saves_and_resumes(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset)
    run_dir = tmp_path / "runs" / "tiny"
    out = _ok(run_pretrain(config)).stdout
    assert "process(es) [single process" in out and "done: step 6" in out
    rows = read_metrics(run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]  # it learns
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[0]["val_windows"] == 32 and evals[0]["val_ppl"] > 1  # eval_iters 4 x global batch 8
    row = next(r for r in rows if r["step"] == 6 and "loss" in r)
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops", "mem_bytes"):
        assert row[key] > 0, key
    assert row["mfu"] is None  # no known peak on a CPU
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"

    # Same command with a later max_steps continues from the checkpoint (train.resume=auto) ...
    out = _ok(run_pretrain(config, "train.max_steps=9")).stdout
    assert "at step 6" in out and "done: step 9" in out
    resumed = train_losses(run_dir)
    # ... and matches an uninterrupted 9-step run (same schedule: optim.decay_steps is fixed).
    straight = _ok(run_pretrain(config, "train.max_steps=9", f"train.run_dir={tmp_path / 'straight'}"))
    assert "resumed" not in straight.stdout
    reference = train_losses(tmp_path / "straight")
    for step in (7, 8, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6), step


def test_bad_data_path_is_one_clear_error(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, data={"train": str(tmp_path / "missing")})
    result = run_pretrain(config)
    assert result.returncode == 2
    assert "error:" in result.stderr and str(tmp_path / "missing") in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_shows_resolved_values(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset)
    result = _ok(run_pretrain(config, "model.n_layer=3", "--print-config"))
    assert "n_layer: 3" in result.stdout and "global_batch_size: 8" in result.stdout


LAUNCHERS = {
    "deepspeed": ["{python}", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "{port}"],
    "torchrun": ["{python}", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "{port}"],
    # MPICH's Hydra (pip package `mpich`): ranks from PMI_RANK/PMI_SIZE, master agreed over mpi4py.
    "mpirun": ["{mpiexec}", "-n", "2", "{python}"],
}


def _launcher_cmd(name: str) -> list[str]:
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if name == "mpirun":
        if mpiexec is None:
            pytest.skip("no mpiexec: pip install mpich (make test installs it with the dev extras)")
        try:
            import mpi4py.MPI  # noqa: F401
        except ImportError as e:
            pytest.skip(f"mpi4py cannot load an MPI library: {e}")
    subst = {"{python}": sys.executable, "{port}": str(free_port()), "{mpiexec}": mpiexec or ""}
    return [subst.get(a, a) for a in LAUNCHERS[name]]


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one_process(one_process_losses, tmp_path, launcher):
    """2 processes (CPU, gloo) under each launcher give the one-process loss curve for the same global batch."""
    config, reference = one_process_losses
    result = _ok(run_pretrain(config, f"train.run_dir={tmp_path / 'two'}", launcher=_launcher_cmd(launcher)))
    assert "2 process(es)" in result.stdout and "accum 2 x dp 2" in result.stdout
    assert f"nodes: {socket.gethostname()}: ranks 0-1" in result.stdout
    losses = train_losses(tmp_path / "two")
    assert sorted(losses) == sorted(reference) == list(range(1, 7))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, loss, losses[step])


def test_an_error_every_rank_meets_is_printed_once(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset)
    result = run_pretrain(config, f"data.train={tmp_path / 'nowhere'}", launcher=_launcher_cmd("torchrun"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line and "nowhere" in line]
    assert len(errors) == 1, result.stderr


def test_checkpoint_at_end_false_saves_nothing_after_the_last_step(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, train={"eval_interval": 0, "max_steps": 3})
    out = _ok(run_pretrain(config, "checkpoint.at_end=false")).stdout
    assert "done: step 3" in out and "saved checkpoint" not in out
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "latest").exists()


def test_model_compile_trains_like_eager_and_reports_the_compile_time(dataset, tmp_path, one_process_losses):
    config, eager = one_process_losses
    run_dir = tmp_path / "runs" / "compiled"
    out = _ok(run_pretrain(config, "model.compile=true", f"train.run_dir={run_dir}")).stdout
    assert "model.compile: the first step compiled the blocks in " in out
    compiled = train_losses(run_dir)
    assert max(abs(compiled[s] - eager[s]) / eager[s] for s in eager) < 1e-5


def signal_after_rows(config, run_dir, signum, rows: int = 3):
    """Start a run, send it `signum` once it has written `rows` metrics rows; (process, stdout, stderr) at its end."""
    proc = start_pretrain(config)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= rows
    ):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def test_ctrl_c_saves_a_checkpoint_says_how_to_continue_and_exits_130(dataset, tmp_path):
    config, run_dir = (
        tiny_config(tmp_path, dataset, train={"max_steps": 5000, "eval_interval": 0}),
        tmp_path / "runs" / "tiny",
    )
    proc, out, err = signal_after_rows(config, run_dir, signal.SIGINT)
    assert proc.returncode == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "press Ctrl-C again to exit at once" in err
    step = int(out.split("interrupted (Ctrl-C) at step ")[1].split(":")[0])
    assert "run the same command again to continue" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"


def test_a_finished_run_says_there_is_nothing_to_train_and_how_to_start_a_new_one(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, train={"eval_interval": 0, "max_steps": 3})
    _ok(run_pretrain(config))
    rows = len(read_metrics(tmp_path / "runs" / "tiny"))
    out = _ok(run_pretrain(config)).stdout
    assert "nothing to train: the run in" in out and "is at step 3 and train.max_steps is 3" in out
    assert "raise train.max_steps" in out and "train.run_dir=<a new directory>" in out and "done:" not in out
    assert len(read_metrics(tmp_path / "runs" / "tiny")) == rows


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_a_checkpoint_and_exits_with_the_preemption_code(dataset, tmp_path, signum):
    config, run_dir = (
        tiny_config(tmp_path, dataset, train={"max_steps": 5000, "eval_interval": 0}),
        tmp_path / "runs" / "tiny",
    )
    proc, out, err = signal_after_rows(config, run_dir, signum)
    assert proc.returncode == PREEMPTED_EXIT_CODE, f"stdout:\n{out}\nstderr:\n{err}"
    step = int(out.split("preempted at step ")[1].split(":")[0])
    assert step >= 3
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    # The same command continues from there.
    again = _ok(run_pretrain(config, f"train.max_steps={step + 2}"))
    assert f"at step {step}" in again.stdout and f"done: step {step + 2}" in again.stdout


LAYOUTS = {
    # name: (processes, overrides, the layout line it must print)
    "tp2": (2, ["parallel.tp=2"], "tp 2 pp 1 dp 1"),
    "tp2-dp2-zero1": (4, ["parallel.tp=2", "zero.stage=1"], "tp 2 pp 1 dp 2"),
    "tp2-dp2-zero2-sp": (4, ["parallel.tp=2", "zero.stage=2", "parallel.sequence_parallel=true"], "tp 2 pp 1 dp 2"),
    "pp2": (2, ["parallel.pp=2"], "tp 1 pp 2 dp 1"),
    "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2"], "tp 2 pp 2 dp 1"),
    "pp2-dp2-zero1-recompute": (4, ["parallel.pp=2", "zero.stage=1", "parallel.activation_checkpoint_interval=1"],
                                "tp 1 pp 2 dp 2"),
}  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layouts_match_one_process(one_process_losses, tmp_path, layout):
    """Tensor, pipeline and data parallelism (ZeRO 1/2, sequence parallelism, recomputation) train like one process.

    tp=2 runs under the deepspeed launcher (`deepspeed --num_gpus 2 ... parallel.tp=2`), the others under torchrun.
    """
    config, reference = one_process_losses
    procs, overrides, line = LAYOUTS[layout]
    if layout == "tp2":
        cmd = _launcher_cmd("deepspeed")
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(free_port())]  # fmt: skip
    result = _ok(run_pretrain(config, f"train.run_dir={tmp_path / 'run'}", *overrides, launcher=cmd, timeout=600))
    assert line in result.stdout
    losses = train_losses(tmp_path / "run")
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, loss, losses[step])


def test_one_process_bf16_at_zero0_trains_as_zero1(dataset, tmp_path):
    """bf16 at zero.stage 0 without a pipeline runs DeepSpeed's ZeRO-1 (BF16_Optimizer): it trains, says so, and
    takes exactly the steps an explicit zero.stage=1 run takes."""
    config = tiny_config(tmp_path, dataset, train={"eval_interval": 0, "log_interval": 1})
    runs = {}
    for stage in (0, 1):
        run_dir = tmp_path / f"zero{stage}"
        out = _ok(run_pretrain(config, "precision.dtype=bf16", f"zero.stage={stage}", "train.max_steps=3",
                               f"train.run_dir={run_dir}", "checkpoint.interval=0")).stdout  # fmt: skip
        runs[stage] = train_losses(run_dir)
        if stage == 0:
            assert "zero 1 (bf16 at zero.stage 0 runs as ZeRO-1)" in out
    assert sorted(runs[0]) == [1, 2, 3] and runs[0] == runs[1]


def test_zero2_with_optimizer_offload_takes_the_same_steps(dataset, tmp_path):
    """zero.offload_optimizer=cpu keeps Adam's state and step in CPU memory: the losses are those without it."""
    config = tiny_config(tmp_path, dataset, train={"eval_interval": 0, "log_interval": 1})
    runs = []
    for offload in ("none", "cpu"):
        run_dir = tmp_path / offload
        _ok(run_pretrain(config, "zero.stage=2", f"zero.offload_optimizer={offload}", "train.max_steps=3",
                         f"train.run_dir={run_dir}", "checkpoint.interval=0"))  # fmt: skip
        runs.append(train_losses(run_dir))
    assert sorted(runs[0]) == [1, 2, 3] and runs[1] == runs[0]

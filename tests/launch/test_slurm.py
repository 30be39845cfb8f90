"""`megalm slurm` writes an sbatch script that bash accepts and that asks SLURM for what the run needs."""

import argparse
import subprocess

import pytest

from megalm.errors import MegalmError
from megalm.launch.slurm import add_slurm_args, render
from tests.helpers import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_slurm_args(parser)
    return parser.parse_args(list(argv))


def test_script_requests_resources_signal_and_requeue(tmp_path):
    text = render(args("--config", TINY, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                       "--account", "proj", "--time", "2-00:00:00", "--sbatch=--exclusive",
                       "train.global_batch_size=64", "train.run_dir=runs/x y"))  # fmt: skip
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --exclusive"):  # fmt: skip
        assert line in text, line
    assert "srun --kill-on-bad-exit=1" in text and "scontrol requeue" in text
    assert "-eq 75 ]" in text
    assert "'train.run_dir=runs/x y'" in text  # overrides are shell-quoted
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_cpu_tasks_ask_for_no_gpus():
    text = render(
        args(
            "--config",
            TINY,
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--time",
            "10:00",
            "train.global_batch_size=16",
        )
    )
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text


def test_layout_that_does_not_fit_the_world_size_is_refused():
    with pytest.raises(MegalmError, match="micro_batch_size\\*dp = 4\\*3"):
        render(args("--config", TINY, "--gpus-per-node", "3"))


def test_bad_time_is_refused():
    with pytest.raises(MegalmError, match="--time '2 hours'"):
        render(args("--config", TINY, "--gpus-per-node", "1", "--time", "2 hours"))

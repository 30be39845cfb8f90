"""The `megalm` console script as a user types it."""

import shutil
import subprocess
import sys

from tests.helpers import REPO, subprocess_env, write_corpus


def megalm(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("megalm") or None
    cmd = [exe] if exe else [sys.executable, "-c", "from megalm.cli import main; main()"]
    return subprocess.run(cmd + list(args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_prepare_then_print_config(tmp_path):
    write_corpus(tmp_path / "text", n_docs=2, words_per_doc=200)
    out = tmp_path / "shards"
    result = megalm("prepare", "--input", str(tmp_path / "text"), "--tokenizer", "bytes", "--output", str(out),
                    "--val-fraction", "0.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "train" / "manifest.json").is_file() and (out / "val" / "manifest.json").is_file()
    assert "train:" in result.stdout and "val:" in result.stdout

    result = megalm("train", "--config", str(REPO / "configs" / "tiny.yaml"), "--print-config", f"data.train={out}")
    assert result.returncode == 0, result.stderr
    assert f"train: {out}" in result.stdout


def test_user_errors_are_one_line(tmp_path):
    result = megalm("prepare", "--input", str(tmp_path / "nothing.txt"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "nothing.txt" in result.stderr and "Traceback" not in result.stderr
    result = megalm("train", "--config", str(REPO / "configs" / "tiny.yaml"), "model.n_lyer=2", "--print-config")
    assert result.returncode == 2
    assert "did you mean 'model.n_layer'?" in result.stderr and "Traceback" not in result.stderr


def test_wandb_missing_is_refused_before_training_starts(tmp_path):
    """log.wandb=true without the package: one line naming log.wandb, before any process group or engine."""
    blocker = tmp_path / "nowandb"
    blocker.mkdir()
    (blocker / "wandb.py").write_text("raise ImportError('wandb is blocked in this test')\n")
    exe = shutil.which("megalm") or None
    cmd = [exe] if exe else [sys.executable, "-c", "from megalm.cli import main; main()"]
    env = subprocess_env()
    env["PYTHONPATH"] = f"{blocker}:{env.get('PYTHONPATH', '')}"
    result = subprocess.run(cmd + ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "log.wandb=true",
                                   f"train.run_dir={tmp_path / 'run'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "log.wandb" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing was started"


def test_python_dash_m_runs_the_command(tmp_path):
    """`python -m megalm ...` and `python -m megalm.cli ...` do what `megalm ...` does (they used to exit 0 and do
    nothing, which the GPU check's data preparation relied on)."""
    write_corpus(tmp_path / "text", n_docs=2, words_per_doc=200)
    for module in ("megalm", "megalm.cli"):
        out = tmp_path / module
        cmd = [sys.executable, "-m", module, "prepare", "--input", str(tmp_path / "text"), "--tokenizer", "bytes",
               "--output", str(out)]  # fmt: skip
        result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert (out / "train" / "manifest.json").is_file(), f"python -m {module} prepare wrote no shards"


def test_print_config_output_loads_as_a_config(tmp_path):
    """`megalm train --print-config > resolved.yaml` then `--config resolved.yaml` is the same run."""
    first = megalm("train", "--config", str(REPO / "configs" / "tiny.yaml"), "--print-config", "train.max_steps=7")
    assert first.returncode == 0, first.stderr
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(first.stdout)
    again = megalm("train", "--config", str(resolved), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "name: tiny" in again.stdout


def test_version_is_the_packages():
    import re

    result = megalm("--version")
    expected = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert result.returncode == 0 and result.stdout.strip() == f"megalm {expected}", result.stdout + result.stderr

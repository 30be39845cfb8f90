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

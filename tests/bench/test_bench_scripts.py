"""The issue-#6 measurement scripts and the GPU check: formulas by hand, schedules, configs, a tiny real run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megalm.config import load_config
from megalm.model.transformer import param_count
from tests.helpers import REPO


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero_formula_by_hand():
    zm = load_bench("zero_memory")
    # 1000 parameters, 4 ranks. bf16 ZeRO-2: params 2*1000, grads 2*1000/4, optimizer 12*1000/4.
    assert zm.formula(1000, "bf16", 2, 4) == {"params": 2000, "grads": 500, "optim": 3000, "total": 5500}
    # fp32 ZeRO-0: 4 + 4 + 8 bytes each; ZeRO-3 at 2 ranks halves everything.
    assert zm.formula(1000, "fp32", 0, 2)["total"] == 16_000
    assert zm.formula(1000, "fp32", 3, 2) == {"params": 2000, "grads": 2000, "optim": 4000, "total": 8000}


def test_pipeline_bubble_counted_from_deepspeed_schedule():
    pb = load_bench("pipeline_bubble")
    for p in (2, 4):
        for m in (1, 3, 8):
            row = pb.schedule_bubble(p, m)
            assert row["ticks"] == 2 * (m + p - 1)
            assert row["idle_per_stage"] == pytest.approx([(p - 1) / (m + p - 1)] * p)


def test_llama_1b_config():
    cfg = load_config(REPO / "configs" / "llama_1b.yaml")
    cfg.validate(world_size=1)
    m = cfg.model
    assert (m.family, m.n_layer, m.d_model, m.n_head, m.n_kv_head, m.ffn_size, m.seq_len) == (
        "llama", 22, 2048, 32, 4, 5632, 4096)  # fmt: skip
    assert (cfg.precision.dtype, m.attention, cfg.zero.stage) == ("bf16", "flash", 0)
    # per block: q, o 2 x 2048^2; k, v 2 x 2048 x 256; SwiGLU 3 x 2048 x 5632; 2 RMSNorms 2 x 2048
    block = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
    assert param_count(m)["total"] == 22 * block + 2048 + 2 * 32000 * 2048 == 1_100_048_384


def test_gpu_check_script_parses():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(REPO / "bench" / script)], check=True)


def test_gpu_check_dry_run_runs_every_part_on_cpu(tmp_path):
    """The GPU check's plumbing end to end at tiny sizes: data, both llama runs, kernels, fp16 (bf16 here), the
    sync-debug run and the GPU tests (which skip on CPU); every part must end ok and report its figures."""
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    parts = results["parts"]
    assert list(parts) == ["env", "llama_fused", "llama_eager", "kernels", "ops", "fp16", "sync", "pytest_gpu"]
    assert all(p["status"] == "ok" for p in parts.values()), parts
    for name in ("llama_fused", "llama_eager"):
        assert parts[name]["figures"]["steps"] == 4 and parts[name]["figures"]["tokens_per_s"] > 0
    assert parts["env"]["figures"]["matmul_tflops"] > 0 and parts["fp16"]["figures"]["last"]["step"] == 6
    assert "| llama_fused | ok |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero_memory_tiny_model_measures_the_shards(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # spawned ranks import the module by name
    zm = importlib.import_module("zero_memory")
    tiny = {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 64, "vocab_size": 512, "seq_len": 64}
    r = zm.measure("fp32", 3, 2, tiny)
    psi = r["psi"]
    assert r["measured"]["params"] >= 4 * psi / 2  # this rank's partition (DeepSpeed pads it)
    assert r["measured"]["params"] < 4 * psi / 2 * 1.1
    assert r["measured"]["optim"] >= 8 * psi / 2


def test_nonfinite_guard_bench_runs_side_by_side(capsys):
    nf = load_bench("nonfinite_guard")
    assert nf.main(["--steps", "2", "--rounds", "2", "--layers", "1", "--d-model", "32", "--seq-len", "16",
                    "--batch", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "step without the guard" in out and "with it" in out and "one observe() alone" in out

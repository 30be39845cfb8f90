"""The issue-#6 measurement scripts and the GPU check: formulas by hand, schedules, configs, a tiny real run."""

from __future__ import annotations

import importlib.util
import subprocess

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
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


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

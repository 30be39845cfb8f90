"""Metrics: model FLOPs and MFU against hand arithmetic, TensorBoard event files, Weights & Biases rows."""

from __future__ import annotations

import sys
import types

import pytest

from megalm.config import ModelConfig, load_config
from megalm.errors import MegalmError
from megalm.model.transformer import param_count
from megalm.training import metrics
from tests.helpers import ok, read_metrics, run_pretrain, tiny_config

GPT2_124M = ModelConfig(family="gpt2", n_layer=12, n_head=12, d_model=768, vocab_size=50304, seq_len=1024)


def test_gpt2_124m_flops_per_token_by_hand():
    # One block: qkv 768*2304 + 2304, proj 768*768 + 768, fc 768*3072 + 3072, fc-proj 3072*768 + 768,
    # two LayerNorms 2*(768 + 768).
    block = (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 1536
    assert block == 7_087_872
    # N: 12 blocks + the tied embedding/head (50304*768 = 38,633,472); not the position embedding nor the final
    # LayerNorm (1536; nanoGPT's 123.69M counts it).
    n = 12 * 7_087_872 + 38_633_472
    assert n == 123_687_936
    assert param_count(GPT2_124M)["matmul"] == n
    assert param_count(GPT2_124M)["total"] == n + 1536 + 1024 * 768  # + final LayerNorm + position embedding
    # 6N = 742,127,616; attention 12 * L12 * H12 * Q64 * T1024 = 113,246,208.
    assert metrics.flops_per_token(GPT2_124M, n) == 742_127_616 + 113_246_208


def test_throughput_and_mfu_by_hand():
    # 8 devices together process 1,000,000 tokens in 10 s at 855,373,824 FLOPs per token (GPT-2 124M above):
    # 100,000 tok/s * 855,373,824 = 85.5373824 PFLOP/s in all, 10.6921728 TFLOP/s per device; H200 peak 989.
    got = metrics.throughput(1_000_000, 10.0, 855_373_824.0, n_devices=8, peak=989.0)
    assert got["tokens_per_s"] == pytest.approx(100_000.0)
    assert got["tflops"] == pytest.approx(10.6921728)
    assert got["mfu"] == pytest.approx(0.010811095)
    assert metrics.throughput(10, 1.0, 1.0, 1, None)["mfu"] is None


def test_peak_tflops_override_and_cpu():
    assert metrics.peak_tflops(400.0) == (400.0, "log.peak_tflops")
    if not metrics.torch.cuda.is_available():
        assert metrics.peak_tflops(None)[0] is None


def test_precision_scalars_loss_scale_with_fp16_only():
    engine = lambda fp16, **kw: types.SimpleNamespace(fp16_enabled=lambda: fp16, **kw)  # noqa: E731
    fp16 = engine(True, skipped_steps=3, optimizer=types.SimpleNamespace(loss_scale=2.0**14))
    assert metrics.precision_scalars(fp16) == {"skipped_steps": 3, "loss_scale": 16384.0}
    bf16 = engine(False, skipped_steps=0, optimizer=types.SimpleNamespace())
    assert metrics.precision_scalars(bf16) == {"skipped_steps": 0}


def test_tensorboard_events_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = metrics.MetricsWriter(tmp_path, tensorboard=True)
    writer.write({"step": 1, "loss": 5.0, "lr": 1e-4, "grad_norm": 2.0, "mfu": None, "skipped_steps": 0})
    writer.write({"step": 2, "loss": 4.0, "lr": 2e-4, "grad_norm": None, "mfu": 0.25, "skipped_steps": 1})
    writer.write({"step": 2, "val_loss": 4.5, "val_ppl": 90.0})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = lambda tag: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]  # noqa: E731
    assert scalars("loss") == [(1, 5.0), (2, 4.0)]
    assert scalars("lr") == [(1, 1e-4), (2, 2e-4)]
    assert scalars("grad_norm") == [(1, 2.0)]  # None is not written
    assert scalars("mfu") == [(2, 0.25)]
    assert scalars("skipped_steps") == [(1, 0.0), (2, 1.0)]
    assert scalars("val_loss") == [(2, 4.5)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    """A `wandb` module that records calls; no key configured (HOME without .netrc, no WANDB_* variables)."""
    calls: list = []
    module = types.ModuleType("wandb")  # only init is used: the run id is megalm's own
    module.init = lambda **kw: calls.append(("init", kw)) or FakeRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_wandb_logs_rows_offline_and_resumes_the_same_run(tmp_path, fake_wandb):
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}", "log.wandb=true", "log.tensorboard=false"])
    cfg.run_dir.mkdir()
    writer = metrics.MetricsWriter.from_config(cfg)
    writer.write({"step": 10, "loss": 3.0, "lr": 1e-3, "mfu": None, "grad_norm": 1.5})
    writer.write({"step": 10, "val_loss": 3.2})
    writer.close()
    init = fake_wandb[0][1]
    run_id = (cfg.run_dir / "wandb_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    assert (init["project"], init["id"], init["resume"], init["mode"]) == ("megalm", run_id, "allow", "offline")
    assert init["config"]["log"]["wandb"] is True
    assert fake_wandb[1:] == [("log", {"loss": 3.0, "lr": 1e-3, "grad_norm": 1.5}, 10),
                              ("log", {"val_loss": 3.2}, 10), ("finish",)]  # fmt: skip
    metrics.MetricsWriter.from_config(cfg).close()  # a resumed run continues the same W&B run
    assert fake_wandb[4][1]["id"] == run_id


def test_wandb_mode_honours_environment_and_key(monkeypatch, fake_wandb):
    assert metrics.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert metrics.wandb_mode() == "offline"


def test_wandb_missing_is_a_startup_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = load_config(None, ["log.wandb=true"])
    with pytest.raises(MegalmError, match=r"log.wandb .*wandb package is not installed"):
        metrics.check_log_backends(cfg)
    metrics.check_log_backends(load_config(None, ["log.wandb=false"]))


@pytest.mark.multiprocess
def test_training_run_writes_every_scalar(tmp_path, dataset):
    """A real (tiny, one-process, fp32) run: metrics.jsonl rows and TensorBoard events carry the scalars."""
    config = tiny_config(tmp_path, dataset, train={"max_steps": 4, "log_interval": 2, "eval_interval": 4},
                         log={"tensorboard": True, "peak_tflops": 1.0})  # fmt: skip
    ok(run_pretrain(config))
    run = tmp_path / "runs" / "tiny"
    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 1.0)
        assert r["data_wait_s"] >= 0 and r["mem_bytes"] > 0 and r["grad_norm"] > 0
        assert r["skipped_steps"] == 0 and "loss_scale" not in r  # fp32: no loss scaling
    assert any("val_loss" in r for r in rows)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return  # tensorboard not installed: the run wrote metrics.jsonl only (checked above)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "mem_bytes", "data_wait_s",
            "skipped_steps"}  # fmt: skip
    assert want <= tags, want - tags


@pytest.mark.multiprocess
def test_real_wandb_logs_offline_and_a_resumed_run_continues_it(dataset, tmp_path, monkeypatch):
    """The installed wandb package (not a stand-in), no key, no network: an offline run holding the scalars; the
    same command run again (resuming) logs to the same W&B run id."""
    pytest.importorskip("wandb", reason="wandb not installed (pip install wandb; it is in the dev extra)")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_config(tmp_path, dataset, log={"wandb": True, "tensorboard": False},
                         train={"log_interval": 2, "eval_interval": 2})  # fmt: skip
    run_dir = tmp_path / "runs" / "tiny"
    for steps in (4, 6):
        ok(run_pretrain(config, f"train.max_steps={steps}", "checkpoint.interval=2"))
    run_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id], "both invocations log to one W&B run"
    logged = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "data_wait_s"):
        assert key.encode() in logged, key

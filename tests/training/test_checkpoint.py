"""Crash-safe checkpoints: atomic save, manifest and checksums, fallback past damaged checkpoints, weights-only loading,
per-rank RNG state, and bit-for-bit resume after a real SIGKILL of a 2-process run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.errors import MegalmError
from megalm.parallel import RNGTracker
from megalm.training import checkpoint
from tests.helpers import REPO, free_port, ok, read_metrics, run_pretrain, subprocess_env, tiny_config, train_losses

# --- a tiny DeepSpeed engine (independent of the megalm model, which the checkpoint code does not need) ------------


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, y):
        x = x.to(self.a.weight.dtype)
        return F.mse_loss(self.b(torch.tanh(self.a(x))).float(), y)


def _engine(stage: int = 1, dtype: str = "fp32", init_seed: int = 0):
    import deepspeed

    from megalm.training.engine import init_deepspeed_comm

    init_deepspeed_comm()
    torch.manual_seed(init_seed)
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ds = {"train_batch_size": 2 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 2,
          "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "bf16": {"enabled": dtype == "bf16"}, "zero_allow_untested_optimizer": True,
          "zero_force_ds_cpu_optimizer": False, "steps_per_print": 1 << 30}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds,
                                      dist_init_required=False)  # fmt: skip
    return engine


def _step(engine, step: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x, y = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return loss.item()


def _meta(step: int) -> dict:
    return {"step": step, "consumed_tokens": 10 * step, "loader": {"epoch": 0}, "config": {"x": [1, 2]}}


def _save(engine, d: Path, step: int, keep_last: int = 0, log=print) -> Path:
    return checkpoint.save(engine, d, step, _meta(step), keep_last, rank_state={"loader": {"rank": dist.get_rank()}},
                           log=log)  # fmt: skip


def _warnings(fn) -> tuple[object, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = fn()
    return result, err.getvalue()


def _raises(fn, *needles: str) -> str:
    with pytest.raises(MegalmError) as e:
        fn()
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    return str(e.value)


# --- save: layout, manifest, latest, pruning, leftovers; resume exactness; RNG per rank ----------------------------


def check_save_and_resume(rank: int, world: int, root: str) -> None:
    d = Path(root) / "ckpt"
    engine = _engine(stage=1)
    logs: list[str] = []
    for step in (1, 2):
        _step(engine, step)
        torch.manual_seed(100 + rank)  # checkpoint 2 holds this RNG state, different on each rank
        _save(engine, d, step, keep_last=2, log=logs.append)
    after_save = torch.rand(4)
    np_after, py_after = np.random.rand(3), random.random()
    losses = [_step(engine, s) for s in (3, 4)]

    if rank == 0:  # a crash left a half-written save and a half-written `latest` behind
        (d / ".tmp-step_00000009").mkdir()
        (d / ".tmp-step_00000009" / "mp_rank_00_model_states.pt").write_bytes(b"half")
        (d / ".tmp-latest").write_text("step_0")
    dist.barrier()
    path = _save(engine, d, 3, keep_last=2, log=logs.append)
    if rank == 0:
        assert logs == [
            f"removed 2 leftover(s) of interrupted checkpoint saves in {d}: .tmp-latest, .tmp-step_00000009"
        ]
        assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000002", "step_00000003",
                                                       "zero_to_fp32.py", "zero_to_torch.py"]  # fmt: skip
        assert (d / "latest").read_text() == "step_00000003" and path == d / "step_00000003"
        manifest = json.loads((path / checkpoint.MANIFEST).read_text())
        assert manifest["step"] == 3 and manifest["world_size"] == 2 and manifest["format"] == checkpoint.FORMAT
        names = {p.name for p in path.iterdir()} - {checkpoint.MANIFEST}
        assert set(manifest["files"]) == names == {
            "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "megalm_rank_0.pt", "megalm_rank_1.pt"}  # fmt: skip
        for name, entry in manifest["files"].items():
            assert checkpoint.file_digest(path / name) == entry, name

    # A fresh engine (other initial weights, other RNG state) resumes checkpoint 2 exactly.
    fresh = _engine(stage=1, init_seed=99)
    torch.manual_seed(12345)
    where = checkpoint.resolve_resume(str(d / "step_00000002"), d)
    assert where == d / "step_00000002"
    meta = checkpoint.load(fresh, where)
    assert meta["step"] == 2 and meta["consumed_tokens"] == 20 and meta["config"] == {"x": [1, 2]}
    assert meta["loader"] == {"rank": rank}  # each rank's own loader state
    assert torch.equal(torch.rand(4), after_save) and np.array_equal(np.random.rand(3), np_after)
    assert random.random() == py_after
    assert [_step(fresh, s) for s in (3, 4)] == losses  # bit for bit
    assert checkpoint.resolve_resume("auto", d) == d / "step_00000003"


@pytest.mark.multiprocess
def test_save_is_atomic_prunes_cleans_up_and_resumes_exactly(tmp_path):
    from tests.distributed import run_distributed

    run_distributed(check_save_and_resume, 2, str(tmp_path), timeout=240)


# --- damaged checkpoints: detected on load, named, skipped with a warning -------------------------------------------


def check_damaged_checkpoints(rank: int, world: int, root: str) -> None:
    d = Path(root) / "ckpt"
    engine = _engine(stage=1)
    for step in (1, 2, 3, 4):
        _step(engine, step)
        _save(engine, d, step)
    if rank == 0:
        shard = d / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:-100])  # truncated
        model = d / "step_00000003" / "mp_rank_00_model_states.pt"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 1  # one flipped bit, same size
        model.write_bytes(bytes(data))
        (d / "step_00000002" / checkpoint.MANIFEST).unlink()  # as if killed before the rename (pre-manifest)
    dist.barrier()
    where, warned = _warnings(lambda: checkpoint.resolve_resume("auto", d))
    assert where == d / "step_00000001"
    assert checkpoint.load(engine, where)["step"] == 1
    if rank == 0:
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in warned and "truncated" in warned
        assert "mp_rank_00_model_states.pt: sha256 checksum mismatch" in warned
        assert f"{d / 'step_00000002'}: {checkpoint.MANIFEST} is missing" in warned
        assert warned.count("warning: skipping damaged checkpoint") == 3
    # Named explicitly, a damaged checkpoint is an error naming the file (on every rank: none waits forever).
    _raises(lambda: checkpoint.resolve_resume(str(d / "step_00000004"), d),
            "step_00000004", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncated")  # fmt: skip
    _raises(lambda: checkpoint.resolve_resume(str(d / "nope"), d), "nope", "is not a directory")
    if rank == 0:
        (d / "step_00000001" / "megalm_rank_1.pt").unlink()
    dist.barrier()
    msg, _ = _warnings(lambda: _raises(lambda: checkpoint.resolve_resume("auto", d), "no valid checkpoint"))
    assert "move them away to start over" in msg
    _warnings(lambda: _raises(lambda: checkpoint.resolve_resume(str(d), d), "no valid checkpoint", str(d)))
    assert checkpoint.resolve_resume("auto", Path(root) / "empty") is None  # nothing saved yet: start fresh
    _raises(lambda: checkpoint.resolve_resume("none", d), "train.resume=none, but", "earlier run")
    assert checkpoint.resolve_resume("none", Path(root) / "empty") is None


@pytest.mark.multiprocess
def test_damaged_checkpoints_are_named_and_skipped(tmp_path):
    from tests.distributed import run_distributed

    run_distributed(check_damaged_checkpoints, 2, str(tmp_path), timeout=240)


# --- weights_only loading: DeepSpeed's own files load at every ZeRO stage; code is refused -------------------------


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def check_malicious_pickle_is_refused(rank: int, world: int, root: str) -> None:
    d, marker = Path(root) / "ckpt", Path(root) / "pwned"
    engine = _engine(stage=0)
    _step(engine, 1)
    path = _save(engine, d, 1)
    evil = path / "mp_rank_00_model_states.pt"
    torch.save({"module": _Evil(str(marker))}, evil)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][evil.name] = checkpoint.file_digest(evil)  # the checksum layer lets it through
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.resolve_resume("auto", d) == path
    _raises(lambda: checkpoint.load(engine, path), f"refusing to load {evil}", "posix.system", "weights_only=True")
    assert not marker.exists()
    _raises(lambda: checkpoint.safe_load(evil), "posix.system")
    assert not marker.exists()


def test_malicious_pickle_in_a_checksummed_checkpoint_is_refused(tmp_path):
    from tests.distributed import run_distributed

    run_distributed(check_malicious_pickle_is_refused, 1, str(tmp_path), timeout=240)
    assert not (tmp_path / "pwned").exists()


def check_zero_stages_load_weights_only(rank: int, world: int, root: str, combos: list) -> None:
    for stage, dtype in combos:
        d = Path(root) / f"z{stage}{dtype}"
        engine = _engine(stage=stage, dtype=dtype)
        _step(engine, 1)
        _save(engine, d, 1)
        expected = [_step(engine, s) for s in (2, 3)]
        fresh = _engine(stage=stage, dtype=dtype, init_seed=5)
        checkpoint.load(fresh, checkpoint.resolve_resume("auto", d))
        assert [_step(fresh, s) for s in (2, 3)] == expected, (stage, dtype)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "combos",
    [
        pytest.param([(3, "bf16")], id="zero3-bf16"),  # ZeRO-1 fp32: test_save_is_atomic_...
        pytest.param(
            [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32")],
            id="other-stages",
            marks=pytest.mark.slow,
        ),  # fmt: skip
    ],
)
def test_deepspeed_checkpoints_load_with_weights_only(tmp_path, combos):
    from tests.distributed import run_distributed

    run_distributed(check_zero_stages_load_weights_only, 2, str(tmp_path), combos, timeout=400)


def test_safe_load_reports_truncation_and_code_without_unpickling_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:300])
    _raises(lambda: checkpoint.safe_load(bad), str(bad), "truncated or corrupted")
    evil = tmp_path / "evil.pt"
    torch.save(_Evil(str(tmp_path / "pwned")), evil)
    msg = _raises(lambda: checkpoint.safe_load(evil), str(evil), "posix.system")
    assert "add_safe_globals" not in msg and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format": "megalm-checkpoint/1", "files": {"a": 3}}'])
def test_a_malformed_manifest_is_named(tmp_path, text):
    (tmp_path / checkpoint.MANIFEST).write_text(text)
    [problem] = checkpoint.verify(tmp_path)  # no process group: one process does it all
    assert problem.startswith(f"{checkpoint.MANIFEST} is unreadable")


def test_save_refuses_metadata_that_weights_only_loading_would_refuse(tmp_path):
    with pytest.raises(TypeError, match=r"metadata\['loader'\]\['epoch'\] is a numpy.int64"):
        checkpoint.save(None, tmp_path, 1, {"loader": {"epoch": np.int64(3)}}, 0)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    tracker = RNGTracker()
    tracker.seed_all(3, tp_offset=7)
    with tracker.fork():
        torch.rand(1)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random()
    np.random.randn()  # mid-stream, numpy holding a cached gaussian
    torch.rand(1)
    torch.save(checkpoint.rng_state(tracker), tmp_path / "rng.pt")

    def draw():
        with tracker.fork():
            tp = torch.rand(3)
        return random.random(), np.random.randn(2).tolist(), torch.rand(3), tp

    first = draw()
    checkpoint.set_rng_state(checkpoint.safe_load(tmp_path / "rng.pt"), tracker)
    second = draw()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


# --- end to end: SIGKILL a 2-process run at random steps; the same command resumes bit for bit ------------------


MAX_STEPS = 12


def _reference(dataset, root: Path, *overrides: str) -> tuple:
    """(config, torchrun command, overrides, {step: loss}) of an uninterrupted 2-process run with dropout on."""
    config = tiny_config(root, dataset, model={"dropout": 0.1},
                         train={"max_steps": MAX_STEPS, "eval_interval": 0, "log_interval": 1},
                         checkpoint={"interval": 1})  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    ok(run_pretrain(config, f"train.run_dir={root / 'straight'}", *overrides, launcher=torchrun + [str(free_port())]))
    reference = train_losses(root / "straight")
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    return config, torchrun, overrides, reference


@pytest.fixture(scope="module")
def kill_setup(dataset, tmp_path_factory):
    """dp=2 (ZeRO-0, the default)."""
    return _reference(dataset, tmp_path_factory.mktemp("kill"))


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it, as a node failure would.

    torchrun starts each worker in a session of its own, so killing the launcher's process group is not enough:
    freeze the whole tree first (no process sees another die), then kill every process group in it.
    """
    import psutil

    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGSTOP)
    for pgid in {os.getpgid(p.pid) for p in tree}:
        os.killpg(pgid, signal.SIGKILL)


BACKGROUND = "writing in the background"  # what an asynchronous save logs once its state is copied


def _reached(run_dir: Path, log_path: Path, kill_at: int, on_background_save: bool) -> bool:
    """Whether the run has logged step kill_at (or, on_background_save, started its kill_at-th background save)."""
    if on_background_save:
        return log_path.read_text().count(BACKGROUND) >= kill_at
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and any(r["step"] >= kill_at for r in read_metrics(run_dir))


def _kill_and_resume(kill_setup, run_dir: Path, kill_at: int, delay: float, on_background_save=False) -> list[str]:
    """SIGKILL the run `delay` s after it logs step kill_at (on_background_save: after its kill_at-th background
    save starts), run the same command again and check every loss against the uninterrupted run; returns the
    leftovers of interrupted saves the kill left."""
    config, torchrun, overrides, reference = kill_setup
    cmd = torchrun + [str(free_port()), str(REPO / "launcher" / "pretrain.py"), "--config", str(config),
                      f"train.run_dir={run_dir}", *overrides]  # fmt: skip
    t0 = time.monotonic()
    log_path = run_dir.parent / f"{run_dir.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not _reached(run_dir, log_path, kill_at, on_background_save):
            assert proc.poll() is None and time.monotonic() < deadline, f"run ended before step {kill_at}"
            time.sleep(0.005)
        time.sleep(delay)  # land anywhere in the step: forward, backward, optimizer, checkpoint save
        _kill_tree(proc.pid)
        proc.wait()
    killed_at = max(r["step"] for r in read_metrics(run_dir))
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-"))
    t1 = time.monotonic()
    again = ok(subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300))
    print(f"killed at step {killed_at} (asked {kill_at} + {delay:.3f} s) after {t1 - t0:.1f} s, leftovers "
          f"{leftovers}; the same command then ran {time.monotonic() - t1:.1f} s")  # fmt: skip
    resumed_at = int(again.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    # A background save of step k is published at the latest when the save of step k+1 starts.
    assert kill_at - (2 if on_background_save else 1) <= resumed_at <= killed_at, (kill_at, resumed_at, killed_at)
    assert f"done: step {MAX_STEPS}" in again.stdout
    if leftovers:
        assert f"removed {len(leftovers)} leftover(s) of interrupted checkpoint saves" in again.stdout
    rows = [r for r in read_metrics(run_dir) if "loss" in r]  # the killed run's rows, then the resumed run's
    assert [r["step"] for r in rows] == list(range(1, killed_at + 1)) + list(range(resumed_at + 1, MAX_STEPS + 1))
    for r in rows:
        assert r["loss"] == reference[r["step"]], (r["step"], r["loss"], reference[r["step"]])
    return leftovers


@pytest.mark.multiprocess
def test_sigkill_then_same_command_resumes_bit_for_bit(kill_setup, tmp_path):
    rng = random.Random(20251129)
    kill_at, delay = rng.randint(2, MAX_STEPS - 2), rng.uniform(0.0, 0.2)
    _kill_and_resume(kill_setup, tmp_path / "run", kill_at, delay)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_at_three_random_steps_resumes_bit_for_bit(kill_setup, tmp_path):
    rng = random.Random(7)
    points = sorted((rng.randint(2, MAX_STEPS - 1), rng.uniform(0.0, 0.3)) for _ in range(3))
    print(f"kill points (step, extra delay s): {[(k, round(t, 3)) for k, t in points]}")
    for i, (kill_at, delay) in enumerate(points):
        _kill_and_resume(kill_setup, tmp_path / f"run{i}", kill_at, delay)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_at_tp2_resumes_bit_for_bit_with_the_tp_rng_stream(dataset, tmp_path):
    """tp=2: dropout inside TP regions draws from the TP tracker's stream, which the checkpoint restores too."""
    setup = _reference(dataset, tmp_path, "parallel.tp=2")
    _kill_and_resume(setup, tmp_path / "run", kill_at=5, delay=0.05)


@pytest.mark.multiprocess
def test_sigkill_during_background_saves_leaves_the_previous_checkpoint_and_resumes_bit_for_bit(kill_setup, tmp_path):
    """checkpoint.async: a save every step, each written while the next step trains; SIGKILL at three random moments
    just after a background save started (so inside the write, or the publish); the same command resumes from the
    newest published checkpoint and every loss equals the uninterrupted synchronous run's."""
    config, torchrun, overrides, reference = kill_setup
    setup = (config, torchrun, (*overrides, "checkpoint.async=true"), reference)
    rng = random.Random(20261201)
    points = sorted((rng.randint(2, MAX_STEPS - 3), rng.uniform(0.0, 0.05)) for _ in range(3))
    print(f"kill points (background save, extra delay s): {[(k, round(t, 3)) for k, t in points]}")
    leftovers = [_kill_and_resume(setup, tmp_path / f"run{i}", k, t, on_background_save=True)
                 for i, (k, t) in enumerate(points)]  # fmt: skip
    assert any(leftovers), "no kill landed inside a save"


# --- a full disk during a save: named, cleaned up, the previous checkpoint kept ------------------------------------


def check_a_full_disk_is_named_and_cleaned_up(rank: int, world: int, root: str) -> None:
    from megalm.training import async_checkpoint

    d = Path(root) / "ckpt"
    engine = _engine(stage=1)
    _step(engine, 1)
    _save(engine, d, 1)
    real = torch.save

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    for background in (False, True):
        _step(engine, 2)
        torch.save = full_disk if rank == 1 else real  # rank 1's disk is full
        try:
            if background:
                saver = async_checkpoint.BackgroundSaver()
                async_checkpoint.save_in_background(engine, d, 2, _meta(2), 0, saver, log=lambda s: None)
                msg = _raises(saver.wait, "an asynchronous checkpoint save failed", "No space left on device")
            else:
                msg = _raises(lambda: _save(engine, d, 2), "checkpoint step 2 was not saved: rank 1 failed writing",
                              "No space left on device", "still names the previous checkpoint")  # fmt: skip
        finally:
            torch.save = real
        assert "optim_states.pt" in msg or "megalm_rank_1.pt" in msg, msg  # the file that could not be written
        dist.barrier()
        assert not any(p.name.startswith(".tmp-") for p in d.iterdir()), sorted(p.name for p in d.iterdir())
        assert (d / "latest").read_text() == "step_00000001" and checkpoint.list_tags(d) == ["step_00000001"]
    assert checkpoint.resolve_resume("auto", d) == d / "step_00000001"


@pytest.mark.multiprocess
def test_a_full_disk_during_a_save_is_named_and_leaves_the_previous_checkpoint(tmp_path):
    from tests.distributed import run_distributed

    run_distributed(check_a_full_disk_is_named_and_cleaned_up, 2, str(tmp_path), timeout=240)

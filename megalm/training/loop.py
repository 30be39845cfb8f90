"""Train and eval loop: gradient accumulation through the DeepSpeed engine, metrics, progress, checkpoints.

The Trainer owns the state of a run (LoopState, the data loader's position) and its checkpoints: `save` writes them
with megalm.training.checkpoint, `resume` restores them; the entry point only builds the pieces and calls `run`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalm.config import Config, Layout
from megalm.convert.consolidate import TrainingState
from megalm.data.loader import Split, TrainBatches, eval_batches, num_windows
from megalm.model.transformer import param_count
from megalm.parallel import ParallelState, global_grad_norm
from megalm.progress import Progress
from megalm.training import async_checkpoint, changes, checkpoint, relayout
from megalm.training.health import NonFiniteGuard
from megalm.training.metrics import (
    MetricsWriter,
    check_log_backends,
    flops_per_token,
    memory_bytes,
    precision_scalars,
    throughput,
)
from megalm.training.signals import StopSignals


@dataclass
class LoopState:
    """Where the run stands; `state_dict` is saved in every checkpoint (history is this process's log only)."""

    step: int = 0
    consumed_tokens: int = 0
    best_val_loss: float | None = None
    preempted: bool = False
    stop_signal: str | None = None  # the signal that ended the run early (SIGTERM, SIGUSR1, SIGINT), when known
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens, "best_val_loss": self.best_val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.consumed_tokens = state["step"], state["consumed_tokens"]
        self.best_val_loss = state.get("best_val_loss")


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over all ranks (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def to_device(micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[tuple]:
    """The step's micro-batches on `device`; to a GPU from pinned memory without blocking the host."""
    if device.type != "cuda":
        return [(x.to(device), y.to(device)) for x, y in micro_batches]
    return [(x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True))
            for x, y in micro_batches]  # fmt: skip


def train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], layout: Layout, state: ParallelState):
    """Forward/backward every micro-batch (already on the device), then one optimizer step.

    Returns (this rank's loss of each micro-batch as one device tensor, the gradient norm as DeepSpeed or
    global_grad_norm gives it: a float, a 0-dim tensor or None). Nothing here waits for the device: the loop
    reads both once per log interval. DeepSpeed reports the gradient norm itself except in plain fp32 without
    ZeRO; there it is measured here after the last backward (averaged over dp ranks, not yet clipped).
    """
    if layout.pipeline:  # the pipeline engine runs the 1F1B schedule over the micro-batches
        loss = engine.train_batch(data_iter=iter(micro_batches))
        norm = engine.get_global_grad_norm()
        norm = getattr(engine.optimizer, "last_grad_norm", None) if norm is None else norm
        return loss.detach().reshape(1), norm
    losses, own_norm = [], None
    for i, (x, y) in enumerate(micro_batches):
        loss = engine(x, y)
        engine.backward(loss)
        if (
            i == len(micro_batches) - 1
            and engine.zero_optimization_stage() == 0
            and not (engine.bfloat16_enabled() or engine.fp16_enabled())
        ):
            own_norm = global_grad_norm(engine.module.parameters(), state)
        engine.step()
        losses.append(loss.detach())
    norm = engine.get_global_grad_norm()
    return torch.stack(losses), norm if norm is not None else own_norm


@contextlib.contextmanager
def sync_debug(mode: str, device: torch.device) -> Iterator[None]:
    """torch.cuda.set_sync_debug_mode(mode) inside the block (train.sync_debug; nothing off CUDA or when off)."""
    if mode == "off" or device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def step_means(losses: list[torch.Tensor]) -> list[float]:
    """Per-step mean losses from each step's per-micro-batch loss tensor: one device-to-host copy for all."""
    flat = torch.cat([t.reshape(-1).float() for t in losses]).tolist()
    out, i = [], 0
    for t in losses:
        n = t.numel()
        out.append(sum(flat[i : i + n]) / n)
        i += n
    return out


@torch.no_grad()
def evaluate(engine, split: Split, cfg: Config, layout: Layout, state: ParallelState, device: torch.device) -> dict:
    """Mean loss and perplexity over the first eval_iters * global_batch_size windows of the validation split
    (rounded down to a multiple of dp: every rank must run the same number of forwards)."""
    engine.eval()
    # Every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively).
    dp = layout.dp
    n_windows = num_windows(split, cfg.model.seq_len)
    limit = min(cfg.train.eval_iters * layout.global_batch_size, n_windows) // dp * dp
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of window losses, windows)
    batches = eval_batches(split, seq_len=cfg.model.seq_len, micro_batch_size=layout.micro_batch_size,
                           dp_rank=state.dp_rank, dp_size=dp, max_windows=limit,
                           on_error=cfg.data.on_error)  # fmt: skip
    if layout.pipeline:
        return _evaluate_pipeline(engine, list(batches), layout)
    for x, y in batches:
        losses = engine(x.to(device), y.to(device), reduction="none")  # (B, T)
        loss_sum[0] += losses.mean(dim=1).sum().double()
        loss_sum[1] += x.shape[0]
    dist.all_reduce(loss_sum, group=state.dp_group)
    engine.train()
    val_loss = (loss_sum[0] / loss_sum[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_windows": int(loss_sum[1])}


def _evaluate_pipeline(engine, batches: list, layout: Layout) -> dict:
    """The pipeline engine's eval_batch: mean loss over full micro-batches, averaged over data-parallel ranks."""
    full = [b for b in batches if b[0].shape[0] == layout.micro_batch_size]  # its buffers have fixed shapes
    loss = engine.eval_batch(iter(full), num_micro_batches=len(full)).item()
    engine.train()
    windows = len(full) * layout.micro_batch_size * layout.dp
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_windows": windows}


class Trainer:
    """Owns the engine, data, writers and state of one run: `run()` trains to train.max_steps, `save()` and
    `resume()` write and restore its checkpoints (weights, optimizer, schedule, loop and loader state, RNG)."""

    def __init__(self, cfg: Config, layout: Layout, state: ParallelState, engine, train: TrainBatches,
                 val: Split | None, device: torch.device, peak_tflops: float | None):  # fmt: skip
        self.cfg, self.layout, self.par, self.engine = cfg, layout, state, engine
        self.train, self.val, self.device, self.peak = train, val, device, peak_tflops
        self.rank = state.rank
        self.state = LoopState()
        check_log_backends(cfg)  # every rank fails alike, before the first step
        self.writer = MetricsWriter.from_config(cfg) if self.rank == 0 else None
        self.data_wait_s = 0.0  # this rank's seconds in train.next_step() since the last metrics row
        self.flops_tok = flops_per_token(cfg.model, param_count(cfg.model)["matmul"])
        self.last_grad_norm: float | torch.Tensor | None = None  # of the last step, read when logged
        self.saver = async_checkpoint.BackgroundSaver()  # checkpoint.async: the save in flight, if any
        self.health = NonFiniteGuard(device)  # a NaN/inf loss or grad norm stops the run, checked without a sync
        if cfg.checkpoint.async_:
            async_checkpoint.check_host_memory(engine)  # refuse now rather than at the first save

    # ------------------------------------------------------------------------------------------ state and checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The loop's position and the data loader's (the same on every rank); saved in every checkpoint."""
        st = self.state
        return {**st.state_dict(), "consumed_samples": st.consumed_tokens // self.cfg.model.seq_len,
                "loader": self.train.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        self.train.load_state_dict(state["loader"])

    def save(self, log=print, background: bool = False) -> Path:
        """Collective: checkpoint the run at its current step into checkpoint.dir (see megalm.training.checkpoint);
        `background`: snapshot it and write it while training goes on (megalm.training.async_checkpoint). Either
        way the previous background save is finished first."""
        self.health.check()  # nothing non-finite is ever written
        cfg = self.cfg
        meta = {**self.state_dict(), "config": cfg.to_dict()}
        args = (self.engine, cfg.checkpoint_dir, self.state.step, meta, cfg.checkpoint.keep_last)
        if background:
            t0 = time.perf_counter()
            path = async_checkpoint.save_in_background(*args, self.saver, rng_tracker=self.par.rng, log=log)
            log(f"checkpoint {path.name}: state copied in {time.perf_counter() - t0:.2f} s, writing in the background")
            return path
        self.saver.wait()
        path = checkpoint.save(*args, rng_tracker=self.par.rng, log=log)
        log(f"saved checkpoint {path}")
        return path

    def resume(self, path: Path, moved: TrainingState | None = None) -> list[str]:
        """Collective: continue from checkpoint `path`. Saved in this layout, DeepSpeed loads it; otherwise `moved` is
        its layout-free state (megalm.training.relayout), whose weights are already in the model. This run's
        optimizer hyperparameters take effect; returns how its config differs from the checkpoint's."""
        if moved is None:
            meta = checkpoint.load(self.engine, path, rng_tracker=self.par.rng)
        else:
            relayout.load_into_engine(self.engine, moved, self.cfg.model.n_layer, self.layout.pipeline)
            if relayout.same_ranks(moved, self.layout):
                checkpoint.restore_rank_state(path, self.par.rng)  # the same ranks: their RNG streams still apply
            meta = moved.meta
        self.load_state_dict(meta)
        changes.apply_hyperparameters(self.engine, self.cfg)
        return changes.config_changes(meta.get("config", {}), self.cfg)

    # ------------------------------------------------------------------------------------------ the loop

    def log_row(self, step: int, losses: list[torch.Tensor], seconds: float, tokens: int) -> dict[str, Any]:
        """One metrics row for the interval that ended at `step` (grad norm of its last step); the only place
        a step's values are read back from the device."""
        data = self.train.take_stats()  # bad samples this rank skipped in the interval
        per_step = step_means(losses)
        wait_per_step = self.data_wait_s / len(losses)
        self.data_wait_s = 0.0
        loss, wait, skipped = _all_mean([sum(per_step) / len(per_step), wait_per_step, data["skipped_samples"]],
                                        self.device)  # fmt: skip
        norm = self.last_grad_norm
        return {
            "step": step,
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(norm) if norm is not None else None,
            **throughput(tokens, seconds, self.flops_tok, dist.get_world_size(), self.peak),
            "mem_bytes": memory_bytes(),
            "consumed_tokens": self.state.consumed_tokens,
            "data_wait_s": wait,  # seconds per step waiting for the next batch, mean over the interval and ranks
            "skipped_samples": round(skipped * self.layout.dp),  # summed over dp ranks (tp/pp ranks read alike)
            **precision_scalars(self.engine),  # skipped_steps; loss_scale with fp16 only
        }

    def emit(self, row: dict[str, Any], progress: Progress) -> None:
        if self.writer is not None:
            self.writer.write(row)
        self.state.history.append(row)
        progress.update(row) if "loss" in row else None

    def run(self, stop: StopSignals) -> LoopState:
        """Train from state.step to max_steps; evaluate and checkpoint on their intervals and at the end.

        A stop signal (preemption) ends the run after the current step with a checkpoint: state.preempted.
        """
        cfg, st = self.cfg, self.state
        progress = Progress(cfg.log.progress, st.step, cfg.train.max_steps, enabled=self.rank == 0)
        losses: list[torch.Tensor] = []  # per step, on the device until the next metrics row
        compile_reported = not cfg.model.compile
        t_last, tok_last = time.perf_counter(), st.consumed_tokens
        while st.step < cfg.train.max_steps:
            t_data = time.perf_counter()
            micro_batches = to_device(self.train.next_step(), self.device)
            self.data_wait_s += time.perf_counter() - t_data
            with sync_debug(cfg.train.sync_debug if st.step > 0 else "off", self.device):
                loss, self.last_grad_norm = train_step(self.engine, micro_batches, self.layout, self.par)
            losses.append(loss)
            self.health.observe(st.step + 1, loss, self.last_grad_norm)
            if not compile_reported:  # this process's first step compiled the blocks (model.compile)
                progress.message(self.compile_report())
                compile_reported = True
            st.step += 1
            st.consumed_tokens += self.train.tokens_per_step
            last = st.step == cfg.train.max_steps
            if st.step % cfg.train.log_interval == 0 or last:
                now = time.perf_counter()
                row = self.log_row(st.step, losses, now - t_last, st.consumed_tokens - tok_last)
                self.emit(row, progress)
                self.health.check_row(row)
                losses, t_last, tok_last = [], now, st.consumed_tokens
            if self.val is not None and ((cfg.train.eval_interval and st.step % cfg.train.eval_interval == 0) or last):
                self.run_eval(progress)
                t_last = time.perf_counter()  # eval time is not training throughput
            at_interval = cfg.checkpoint.interval and st.step % cfg.checkpoint.interval == 0
            saved = at_interval or (last and cfg.checkpoint.at_end)
            if saved:
                self.save(progress.message, background=cfg.checkpoint.async_ and not last)
                t_last = time.perf_counter()
            if not last and st.step % cfg.train.signal_check_interval == 0 and stop.agreed(self.device, self.health):
                progress.message(f"stop signal ({stop.received.name if stop.received else 'on another rank'}): "
                                 f"saving a checkpoint at step {st.step} and exiting")  # fmt: skip
                st.preempted = True
                st.stop_signal = stop.received.name if stop.received else None
                if not saved:
                    self.save(progress.message)
                break
        self.saver.wait()  # a background save still in flight is published before the run ends or exits
        progress.close()
        return st

    def compile_report(self) -> str:
        """The first step's line under model.compile: how long torch.compile took (forward and backward)."""
        from megalm.model.compile import compile_seconds

        return f"model.compile: the first step compiled the blocks in {compile_seconds():.1f} s (forward and backward)"

    def run_eval(self, progress: Progress) -> None:
        result = evaluate(self.engine, self.val, self.cfg, self.layout, self.par, self.device)
        st = self.state
        st.best_val_loss = min(st.best_val_loss or math.inf, result["val_loss"])
        self.emit({"step": st.step, **result}, progress)
        progress.message(f"eval at step {st.step}: val_loss {result['val_loss']:.4f} "
                         f"ppl {result['val_ppl']:.2f} ({result['val_windows']} windows)")  # fmt: skip

    def close(self) -> None:
        self.train.close()
        if self.writer is not None:
            self.writer.close()

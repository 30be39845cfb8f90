"""Train and eval loop: gradient accumulation through the DeepSpeed engine, metrics, progress, checkpoints."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.data.loader import Split, TrainBatches, eval_batches, num_windows
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
    """Where the run stands; saved in every checkpoint."""

    step: int = 0
    consumed_tokens: int = 0
    best_val_loss: float | None = None
    preempted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over all ranks (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _grad_norm(module: torch.nn.Module, tp_group) -> float:
    """Global L2 norm of the (data-parallel averaged) gradients: TP shards summed over the TP group, replicated
    parameters counted once."""
    sharded, replicated = [], []
    for p in module.parameters():
        if p.grad is not None:
            (sharded if getattr(p, "tensor_model_parallel", False) else replicated).append(p.grad.detach().float())
    sq = lambda grads: torch.stack([g.pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())  # noqa: E731
    total = sq(sharded)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return (total + sq(replicated)).sqrt().item()


def train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, tp_group=None):
    """Forward/backward every micro-batch, then one optimizer step; returns (this rank's mean loss, grad norm).

    DeepSpeed reports the gradient norm itself except in plain fp32 without ZeRO; there it is measured here
    after the last backward, when the gradients are averaged over data-parallel ranks and not yet clipped.
    """
    if hasattr(engine, "train_batch"):  # pipeline engine: it runs the 1F1B schedule over the micro-batches
        loss = engine.train_batch(data_iter=iter(micro_batches))
        norm = engine.get_global_grad_norm()
        norm = getattr(engine.optimizer, "last_grad_norm", None) if norm is None else norm
        return loss.item(), float(norm) if norm is not None else None
    total, own_norm = 0.0, None
    for i, (x, y) in enumerate(micro_batches):
        loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        engine.backward(loss)
        if (
            i == len(micro_batches) - 1
            and engine.zero_optimization_stage() == 0
            and not (engine.bfloat16_enabled() or engine.fp16_enabled())
        ):
            own_norm = _grad_norm(engine.module, tp_group)
        engine.step()
        total += loss.item()
    norm = engine.get_global_grad_norm()
    return total / len(micro_batches), float(norm) if norm is not None else own_norm


@torch.no_grad()
def evaluate(engine, split: Split, cfg: Config, rank: int, dp: int, device: torch.device, dp_group=None) -> dict:
    """Mean loss and perplexity over the first eval_iters * global_batch_size windows of the validation split
    (rounded down to a multiple of dp: every rank must run the same number of forwards)."""
    engine.eval()
    # Every rank must run the same number of forwards (ZeRO-3 gathers parameters collectively).
    n_windows = num_windows(split, cfg.model.seq_len)
    limit = min(cfg.train.eval_iters * cfg.train.global_batch_size, n_windows) // dp * dp
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of window losses, windows)
    batches = eval_batches(split, seq_len=cfg.model.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                           dp_rank=rank, dp_size=dp, max_windows=limit, on_error=cfg.data.on_error)  # fmt: skip
    if hasattr(engine, "eval_batch"):
        return _evaluate_pipeline(engine, list(batches), cfg, dp)
    for x, y in batches:
        losses = engine(x.to(device), y.to(device), reduction="none")  # (B, T)
        loss_sum[0] += losses.mean(dim=1).sum().double()
        loss_sum[1] += x.shape[0]
    dist.all_reduce(loss_sum, group=dp_group)
    engine.train()
    val_loss = (loss_sum[0] / loss_sum[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_windows": int(loss_sum[1])}


def _evaluate_pipeline(engine, batches: list, cfg: Config, dp: int) -> dict:
    """The pipeline engine's eval_batch: mean loss over full micro-batches, averaged over data-parallel ranks."""
    full = [b for b in batches if b[0].shape[0] == cfg.train.micro_batch_size]  # its buffers have fixed shapes
    loss = engine.eval_batch(iter(full), num_micro_batches=len(full)).item()
    engine.train()
    windows = len(full) * cfg.train.micro_batch_size * dp
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_windows": windows}


class Progress:
    """Rank-0 progress: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, cfg: Config, start_step: int, enabled: bool):
        self.cfg, self.enabled, self.bar = cfg, enabled, None
        mode = cfg.log.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if enabled and mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), start_step

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step, total = row["step"], self.cfg.train.max_steps
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (total - step) / rate if rate > 0 else float("nan")
        print(f"step {step}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | "
              f"{row['tokens_per_s']:,.0f} tok/s | eta {_fmt_secs(eta)}", flush=True)  # fmt: skip

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_secs(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Trainer:
    """Owns the engine, data and writers of one run; `run()` trains to train.max_steps."""

    def __init__(self, cfg: Config, engine, train: TrainBatches, val: Split | None, ctx: dict[str, Any]):
        self.cfg, self.engine, self.train, self.val = cfg, engine, train, val
        self.par = ctx["parallel"]  # ParallelState
        self.rank, self.dp_rank, self.dp, self.device = ctx["rank"], self.par.dp_rank, self.par.dp, ctx["device"]
        self.n_params = ctx["n_params"]
        self.peak = ctx["peak_tflops"]
        self.state = LoopState()
        check_log_backends(cfg)  # every rank fails alike, before the first step
        self.writer = MetricsWriter.from_config(cfg) if self.rank == 0 else None
        self.data_wait_s = 0.0  # this rank's seconds in train.next_step() since the last metrics row
        self.flops_tok = flops_per_token(cfg.model, self.n_params)
        self.last_grad_norm: float | None = None

    def log_row(self, step: int, losses: list[float], seconds: float, tokens: int) -> dict[str, Any]:
        """One metrics row for the interval that ended at `step` (grad norm of its last step)."""
        data = self.train.take_stats()  # bad samples this rank skipped in the interval
        wait_per_step = self.data_wait_s / len(losses)
        self.data_wait_s = 0.0
        loss, wait, skipped = _all_mean([sum(losses) / len(losses), wait_per_step, data["skipped_samples"]],
                                        self.device)  # fmt: skip
        return {
            "step": step,
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "grad_norm": self.last_grad_norm,
            **throughput(tokens, seconds, self.flops_tok, dist.get_world_size(), self.peak),
            "mem_bytes": memory_bytes(),
            "consumed_tokens": self.state.consumed_tokens,
            "data_wait_s": wait,  # seconds per step waiting for the next batch, mean over the interval and ranks
            "skipped_samples": round(skipped * self.dp),  # summed over data-parallel ranks (tp/pp ranks read alike)
            **precision_scalars(self.engine),  # skipped_steps; loss_scale with fp16 only
        }

    def emit(self, row: dict[str, Any], progress: Progress) -> None:
        if self.writer is not None:
            self.writer.write(row)
        self.state.history.append(row)
        progress.update(row) if "loss" in row else None

    def run(self, on_checkpoint, stop: StopSignals) -> LoopState:
        """Train from state.step to max_steps; evaluate and checkpoint on their intervals and at the end.

        A stop signal (preemption) ends the run after the current step with a checkpoint: state.preempted.
        """
        cfg, st = self.cfg, self.state
        progress = Progress(cfg, st.step, enabled=self.rank == 0)
        losses: list[float] = []
        t_last, tok_last = time.perf_counter(), st.consumed_tokens
        while st.step < cfg.train.max_steps:
            t_data = time.perf_counter()
            micro_batches = self.train.next_step()
            self.data_wait_s += time.perf_counter() - t_data
            loss, self.last_grad_norm = train_step(self.engine, micro_batches, self.device, self.par.tp_group)
            losses.append(loss)
            st.step += 1
            st.consumed_tokens += self.train.tokens_per_step
            last = st.step == cfg.train.max_steps
            if st.step % cfg.train.log_interval == 0 or last:
                now = time.perf_counter()
                self.emit(self.log_row(st.step, losses, now - t_last, st.consumed_tokens - tok_last), progress)
                losses, t_last, tok_last = [], now, st.consumed_tokens
            if self.val is not None and ((cfg.train.eval_interval and st.step % cfg.train.eval_interval == 0) or last):
                self.run_eval(progress)
                t_last = time.perf_counter()  # eval time is not training throughput
            saved = (cfg.checkpoint.interval and st.step % cfg.checkpoint.interval == 0) or last
            if saved:
                on_checkpoint(progress)
                t_last = time.perf_counter()
            if not last and stop.agreed(self.device):
                progress.message(f"stop signal ({stop.received.name if stop.received else 'on another rank'}): "
                                 f"saving a checkpoint at step {st.step} and exiting")  # fmt: skip
                st.preempted = True
                if not saved:
                    on_checkpoint(progress)
                break
        progress.close()
        return st

    def run_eval(self, progress: Progress) -> None:
        result = evaluate(self.engine, self.val, self.cfg, self.dp_rank, self.dp, self.device, self.par.dp_group)
        st = self.state
        st.best_val_loss = min(st.best_val_loss or math.inf, result["val_loss"])
        self.emit({"step": st.step, **result}, progress)
        progress.message(f"eval at step {st.step}: val_loss {result['val_loss']:.4f} "
                         f"ppl {result['val_ppl']:.2f} ({result['val_windows']} windows)")  # fmt: skip

    def close(self) -> None:
        self.train.close()
        if self.writer is not None:
            self.writer.close()

"""Pipeline bubble of DeepSpeed's 1F1B TrainSchedule, and a measured step-time breakdown at pp=2 (CPU, gloo).

    python bench/pipeline_bubble.py [--stages 2 4] [--micro-batches 16] [--breakdown] [--out bubble.json]

Bubble: for each stage count p and micro-batch count m, DeepSpeed's `TrainSchedule(m, p, stage_id)` is walked
tick by tick (one list of instructions per tick). A tick is busy when it holds a ForwardPass or BackwardPass
(never both: checked), idle otherwise; the idle fraction of a stage is idle ticks / all ticks, next to
(p - 1) / (m + p - 1), the 1F1B bubble when a forward and a backward take the same time. No processes.

Breakdown (--breakdown): 2 gloo processes train megalm's pipeline model (a small GPT-2, 2 stages) through the
pipeline engine with DeepSpeed's `wall_clock_breakdown`, and report its timers per step, per stage: forward,
backward, communication (pipe send/recv of activations and gradients, where a receive includes waiting for the
other stage, i.e. the bubble; plus the data-parallel gradient all-reduce, nothing at dp=1), optimizer step, and the
rest of train_batch (batch loading, the tied embedding's gradient all-reduce between the first and last stage,
loss aggregation, schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megalm.launch.local import run_ranks  # noqa: E402

BREAKDOWN_MODEL = {"family": "gpt2", "n_layer": 4, "n_head": 4, "d_model": 256, "vocab_size": 4096, "seq_len": 256}
COMM_TIMERS = ("pipe_send_output", "pipe_recv_input", "pipe_send_grad", "pipe_recv_grad", "bwd_allreduce_microstep")
FRIENDLY = {"fwd_microstep": "forward", "bwd_microstep": "backward", "step_microstep": "optimizer"}


def schedule_bubble(stages: int, micro_batches: int) -> dict:
    """Idle fraction of every stage, counted from the instructions of DeepSpeed's TrainSchedule."""
    from deepspeed.runtime.pipe import schedule

    idle = []
    for stage_id in range(stages):
        ticks = list(schedule.TrainSchedule(micro_batches, stages, stage_id).steps())
        busy = 0
        for cmds in ticks:
            compute = [c for c in cmds if isinstance(c, schedule.ForwardPass | schedule.BackwardPass)]
            if len(compute) > 1:
                raise RuntimeError(f"tick with {len(compute)} compute instructions: {compute}")
            busy += len(compute)
        if busy != 2 * micro_batches:
            raise RuntimeError(f"stage {stage_id} runs {busy} passes, expected 2 x {micro_batches}")
        idle.append(1 - busy / len(ticks))
    return {"stages": stages, "micro_batches": micro_batches, "ticks": len(ticks), "idle_per_stage": idle,
            "formula": (stages - 1) / (micro_batches + stages - 1)}  # fmt: skip


def bubble_table(rows: list[dict]) -> str:
    lines = ["| p | m | ticks | idle fraction per stage (schedule) | (p-1)/(m+p-1) |", "|---|---|---|---|---|"]
    for r in rows:
        idle = " ".join(f"{x:.3f}" for x in r["idle_per_stage"])
        lines.append(f"| {r['stages']} | {r['micro_batches']} | {r['ticks']} | {idle} | {r['formula']:.3f} |")
    return "\n".join(lines)


def _breakdown_worker(rank: int, world_size: int, micro_batches: int, steps: int) -> dict[str, float]:
    """One stage of the pp=2 run (under run_ranks): its timers in ms per step, by friendly name."""
    import torch

    from megalm.config import load_config
    from megalm.model.pipeline import build_pipeline
    from megalm.parallel import ParallelState
    from megalm.training.engine import build_engine, init_deepspeed_comm

    init_deepspeed_comm()
    overrides = [f"model.{k}={v}" for k, v in BREAKDOWN_MODEL.items()] + [
        "parallel.pp=2", "train.micro_batch_size=2", f"train.global_batch_size={2 * micro_batches}",
        "deepspeed={wall_clock_breakdown: true}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    layout, state = cfg.layout(world_size), ParallelState(tp=1, pp=2)
    engine = build_engine(cfg, layout, build_pipeline(cfg, layout, state), state)
    # DeepSpeed 0.19.8: on stages before the last, the pipeline engine starts the backward timers itself and the
    # base engine's backward hook starts them again ("bwd_microstep timer has already been started"): leave them
    # to the pipeline engine there. The last stage's backward is the base engine's, timed by the base engine.
    if not engine.is_last_stage():
        engine.engine_timers.backward_timers = []
        engine.engine_timers.backward_inner_timers = []
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (2, 257), generator=g) for _ in range(micro_batches)]
    data = [(b[:, :-1], b[:, 1:]) for b in batches]
    from deepspeed.utils import timer

    names = (timer.FORWARD_MICRO_TIMER, timer.BACKWARD_MICRO_TIMER, timer.BACKWARD_REDUCE_MICRO_TIMER,
             timer.STEP_MICRO_TIMER, "train_batch", "batch_input", *COMM_TIMERS)  # fmt: skip
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocations and buffers: not timed
            for name in names:
                engine.timers(name).elapsed(reset=True)
        engine.train_batch(data_iter=iter(data))
    ms = {name: engine.timers(name).elapsed(reset=True) / steps for name in names}
    return {FRIENDLY.get(n, n): v for n, v in ms.items()}


def breakdown(micro_batches: int = 8, steps: int = 5) -> list[dict]:
    """Milliseconds per step on each stage, from DeepSpeed's pipeline timers."""
    out = []
    for rank, ms in enumerate(run_ranks(_breakdown_worker, 2, micro_batches, steps, timeout=1800)):
        comm = sum(ms[n] for n in COMM_TIMERS)
        parts = {"forward": ms["forward"], "backward": ms["backward"], "communication": comm,
                 "optimizer": ms["optimizer"]}  # fmt: skip
        parts["other"] = ms["train_batch"] - sum(parts.values())
        out.append({"stage": rank, "total_ms": ms["train_batch"], "ms": parts, "timers_ms": ms})
    return out


def breakdown_table(rows: list[dict]) -> str:
    lines = ["| stage | step (ms) | forward | backward | communication (incl. waiting) | optimizer | other |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{v:.0f} ({v / r['total_ms']:.0%})" for v in r["ms"].values())
        lines.append(f"| {r['stage']} | {r['total_ms']:.0f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, default=16, help="sweep m = 1..this")
    parser.add_argument("--breakdown", action="store_true", help="also measure the pp=2 step-time breakdown")
    parser.add_argument("--breakdown-micro-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    bubble = [schedule_bubble(p, m) for p in args.stages for m in range(1, args.micro_batches + 1)]
    print(bubble_table(bubble))
    result = {"bubble": bubble}
    if args.breakdown:
        result["breakdown"] = breakdown(args.breakdown_micro_batches)
        print(f"\npp=2, {args.breakdown_micro_batches} micro-batches of 2 x 256 tokens, ms per step:")
        print(breakdown_table(result["breakdown"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

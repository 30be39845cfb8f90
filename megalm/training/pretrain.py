"""Pretrain a megalm model: what `megalm train` and launcher/pretrain.py (the `deepspeed`/`torchrun` entry) run.

    deepspeed launcher/pretrain.py --config configs/tiny.yaml [section.key=value ...]
    python launcher/pretrain.py --config configs/tiny.yaml train.max_steps=20

`train` reads top to bottom like a recipe: config -> processes and layout -> data -> model -> engine -> resume ->
train -> report. The pieces own their parts: Config.layout the derived sizes, build_model the model in any layout,
build_engine DeepSpeed, Trainer the loop, its state and its checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
import yaml

from megalm.config import Config, Layout, load_config
from megalm.convert.consolidate import MASTER, TrainingState
from megalm.data.loader import Blend, Split, TrainBatches, load_blend, load_split
from megalm.errors import MegalmError
from megalm.launch.env import DistInfo, device_for, init_distributed, node_map
from megalm.launch.watchdog import Heartbeat, explain, is_collective_failure
from megalm.model import build_model
from megalm.model.compile import check_compile
from megalm.model.transformer import param_count
from megalm.parallel import ParallelState
from megalm.training import checkpoint, relayout, rundir
from megalm.training.engine import build_engine, init_deepspeed_comm, zero_stage
from megalm.training.health import NonFiniteError
from megalm.training.loop import LoopState, Trainer
from megalm.training.metrics import check_log_backends, peak_tflops
from megalm.training.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, StopSignals


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives in LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def train(args: argparse.Namespace) -> int:
    """The recipe. Returns the process exit code."""
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    check_log_backends(cfg)  # a missing wandb package fails here, before any process group or engine exists
    info = init_distributed(cfg.train.collective_timeout_s)
    layout = cfg.layout(info.world_size)
    check_compile(cfg, layout)  # model.compile refuses what it cannot run before any data or model is built
    init_deepspeed_comm()  # DeepSpeed adopts the process group (the pipeline module needs it to build)
    state = ParallelState(tp=layout.tp, pp=layout.pp)
    device = device_for(info)

    train_split, val_split = load_data(cfg)
    batches = TrainBatches(train_split, layout=layout, dp_rank=state.dp_rank, seq_len=cfg.model.seq_len,
                           seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                           on_error=cfg.data.on_error)  # fmt: skip
    lock_run_dir(cfg)  # one run per run directory

    model = build_model(cfg, layout, state).to(device)
    state.seed(cfg.train.seed)  # dropout: the same default stream on TP ranks, a TP stream per rank
    resume_path = checkpoint.resolve_resume(cfg.train.resume, cfg.checkpoint_dir)  # None: start fresh
    moved = None  # a checkpoint of another layout, read layout-free; its weights go into the model now
    if resume_path is not None and (change := relayout.plan(resume_path, cfg, layout)):
        moved = read_moved(cfg, layout, model, resume_path, change, info.rank)
    elif resume_path is None and cfg.train.init_from:
        init_weights_from(cfg, layout, model, info.rank)
    record_config(cfg, info.rank)
    engine = build_engine(cfg, layout, model, state)

    peak = peak_tflops(cfg.log.peak_tflops)
    trainer = Trainer(cfg, layout, state, engine, batches, val_split, device, peak[0])
    nodes = node_map()
    if info.rank == 0:
        print(describe(cfg, layout, info, nodes, batches, peak), flush=True)
    if resume_path is not None and not resume(cfg, trainer, resume_path, moved, info.rank):
        return 0  # already at train.max_steps: said so
    return report(cfg, run_watched(trainer, info), info.rank)


def load_data(cfg: Config) -> tuple[Blend, Split | None]:
    """The training sources (one split or a blend) and the validation split, checked against the model."""
    train_data = load_blend(cfg.data.train, on_error=cfg.data.on_error)
    val = load_split(cfg.data.val, on_error=cfg.data.on_error) if cfg.data.val is not None else None
    for key, split in [("data.train", s) for s in train_data.splits] + [("data.val", val)]:
        if split is None:
            continue
        if split.vocab_size > cfg.model.vocab_size:
            raise MegalmError(f"{key}: shards in {split.path} use a vocabulary of {split.vocab_size} tokens but "
                              f"model.vocab_size is {cfg.model.vocab_size}; raise model.vocab_size")  # fmt: skip
        spec = split.tokenizer_spec
        if spec != train_data.splits[0].tokenizer_spec:
            raise MegalmError(
                f"{key}: shards in {split.path} were made with another tokenizer than "
                f"{train_data.splits[0].path} ({spec} vs {train_data.splits[0].tokenizer_spec}): its "
                f"losses would be on another vocabulary; prepare both with the same --tokenizer"
            )
        name = spec.get("path") if spec.get("type") == "hf" else spec.get("type")
        if cfg.data.tokenizer and name != cfg.data.tokenizer:
            raise MegalmError(f"{key}: shards in {split.path} were made with tokenizer '{name}', "
                              f"but data.tokenizer is '{cfg.data.tokenizer}'")  # fmt: skip
        if split.num_tokens <= cfg.model.seq_len:
            raise MegalmError(f"{key}: {split.path} holds {split.num_tokens} tokens, fewer than one window of "
                              f"model.seq_len+1 = {cfg.model.seq_len + 1}")  # fmt: skip
    if cfg.data.verify:
        verify_shards([*train_data.splits, *([val] if val is not None else [])])
    return train_data, val


def verify_shards(splits: list[Split]) -> None:
    """Collective (data.verify): every shard's sha256, the shards split across ranks; MegalmError on every rank
    naming the corrupt ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = [(split, i) for split in splits for i in range(len(split.shards))]
    t0 = time.perf_counter()
    mine = [p for n, (split, i) in enumerate(shards) if n % world == rank and (p := split.check_shard(i))]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    problems = [p for ps in gathered for p in ps]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MegalmError(f"data.verify: {problems[0]}{more}")
    if rank == 0:
        print(f"data.verify: the sha256 of {len(shards)} shard(s) matches their manifests "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip


def lock_run_dir(cfg: Config) -> None:
    """Collective: rank 0 takes the run directory's lock (one run per directory) and checks that checkpoint.dir
    can be written, before training rather than at the first save; every rank raises if either fails."""

    def lock():
        rundir.lock_run_dir(cfg.run_dir)
        d = cfg.checkpoint_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MegalmError(f"checkpoint.dir {d} cannot be created: {e.strerror}") from None
        if not os.access(d, os.W_OK | os.X_OK):
            raise MegalmError(f"checkpoint.dir {d} is not writable: checkpoints could not be saved; fix its "
                              f"permissions or set checkpoint.dir to a writable directory")  # fmt: skip

    checkpoint._on_rank0(lock)


def record_config(cfg: Config, rank: int) -> None:
    """Rank 0: the resolved config into <run_dir>/config.yaml (once the run is known to go ahead)."""
    if rank == 0:
        (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cfg: Config, layout: Layout, info: DistInfo, nodes: str, batches: TrainBatches, peak: tuple) -> str:
    sp = ", sequence parallel" if layout.sequence_parallel else ""
    stage = zero_stage(cfg, layout)
    zero = f"zero {stage}" if stage == cfg.zero.stage else f"zero {stage} (bf16 at zero.stage 0 runs as ZeRO-1)"
    m = cfg.model
    return (
        f"megalm: {info.world_size} process(es) [{info.discovered_by}], backend {info.backend}, "
        f"tp {layout.tp} pp {layout.pp} dp {layout.dp}{sp}, {zero}, {cfg.precision.dtype}\n"
        f"nodes: {nodes}\n"
        f"model: {m.family}, {param_count(m)['total'] / 1e6:.2f}M parameters, {m.n_layer} layers, "
        f"d_model {m.d_model}, seq_len {m.seq_len}, attention {m.attention}\n"
        f"batch: {layout.global_batch_size} sequences = {batches.tokens_per_step:,} tokens/step "
        f"(micro {layout.micro_batch_size} x accum {layout.grad_accum} x dp {layout.dp}); "
        f"{batches.steps_per_epoch} steps/epoch\n"
        + (f"MFU peak: {peak[0]} TFLOP/s ({peak[1]})\n" if peak[0] else f"MFU: not computed, peak {peak[1]}\n")
        + f"run dir: {cfg.run_dir}"
    )


def init_weights_from(cfg: Config, layout: Layout, model, rank: int) -> None:
    """Apply train.init_from: this rank's slice of full weights saved in any layout; everything else starts fresh."""
    from megalm.convert.consolidate import load_with_source
    from megalm.convert.reshard import check_same_model, load_into

    source_cfg, full, src = load_with_source(cfg.train.init_from)
    check_same_model(source_cfg.model, cfg.model, str(src.path))
    load_into(model, full, cfg.model.n_layer, pipeline=layout.pipeline)
    if rank == 0:
        step = f"step {src.step}, " if src.step is not None else ""
        print(f"initialised weights from {src.path} ({step}{src.layout}) into tp {layout.tp} pp {layout.pp} "
              f"dp {layout.dp}: only the weights move; step, optimizer state, lr schedule and data loader start "
              f"fresh", flush=True)  # fmt: skip


def read_moved(cfg: Config, layout: Layout, model, path: Path, change: str, rank: int) -> TrainingState:
    """Read checkpoint `path` of another layout (`change`: 'saved -> this' in words) layout-free and put this rank's
    slice of its fp32 weights into `model`; the optimizer state follows once the engine exists (Trainer.resume)."""
    from megalm.convert.consolidate import read_training_state
    from megalm.convert.reshard import load_into

    if rank == 0:
        print(f"resuming {path} in another layout ({change}): reading it layout-free", flush=True)
    pipeline = layout.pipeline
    moved = read_training_state(path, relayout.wanted_names(model, cfg.model.n_layer, pipeline))
    load_into(model, moved.tensors[MASTER], cfg.model.n_layer, pipeline=pipeline)
    return moved


def resume(cfg: Config, trainer: Trainer, path: Path, moved: TrainingState | None, rank: int) -> bool:
    """Continue from checkpoint `path` (`moved`: its layout-free state, when it was saved in another layout); False
    (and one line saying so) when it is already at train.max_steps."""
    changed = trainer.resume(path, moved)
    step = trainer.state.step
    if rank == 0:
        carried = ""
        if moved is not None:
            rng = "restored" if relayout.same_ranks(moved, trainer.layout) else "fresh (tp, pp or dp changed)"
            carried = (" in this layout: fp32 weights, AdamW moments and step, lr schedule, loop and data position "
                       f"carried over; RNG states {rng}")  # fmt: skip
        print(f"resumed from {path} at step {step}{carried}", flush=True)
        if changed:
            print(f"the config differs from the checkpoint's, and this run's values take effect (the lr schedule and "
                  f"AdamW follow them from step {step}): {'; '.join(changed)}", flush=True)  # fmt: skip
    if step < cfg.train.max_steps:
        return True
    trainer.close()
    if rank == 0:
        print(f"nothing to train: the run in {cfg.run_dir} is at step {step} and train.max_steps is "
              f"{cfg.train.max_steps}. To train it further, raise train.max_steps; to start a new run, set "
              f"train.run_dir=<a new directory>", flush=True)  # fmt: skip
    return False


def run_watched(trainer: Trainer, info: DistInfo) -> LoopState:
    """trainer.run() with stop signals caught (preemption) and a dead or hung peer named by the heartbeats."""
    stop = StopSignals()
    if stop.agreed(trainer.device):  # SIGTERM/SIGUSR1 during start-up (install_early): no step ran, nothing to save
        st = trainer.state
        st.preempted, st.stop_signal = True, stop.received.name if stop.received else None
        if info.rank == 0:
            print(f"stop signal during start-up ({st.stop_signal or 'on another rank'}): exiting before the first "
                  f"step; the newest checkpoint is as it was", flush=True)  # fmt: skip
        stop.restore()
        trainer.close()
        return st
    heartbeat = Heartbeat().start() if info.world_size > 1 else None
    try:
        result = trainer.run(stop)
    except NonFiniteError as e:  # every rank decides alike: the guard's values are all-reduced
        trainer.saver.wait()  # a background save of an earlier, finite step is published
        raise NonFiniteError(f"{e}: the run stops, and nothing was saved from a non-finite state. "
                             f"{newest_checkpoint(trainer.cfg)} Lower optim.lr (now {trainer.cfg.optim.lr:g}) or "
                             f"check the data, then continue from a checkpoint before that step "
                             f"(train.resume=PATH)") from None  # fmt: skip
    except RuntimeError as e:  # a peer died or a collective timed out: say which rank stopped
        if not is_collective_failure(e):
            raise
        raise explain(e, heartbeat) from None
    stop.restore()
    trainer.close()
    return result


def newest_checkpoint(cfg: Config) -> str:
    tags = checkpoint.list_tags(cfg.checkpoint_dir)
    return f"The newest checkpoint is {cfg.checkpoint_dir / tags[-1]}." if tags else "No checkpoint was saved."


def report(cfg: Config, result: LoopState, rank: int) -> int:
    """The closing lines on rank 0 and the exit code (PREEMPTED_EXIT_CODE after a stop signal)."""
    if result.preempted and result.stop_signal == "SIGINT":
        if rank == 0:
            print(f"interrupted (Ctrl-C) at step {result.step}: checkpoint saved in {cfg.checkpoint_dir}; run the same "
                  f"command again to continue", flush=True)  # fmt: skip
        return INTERRUPTED_EXIT_CODE
    if result.preempted:
        if rank == 0:
            print(f"preempted at step {result.step}: exit code {PREEMPTED_EXIT_CODE} (run again to resume)", flush=True)
        return PREEMPTED_EXIT_CODE
    if rank == 0:
        best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
        skipped = sum(r.get("skipped_samples", 0) for r in result.history)
        print(f"done: step {result.step}, {result.consumed_tokens:,} tokens, best val_loss {best}, "
              f"{skipped} bad data samples skipped", flush=True)  # fmt: skip
        print(f"  metrics: {cfg.run_dir / 'metrics.jsonl'}\n  checkpoints: {cfg.checkpoint_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    return train(parser.parse_args(argv))


def first_to_report(message: str) -> bool:
    """Whether this rank is the first to report `message` (counted in the rendezvous store); True without one."""
    if not dist.is_initialized():
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        key = "megalm-error-" + hashlib.sha256(message.encode()).hexdigest()[:16]
        return store.add(key, 1) == 1
    except Exception:  # no store reachable (the master is gone): better twice than never
        return True


def run_and_exit(main_fn=main, argv: list[str] | None = None) -> None:
    """Run, report user errors in one line, and leave without waiting on gloo threads (see CPU-NOTES)."""
    try:
        code = main_fn(argv)
    except MegalmError as e:
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        if first_to_report(str(e)):  # the same error on every rank prints once
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        rundir.release_all()
        os._exit(2)
    except KeyboardInterrupt:
        os._exit(130)
    if dist.is_initialized():
        dist.barrier()
    rundir.release_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()

"""Checkpoint save/load time and size: megalm's crash-safe checkpoints vs DeepSpeed alone vs plain torch.save.

A GPT-2-124M-shaped model (12 layers, 12 heads, d_model 768, vocab 50304, seq_len 1024) wrapped in DeepSpeed
through megalm's build_engine (fp32, ZeRO-1 by default) in `--nproc` CPU processes; one training step on random
tokens so AdamW state exists; then, `--repeats` times, in an order rotated from repeat to repeat:

    plain      torch.save / torch.load(weights_only=True) of the same state dicts, one model file (rank 0) and
               one optimizer-shard file per rank, no fsync, no checksums; load = read + deserialize only
    deepspeed  engine.save_checkpoint / engine.load_checkpoint with DeepSpeed's own torch engine (no fsync,
               no checksums, load with weights_only=False)
    megalm     checkpoint.save (DeepSpeed's files + fsync + sha256 + manifest + rename + `latest`) and
               checkpoint.resolve_resume (verify sizes and checksums, split across ranks) + checkpoint.load
               (weights_only=True, RNG and loader state)

    async      async_checkpoint.save_in_background (checkpoint.async): "blocked" is the time until training may go
               on (barrier to barrier); "background" the further time until the checkpoint is published

and, with `--steps N` (default 10), N training steps with no save, with one synchronous save and with one
asynchronous save after step 2 (the background write overlapping the following steps, waited for at the end),
side by side in rotated order.

Each time is the wall time of the collective (barrier before, barrier after) as rank 0 sees it; medians are
reported. Files sit in the page cache when loaded (the cache is not dropped: the machine is shared).

    python bench/checkpoint_io.py                       # starts torchrun with --nproc 2 itself
    python bench/checkpoint_io.py --preempt             # also: SIGTERM to exit of a preempted 124M training run
    python bench/checkpoint_io.py --dir /scratch/ck --repeats 5 --zero 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from megalm.launch.local import free_port  # noqa: E402
from megalm.training import async_checkpoint, checkpoint  # noqa: E402

SHAPE = ["model.family=gpt2", "model.n_layer=12", "model.n_head=12", "model.d_model=768", "model.vocab_size=50304"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a temporary directory)")
    p.add_argument("--nproc", type=int, default=2, help="data-parallel CPU processes")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-tokens", type=int, default=64, help="tokens of the one training step (shorter is faster)")
    p.add_argument("--steps", type=int, default=10, help="training steps per variant of the step comparison (0: skip)")
    p.add_argument("--preempt", action="store_true", help="also time SIGTERM -> exit of a preempted training run")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of a collective operation, barrier to barrier."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(args: argparse.Namespace):
    """(cfg, engine) after one training step; the model setup follows megalm.training.pretrain."""
    from megalm.config import load_config
    from megalm.model.transformer import GPT
    from megalm.parallel import ParallelState
    from megalm.training.engine import build_engine, init_deepspeed_comm

    world = dist.get_world_size()
    cfg = load_config(None, SHAPE + ["model.seq_len=1024", "precision.dtype=fp32", f"zero.stage={args.zero}",
                                     "train.micro_batch_size=1", f"train.global_batch_size={world}"])  # fmt: skip
    state = ParallelState(tp=1, pp=1)
    state.seed(1234)
    model = GPT(cfg.model, state, False)
    init_deepspeed_comm()
    engine = build_engine(cfg, cfg.layout(world), model, state)
    train_step(engine, cfg, args)
    return cfg, engine


def train_step(engine, cfg, args: argparse.Namespace) -> None:
    x = torch.randint(0, cfg.model.vocab_size, (1, args.train_tokens + 1))
    loss = engine(x[:, :-1], x[:, 1:])
    engine.backward(loss)
    engine.step()


def plain_save(engine, d: Path) -> None:
    rank = dist.get_rank()
    d.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save(engine.module.state_dict(), d / "model.pt")
    torch.save(engine.optimizer.state_dict(), d / f"optim_{rank}.pt")


def plain_load(d: Path) -> None:
    if dist.get_rank() == 0:
        checkpoint.safe_load(d / "model.pt")
    checkpoint.safe_load(d / f"optim_{dist.get_rank()}.pt")


def deepspeed_save(engine, d: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ours, engine.checkpoint_engine = engine.checkpoint_engine, TorchCheckpointEngine(engine._config)
    try:
        engine.save_checkpoint(str(d), tag="ds", save_latest=False)
    finally:
        engine.checkpoint_engine = ours


def deepspeed_load(engine, d: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ours, engine.checkpoint_engine = engine.checkpoint_engine, TorchCheckpointEngine(engine._config)
    try:
        engine.load_checkpoint(str(d), tag="ds")
    finally:
        engine.checkpoint_engine = ours


def fresh(d: Path) -> None:
    """Untimed: remove the previous repeat's files, so that no save pays for overwriting or deleting them."""
    if dist.get_rank() == 0:
        shutil.rmtree(d, ignore_errors=True)
    dist.barrier()


def measure(args: argparse.Namespace, root: Path) -> dict:
    cfg, engine = build(args)
    meta = {"step": 1, "consumed_tokens": 0, "loader": {}, "config": cfg.to_dict()}
    times: dict[str, list[float]] = {k: [] for k in ("plain_save", "plain_load", "deepspeed_save", "deepspeed_load",
                                                     "megalm_save", "megalm_verify", "megalm_load")}  # fmt: skip
    found: list[Path] = []
    ops = {
        "plain": [("plain_save", lambda: plain_save(engine, root / "plain")),
                  ("plain_load", lambda: plain_load(root / "plain"))],
        "deepspeed": [("deepspeed_save", lambda: deepspeed_save(engine, root / "deepspeed")),
                      ("deepspeed_load", lambda: deepspeed_load(engine, root / "deepspeed"))],
        "megalm": [("megalm_save", lambda: checkpoint.save(engine, root / "megalm", 1, meta, 1, log=lambda s: None)),
                   ("megalm_verify", lambda: found.append(checkpoint.resolve_resume("auto", root / "megalm"))),
                   ("megalm_load", lambda: checkpoint.load(engine, found[-1]))],
    }  # fmt: skip
    saver = async_checkpoint.BackgroundSaver()
    times.update(async_blocked=[], async_background=[])
    ops["async"] = [("async_blocked", lambda: async_checkpoint.save_in_background(
                        engine, root / "async", 1, meta, 1, saver, log=lambda s: None)),
                    ("async_background", saver.wait)]  # fmt: skip
    order = list(ops)
    for r in range(args.repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            fresh(root / name)
            for key, fn in ops[name]:
                times[key].append(timed(fn))
                gc.collect()
    steps = compare_steps(args, cfg, engine, root, meta) if args.steps else {}
    sizes = {"plain": dir_bytes(root / "plain"), "deepspeed": dir_bytes(root / "deepspeed" / "ds"),
             "megalm": dir_bytes(found[-1])}  # fmt: skip
    n_params = sum(p.numel() for p in engine.module.parameters())
    return {"times": times, "sizes": sizes, "n_params": n_params, "world": dist.get_world_size(), "zero": args.zero,
            "steps": steps, "steps_n": args.steps}  # fmt: skip


def compare_steps(args: argparse.Namespace, cfg, engine, root: Path, meta: dict) -> dict[str, list[float]]:
    """Seconds of args.steps training steps with no save, one sync save and one async save after step 2 (the
    async one waited for after the last step); the three in rotated order, args.repeats times."""
    saver = async_checkpoint.BackgroundSaver()

    def run(save) -> None:
        for i in range(args.steps):
            train_step(engine, cfg, args)
            if i == 1:
                save()
        saver.wait()

    variants = {
        "none": lambda: None,
        "sync": lambda: checkpoint.save(engine, root / "steps_sync", 1, meta, 1, log=lambda s: None),
        "async": lambda: async_checkpoint.save_in_background(engine, root / "steps_async", 1, meta, 1, saver,
                                                             log=lambda s: None),
    }  # fmt: skip
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            fresh(root / f"steps_{name}")
            out[name].append(timed(lambda save=variants[name]: run(save)))
            gc.collect()
    return out


def report(res: dict) -> str:
    t = {k: statistics.median(v) for k, v in res["times"].items()}
    s, gb = res["sizes"], 1e9
    rows = [
        ("save", t["plain_save"], t["deepspeed_save"], t["megalm_save"]),
        ("load", t["plain_load"], t["deepspeed_load"], t["megalm_verify"] + t["megalm_load"]),
    ]
    lines = [
        f"GPT-2 124M shape ({res['n_params'] / 1e6:.1f}M parameters), fp32, ZeRO-{res['zero']}, dp={res['world']} "
        f"CPU processes; medians of {len(res['times']['plain_save'])}",
        "",
        "| | plain torch | DeepSpeed alone | megalm | megalm / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, plain, ds, mg in rows:
        lines.append(f"| {name} (s) | {plain:.2f} | {ds:.2f} | {mg:.2f} | {mg / plain:.2f}x |")
    lines.append(f"| size (GB) | {s['plain'] / gb:.3f} | {s['deepspeed'] / gb:.3f} | {s['megalm'] / gb:.3f} | "
                 f"{s['megalm'] / s['plain']:.2f}x |")  # fmt: skip
    lines.append("")
    lines.append(f"megalm load = verify (sizes + sha256, split across ranks) {t['megalm_verify']:.2f} s + "
                 f"DeepSpeed load with weights_only=True, RNG, loader {t['megalm_load']:.2f} s")  # fmt: skip
    lines.append(f"checkpoint.async: training blocked {t['async_blocked']:.2f} s per save "
                 f"({t['async_blocked'] / t['megalm_save']:.1%} of the synchronous save's {t['megalm_save']:.2f} s, "
                 f"{t['async_blocked'] / t['plain_save']:.1%} of plain torch.save's), then written and published "
                 f"in the background in {t['async_background']:.2f} s")  # fmt: skip
    if res["steps"]:
        st = {k: statistics.median(v) for k, v in res["steps"].items()}
        n = len(next(iter(res["steps"].values())))
        lines.append(f"{res['steps_n']} training steps, medians of {n}: no save {st['none']:.2f} s; one sync save "
                     f"{st['sync']:.2f} s ({st['sync'] / st['none']:.2f}x); one async save {st['async']:.2f} s "
                     f"({st['async'] / st['none']:.2f}x)")  # fmt: skip
    return "\n".join(lines)


def preempt(args: argparse.Namespace, root: Path) -> dict:
    """Seconds from SIGTERM (to every worker, as SLURM and Kubernetes send it) to the exit of a 124M run."""
    from tests.helpers import prepare_bytes_dataset, subprocess_env, tiny_config

    data = prepare_bytes_dataset(root / "preempt")
    config = tiny_config(root / "preempt", data, name="gpt2_124m", train={"max_steps": 1000, "eval_interval": 0,
                         "log_interval": 1, "micro_batch_size": 1, "global_batch_size": args.nproc})  # fmt: skip
    run_dir = root / "preempt" / "runs" / "gpt2_124m"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(free_port()), str(REPO / "launcher" / "pretrain.py"), "--config", str(config), *SHAPE,
           "model.seq_len=128", f"zero.stage={args.zero}"]  # fmt: skip
    import psutil

    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None:
            raise RuntimeError(f"training run ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    t_step = json.loads(metrics.read_text().splitlines()[-1])["tokens_per_s"]
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())]
    t0 = time.perf_counter()
    for w in workers:
        w.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    seconds = time.perf_counter() - t0
    step_s = args.nproc * 128 / t_step
    return {"signal_to_exit_s": seconds, "exit_code": proc.returncode, "step_s": step_s, "tail": out[-400:]}


def worker(args: argparse.Namespace) -> None:
    from megalm.launch.env import init_distributed

    init_distributed()
    root = Path(os.environ["MEGALM_BENCH_DIR"])
    res = measure(args, root)
    if dist.get_rank() == 0:
        print(json.dumps(res), flush=True)
        print(report(res), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    dist.barrier()
    os._exit(0)  # see CPU-NOTES: gloo threads may abort a normal interpreter exit


def main(argv: list[str] | None = None) -> int:
    if "RANK" in os.environ:  # a worker under torchrun: the arguments come in the environment (torchrun would
        worker(parse_args(json.loads(os.environ["MEGALM_BENCH_ARGS"])))  # take --nproc for its own --nproc-per-node)
    args = parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="megalm-ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        forwarded = argv if argv is not None else sys.argv[1:]
        env = dict(os.environ, MEGALM_BENCH_DIR=str(root), MEGALM_BENCH_ARGS=json.dumps(forwarded))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(free_port()), __file__]  # fmt: skip
        if subprocess.run(cmd, env=env).returncode != 0:
            return 1
        if args.preempt:
            res = preempt(args, root)
            secs, step = res["signal_to_exit_s"], res["step_s"]
            print(f"preemption (SIGTERM to every worker) -> exit {res['exit_code']}: {secs:.1f} s, of which up to "
                  f"one training step ({step:.1f} s at seq_len 128) and one checkpoint save")  # fmt: skip
            print(res["tail"])
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

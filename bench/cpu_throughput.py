"""Single-process CPU training throughput: megalm's GPT-2 vs Hugging Face GPT2LMHeadModel, side by side.

Both models get the same shapes, weights (HF is loaded from megalm's init), batch, AdamW settings, precision
and thread count. The contenders are timed in one process, interleaved: every round times `--steps` training
steps of each contender, in an order rotated from round to round (AB, BA, ...), so a noisy shared machine
slows all of them alike. We report per-contender median tokens/s and the median of the per-round ratios.

    python bench/cpu_throughput.py                      # small + 124m shapes, fp32, megalm vs HF sdpa and eager
    python bench/cpu_throughput.py --shapes small 124m --deepspeed --warmup 1 --rounds 12 --steps 1 --out r.json
    python bench/cpu_throughput.py --dtypes fp32 bf16   # + bf16 autocast rows (needs AVX512-BF16/AMX to be usable)
    python bench/cpu_throughput.py --profile --shapes small --hf-attn sdpa --rounds 3 --steps 1   # per-op profile

The second line is the run recorded in BENCHMARKS.md (section "CPU training throughput").
Needs `transformers` (not a megalm dependency): `pip install transformers`. Exits 2 when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from megalm.config import Config, ModelConfig  # noqa: E402
from megalm.model.transformer import GPT, param_groups  # noqa: E402

LR, WEIGHT_DECAY, BETAS = 3e-4, 0.1, (0.9, 0.95)
REFERENCE = "hf-sdpa"  # the contender megalm must match: same attention kernel (torch sdpa)


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    batch: int
    vocab_size: int = 50304

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


SHAPES = {
    "small": Shape(n_layer=4, n_head=4, d_model=256, seq_len=256, batch=8),  # CPU-sized GPT-2
    "124m": Shape(n_layer=12, n_head=12, d_model=768, seq_len=128, batch=2),  # GPT-2 124M, short sequences
}


@dataclass
class Contender:
    name: str
    model: nn.Module
    step: Callable[[], float]  # one full training step (forward, backward, optimizer); returns the loss


def import_transformers():
    try:
        import transformers
    except ImportError:
        print(
            "bench/cpu_throughput.py needs Hugging Face transformers, which megalm does not depend on.\n"
            "Install it into this environment: pip install 'transformers>=4.40'",
            file=sys.stderr,
        )
        sys.exit(2)
    return transformers


# ---------------------------------------------------------------------------------------------- models


def model_config(shape: Shape) -> ModelConfig:
    return ModelConfig(
        family="gpt2",
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        d_model=shape.d_model,
        vocab_size=shape.vocab_size,
        seq_len=shape.seq_len,
        dropout=0.0,
        attention="sdpa",
    )


def make_megalm(shape: Shape, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config(shape)).train()


def make_hf(shape: Shape, attn: str, src: GPT) -> nn.Module:
    """GPT2LMHeadModel with the same shapes, loaded with `src`'s weights (so both start from one init)."""
    transformers = import_transformers()
    cfg = transformers.GPT2Config(
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_embd=shape.d_model,
        vocab_size=shape.vocab_size,
        n_positions=shape.seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
        layer_norm_epsilon=src.cfg.norm_eps,
        attn_implementation=attn,
    )
    hf = transformers.GPT2LMHeadModel(cfg)
    copy_weights_to_hf(src, hf)
    return hf.train()


@torch.no_grad()
def copy_weights_to_hf(src: GPT, hf: nn.Module) -> None:
    """megalm GPT -> GPT2LMHeadModel. HF's Conv1D stores weights as (in, out), hence the transposes."""
    t = hf.transformer
    t.wte.weight.copy_(src.wte.weight)
    t.wpe.weight.copy_(src.wpe.weight)
    pairs = [("ln_1", "norm1", False), ("attn.c_attn", "attn.qkv", True), ("attn.c_proj", "attn.proj", True)]
    pairs += [("ln_2", "norm2", False), ("mlp.c_fc", "mlp.up", True), ("mlp.c_proj", "mlp.down", True)]
    for hb, mb in zip(t.h, src.blocks, strict=True):
        for hname, mname, transpose in pairs:
            h, m = hb.get_submodule(hname), mb.get_submodule(mname)
            h.weight.copy_(m.weight.t() if transpose else m.weight)
            h.bias.copy_(m.bias)
    t.ln_f.weight.copy_(src.norm_f.weight)
    t.ln_f.bias.copy_(src.norm_f.bias)
    assert hf.lm_head.weight.data_ptr() == t.wte.weight.data_ptr(), "HF head is not tied to wte"


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def check_same_function(mg: GPT, hf: nn.Module, x: torch.Tensor) -> float:
    """|loss_megalm - loss_hf| on one batch: both predict x[t+1] from x[:t+1] for t < T-1."""
    T = x.shape[1] - 1
    with torch.no_grad():
        a = mg(x[:, : T - 1], x[:, 1:T]).item()
        b = hf(input_ids=x[:, :T], labels=x[:, :T]).loss.item()
    return abs(a - b)


# ----------------------------------------------------------------------------------------------- steps


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """The same AdamW for everyone: decay 2-D weights (linears, embeddings), never norms or biases."""
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], dtype: str) -> Callable[[], float]:
    opt = adamw(model)

    def step() -> float:
        with autocast(dtype):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def megalm_loss(model: GPT, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    T = x.shape[1] - 1
    idx, targets = x[:, :T], x[:, 1:]  # T inputs, T targets
    return lambda: model(idx, targets)


def hf_loss(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    ids = x[:, :-1]  # T inputs; HF shifts the labels itself
    return lambda: model(input_ids=ids, labels=ids).loss


def init_single_process_group() -> None:
    """torch.distributed over gloo with world size 1, as DeepSpeed wants a process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from megalm.launch.local import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def deepspeed_contender(shape: Shape, seed: int, x: torch.Tensor) -> Contender:
    """megalm through megalm's own engine builder, as megalm.training.pretrain builds it (ZeRO 0, fp32, no clipping,
    constant lr: the same math as the plain loop, plus whatever the engine adds)."""
    from megalm.parallel import ParallelState
    from megalm.training.engine import build_engine, init_deepspeed_comm

    init_single_process_group()
    state = ParallelState(tp=1, pp=1)
    cfg = Config(model=model_config(shape))
    cfg.train.micro_batch_size = cfg.train.global_batch_size = shape.batch
    cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay = LR, BETAS, WEIGHT_DECAY
    cfg.optim.grad_clip, cfg.optim.warmup_steps, cfg.optim.min_lr = 0.0, 0, LR
    torch.manual_seed(seed)
    model = GPT(cfg.model, state).train()
    init_deepspeed_comm()
    engine = build_engine(cfg, cfg.layout(world_size=1), model, state)
    loss_fn = megalm_loss(engine, x)

    def step() -> float:
        loss = loss_fn()
        engine.backward(loss)
        engine.step()
        return loss.item()

    return Contender("megalm-deepspeed", model, step)


def build_contenders(shape: Shape, dtype: str, args: argparse.Namespace, x: torch.Tensor) -> list[Contender]:
    mg = make_megalm(shape, args.seed)
    out = [Contender("megalm", mg, plain_step(mg, megalm_loss(mg, x), dtype))]
    for attn in args.hf_attn:
        hf = make_hf(shape, attn, mg)
        out.append(Contender(f"hf-{attn}", hf, plain_step(hf, hf_loss(hf, x), dtype)))
    if args.deepspeed and dtype == "fp32":
        out.append(deepspeed_contender(shape, args.seed, x))
    return out


# ---------------------------------------------------------------------------------------------- timing


def time_steps(c: Contender, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        c.step()
    return time.perf_counter() - t0


def run_interleaved(contenders: list[Contender], tokens: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """tokens/s per round for each contender; round r starts at contender r mod n (AB, BA, ... for two)."""
    for c in contenders:
        for _ in range(args.warmup):
            c.step()
    tps: dict[str, list[float]] = {c.name: [] for c in contenders}
    n = len(contenders)
    for r in range(args.rounds):
        for c in contenders[r % n :] + contenders[: r % n]:
            tps[c.name].append(args.steps * tokens / time_steps(c, args.steps))
        line = "  ".join(f"{k} {v[-1]:8.0f}" for k, v in tps.items())
        print(f"    round {r + 1}/{args.rounds}: tokens/s  {line}", flush=True)
    return tps


def per_round_ratio(v: list[float], ref: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(v, ref, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def summarize(tps: dict[str, list[float]]) -> list[dict]:
    """Median/min/max tokens/s per contender, and its per-round ratios to HF sdpa (the reference) and to megalm."""
    rows = []
    for name, v in tps.items():
        row = {"contender": name, "tokens_per_s": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
        for key, ref in (("vs_hf_sdpa", REFERENCE), ("vs_megalm", "megalm")):
            if ref in tps:
                row[key] = per_round_ratio(v, tps[ref])
        rows.append(row)
    return rows


def bench_group(shape_name: str, dtype: str, args: argparse.Namespace) -> dict:
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len + 1), generator=g)
    contenders = build_contenders(shape, dtype, args, x)
    counts = {c.name: num_params(c.model) for c in contenders}
    mg = contenders[0].model
    diffs = {c.name: check_same_function(mg, c.model, x) for c in contenders if c.name.startswith("hf-")}
    shown = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    print(f"\n== {shape_name} {asdict(shape)} {dtype}\n    parameters: {counts}\n    |loss - megalm's loss| "
          f"on the same weights and batch: {shown}", flush=True)  # fmt: skip
    if len(set(counts.values())) != 1 or max(diffs.values()) > 1e-3:
        print("    WARNING: the models differ (parameter counts or loss): the comparison is not like for like")
    tps = run_interleaved(contenders, shape.tokens_per_step, args)
    return {"shape": shape_name, **asdict(shape), "dtype": dtype, "params": counts, "loss_diff": diffs,
            "rows": summarize(tps)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- report


def markdown(groups: list[dict]) -> str:
    """The results table; ratios are medians of the per-round ratios, with their range in brackets."""

    def ratio(r: dict, key: str) -> str:
        x = r.get(key)
        return f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}]" if x else "-"

    lines = [
        "| shape | precision | contender | tokens/s median [min, max] | ÷ HF sdpa | ÷ megalm |",
        "|---|---|---|---:|---:|---:|",
    ]
    for g in groups:
        for r in g["rows"]:
            lines.append(
                f"| {g['shape']} | {g['dtype']} | {r['contender']} | {r['tokens_per_s']:.0f} "
                f"[{r['min']:.0f}, {r['max']:.0f}] | {ratio(r, 'vs_hf_sdpa')} | {ratio(r, 'vs_megalm')} |"
            )
    lines += ["", "Target megalm / HF sdpa >= 1.0 (median of per-round ratios):"]
    for g in groups:
        r = next((r for r in g["rows"] if r["contender"] == "megalm" and "vs_hf_sdpa" in r), None)
        if r is not None:
            x = r["vs_hf_sdpa"]["median"]
            lines.append(f"- {g['shape']} {g['dtype']}: {x:.2f} -> {'met' if x >= 1.0 else 'NOT met'}")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": import_transformers().__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "args": vars(args),
    }


def profile(args: argparse.Namespace) -> None:
    """Side-by-side torch.profiler breakdown: per-op self CPU ms per step of every contender, profiled interleaved.

    Each round profiles `--steps` steps of each contender (rotated order, like the timing); the per-op sums over all
    rounds are divided by the number of profiled steps, so a load spike hits every column alike.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for shape_name, dtype in [(s, d) for s in args.shapes for d in args.dtypes]:
        shape = SHAPES[shape_name]
        x = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len + 1))
        contenders = build_contenders(shape, dtype, args, x)
        for c in contenders:
            for _ in range(args.warmup):
                c.step()
        ms: dict[str, dict[str, float]] = {c.name: {} for c in contenders}
        calls: dict[str, dict[str, int]] = {c.name: {} for c in contenders}
        for r in range(args.rounds):
            for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.steps):
                        c.step()
                for e in prof.key_averages():
                    ms[c.name][e.key] = ms[c.name].get(e.key, 0.0) + e.self_cpu_time_total / 1e3
                    calls[c.name][e.key] = calls[c.name].get(e.key, 0) + e.count
        n = args.rounds * args.steps
        print(f"\n== profile {shape_name} {dtype}: self CPU ms per step (calls per step), {n} steps each")
        print(profile_table(ms, calls, n, args.profile_rows))


def profile_table(ms: dict[str, dict[str, float]], calls: dict[str, dict[str, int]], n: int, rows: int) -> str:
    names = list(ms)
    ops = sorted({k for d in ms.values() for k in d}, key=lambda k: -max(d.get(k, 0.0) for d in ms.values()))
    lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for op in ops[:rows]:
        cells = [f"{ms[c].get(op, 0.0) / n:.0f} ({calls[c].get(op, 0) / n:g})" for c in names]
        lines.append(f"| {op[:60]} | " + " | ".join(cells) + " |")
    totals = [f"{sum(ms[c].values()) / n:.0f}" for c in names]
    lines.append("| **total self CPU** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "124m"])
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["fp32", "bf16"],
        default=["fp32"],
        help="bf16 = torch.autocast('cpu', bfloat16); needs AVX512-BF16/AMX to be usable",
    )
    p.add_argument("--hf-attn", nargs="+", choices=["sdpa", "eager"], default=["sdpa", "eager"])
    p.add_argument("--deepspeed", action="store_true", help="add megalm through the DeepSpeed engine (fp32 only)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender before the rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (order rotated every round)")
    p.add_argument("--steps", type=int, default=3, help="timed (or profiled) steps per contender per round")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--profile", action="store_true", help="print a side-by-side per-op profile instead of timing")
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args(argv)
    args.hf_attn = list(dict.fromkeys(args.hf_attn))
    if "sdpa" not in args.hf_attn:
        p.error("--hf-attn must include sdpa: it is the reference the ratios are taken against")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_transformers().logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if "bf16" in args.dtypes and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("WARNING: this CPU has no native bf16 (AVX512-BF16/AMX): bf16 matmuls are emulated and very slow",
              file=sys.stderr, flush=True)  # fmt: skip
    if args.profile:
        profile(args)
        return 0
    env = environment(args)
    print(json.dumps({k: v for k, v in env.items() if k != "args"}))
    groups = [bench_group(s, d, args) for s in args.shapes for d in args.dtypes]
    print("\n" + markdown(groups))
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "groups": groups}, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

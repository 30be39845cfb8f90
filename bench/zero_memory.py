"""Per-rank model-state memory under ZeRO 0-3 at dp=2 and dp=4 (CPU, gloo), next to the ZeRO paper's formula.

    python bench/zero_memory.py [--dp 2 4] [--stages 0 1 2 3] [--dtypes fp32 bf16] [--out zero_memory.json]

For each (dtype, dp, stage) it starts dp gloo processes that build megalm's GPT-2 124M (12 layers, 12 heads,
d 768, vocab 50304, seq 1024) inside megalm's DeepSpeed engine (torch AdamW, the config megalm generates), run
one optimizer step and a second forward/backward on one 64-token sequence, and then, before the second step,
with parameters, gradients and optimizer state all alive, add up the bytes of the tensors themselves:

  params   the model's parameters as stored on this rank (ZeRO-3: its partition `ds_tensor`)
  grads    p.grad and every gradient buffer the DeepSpeed optimizer holds (attributes named *grad*)
  optim    AdamW's exp_avg/exp_avg_sq plus fp32 master copies (DeepSpeed attributes named *fp32*/*master*/
           *single_partition*, and the tensors the inner AdamW steps when they are not the model's parameters)
  other    any other tensor the DeepSpeed optimizer holds (communication buckets, flat buffers)

Storages are counted once (views into one flat buffer count the buffer). The formula (Rajbhandari et al. 2020,
Psi parameters, Nd ranks): mixed precision 2 + 2 + K bytes per parameter with K = 12 (fp32 master, m, v); fp32
4 + 4 + 8. Stage 1 divides the optimizer term by Nd, stage 2 also gradients, stage 3 also parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megalm.launch.local import run_ranks  # noqa: E402

MODEL = {"family": "gpt2", "n_layer": 12, "n_head": 12, "d_model": 768, "vocab_size": 50304, "seq_len": 1024}
TOKENS = 64  # one short sequence per step: activations are not what this measures
BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12)}  # (params, grads, optimizer) per parameter, before sharding


def formula(psi: int, dtype: str, stage: int, nd: int) -> dict[str, float]:
    """Per-rank model-state bytes of the ZeRO paper for `psi` parameters."""
    p, g, o = BYTES[dtype]
    out = {"params": p * psi / (nd if stage >= 3 else 1), "grads": g * psi / (nd if stage >= 2 else 1),
           "optim": o * psi / (nd if stage >= 1 else 1)}  # fmt: skip
    out["total"] = sum(out.values())
    return out


def _storage(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class Ledger:
    """Bytes per category, each storage counted once (under the first category that claims it)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = {"params": 0, "grads": 0, "optim": 0, "other": 0}

    def add(self, category: str, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        ptr, nbytes = _storage(t)
        if ptr and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes[category] += nbytes


def _tensors(obj, path: str, depth: int = 0):
    """(path, tensor) for every tensor inside nested lists, tuples and dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif depth < 4 and isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k}]", depth + 1)


def _category(name: str) -> str:
    lower = name.lower()
    if "grad" in lower:
        return "grads"
    if any(s in lower for s in ("fp32", "master", "single_partition")):
        return "optim"
    return "other"


def account(engine, model) -> dict[str, int]:
    """The ledger of this rank's model state (see the module docstring)."""
    ledger = Ledger()
    for p in model.parameters():
        ledger.add("params", getattr(p, "ds_tensor", p.data))
    for p in model.parameters():
        ledger.add("grads", p.grad)
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)  # the torch AdamW DeepSpeed wraps (or itself at stage 0, fp32)
    for state in inner.state.values():
        for t in state.values():
            ledger.add("optim", t)
    for group in inner.param_groups:  # fp32 master partitions that AdamW steps; and their gradients
        for p in group["params"]:
            ledger.add("grads", p.grad)
            ledger.add("optim", p)
    if wrapper is not inner:
        for name, value in vars(wrapper).items():
            for path, t in _tensors(value, name):
                ledger.add(_category(path), t)
    return ledger.bytes


def _worker(rank: int, nd: int, dtype: str, stage: int, model_cfg: dict) -> tuple[int, dict[str, int], int]:
    """(rank, its ledger, parameter count) after one step and a second backward (under run_ranks)."""
    import torch

    from megalm.config import load_config
    from megalm.model.transformer import GPT, param_count
    from megalm.parallel import ParallelState
    from megalm.training.engine import build_engine, init_deepspeed_comm

    init_deepspeed_comm()
    overrides = [f"model.{k}={v}" for k, v in model_cfg.items()] + [
        f"zero.stage={stage}", f"precision.dtype={dtype}", "train.micro_batch_size=1", f"train.global_batch_size={nd}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    state = ParallelState(tp=1, pp=1)
    model = GPT(cfg.model, state, False, seed=0)
    log = lambda what: print(f"[{time.strftime('%X')} rank {rank}] {what}", file=sys.stderr, flush=True)  # noqa: E731
    log("model built")
    engine = build_engine(cfg, cfg.layout(nd), model, state)
    log("engine built")
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.model.vocab_size, (1, TOKENS + 1), generator=g)
    for step in range(2):
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        log(f"backward {step}")
        if step == 0:
            engine.step()
            log("step")
    ledger = account(engine, engine.module)
    return rank, ledger, param_count(cfg.model)["total"]


def measure(dtype: str, stage: int, nd: int, model_cfg: dict | None = None) -> dict:
    """Spawn `nd` ranks and return the fullest rank's ledger next to the formula."""
    rows = run_ranks(_worker, nd, dtype, stage, model_cfg or MODEL, timeout=1800)
    psi = rows[0][2]
    worst = {k: max(r[1][k] for r in rows) for k in rows[0][1]}  # the fullest rank (padding lands on one)
    worst["total_model_state"] = worst["params"] + worst["grads"] + worst["optim"]
    return {"dtype": dtype, "stage": stage, "dp": nd, "psi": psi, "measured": worst,
            "formula": formula(psi, dtype, stage, nd)}  # fmt: skip


def table(results: list[dict]) -> str:
    gib = 2**30
    lines = ["| dtype | dp | ZeRO | params GiB (formula) | grads GiB (formula) | optim GiB (formula) | "
             "model state GiB (formula) | ratio | other buffers GiB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        m, f = r["measured"], r["formula"]
        cell = lambda k, m=m, f=f: f"{m[k] / gib:.3f} ({f[k] / gib:.3f})"  # noqa: E731
        ratio = m["total_model_state"] / f["total"]
        lines.append(f"| {r['dtype']} | {r['dp']} | {r['stage']} | {cell('params')} | {cell('grads')} | "
                     f"{cell('optim')} | {m['total_model_state'] / gib:.3f} ({f['total'] / gib:.3f}) | "
                     f"{ratio:.3f} | {m['other'] / gib:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(BYTES))
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    results = []
    for dtype in args.dtypes:
        for nd in args.dp:
            for stage in args.stages:
                results.append(measure(dtype, stage, nd))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

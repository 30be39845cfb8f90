"""The shakespeare_char recipe in a plain PyTorch loop, nanoGPT-style, as a reference for megalm's own run.

Same model class (megalm's GPT at tp=1), data split, schedule and optimizer settings as
configs/shakespeare_char.yaml, but none of megalm's training stack: no DeepSpeed, no streaming loader.
Batches are drawn the way nanoGPT's get_batch draws them (every window at an independent uniformly random
offset of the training tokens), the optimizer is torch.optim.AdamW, and validation is the same mean over every
non-overlapping window of the validation split that megalm reports. Running several seeds shows how much of a
gap to a target is seed noise.

    python bench/shakespeare_reference.py --seeds 1337 1 2 --out runs/shakespeare_reference.json

Prepare the data first: megalm prepare --input ../shared/data/tinyshakespeare.txt --tokenizer char \
    --output data/shakespeare_char --val-fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from megalm.config import Config, load_config  # noqa: E402
from megalm.data.loader import _split_tokens, eval_batches, num_windows  # noqa: E402
from megalm.data.shards import load_split  # noqa: E402
from megalm.model.transformer import GPT, param_groups  # noqa: E402
from megalm.training.engine import lr_at  # noqa: E402


def all_tokens(path: str) -> torch.Tensor:
    """Every token of a prepared split, in order (int64)."""
    split = load_split(path)
    return torch.from_numpy(np.concatenate([t for t, _ in _split_tokens(split, "raise")]).astype(np.int64))


@torch.no_grad()
def val_loss(model: GPT, cfg: Config) -> float:
    """Mean loss over every non-overlapping window of the validation split (megalm's eval, one process)."""
    model.eval()
    split = load_split(cfg.data.val)
    total, n = 0.0, 0
    batches = eval_batches(split, seq_len=cfg.model.seq_len, micro_batch_size=64, dp_rank=0, dp_size=1,
                           max_windows=num_windows(split, cfg.model.seq_len))  # fmt: skip
    for x, y in batches:
        total += model(x, y, reduction="none").mean(dim=1).sum().item()
        n += x.shape[0]
    model.train()
    return total / n


def train_one(cfg: Config, train: torch.Tensor, seed: int) -> dict:
    """nanoGPT's loop: iid random windows, AdamW, clip, warmup + cosine; returns val losses per eval step."""
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    o, t, b = cfg.optim, cfg.model.seq_len, cfg.train.global_batch_size
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    curve, start = {}, time.perf_counter()
    for step in range(cfg.train.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ix = torch.randint(len(train) - t - 1, (b,), generator=gen)
        w = torch.stack([train[i : i + t + 1] for i in ix.tolist()])  # (B, T + 1)
        loss = model(w[:, :-1], w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        if (step + 1) % cfg.train.eval_interval == 0 or step + 1 == cfg.train.max_steps:
            curve[step + 1] = round(val_loss(model, cfg), 4)
            print(f"seed {seed} step {step + 1}: val_loss {curve[step + 1]}", flush=True)
    return {"seed": seed, "val_loss": curve, "wall_s": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shakespeare_char.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    train = all_tokens(cfg.data.train)
    runs = [train_one(cfg, train, s) for s in args.seeds]
    final = [r["val_loss"][cfg.train.max_steps] for r in runs]
    summary = {"config": args.config, "runs": runs, "final_median": statistics.median(final),
               "final_min": min(final), "final_max": max(final)}  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    return 0 if all(math.isfinite(f) for f in final) else 1


if __name__ == "__main__":
    sys.exit(main())

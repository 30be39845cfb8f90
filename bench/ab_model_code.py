"""The model code of another commit against this checkout's, in ONE process, interleaved step by step.

    git worktree add /tmp/old <commit>
    python bench/ab_model_code.py --old /tmp/old --rounds 12

Comparing two commits in two processes mixes in whatever else the shared machine does between them; here both
models are built in the same process (the old package is copied to a temporary `megalm_old` with its imports
rewritten), from the same seed (their first losses must be equal, or the comparison stops), and each round times
one training step of each (forward, loss, backward, AdamW step), in alternating order. Reported: tokens/s of each
(median over rounds) and the median, min and max of the per-round ratio new/old step time (below 1: this
checkout is faster). CPU, fp32, attention sdpa, torch.set_num_threads(--threads).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "small-gpt2": (dict(family="gpt2", n_layer=4, n_head=4, d_model=256, seq_len=256, vocab_size=50304), 8),
    "124m-gpt2": (dict(family="gpt2", n_layer=12, n_head=12, d_model=768, seq_len=128, vocab_size=50304), 2),
    "small-llama": (dict(family="llama", n_layer=4, n_head=8, n_kv_head=2, d_model=256, seq_len=256,
                         vocab_size=32000), 8),
}  # fmt: skip


def import_old(checkout: Path):
    """(ModelConfig, GPT) of the megalm package in `checkout`, imported as megalm_old."""
    root = Path(tempfile.mkdtemp(prefix="megalm-old-"))
    shutil.copytree(checkout / "megalm", root / "megalm_old")
    for f in (root / "megalm_old").rglob("*.py"):
        f.write_text(re.sub(r"\b(from|import) megalm\b", r"\1 megalm_old", f.read_text()))
    sys.path.insert(0, str(root))
    from megalm_old.config import ModelConfig
    from megalm_old.model.transformer import GPT

    return ModelConfig, GPT


def compare(name: str, kw: dict, batch: int, old, rounds: int) -> str:
    sys.path.insert(0, str(REPO))
    from megalm.config import ModelConfig
    from megalm.model.transformer import GPT

    kw = dict(kw, attention="sdpa")
    models = {"old": old[1](old[0](**kw), seed=1).train(), "new": GPT(ModelConfig(**kw), seed=1).train()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, kw["vocab_size"], (batch, kw["seq_len"] + 1), generator=torch.Generator().manual_seed(0))

    def step(k: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = models[k](ids[:, :-1], ids[:, 1:])
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    first = {k: step(k)[1] for k in models}  # warm-up, and the same weights must give the same loss
    if first["old"] != first["new"]:
        sys.exit(f"{name}: the first losses differ ({first}): the two models are not the same computation")
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        for k in ("old", "new") if r % 2 == 0 else ("new", "old"):
            times[k].append(step(k)[0])
    ratios = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
    tok = batch * kw["seq_len"]
    return (f"| {name} | {tok / statistics.median(times['old']):.0f} | {tok / statistics.median(times['new']):.0f} | "
            f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] |")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="a checkout (e.g. a git worktree) of the other commit")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = import_old(args.old)
    print("| shape | old tokens/s | new tokens/s | new/old step time, median [min, max] |\n|---|---:|---:|---|")
    for name in args.shapes:
        print(compare(name, *SHAPES[name], old, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

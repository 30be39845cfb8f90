"""Per-rank parameter counts and memory of the model at tp=1/2/4 (CPU, gloo; builds the real sharded model).

    python bench/tp_memory.py [--out results.json]

For each config and tp it builds megalm's GPT on every rank of a tp-sized gloo world and reports, per rank:
sharded and replicated parameters, their fp32 bytes, and the training memory they imply with fp32 AdamW
(parameters + gradients + two moments = 16 bytes per parameter, activations not included). It checks that the
shards add up to the whole model plus the vocabulary padding, counting replicated parameters once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megalm.launch.local import run_ranks  # noqa: E402

CONFIGS = {
    "tiny": dict(family="gpt2", n_layer=4, n_head=4, d_model=128, vocab_size=50304, seq_len=128),
    "gpt2-124M": dict(family="gpt2", n_layer=12, n_head=12, d_model=768, vocab_size=50304, seq_len=1024),
}


def _count(rank: int, tp: int, name: str) -> tuple[int, int, int, int]:
    """(rank, sharded, replicated, padded vocabulary) of this rank's shard of the model (under run_ranks)."""
    from megalm.config import ModelConfig
    from megalm.model.transformer import GPT
    from megalm.parallel import ParallelState

    state = ParallelState(tp=tp)
    state.seed(0)
    model = GPT(ModelConfig(**CONFIGS[name]), state)
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.numel() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
    return rank, sharded, replicated, model.wte.padded_vocab_size


def measure(name: str, tp: int) -> dict:
    return {"config": name, "tp": tp, "ranks": run_ranks(_count, tp, name, timeout=600)}


def main() -> None:
    from megalm.config import ModelConfig
    from megalm.model.transformer import param_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    print("| config | tp | params per rank (sharded + replicated) | fp32 bytes per rank | "
          "AdamW fp32 training state per rank | shards + replicated = total + padding |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in CONFIGS:
        total = param_count(ModelConfig(**CONFIGS[name]))["total"]
        for tp in (1, 2, 4):
            r = measure(name, tp)
            _, sharded, replicated, padded_vocab = r["ranks"][0]
            assert all(row[1:] == r["ranks"][0][1:] for row in r["ranks"]), "ranks differ"
            padding = (padded_vocab - CONFIGS[name]["vocab_size"]) * CONFIGS[name]["d_model"]
            whole = tp * sharded + replicated
            assert whole == total + padding, (whole, total, padding)
            per_rank = sharded + replicated
            r.update(total=total, padding=padding, per_rank=per_rank)
            results.append(r)
            print(f"| {name} | {tp} | {per_rank / 1e6:.2f}M ({sharded / 1e6:.2f}M + {replicated / 1e6:.3f}M) | "
                  f"{4 * per_rank / 2**20:.1f} MiB | {16 * per_rank / 2**20:.1f} MiB | "
                  f"{tp} x {sharded / 1e6:.3f}M + {replicated / 1e6:.3f}M = {total / 1e6:.3f}M + "
                  f"{padding / 1e6:.3f}M |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Data pipeline throughput: the streaming loader vs raw reads of the same bytes, and `megalm prepare` vs the
tokenizer library's own batch encoding of the same text.

Loader. The built-in Shakespeare corpus, GPT-2 tokens, tiled to `--tokens` and written as `megalm prepare`
writes shards (4,096-token samples, `--shard-tokens` a shard). Each round times, in a rotated order:
  file read   np.fromfile of every shard (the bytes, no tar parsing: an I/O ceiling);
  raw arrays  every shard's tar members with Python's tarfile, each np.frombuffer'ed (the same arrays the
              loader reads, no packing, shuffling or batching);
  loader      TrainBatches(seq_len 2048, micro-batch 8, one process, num_workers=0) over one full epoch:
              int64 (x, y) micro-batches, as training gets them;
  loader w2   the same with 2 DataLoader workers.
Target: loader >= 50% of raw arrays, and >= 100x what one H200 trains a 1B model at: 6e9 FLOPs/token at
~400 TFLOP/s achieved is ~67k tokens/s, so >= 6.7M tokens/s per process.

Prepare. The Shakespeare plays (`--text-copies` times over). Each round runs, in a rotated order and each in
a fresh process with TOKENIZERS_PARALLELISM=false (one tokenizer thread): the library encoding the same
document batches with `encode_batch` (the time of the calls only), and `prepare(..., workers=N)` for each
N in `--workers` (the whole call: reading, tokenizing, shard writing, checksums, manifests). Per worker =
total tokens/s / N. Target: prepare per worker >= 0.8x the library.

    python bench/data_throughput.py                    # both, 5 rounds each
    python bench/data_throughput.py --only loader --tokens 64M --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun and the tests set it; before torch is imported

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from megalm.data.corpus import default_corpus_files  # noqa: E402
from megalm.data.prepare import FORMAT, parse_count, write_json_atomic, write_split_shards  # noqa: E402

SEQ_LEN, MICRO_BATCH, SAMPLE_TOKENS = 2048, 8, 4096
H200_1B_TOKENS_PER_S = 400e12 / 6e9  # ~67k tokens/s: 6 * 1e9 FLOPs per token at 400 TFLOP/s


def _rotate(names: list[str], r: int) -> list[str]:
    return names[r % len(names) :] + names[: r % len(names)]


# ---------------------------------------------------------------------------------------------- loader


def build_shards(root: Path, tokens: int, shard_tokens: int) -> Path:
    """Shakespeare in GPT-2 tokens, tiled to `tokens`, as a prepared split under root/train."""
    from megalm.data.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    texts = [p.read_text(encoding="utf-8") for p in default_corpus_files()]
    ids = np.concatenate([np.asarray(i + [tok.eot_id], dtype="<u2") for i in tok.encode_batch(texts)])
    data = np.resize(ids, tokens)
    split = root / "train"
    split.mkdir(parents=True)
    shards = write_split_shards(data, split, sample_tokens=SAMPLE_TOKENS, shard_tokens=shard_tokens)
    write_json_atomic(split / "manifest.json", {
        "format": FORMAT, "split": "train", "tokenizer": tok.spec(), "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id, "dtype": "uint16", "num_tokens": len(data), "num_documents": 0,
        "sample_tokens": SAMPLE_TOKENS, "shards": shards, "sources": ["builtin:shakespeare (tiled)"],
    })  # fmt: skip
    return split


def file_read(split: Path) -> int:
    """Tokens in the shards' bytes, read with np.fromfile."""
    return sum(len(np.fromfile(p, dtype=np.uint8)) // 2 for p in sorted(split.glob("*.tar")))


def raw_arrays(split: Path) -> int:
    """Tokens of every tar member, read with tarfile and np.frombuffer."""
    n = 0
    for p in sorted(split.glob("*.tar")):
        with tarfile.open(p, "r|") as tar:
            for member in tar:
                n += len(np.frombuffer(tar.extractfile(member).read(), dtype="<u2"))
    return n


def loader_epoch(split: Path, workers: int) -> int:
    """Input tokens of one epoch of (x, y) micro-batches from TrainBatches."""
    from megalm.config import Layout
    from megalm.data.loader import TrainBatches, load_split

    loader = TrainBatches(load_split(split), seq_len=SEQ_LEN, layout=Layout(micro_batch_size=MICRO_BATCH),
                          dp_rank=0, seed=0, num_workers=workers)  # fmt: skip
    n = 0
    for _ in range(loader.steps_per_epoch):
        for x, _y in loader.next_step():
            n += x.numel()
    loader.close()
    return n


def bench_loader(args: argparse.Namespace) -> dict:
    """Tokens/s of each loader contender per round, and the median loader / raw arrays ratio."""
    import megalm.data.loader  # noqa: F401  (torch: imported before any timing, not at module level, where
    # spawned prepare workers, which import this file as their __main__, would pay for it)

    contenders = {"file read": lambda s: file_read(s), "raw arrays": lambda s: raw_arrays(s),
                  "loader": lambda s: loader_epoch(s, 0), "loader w2": lambda s: loader_epoch(s, 2)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="megalm-bench-") as tmp:
        split = build_shards(Path(tmp), args.tokens, args.shard_tokens)
        file_read(split)  # warm the page cache: every contender reads from memory
        rates: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds):
            for name in _rotate(list(contenders), r):
                t0 = time.perf_counter()
                n = contenders[name](split)
                rates[name].append(n / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] / 1e6:.1f}M" for k, v in rates.items()), file=sys.stderr)
    ratios = [lo / raw for lo, raw in zip(rates["loader"], rates["raw arrays"], strict=True)]
    return {"rates": rates, "loader_over_raw": statistics.median(ratios)}


# --------------------------------------------------------------------------------------------- prepare


def _child(kind: str, copies: int, workers: int) -> None:
    """One timed contender in this (fresh) process; prints {"tokens", "seconds", "cpu_seconds"} as JSON.

    cpu_seconds counts this process and its (finished) worker processes: on a shared machine it shows the
    work done apart from the waiting for a core.
    """
    import resource

    from megalm.data.tokenizer import load_tokenizer

    files, cpu = default_corpus_files() * copies, lambda: time.process_time() + _children_cpu(resource)
    load_tokenizer("gpt2")  # both contenders start with a loaded tokenizer
    if kind == "library":
        from megalm.data.documents import batches, iter_documents
        from megalm.data.tokenizer import _gpt2_hf

        hf, docs, n, seconds, cpu_seconds = _gpt2_hf(), list(batches(iter_documents(files))), 0, 0.0, 0.0
        for batch in docs:
            t0, c0 = time.perf_counter(), cpu()
            n += sum(len(e.ids) for e in hf.encode_batch(batch, add_special_tokens=False))
            seconds, cpu_seconds = seconds + time.perf_counter() - t0, cpu_seconds + cpu() - c0
    else:
        from megalm.data.prepare import prepare

        with tempfile.TemporaryDirectory(prefix="megalm-bench-") as tmp:
            t0, c0 = time.perf_counter(), cpu()
            manifests = prepare([str(f) for f in files], "gpt2", tmp, workers=workers, progress=False)
            seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
        n = manifests["train"]["num_tokens"]
    print(json.dumps({"tokens": n, "seconds": seconds, "cpu_seconds": cpu_seconds}))


def _children_cpu(resource) -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_prepare(args: argparse.Namespace) -> dict:
    """Per-worker tokens/s and tokens per CPU-second of the library and prepare, each run in a fresh process."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    contenders = {"library": ("library", 1), **{f"prepare w{n}": ("prepare", n) for n in args.workers}}
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    per_cpu: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        for name in _rotate(list(contenders), r):
            kind, n = contenders[name]
            cmd = [sys.executable, __file__, "--child", kind, "--child-workers", str(n),
                   "--text-copies", str(args.text_copies)]  # fmt: skip
            out = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            rates[name].append(out["tokens"] / out["seconds"] / n)  # per worker
            per_cpu[name].append(out["tokens"] / out["cpu_seconds"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] / 1e3:.0f}k" for k, v in rates.items()), file=sys.stderr)

    def ratios(d: dict[str, list[float]]) -> dict[str, float]:
        """Median over rounds of each contender's figure / the library's."""
        return {k: statistics.median(a / b for a, b in zip(v, d["library"], strict=True)) for k, v in d.items()}

    return {"rates": rates, "ratio": ratios(rates), "per_cpu": per_cpu, "per_cpu_ratio": ratios(per_cpu)}


# ------------------------------------------------------------------------------------------------ main


def report(loader: dict | None, prep: dict | None, args: argparse.Namespace) -> None:
    """Markdown tables of the medians."""
    if loader:
        print(
            f"\nLoader, {args.tokens / 1e6:.0f}M tokens, seq_len {SEQ_LEN}, micro-batch {MICRO_BATCH}, "
            f"median of {args.rounds} rounds (tokens/s):\n"
        )
        print("| contender | tokens/s | vs raw arrays |\n|---|---:|---:|")
        raw = statistics.median(loader["rates"]["raw arrays"])
        for name, v in loader["rates"].items():
            print(f"| {name} | {statistics.median(v) / 1e6:.1f}M | {statistics.median(v) / raw:.2f}x |")
        lo = statistics.median(loader["rates"]["loader"])
        print(
            f"\nloader / raw arrays (median of per-round ratios): {loader['loader_over_raw']:.2f}; loader = "
            f"{lo / H200_1B_TOKENS_PER_S:.0f}x a 1B model's ~67k tokens/s on one H200"
        )
    if prep:
        print(
            f"\nPrepare, Shakespeare x{args.text_copies}, GPT-2, median of {args.rounds} rounds:\n\n"
            "| contender | tokens/s per worker | vs library | tokens per CPU-second | vs library |\n"
            "|---|---:|---:|---:|---:|"
        )
        for name, v in prep["rates"].items():
            cpu = statistics.median(prep["per_cpu"][name])
            print(f"| {name} | {statistics.median(v) / 1e3:.0f}k | {prep['ratio'][name]:.2f}x | {cpu / 1e3:.0f}k | "
                  f"{prep['per_cpu_ratio'][name]:.2f}x |")  # fmt: skip


def main() -> None:
    """Run the chosen benchmarks (or one contender, as a child process) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("loader", "prepare"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=parse_count, default=32_000_000, help="loader: tokens of shards")
    parser.add_argument("--shard-tokens", type=parse_count, default=4_000_000)
    parser.add_argument("--text-copies", type=int, default=3, help="prepare: Shakespeare this many times over")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare: worker counts")
    parser.add_argument("--child", choices=("library", "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.text_copies, args.child_workers)
    loader = bench_loader(args) if args.only in (None, "loader") else None
    prep = bench_prepare(args) if args.only in (None, "prepare") else None
    report(loader, prep, args)


if __name__ == "__main__":
    main()

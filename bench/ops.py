"""megalm's fused ops against torch eager, torch.compile of the same eager code, and Liger-Kernel, side by side.

    python bench/ops.py --out ops.json                    # on a GPU: llama_1b's shapes, bf16
    python bench/ops.py --device cpu --dry-run            # tiny shapes on CPU: plumbing only (no Triton, no Liger)

Ops (llama_1b, micro batch 8 x 4096 tokens): rms_norm and layer_norm over d 2048; rope of q (32 heads) and k
(4 heads) of 64; swiglu over 5632; linear + cross-entropy over a 32000 vocabulary (the eager baseline is the
model's F.linear + vocab-parallel cross-entropy, which materialises the logits). Each contender: forward and
forward+backward median milliseconds (triton.testing.do_bench on CUDA), peak memory above the inputs (CUDA), and
its max abs difference from eager on the output. Ratios: megalm's fwd+bwd time / each other contender's (< 1 is
faster). Rows are written to --out as they are measured, so a run cut short keeps what it has. Targets
(reported, not asserted): megalm >= 1.0x Liger-Kernel's speed and >= 1.5x torch eager's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import kernels  # noqa: E402
from megalm.model.ops import TorchOps, TritonOps  # noqa: E402

B, T, D, FFN, VOCAB, NH, NKV, HD = 8, 4096, 2048, 5632, 32000, 32, 4, 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, few repetitions")
    p.add_argument("--ops", nargs="+", default=["linear_cross_entropy", "rms_norm", "swiglu", "rope", "layer_norm"])
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    return p.parse_args(argv)


def shapes(dry_run: bool) -> dict:
    if dry_run:
        return {"tokens": 64, "d": 32, "ffn": 48, "vocab": 300, "b": 2, "t": 16, "nh": 4, "nkv": 2, "hd": 8}
    return {"tokens": B * T, "d": D, "ffn": FFN, "vocab": VOCAB, "b": B, "t": T, "nh": NH, "nkv": NKV, "hd": HD}


# ------------------------------------------------------------------------------------------------ the ops


def make_inputs(op: str, s: dict, device: str, dtype: torch.dtype) -> tuple:
    """Inputs (leaf tensors requiring grad where the op has gradients) of `op` at shapes `s`."""
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
    leaf = lambda t: t.requires_grad_()
    if op in ("rms_norm", "layer_norm"):
        return leaf(rand(s["tokens"], s["d"])), leaf(rand(s["d"]) + 1), leaf(rand(s["d"]))
    if op == "swiglu":
        return leaf(rand(s["tokens"], s["ffn"])), leaf(rand(s["tokens"], s["ffn"]))
    if op == "rope":
        from megalm.model.ops import rope_tables

        cos, sin = (t.to(device) for t in rope_tables(s["t"], s["hd"], 10000.0))
        q, k = leaf(rand(s["b"], s["nh"], s["t"], s["hd"])), leaf(rand(s["b"], s["nkv"], s["t"], s["hd"]))
        return q, k, cos, sin
    targets = torch.randint(0, s["vocab"], (s["tokens"],), device=device, generator=g)
    return leaf(rand(s["tokens"], s["d"])), leaf(rand(s["vocab"], s["d"], scale=0.02)), targets


def eager_fns() -> dict:
    """The model's eager torch code per op (what model.kernels=torch runs)."""
    return {
        "rms_norm": lambda x, w, b: TorchOps.rms_norm(x, w, 1e-5),
        "layer_norm": lambda x, w, b: TorchOps.layer_norm(x, w, b, 1e-5),
        "swiglu": TorchOps.swiglu,
        "rope": TorchOps.rope,
        "linear_cross_entropy": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
    }


def megalm_fns() -> dict:
    """What model.kernels=triton runs (TritonOps: the kernels through kernels.custom_ops; the fused loss)."""
    return {
        "rms_norm": lambda x, w, b: TritonOps.rms_norm(x, w, 1e-5),
        "layer_norm": lambda x, w, b: TritonOps.layer_norm(x, w, b, 1e-5),
        "swiglu": TritonOps.swiglu,
        "rope": TritonOps.rope,
        "linear_cross_entropy": lambda h, w, t: kernels.linear_cross_entropy(h, w, t),
    }


def liger_fns() -> dict:
    """Liger-Kernel's autograd functions for the same ops (imported lazily; missing -> an error row)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as LCE
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def rope(q, k, cos, sin):  # Liger takes HF's (1, T, hd) tables, both halves
        return LigerRopeFunction.apply(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])

    return {
        "rms_norm": lambda x, w, b: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False),
        "layer_norm": lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5),
        "swiglu": LigerSiLUMulFunction.apply,
        "rope": rope,
        "linear_cross_entropy": lambda h, w, t: LCE.apply(h, w, t),
    }


# ------------------------------------------------------------------------------------------------ timing


def bench_ms(fn, device: str, dry_run: bool) -> float:
    fn()
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=20 if dry_run else 60, return_mode="median")
    times = []
    for _ in range(2 if dry_run else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def measure(name: str, fn, inputs: tuple, reference: list[torch.Tensor] | None, args) -> dict:
    """fwd and fwd+bwd ms, peak extra memory (CUDA) and max |output - eager| of one contender."""
    leaves = [t for t in inputs if t.requires_grad]
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    outs = _outputs(fn(*inputs))
    diff = (
        max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, reference, strict=True))
        if reference
        else 0.0
    )

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        sum(o.float().sum() for o in _outputs(fn(*inputs))).backward()

    row = {"contender": name, "max_abs_diff_vs_eager": diff}
    with torch.no_grad():
        row["fwd_ms"] = bench_ms(lambda: fn(*inputs), args.device, args.dry_run)
    row["fwdbwd_ms"] = bench_ms(fwd_bwd, args.device, args.dry_run)
    if args.device == "cuda":
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def contenders(args) -> dict:
    """name -> (op -> fn), in the order they are measured; a contender that cannot load is an error entry."""
    out: dict = {"megalm": megalm_fns(), "eager": eager_fns()}
    try:
        out["liger"] = liger_fns()
    except Exception as e:  # not installed, or an API that changed
        out["liger"] = f"{type(e).__name__}: {e}"
    if not args.no_compile:
        out["compile"] = {op: torch.compile(fn) for op, fn in eager_fns().items()}
    return out


def op_rows(op: str, args, table: dict, save) -> list[dict]:
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    inputs = make_inputs(op, shapes(args.dry_run), args.device, dtype)
    with torch.no_grad():
        reference = [o.detach() for o in _outputs(eager_fns()[op](*inputs))]
    rows = []
    for name, fns in table.items():
        row = {"op": op, "contender": name}
        try:
            if isinstance(fns, str):
                raise RuntimeError(fns)
            fresh = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)  # some ops work in place
            row = {"op": op, **measure(name, fns[op], fresh, reference, args)}
        except Exception as e:  # report and go on: one failing contender must not stop the rest
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        rows.append(row)
        print(_line(row), flush=True)
        save(rows)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """megalm's fwd+bwd time / each contender's (below 1: megalm is faster); targets vs eager and Liger."""
    ours = next((r for r in rows if r["contender"] == "megalm" and "fwdbwd_ms" in r), None)
    for r in rows:
        if ours and "fwdbwd_ms" in r:
            r["megalm_time_ratio"] = ours["fwdbwd_ms"] / r["fwdbwd_ms"]
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['op']} | {r['contender']} | {r['error']} | | |"
    mem = f"{r['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in r else ""
    return (f"| {r['op']} | {r['contender']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {mem} | "
            f"{r['max_abs_diff_vs_eager']:.2e} |")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --dry-run for a smoke test")
    results: dict = {"device": args.device, "dry_run": args.dry_run, "shapes": shapes(args.dry_run), "ops": {}}
    table = contenders(args)

    def save(rows, op=None):
        if op is not None:
            results["ops"][op] = rows
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    print("| op | contender | fwd ms | fwd+bwd ms | peak extra | max abs diff vs eager |\n|---|---|---|---|---|---|")
    for op in args.ops:
        save(op_rows(op, args, table, lambda rows, op=op: save(rows, op)), op)
    failed = [r for rows in results["ops"].values() for r in rows if r["contender"] == "megalm" and "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

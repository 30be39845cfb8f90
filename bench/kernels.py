"""GPU benchmark of megalm's Triton kernels against PyTorch, side by side in one run.

Attention: TFLOP/s of forward and forward+backward, bf16, causal (--non-causal adds the rest), B*T fixed (16k
tokens) and H*D = 2048, for T in {1k, 4k, 16k}, D in {64, 128}, multi-head and GQA 4:1, plus llama_1b's own
shape (32 query / 4 kv heads of 64, T 4096): megalm's flash_attention, SDPA with its FLASH_ATTENTION,
CUDNN_ATTENTION and EFFICIENT_ATTENTION backends, and eager attention (T <= 2048 only). Plus the measured bf16
matmul peak (8192^3) for scale, and fused_softmax GB/s against torch.softmax. A correctness check at full size
against the fp64 reference runs before any timing. With --out, the JSON is rewritten after every row, so a run
cut short keeps what it measured.

    python bench/kernels.py --out results/kernels.json        # on a GPU (no network needed)
    python bench/kernels.py --device cpu --dry-run            # tiny smoke run on CPU

Timings are medians of triton.testing.do_bench (CUDA events) on GPU, of perf_counter on CPU.
FLOPs: forward 4*B*H*T^2*D (halved when causal), backward 2.5x forward (FlashAttention's convention).
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
from kernels import _utils  # noqa: E402
from kernels.testing import check_flash_attention, check_fused_softmax  # noqa: E402

TARGET_BWD_VS_SDPA = 1.0  # fwd+bwd at T=4096, D=128, causal, bf16: megalm / best SDPA backend
TARGET_FWD_VS_PEAK = 0.5  # forward TFLOP/s / measured matmul TFLOP/s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write JSON results here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, few repetitions: a smoke test")
    p.add_argument("--seqlens", type=int, nargs="+", help="default 1024 2048 4096 8192 16384")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="B * T per measurement")
    p.add_argument("--model-dim", type=int, default=2048, help="H * D per measurement")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check (not advised)")
    p.add_argument("--non-causal", action="store_true", help="also time non-causal attention")
    args = p.parse_args(argv)
    if args.dry_run:
        args.seqlens = args.seqlens or [64, 128]
        args.head_dims, args.tokens, args.model_dim = [32, 64], 256, 128
    args.seqlens = args.seqlens or [1024, 4096, 16384]
    return args


# ---------------------------------------------------------------------------------------------- timing


def bench_ms(fn, device: str, dry_run: bool, grad_to_none=None) -> float:
    """Median milliseconds of fn() (called once before, so autotuning is not timed)."""
    fn()
    if device == "cuda":
        import triton.testing

        rep = 20 if dry_run else 100
        return triton.testing.do_bench(fn, warmup=10, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(2 if dry_run else 10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, backward: bool) -> float:
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


# -------------------------------------------------------------------------------------------- backends


def eager_attention(q, k, v, causal: bool):
    """nanoGPT-style attention in the input dtype, (T x T) scores in memory."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    if causal:
        att = att.masked_fill(kernels.causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal: bool):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])

    return run


BACKENDS = {
    "megalm": lambda q, k, v, causal: kernels.flash_attention(q, k, v, causal=causal),
    "sdpa_flash": sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": sdpa("CUDNN_ATTENTION"),
    "sdpa_efficient": sdpa("EFFICIENT_ATTENTION"),
    "eager": eager_attention,
}


def eager_bytes(B: int, H: int, T: int) -> int:
    """Rough peak of eager fwd+bwd: scores, probabilities and their grads, about 5 (T x T) bf16/fp32 buffers."""
    return B * H * T * T * 12


# ---------------------------------------------------------------------------------------- measurements


def _time_fwd_and_fwdbwd(fn, B: int, H: int, H_KV: int, T: int, D: int, causal: bool, args) -> tuple[float, float]:
    dtype = torch.bfloat16
    q = torch.randn(B, H, T, D, device=args.device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H_KV, T, D, device=args.device, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    fwd_ms = bench_ms(lambda: fn(q, k, v, causal), args.device, args.dry_run)
    bwd = lambda: fn(q, k, v, causal).backward(do)
    return fwd_ms, bench_ms(bwd, args.device, args.dry_run, grad_to_none=[q, k, v])


def time_attention(name: str, B: int, H: int, H_KV: int, T: int, D: int, causal: bool, args) -> dict:
    """One table row: fwd and fwd+bwd of backend `name`, or a note saying why it has no numbers."""
    row = {"backend": name, "B": B, "H": H, "H_kv": H_KV, "T": T, "D": D, "causal": causal}
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else 1 << 62
    if name == "eager" and (eager_bytes(B, H, T) > 0.8 * free or (T > 2048 and not args.dry_run)):
        row["note"] = f"skipped: needs ~{eager_bytes(B, H, T) / 2**30:.0f} GiB of scores (timed at T <= 2048 only)"
        return row
    try:
        fwd_ms, fwdbwd_ms = _time_fwd_and_fwdbwd(BACKENDS[name], B, H, H_KV, T, D, causal, args)
    except RuntimeError as e:  # backend unavailable for this shape/device, or out of memory
        row["note"] = f"n/a: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        row["error"] = name == "megalm" and not isinstance(e, torch.cuda.OutOfMemoryError)
        return row
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()
    row["fwd_ms"], row["fwdbwd_ms"] = fwd_ms, fwdbwd_ms
    row["fwd_tflops"] = attention_flops(B, H, T, D, causal, False) / fwd_ms / 1e9
    row["fwdbwd_tflops"] = attention_flops(B, H, T, D, causal, True) / fwdbwd_ms / 1e9
    return row


def attention_shapes(args) -> list[tuple[int, int, int, int, int, bool]]:
    """(B, H, H_kv, T, D, causal) to time: MHA and GQA 4:1 over T and D, then llama_1b's shape."""
    shapes = []
    for D in args.head_dims:
        H = args.model_dim // D
        for T in args.seqlens:
            for group in (1, 4):
                for causal in (True, False) if args.non_causal else (True,):
                    shapes.append((max(1, args.tokens // T), H, max(1, H // group), T, D, causal))
    if not args.dry_run:
        shapes.append((max(1, args.tokens // 4096), 32, 4, 4096, 64, True))  # llama_1b: GQA 8:1
    return shapes


def attention_rows(args, saved: list[dict], save) -> list[dict]:
    """Every backend at every shape; `saved` grows row by row and save() writes it."""
    for B, H, H_KV, T, D, causal in attention_shapes(args):
        for name in BACKENDS:
            saved.append(time_attention(name, B, H, H_KV, T, D, causal, args))
            print(_row_line(saved[-1]), flush=True)
            save()
    return saved


def matmul_peak(args) -> dict:
    n = 512 if args.dry_run else 8192
    a, b = (torch.randn(n, n, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    ms = bench_ms(lambda: a @ b, args.device, args.dry_run)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def softmax_rows(args) -> list[dict]:
    """fused_softmax (scale + causal mask + softmax) vs torch.softmax alone and eager scale+mask+softmax."""
    shape = (2, 4, 128, 128) if args.dry_run else (4, 32, 4096, 4096)
    x = torch.randn(shape, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    mask = kernels.causal_mask(shape[-2], shape[-1], args.device)
    fns = {
        "megalm fused_softmax": lambda: kernels.fused_softmax(x, scale=0.125, causal=True),
        "torch.softmax": lambda: torch.softmax(x, dim=-1),
        "eager scale+mask+softmax": lambda: torch.softmax((x * 0.125).masked_fill(mask, float("-inf")), dim=-1),
    }
    nbytes = x.numel() * x.element_size()
    rows = []
    for name, fn in fns.items():
        fwd_ms = bench_ms(fn, args.device, args.dry_run)
        bwd_ms = bench_ms(lambda fn=fn: fn().backward(dy), args.device, args.dry_run, grad_to_none=[x])
        rows.append(
            {"op": name, "shape": list(shape), "fwd_ms": fwd_ms, "fwdbwd_ms": bwd_ms,
             "fwd_gbps": 2 * nbytes / fwd_ms / 1e6, "fwdbwd_gbps": 5 * nbytes / bwd_ms / 1e6}
        )  # fmt: skip
        print(f"| {name} | {fwd_ms:.3f} ms | {rows[-1]['fwd_gbps']:.0f} GB/s | {rows[-1]['fwdbwd_gbps']:.0f} GB/s |")
    return rows


def correctness(args) -> list[dict]:
    """Full-size check against the fp64 reference (kernels.testing's rule) before timing."""
    if args.dry_run:
        flash = [(1, 4, 2, 100, 64, torch.float32, True)]
        soft = [((2, 3, 50, 50), torch.float32)]
    else:
        flash = [(1, 16, 16, 4096, 128, torch.bfloat16, True), (2, 16, 4, 2048, 64, torch.bfloat16, False)]
        soft = [((2, 16, 2048, 2048), torch.bfloat16)]
    results = []
    for B, H, H_KV, T, D, dtype, causal in flash:
        comparisons, _ = check_flash_attention(B, H, H_KV, T, T, D, dtype, causal, device=args.device)
        results += [{"check": str(c), "ok": c.ok} for c in comparisons]
    for shape, dtype in soft:
        comparisons, _ = check_fused_softmax(shape, dtype, True, scale=0.125, device=args.device)
        results += [{"check": str(c), "ok": c.ok} for c in comparisons]
    for r in results:
        print(("  " if r["ok"] else "  FAILED ") + r["check"], flush=True)
    return results


# ------------------------------------------------------------------------------------------- reporting


def _row_line(r: dict) -> str:
    if "fwd_tflops" not in r:
        return f"| {r['backend']} | {r['T']} | {r['D']} | {r['causal']} | {r.get('note', '')} | | |"
    return (
        f"| {r['backend']} | {r['T']} | {r['D']} | {r['causal']} | H={r['H']}/{r['H_kv']} B={r['B']} "
        f"| {r['fwd_tflops']:.3g} | {r['fwdbwd_tflops']:.3g} |"
    )


def targets(rows: list[dict], peak: dict) -> dict:
    """The reported (not asserted) targets at T=4096, D=128, causal, bf16."""
    pick = lambda name: next(
        (r for r in rows if r["backend"] == name and r["T"] == 4096 and r["D"] == 128 and r["causal"]
         and r["H"] == r["H_kv"]), {}
    )  # fmt: skip
    ours = pick("megalm")
    best = max((pick(n).get("fwdbwd_tflops", 0.0) for n in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")), default=0)
    out = {}
    if ours.get("fwdbwd_tflops") and best:
        out["fwdbwd_vs_best_sdpa"] = ours["fwdbwd_tflops"] / best
        out["fwdbwd_target_met"] = out["fwdbwd_vs_best_sdpa"] >= TARGET_BWD_VS_SDPA
    if ours.get("fwd_tflops"):
        out["fwd_vs_matmul_peak"] = ours["fwd_tflops"] / peak["tflops"]
        out["fwd_target_met"] = out["fwd_vs_matmul_peak"] >= TARGET_FWD_VS_PEAK
    return out


def _save(args, results: dict) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


def environment(args) -> dict:
    env = {"torch": torch.__version__, "device": args.device, "dry_run": args.dry_run}
    env["megalm_path"] = "triton" if _utils.use_triton(torch.zeros(1, device=args.device)) else "torch reference"
    if args.device == "cuda":
        import triton

        env |= {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "cuda": torch.version.cuda}
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --dry-run for a smoke test")
    if args.device == "cuda" and _utils.INTERPRET_AT_IMPORT:
        sys.exit("TRITON_INTERPRET is set: unset it (or set 0) to benchmark compiled kernels")
    torch.manual_seed(0)
    results = {"env": environment(args)}
    print("# megalm kernels benchmark", json.dumps(results["env"]))
    if not args.skip_check:
        print("\n## correctness (full size, vs fp64 reference)")
        results["correctness"] = correctness(args)
    print("\n## bf16 matmul peak")
    results["matmul_peak"] = matmul_peak(args)
    print(f"{results['matmul_peak']['n']}^3: {results['matmul_peak']['tflops']:.1f} TFLOP/s")
    _save(args, results)
    print("\n## attention (bf16), TFLOP/s\n| backend | T | D | causal | shape / note | fwd | fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    results["attention"] = []
    attention_rows(args, results["attention"], lambda: _save(args, results))
    print("\n## softmax (bf16)\n| op | fwd time | fwd GB/s | fwd+bwd GB/s |\n|---|---|---|---|")
    results["softmax"] = softmax_rows(args)
    results["targets"] = targets(results["attention"], results["matmul_peak"])
    print("\n## targets (reported, not asserted)\n" + json.dumps(results["targets"], indent=1))
    _save(args, results)
    if args.out:
        print(f"wrote {args.out}")
    failed = [r for r in results.get("correctness", []) if not r["ok"]]
    failed += [r for r in results["attention"] if r.get("error")]
    if failed:
        print(f"\n{len(failed)} FAILURES (correctness checks or megalm errors): see above")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every Triton kernel of `kernels` for an sm_90 (H100/H200) target, without a GPU.

Run as a script (`python tests/kernels/sm90_compile.py`), NOT under TRITON_INTERPRET: it checks that the
kernels get through Triton's real compiler (type checks, layouts, ptxas) for each launch config, and
prints registers, spills and shared memory per kernel. test_sm90_compile.py runs it (marked slow).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET to compile for the GPU")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"qk_scale", "sm_scale", "scale", "scale_log2", "eps", "z_loss_weight", "theta"}


def compile_kernel(fn, ptr_types: dict, consts: dict, num_warps: int, num_stages: int):
    """triton.compile for TARGET; pointers/strides get the divisibility-16 hint the JIT would give."""
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    backend = triton.compiler.make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=TARGET, options=options.__dict__)


def resource_usage(cubin: bytes) -> str:
    """Registers and spill stores from Triton's bundled cuobjdump, e.g. 'REG:168 ... STACK:0'."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return f"regs={m[1]} stack={m[2]} local={m[4]}" if m else out.strip()[-200:]


def _report(name: str, ck, t0: float) -> None:
    usage = resource_usage(ck.asm["cubin"])
    print(f"{name:72s} shared={ck.metadata.shared:6d} {usage} {time.time() - t0:.1f}s", flush=True)


def flash_cases(args):
    fa = importlib.import_module("kernels.flash_attention")
    for dtype in args.dtypes:
        for d in args.dims:
            for causal in args.causal:
                base = {
                    "GROUP": 4,
                    "HEAD_DIM": d,
                    "CAUSAL": bool(causal),
                    "BLOCK_D": max(16, triton.next_power_of_2(d)),
                }
                base |= {"DOT_PRECISION": "tf32", "INTERPRETER": False}
                yield from _flash_kernels(fa, dtype, base, args.all_configs)


def _flash_kernels(fa, dtype, base, full):
    p = "*" + dtype
    ptrs = {n: p for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
    ptrs |= {"lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    tag = f"{dtype} D={base['HEAD_DIM']} causal={base['CAUSAL']}"
    tables = [("fwd", fa._attn_fwd_tuned), ("dkdv", fa._attn_bwd_dkdv_tuned), ("dq", fa._attn_bwd_dq_tuned)]
    for name, tuned in tables:
        configs = fa._prune_configs(tuned.configs, {"T_Q": 4096, "T_K": 4096}, HEAD_DIM=base["HEAD_DIM"])
        for cfg in configs if full else configs[:2]:
            consts = dict(base, **cfg.kwargs)
            if name == "dkdv":
                consts["HEADS_PER_SPLIT"] = 2
            label = f"{name} {tag} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
            yield label, tuned, ptrs, consts, cfg.num_warps, cfg.num_stages
    pre = {"HEAD_DIM": base["HEAD_DIM"], "BLOCK_M": 64, "BLOCK_D": base["BLOCK_D"]}
    yield f"preprocess {tag}", fa._attn_bwd_preprocess_kernel, ptrs, pre, 4, 3


def softmax_cases(args):
    fs = importlib.import_module("kernels.fused_softmax")
    for dtype in args.dtypes:
        ptrs = {"x_ptr": "*" + dtype, "y_ptr": "*" + dtype, "mask_ptr": "*u8", "dy_ptr": "*" + dtype}
        ptrs["dx_ptr"] = "*" + dtype
        for t_k in (128, 2048, 8192, 32768):
            block_r, block_n, single, warps = fs._blocks(t_k, fs.MAX_BLOCK_N)
            blocks = {"BLOCK_R": block_r, "BLOCK_N": block_n, "SINGLE_PASS": single, "INTERPRETER": False}
            fwd = dict(blocks, CAUSAL=True, HAS_MASK=True)
            yield f"softmax fwd {dtype} T_k={t_k}", fs._softmax_fwd_kernel, ptrs, fwd, warps, 3
            yield f"softmax bwd {dtype} T_k={t_k}", fs._softmax_bwd_kernel, ptrs, blocks, warps, 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--dims", nargs="+", type=int, default=[64, 80, 128])
    p.add_argument("--causal", nargs="+", type=int, default=[1], choices=[0, 1])
    p.add_argument("--all-configs", action="store_true", help="every autotune config, not the first two")
    return p.parse_args(argv)


OP_MODULES = ("kernels.norm", "kernels.rope", "kernels.swiglu", "kernels.linear_cross_entropy")
"""Kernel modules that list their own compile cases: `sm90_cases(dtypes)` yields (label, jit fn, pointer types,
constexprs, num_warps, num_stages) for each launch config worth compiling."""


def op_cases(args):
    for name in OP_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # not written yet
        yield from module.sm90_cases(args.dtypes)


def main() -> int:
    args = parse_args()
    failures = 0
    for cases in (flash_cases(args), softmax_cases(args), op_cases(args)):
        for label, fn, ptrs, consts, warps, stages in cases:
            t0 = time.time()
            try:
                _report(label, compile_kernel(fn, ptrs, consts, warps, stages), t0)
            except Exception as e:  # report every failure, then fail
                failures += 1
                print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

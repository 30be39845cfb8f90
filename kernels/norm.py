"""Fused RMSNorm and LayerNorm over the last dim, forward and backward, in Triton.

    rms_norm:   y = x * rsqrt(mean(x^2) + eps) * w                   (Llama)
    layer_norm: y = (x - mean(x)) * rsqrt(var(x) + eps) * w (+ b)    (GPT-2; biased variance, like F.layer_norm)

Statistics are fp32 whatever the input dtype; y has x's dtype. Any leading shape is flattened to (rows, hidden).
A program normalises a (BLOCK_R, BLOCK_N) tile of whole rows held in registers (BLOCK_N >= hidden, several
rows per tile when hidden is small), so hidden is limited to MAX_HIDDEN; larger rows raise a ValueError.

The forward saves x, w and the per-row fp32 rstd (and mean for LayerNorm), not y. The backward runs a fixed
number of programs (a few per SM), each looping over its own contiguous range of rows: it writes dx and
its fp32 partial sums of dw (and db) over those rows into a (n_programs, hidden) buffer that torch sums
over programs afterwards. No atomics: the gradients are deterministic for a given shape and device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._utils import cast_rne, interpreting, last_dim_contiguous, use_triton

MAX_HIDDEN = 16384  # longest row one program holds in registers (fp32)
_TILE_ELEMS = 4096  # BLOCK_R * BLOCK_N target per program for short rows
_PROGRAMS_PER_SM = 2  # backward programs per SM on CUDA (each writes one row of dw/db partials)
_CPU_PROGRAMS = 4  # backward programs under the interpreter (each costs ~1.5 ms to start)
_NUM_STAGES = 1  # no loop to pipeline in the forward; 2-3 stages changed nothing in the backward's sm_90 code
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------------------------------
# References (pure torch): the ground truth in tests and the fallback on CPU
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, *, eps: float, upcast: bool = True) -> torch.Tensor:
    """megalm's Llama Norm.forward: y = x * rsqrt(mean(x^2) + eps) * w over the last dim, in x's dtype.

    Computed in fp32 (fp64 stays fp64) when `upcast`; for fp16/bf16/fp32 inputs that is exactly
    `xf = x.float(); (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).type_as(x)`.
    upcast=False computes in x's dtype (plain eager torch, what the tests compare the kernel's error with).
    """
    cd = _compute_dtype(x.dtype, upcast)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(cd)).type_as(x)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, eps: float, upcast: bool = True
) -> torch.Tensor:
    """F.layer_norm over the last dim on the fp32 upcast (fp64 stays fp64), cast back to x's dtype.

    upcast=False is F.layer_norm in the input dtype, what megalm's gpt2 Norm computes today.
    """
    cd = _compute_dtype(x.dtype, upcast)
    b = None if bias is None else bias.to(cd)
    return F.layer_norm(x.to(cd), (x.shape[-1],), weight.to(cd), b, eps).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, hidden, stride_xr, stride_yr, eps,
    RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    """Normalise BLOCK_R rows. x, y: (n_rows, hidden); w, b: (hidden,); mean, rstd: (n_rows,) fp32.

    HBM per row: reads x once, writes y once and 4 bytes of rstd (+ 4 of mean for LayerNorm);
    per program: reads w (and b) once.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < hidden)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / hidden  # (BLOCK_R,)
        xc = tl.where(ok, x - mean[:, None], 0.0)  # two-pass variance, in registers
        tl.store(mean_ptr + rows, mean, mask=row_ok)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / hidden + eps)  # (BLOCK_R,)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    y = (xc * rstd[:, None]) * w[None, :]  # the reference's rounding order: (x * rstd) * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64 * stride_yr + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty, INTERPRETER), mask=ok)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, n_rows, hidden, rows_per_program,
    stride_dyr, stride_xr, stride_dxr,
    RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    """dx for rows [pid * rows_per_program, +rows_per_program) and this program's partial dw, db.

    With xhat = (x - mean) * rstd (mean = 0 for RMSNorm) and g = dy * w:
        dx = rstd * (g - xhat * mean(g * xhat) - mean(g))    (the last term for LayerNorm only)
        dw_partial = sum over the rows of dy * xhat,   db_partial = sum over the rows of dy.
    dy, x, dx: (n_rows, hidden); mean, rstd: (n_rows,) fp32; dw, db: (n_programs, hidden) fp32.
    HBM per row: reads x and dy once and 4-8 bytes of stats, writes dx once; per program: reads w once (each
    tile reloads it from L1/L2, which frees registers) and writes 4 * hidden bytes of dw (and of db) partials.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_xr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dyr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # L1/L2 hit after the first tile
        g = dy * w[None, :]  # (BLOCK_R, BLOCK_N), 0 outside `ok` as dy is
        c1 = tl.sum(g * xhat, 1) / hidden  # (BLOCK_R,)
        if RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, 1) / hidden
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        dx = cast_rne(dx, dx_ptr.dtype.element_ty, INTERPRETER)
        tl.store(dx_ptr + rows64 * stride_dxr + cols[None, :], dx, mask=ok)
        dw_acc += tl.sum(dy * xhat, 0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, 0)
    tl.store(dw_ptr + pid.to(tl.int64) * hidden + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(db_ptr + pid.to(tl.int64) * hidden + cols, db_acc, mask=col_ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _blocks(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps) for rows of `hidden` elements: ~16 fp32 elements per thread."""
    block_n = triton.next_power_of_2(max(hidden, 1))
    block_r = max(1, min(16, _TILE_ELEMS // block_n))
    return block_r, block_n, min(32, max(4, block_r * block_n // 512))


def _bwd_grid(n_rows: int, block_r: int, device: torch.device, n_programs: int | None) -> tuple[int, int]:
    """(n_programs, rows_per_program) for the backward: a fixed program count, whole tiles per program."""
    if n_programs is None:
        if device.type == "cuda":
            n_programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            n_programs = _CPU_PROGRAMS
    tiles = triton.cdiv(n_rows, block_r)
    rows_per_program = triton.cdiv(tiles, min(max(n_programs, 1), tiles)) * block_r
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel. Returns y (x's shape and dtype), x as (rows, hidden), mean (None for
    RMSNorm) and rstd, both (rows,) fp32."""
    hidden = x.shape[-1]
    x2 = last_dim_contiguous(x.reshape(-1, hidden))  # (rows, hidden)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, hidden), device=x.device, dtype=x.dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    mean = None if rms else torch.empty_like(rstd)
    if n_rows > 0:
        block_r, block_n, warps = _blocks(hidden)
        _norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, weight, weight if bias is None else bias, y, rstd if mean is None else mean, rstd,
            n_rows, hidden, x2.stride(0), y.stride(0), eps,
            RMS=rms, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_N=block_n, INTERPRETER=interpreting(x2),
            num_warps=warps, num_stages=_NUM_STAGES,
        )  # fmt: skip
    return y.view(x.shape), x2, mean, rstd


def norm_bwd(
    dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
    has_bias: bool, n_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Launch the backward kernel. Returns dx (rows, hidden) in x's dtype, dw in w's dtype, db (fp32) or None.

    RMSNorm when `mean` is None. dw and db are the torch sum over programs of the fp32 partials.
    """
    n_rows, hidden = x2.shape
    dy2 = last_dim_contiguous(dy.reshape(-1, hidden))  # (rows, hidden)
    dx = torch.empty((n_rows, hidden), device=x2.device, dtype=x2.dtype)
    if n_rows == 0:
        zeros = torch.zeros(hidden, device=x2.device, dtype=torch.float32)
        return dx, zeros.to(weight.dtype), zeros if has_bias else None
    block_r, block_n, warps = _blocks(hidden)
    grid, rows_per_program = _bwd_grid(n_rows, block_r, x2.device, n_programs)
    dw_part = torch.empty((grid, hidden), device=x2.device, dtype=torch.float32)  # (n_programs, hidden)
    db_part = torch.empty_like(dw_part) if has_bias else dw_part
    _norm_bwd_kernel[(grid,)](
        dy2, x2, weight, rstd if mean is None else mean, rstd, dx, dw_part, db_part,
        n_rows, hidden, rows_per_program, dy2.stride(0), x2.stride(0), dx.stride(0),
        RMS=mean is None, HAS_BIAS=has_bias, BLOCK_R=block_r, BLOCK_N=block_n, INTERPRETER=interpreting(x2),
        num_warps=warps, num_stages=_NUM_STAGES,
    )  # fmt: skip
    # the reduction over programs reads n_programs * hidden * 4 bytes per partial buffer (4.3 MB at 2 x 132 SMs, 4096)
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0) if has_bias else None


# --------------------------------------------------------------------------------------------------
# Autograd functions and public ops
# --------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """Saves x (rows, hidden), w and the fp32 per-row rstd; not y."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, n_programs: int | None = None):
        y, x2, _, rstd = norm_fwd(x, weight, None, eps, rms=True)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.n_programs = x.shape, n_programs
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw, _ = norm_bwd(dy, x2, weight, None, rstd, False, ctx.n_programs)
        return dx.view(ctx.x_shape), dw, None, None


class LayerNormFunction(torch.autograd.Function):
    """Saves x (rows, hidden), w and the fp32 per-row mean and rstd; not y (nor b: its gradient needs only dy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, n_programs: int | None = None):
        y, x2, mean, rstd = norm_fwd(x, weight, bias, eps, rms=False)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape, ctx.n_programs = x.shape, n_programs
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        has_bias = ctx.bias_dtype is not None
        dx, dw, db = norm_bwd(dy, x2, weight, mean, rstd, has_bias, ctx.n_programs)
        return dx.view(ctx.x_shape), dw, db.to(ctx.bias_dtype) if has_bias else None, None, None


def _check_inputs(op: str, x: torch.Tensor, params: dict[str, torch.Tensor | None]) -> None:
    """Shapes and devices (both paths); for the Triton path also dtypes and the hidden-size limit."""
    hidden = x.shape[-1] if x.dim() else None
    for name, p in params.items():
        if p is None:
            continue
        if p.shape != (hidden,):
            raise ValueError(f"{op}: {name} must have shape ({hidden},) = x.shape[-1:], got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    if not use_triton(x):
        return
    for name, t in {"x": x, **params}.items():
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"{op}: the Triton kernel supports fp16/bf16/fp32 {name}, got {t.dtype}")
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"{op}: hidden size {hidden} exceeds MAX_HIDDEN={MAX_HIDDEN}, the longest row the Triton kernel "
            "holds in registers; use the torch path (model.kernels=torch) for wider rows"
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * weight, fp32 statistics, y in x's dtype.

    x: (..., hidden), any leading dims; weight: (hidden,). Gradients for x and weight.
    Runs the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else rms_norm_reference.
    """
    _check_inputs("rms_norm", x, {"weight": weight})
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps=eps)
    return RMSNormFunction.apply(x, weight.contiguous(), float(eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, like F.layer_norm(x, (hidden,), weight, bias, eps) with fp32 statistics.

    x: (..., hidden), any leading dims; weight, bias: (hidden,), bias optional. y in x's dtype.
    Runs the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else layer_norm_reference.
    """
    _check_inputs("layer_norm", x, {"weight": weight, "bias": bias})
    if not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps=eps)
    b = None if bias is None else bias.contiguous()
    return LayerNormFunction.apply(x, weight.contiguous(), b, float(eps))


# --------------------------------------------------------------------------------------------------
# sm_90 compile cases (tests/kernels/sm90_compile.py)
# --------------------------------------------------------------------------------------------------


def sm90_cases(dtypes):
    """(label, jit fn, pointer types, constexprs, num_warps, num_stages) for each launch config at model sizes."""
    for dtype in dtypes:
        p = "*" + dtype
        ptrs = {n: p for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "dy_ptr", "dx_ptr")}
        ptrs |= {n: "*fp32" for n in ("mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr")}
        for hidden in (768, 2048, 4096, 8192, MAX_HIDDEN):
            block_r, block_n, warps = _blocks(hidden)
            for rms in (True, False):
                consts = {"RMS": rms, "HAS_BIAS": not rms, "BLOCK_R": block_r, "BLOCK_N": block_n}
                consts["INTERPRETER"] = False
                tag = f"{'rms' if rms else 'layer'}_norm {dtype} hidden={hidden} R={block_r} w{warps}"
                yield f"{tag} fwd", _norm_fwd_kernel, ptrs, consts, warps, _NUM_STAGES
                yield f"{tag} bwd", _norm_bwd_kernel, ptrs, consts, warps, _NUM_STAGES

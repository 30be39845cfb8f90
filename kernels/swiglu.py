"""SwiGLU activation silu(gate) * up, forward and backward, in Triton.

    y      = silu(g) * u = g * sigmoid(g) * u
    d(up)  = dy * silu(g)
    d(g)   = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

The backward recomputes sigmoid(g) from g: only gate and up are saved (no silu(gate) activation).
gate and up (..., N) are usually the two halves of a fused column-parallel projection split along the
last dim, i.e. views with row stride 2N: they are read in place through their row strides, not copied.
Math in fp32, outputs in the inputs' dtype; one rounding per output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._utils import cast_rne, interpreting, last_dim_contiguous, use_triton

MAX_BLOCK_N = 1024  # columns per program
_TILE_ELEMS = 4096  # BLOCK_R * BLOCK_N target per program


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed in fp32 (fp64 inputs stay fp64), returned in gate's dtype.

    megalm's MLP computes `F.silu(gate) * up` in the input dtype instead: in bf16/fp16 that rounds
    silu(gate) before the product (two roundings, and a rounded operand in backward); this rounds once.
    """
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile(n_rows, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row offsets (int64, (BLOCK_R, 1)), column offsets ((1, BLOCK_N)) and bounds mask of this program's tile."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _sigmoid(g):
    """sigmoid(g) in fp32 from exp(-|g|) in (0, 1]: no overflow for any finite g."""
    e = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, y_ptr, n_rows, N, stride_gr, stride_ur, stride_yr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """y = silu(g) * u on a (BLOCK_R, BLOCK_N) tile. HBM per element: reads g, u; writes y."""
    rows, cols, mask = _tile(n_rows, N, BLOCK_R, BLOCK_N)
    g = tl.load(gate_ptr + rows * stride_gr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_ur + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * _sigmoid(g) * u
    tl.store(y_ptr + rows * stride_yr + cols, cast_rne(y, y_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n_rows, N,
    stride_gr, stride_ur, stride_dyr, stride_dgr, stride_dur,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """d(gate), d(up) from g, u, dy, recomputing sigmoid(g). HBM per element: reads g, u, dy; writes dg, du."""
    rows, cols, mask = _tile(n_rows, N, BLOCK_R, BLOCK_N)
    g = tl.load(gate_ptr + rows * stride_gr + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_ur + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows * stride_dyr + cols, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(dgate_ptr + rows * stride_dgr + cols, cast_rne(dg, dgate_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    tl.store(dup_ptr + rows * stride_dur + cols, cast_rne(du, dup_ptr.dtype.element_ty, INTERPRETER), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps) for rows of length N."""
    block_n = min(triton.next_power_of_2(max(N, 1)), MAX_BLOCK_N)
    block_r = max(1, _TILE_ELEMS // block_n)
    return block_r, block_n, 8 if block_r * block_n >= 4096 else 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, N) view of t (..., N) with stride 1 on N; copies only when the leading dims cannot be merged."""
    return last_dim_contiguous(t.reshape(-1, t.shape[-1]))


def _grid(n_rows: int, N: int) -> tuple[tuple[int, int], int, int, int]:
    block_r, block_n, warps = _blocks(N)
    return (triton.cdiv(n_rows, block_r), triton.cdiv(N, block_n)), block_r, block_n, warps


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel; returns y with gate's shape and dtype (contiguous)."""
    g, u = _rows(gate), _rows(up)  # (rows, N)
    y = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    if y.numel() == 0:
        return y.view(gate.shape)
    grid, block_r, block_n, warps = _grid(*g.shape)
    _swiglu_fwd_kernel[grid](
        g, u, y, *g.shape, g.stride(0), u.stride(0), y.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, INTERPRETER=interpreting(g), num_warps=warps,
    )  # fmt: skip
    return y.view(gate.shape)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns (d(gate), d(up)) with gate's shape and dtype (contiguous)."""
    g, u, d = _rows(gate), _rows(up), _rows(dy)  # (rows, N)
    dg = torch.empty(g.shape, device=g.device, dtype=g.dtype)
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    if dg.numel() == 0:
        return dg.view(gate.shape), du.view(up.shape)
    grid, block_r, block_n, warps = _grid(*g.shape)
    _swiglu_bwd_kernel[grid](
        g, u, d, dg, du, *g.shape, g.stride(0), u.stride(0), d.stride(0), dg.stride(0), du.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, INTERPRETER=interpreting(g), num_warps=warps,
    )  # fmt: skip
    return dg.view(gate.shape), du.view(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Saves only gate and up (views of the projection output, no new memory); sigmoid is recomputed."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dim() == 0:
        raise ValueError(f"swiglu wants gate and up of one shape (..., N), got {tuple(gate.shape)}, {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.dtype not in _DTYPES:
        raise ValueError(f"gate and up must share one dtype among fp16/bf16/fp32, got {gate.dtype}/{up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device} but up is on {up.device}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused; fp32 math, output (contiguous) in gate's dtype.

    gate, up: (..., N), same shape and dtype, any leading dims; strided views (e.g. the two halves of
    `h.split(n, dim=-1)`) are read in place. The backward saves only gate and up and recomputes sigmoid.
    Runs the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else the torch reference.
    """
    _check_inputs(gate, up)
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)


def sm90_cases(dtypes):
    """Compile cases for tests/kernels/sm90_compile.py: the launch configs of Llama FFN widths."""
    for dtype in dtypes:
        p = "*" + dtype
        ptrs = {n: p for n in ("gate_ptr", "up_ptr", "y_ptr", "dy_ptr", "dgate_ptr", "dup_ptr")}
        for n in (123, 512, 11008):  # widths per rank: odd, narrow (high tp), Llama 7B (14336 uses its config too)
            block_r, block_n, warps = _blocks(n)
            consts = {"BLOCK_R": block_r, "BLOCK_N": block_n, "INTERPRETER": False}
            tag = f"{dtype} N={n} BLOCK={block_r}x{block_n}"
            yield f"swiglu fwd {tag}", _swiglu_fwd_kernel, ptrs, consts, warps, 1
            yield f"swiglu bwd {tag}", _swiglu_bwd_kernel, ptrs, consts, warps, 1

"""kernels.rope against an fp64 reference, in the Triton CPU interpreter.

Tolerance (kernels.testing.compare): kernel error <= 2 x error of torch in the same low precision +
ABS_FLOOR[dtype], for q_rot, k_rot, dq and dk. "Torch in the same precision" is megalm's apply_rope
(= rope_reference on the low-precision inputs: fp32 math, one rounding), the strictest torch baseline.
q and k are the strided views the model makes of its fused qkv projection.
"""

import importlib

import pytest
import torch

from kernels.testing import check_outputs
from megalm.model.transformer import apply_rope, rope_tables

rp = importlib.import_module("kernels.rope")
rope, rope_reference = rp.rope, rp.rope_reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # tests/kernels/conftest.py


def qkv_views(B, nh, nkv, T, hd, dtype, scale=1.0, seed=0):
    """q (B, nh, T, hd), k (B, nkv, T, hd): strided views of one fused (B, T, (nh + 2 nkv) hd) projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = (scale * torch.randn(B, T, (nh + 2 * nkv) * hd, generator=g)).to(dtype)
    q, k, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    return q.view(B, T, nh, hd).transpose(1, 2), k.view(B, T, nkv, hd).transpose(1, 2)  # (B, n, T, hd), strided


def forward_backward(fn, q, k, dq_rot, dk_rot, dtype=None):
    """[q_rot, k_rot, dq, dk] of fn(q, k) with q, k (and the incoming gradients) cast to `dtype`."""
    q, k = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k))
    q_rot, k_rot = fn(q, k)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_rot.to(q_rot.dtype), dk_rot.to(k_rot.dtype)))
    return [q_rot.detach(), k_rot.detach(), dq, dk]


def tables(start, T, hd, theta=10000.0):
    """cos, sin (T + 3, hd/2) starting at position `start`: a KV-cache slice, longer than T."""
    return tuple(t[start:] for t in rope_tables(start + T + 3, hd, theta))


def check_rope(B, nh, nkv, T, hd, dtype, *, start=0, scale=1.0, qk=None, cos_sin=None, run=rope, record=None):
    """Kernel `run(q, k, cos, sin)` vs fp64 and low-precision references, forward and backward."""
    q, k = qk or qkv_views(B, nh, nkv, T, hd, dtype, scale)
    cos, sin = cos_sin or tables(start, T, hd)
    g = torch.Generator().manual_seed(1)
    dq_rot, dk_rot = (torch.randn(t.shape, generator=g).to(dtype) for t in (q, k))
    ref = lambda q, k: rope_reference(q, k, cos, sin)
    got = forward_backward(lambda q, k: run(q, k, cos, sin), q, k, dq_rot, dk_rot)
    hi = forward_backward(ref, q, k, dq_rot, dk_rot, torch.float64)
    lo = forward_backward(ref, q, k, dq_rot, dk_rot)
    assert [t.dtype for t in got] == [dtype] * 4
    assert [t.shape for t in got] == [q.shape, k.shape, q.shape, k.shape]
    tag = f"{dtype} B={B} H={nh}/{nkv} T={T} hd={hd} start={start}"
    check_outputs("rope", ("q", "k", "dq", "dk"), tag, got, hi, lo, dtype, record)
    return got


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("hd", [80, 64, 2])
def test_matches_reference(dtype, hd, record):
    check_rope(2, 4, 2, 7, hd, dtype, start=5, record=record)


@pytest.mark.parametrize("heads_per_program", [1, 3, 4, 5, 100])
def test_head_groups_across_q_and_k(heads_per_program, record):
    """Programs whose head group ends in q, straddles q and k, or covers all heads (6 = 4 q + 2 k)."""
    run = lambda q, k, cos, sin: rp.RoPEFunction.apply(q, k, cos, sin, heads_per_program)
    check_rope(2, 4, 2, 7, 80, BF16, start=3, run=run, record=record)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_one_position_one_head(dtype, record):
    """A KV-cache decode step: T = 1 at a late position, MQA."""
    check_rope(1, 1, 1, 1, 80, dtype, start=1000, record=record)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_large_values_and_positions(dtype, record):
    """|x| ~ 1e3 (2e4 in fp16's range would overflow in fp16 math, not in the kernel's fp32), angles ~ 3e4."""
    check_rope(2, 3, 1, 5, 64, dtype, start=30000, scale=1e3 if dtype != FP16 else 2e3, record=record)


def test_mqa_many_positions_several_blocks(record):
    """T = 70 > BLOCK_T for hd = 128 (BLOCK_T = 32): several position blocks, masked tail."""
    check_rope(1, 2, 1, 70, 128, FP16, start=11, record=record)


def test_strided_inputs_other_layouts(record):
    """q contiguous, k with stride != 1 on hd (copied once), tables with a row stride of 2 * hd/2."""
    B, nh, nkv, T, hd = 2, 3, 1, 6, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, nh, T, hd, generator=g)
    k = torch.randn(B, nkv, hd, T, generator=g).transpose(-1, -2)  # (B, nkv, T, hd), stride 1 on T
    cos, sin = rope_tables(T, hd, 500.0)
    cos_wide, sin_wide = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # (T, hd)
    cos_v, sin_v = cos_wide[:, : hd // 2], sin_wide[:, : hd // 2]  # (T, hd/2) views, row stride hd
    assert not k.is_contiguous() and cos_v.stride(0) == hd
    check_rope(B, nh, nkv, T, hd, FP32, qk=(q, k), cos_sin=(cos_v, sin_v), record=record)


def test_reference_is_apply_rope():
    """rope_reference == megalm's apply_rope bit for bit in every low precision; fp64 stays fp64."""
    cos, sin = rope_tables(9, 80, 10000.0)
    for dtype in (FP32, FP16, BF16):
        q, k = qkv_views(2, 4, 2, 7, 80, dtype)
        q_rot, k_rot = rope_reference(q, k, cos, sin)
        assert torch.equal(q_rot, apply_rope(q, cos, sin)) and torch.equal(k_rot, apply_rope(k, cos, sin))
    q, k = qkv_views(1, 1, 1, 3, 8, torch.float64)
    assert rope_reference(q, k, *rope_tables(3, 8, 1e4))[0].dtype == torch.float64


def test_unused_output_gets_zero_gradient():
    q, k = (t.detach().requires_grad_() for t in qkv_views(1, 2, 1, 3, 8, FP32))
    q_rot, _ = rope(q, k, *rope_tables(3, 8, 10000.0))
    q_rot.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and q.grad.abs().sum() > 0


def test_empty_sequence():
    q, k = qkv_views(2, 4, 2, 0, 8, BF16)
    q_rot, k_rot = rope(q, k, *rope_tables(4, 8, 10000.0))
    assert q_rot.shape == q.shape and k_rot.shape == k.shape


@pytest.mark.parametrize(
    "q_shape,k_shape,table_shape,dtype,match",
    [
        ((1, 2, 3, 8), (1, 2, 3), (3, 4), FP32, r"\(B, nh, T, hd\)"),
        ((1, 2, 3, 8), (1, 1, 4, 8), (4, 4), FP32, "differ"),
        ((1, 2, 3, 7), (1, 1, 3, 7), (3, 3), FP32, "even head dim"),
        ((1, 2, 3, 8), (1, 1, 3, 8), (2, 4), FP32, "T_tab >= 3"),
        ((1, 2, 3, 8), (1, 1, 3, 8), (3, 8), FP32, "hd/2 = 4"),
        ((1, 2, 3, 8), (1, 1, 3, 8), (3, 4), torch.float64, "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(q_shape, k_shape, table_shape, dtype, match):
    t = torch.zeros(table_shape)
    with pytest.raises(ValueError, match=match):
        rope(torch.zeros(q_shape, dtype=dtype), torch.zeros(k_shape, dtype=dtype), t, t)


def test_falls_back_to_reference_when_interpreter_unset(monkeypatch):
    """With TRITON_INTERPRET unset, CPU tensors take the reference: results equal it bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("Triton must not run")

    monkeypatch.setattr(rp.RoPEFunction, "apply", boom)
    q, k = qkv_views(2, 4, 2, 7, 80, BF16)
    cos, sin = tables(2, 7, 80)
    got, expected = rope(q, k, cos, sin), rope_reference(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("hd", [2, 6, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("B,nh,nkv,T,start", [(3, 8, 1, 33, 0), (1, 6, 6, 129, 7), (2, 12, 4, 1, 4095)])
def test_sweep(dtype, hd, B, nh, nkv, T, start, record):
    check_rope(B, nh, nkv, T, hd, dtype, start=start, record=record)

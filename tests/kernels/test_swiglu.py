"""kernels.swiglu against an fp64 reference, in the Triton CPU interpreter.

Tolerance (kernels.testing.compare): kernel error <= 2 x error of torch in the same low precision +
ABS_FLOOR[dtype], for y, d(gate) and d(up). The torch baseline is swiglu_reference on the low-precision
inputs (fp32 math, one rounding), stricter than megalm's eager `F.silu(gate) * up` in bf16/fp16, which
test_megalm_eager_math_is_less_accurate measures. gate and up are the two halves of one fused projection
output, split along the last dim (strided views), as in megalm's MLP.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels.testing import check_outputs

sw = importlib.import_module("kernels.swiglu")
swiglu, swiglu_reference = sw.swiglu, sw.swiglu_reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # tests/kernels/conftest.py


def split_projection(shape, dtype, gate_scale=3.0, up_scale=1.0, seed=0):
    """gate, up (..., N): the halves of one (..., 2N) tensor, as `h.split(N, dim=-1)` gives them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)
    h[..., : shape[-1]] *= gate_scale
    h[..., shape[-1] :] *= up_scale
    return h.to(dtype).split(shape[-1], dim=-1)


def forward_backward(fn, gate, up, dy, dtype=None):
    """[y, d(gate), d(up)] of fn(gate, up) with the inputs (and dy) cast to `dtype`."""
    gate, up = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (gate, up))
    y = fn(gate, up)
    return [y.detach(), *torch.autograd.grad(y, (gate, up), dy.to(y.dtype))]


def check_swiglu(shape, dtype, *, gate_up=None, baseline=swiglu_reference, record=None, **scales):
    """Kernel vs the fp64 reference, with `baseline` in the low precision setting the tolerance."""
    gate, up = gate_up or split_projection(shape, dtype, **scales)
    dy = torch.randn(gate.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = forward_backward(swiglu, gate, up, dy)
    hi = forward_backward(swiglu_reference, gate, up, dy, torch.float64)
    lo = forward_backward(baseline, gate, up, dy)
    assert [t.dtype for t in got] == [dtype] * 3 and all(t.shape == gate.shape for t in got)
    tag = f"{dtype} {tuple(gate.shape)}"
    comparisons = check_outputs("swiglu", ("y", "dgate", "dup"), tag, got, hi, lo, dtype, record)
    return comparisons


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 1, 7)])
def test_matches_reference(shape, dtype, record):
    check_swiglu(shape, dtype, record=record)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_one_row(dtype, record):
    check_swiglu((1, 123), dtype, record=record)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_rows_longer_than_one_block(dtype, record):
    """N = 1500 > MAX_BLOCK_N: two column blocks per row, the second masked."""
    check_swiglu((2, 1500), dtype, record=record)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_large_values(dtype, record):
    """|gate| up to ~200 (exp(-gate) overflows in fp32: silu -> 0 or gate, no NaN) and large up."""
    up_scale = 1e2 if dtype == FP16 else 1e4
    check_swiglu((4, 77), dtype, gate_scale=60.0, up_scale=up_scale, record=record)


def test_other_layouts(record):
    """Stride != 1 on N (copied once) and leading dims that cannot be merged into rows (copied)."""
    g = torch.Generator().manual_seed(5)
    gate = torch.randn(3, 40, 6, generator=g).transpose(1, 2)  # (3, 6, 40), stride 1 on dim 1
    up = torch.randn(6, 3, 40, generator=g).transpose(0, 1)  # (3, 6, 40), rows not mergeable
    check_swiglu(None, FP32, gate_up=(gate, up), record=record)


def test_split_views_are_read_in_place(monkeypatch):
    """No copy of the split halves: the kernels get row strides 2N; backward saves just gate and up."""
    gate, up = (t.requires_grad_() for t in split_projection((2, 3, 10), BF16))
    launched = []
    original = sw._rows
    monkeypatch.setattr(sw, "_rows", lambda t: launched.append(original(t)) or launched[-1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu(gate, up)
    y.sum().backward()
    assert [t.stride(0) for t in launched[:2]] == [20, 20]
    assert [t.data_ptr() for t in launched[:2]] == [gate.data_ptr(), up.data_ptr()]
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]


def test_megalm_eager_math_is_less_accurate(record):
    """megalm's MLP computes F.silu(gate) * up in bf16, rounding silu before the product (and using the rounded
    silu in backward): its mean error against fp64 is larger than the fp32-math reference's. The kernel also
    passes with that eager math as the baseline."""
    eager = lambda gate, up: F.silu(gate) * up
    check_swiglu((5, 123, 123), BF16, baseline=eager, record=record)
    gate, up = split_projection((5, 123, 123), BF16)
    exact = swiglu_reference(gate.double(), up.double())
    mean_err = lambda y: (y.double() - exact).abs().mean().item()
    assert mean_err(eager(gate, up)) > 1.2 * mean_err(swiglu_reference(gate, up))
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))  # one rounding of the same fp32 value


def test_empty():
    gate, up = split_projection((2, 0, 5), BF16)
    assert swiglu(gate, up).shape == (2, 0, 5)


@pytest.mark.parametrize(
    "gate,up,match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), "one shape"),
        (torch.zeros(()), torch.zeros(()), "one shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=BF16), "dtype"),
        (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(gate, up, match):
    with pytest.raises(ValueError, match=match):
        swiglu(gate, up)


def test_falls_back_to_reference_when_interpreter_unset(monkeypatch):
    """With TRITON_INTERPRET unset, CPU tensors take the reference: results equal it bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("Triton must not run")

    monkeypatch.setattr(sw.SwiGLUFunction, "apply", boom)
    gate, up = split_projection((5, 123, 123), BF16)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 1, 1), (2, 3, 1024), (3, 2047), (2, 2, 4100), (64, 96)])
def test_sweep(shape, dtype, record):
    check_swiglu(shape, dtype, record=record)

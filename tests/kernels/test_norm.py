"""kernels.norm (rms_norm, layer_norm) against an fp64 reference, in the Triton CPU interpreter.

Tolerance (kernels.testing.compare): kernel error <= 2 x error of eager torch in the same dtype
(the references with upcast=False) + ABS_FLOOR[dtype], for y, dx, dweight and dbias.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels.norm import (
    MAX_HIDDEN,
    LayerNormFunction,
    RMSNormFunction,
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from kernels.testing import compare, max_abs_err

norm = importlib.import_module("kernels.norm")

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
EPS = 1e-5


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # tests/kernels/conftest.py


def make_inputs(shape, dtype, bias=True, scale=1.0, offset=0.0, w_dtype=None, seed=0):
    """x = offset + scale * N(0, 1) (shape), w = 1 + N(0, 0.5), b = N(0, 1) (hidden,), dy = N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = (offset + scale * torch.randn(shape, generator=g)).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    b = torch.randn(shape[-1], generator=g).to(w_dtype or dtype) if bias else None
    return x, w, b, torch.randn(shape, generator=g).to(dtype)


def forward_backward(fn, x, w, b, dy, dtype=None):
    """[y, dx, dw(, db)] of fn(x, w, b) with the inputs cast to `dtype` (default: as given, strides kept)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def ops(kind, n_programs=None):
    """(kernel, reference) as fn(x, w, b, upcast=...) for 'rms' or 'layer'."""
    if kind == "rms":
        run = lambda x, w, b: rms_norm(x, w, eps=EPS)
        if n_programs is not None:
            run = lambda x, w, b: RMSNormFunction.apply(x, w, EPS, n_programs)
        return run, lambda x, w, b, up=True: rms_norm_reference(x, w, eps=EPS, upcast=up)
    run = lambda x, w, b: layer_norm(x, w, b, eps=EPS)
    if n_programs is not None:
        run = lambda x, w, b: LayerNormFunction.apply(x, w, b, EPS, n_programs)
    return run, lambda x, w, b, up=True: layer_norm_reference(x, w, b, eps=EPS, upcast=up)


def check_norm(kind, x, w, b, dy, *, n_programs=None, lo_upcast=False, record=None):
    """Kernel vs fp64 reference; tolerance from the same-dtype torch run (fp32 statistics if lo_upcast)."""
    run, ref = ops(kind, n_programs)
    got = forward_backward(run, x, w, b, dy)
    hi = forward_backward(ref, x, w, b, dy, torch.float64)
    lo = forward_backward(lambda *t: ref(*t, up=lo_upcast), x, w, b, dy)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    assert got[1].dtype == x.dtype and got[1].shape == x.shape and got[2].dtype == w.dtype
    tag = f"{kind}_norm {x.dtype} {tuple(x.shape)} w={w.dtype} bias={b is not None}"
    names = ("y", "dx", "dw", "db")
    comparisons = [compare(f"{n} {tag}", *t, x.dtype) for n, *t in zip(names, got, hi, lo, strict=False)]
    for c in comparisons:
        if record:
            record(f"{kind}_norm", x.dtype, c)
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "\n".join(failed)
    return comparisons, got


SHAPES = [(5, 123, 123), (3, 1, 64), (7, 2048), (2, 9, 80)]
KINDS = [("rms", False), ("layer", True), ("layer", False)]  # (kind, bias)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_matches_reference(kind, bias, shape, dtype, record):
    check_norm(kind, *make_inputs(shape, dtype, bias), record=record)


@pytest.mark.parametrize("kind,bias", KINDS)
@pytest.mark.parametrize("shape", [(123,), (1, 123), (4, 1), (2, 3, 1000)])
def test_one_row_and_odd_hidden(kind, bias, shape, record):
    for dtype in (FP32, BF16):
        check_norm(kind, *make_inputs(shape, dtype, bias), record=record)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_large_values_need_fp32_statistics(dtype, record):
    """RMSNorm at |x| ~ 300 (x^2 overflows fp16) and LayerNorm at mean 1e3 (fp32: mean 1e4, std 1)."""
    x, w, _, dy = make_inputs((6, 257), dtype, bias=False, scale=300.0)
    check_norm("rms", x, w, None, dy, lo_upcast=True, record=record)
    if dtype == FP16:  # eager fp16: x^2 overflows, mean = inf, y = 0; fp32 statistics are what keeps y right
        eager = rms_norm_reference(x, w, eps=EPS, upcast=False)
        assert max_abs_err(eager, rms_norm_reference(x.double(), w.double(), eps=EPS)) > 0.5
    offset, scale = (1e4, 1.0) if dtype == FP32 else (1e3, 10.0)
    check_norm("layer", *make_inputs((6, 257), dtype, scale=scale, offset=offset), lo_upcast=True, record=record)


@pytest.mark.parametrize("kind,bias", KINDS)
def test_non_contiguous_inputs(kind, bias, record):
    x, w, b, dy = make_inputs((5, 7, 200), BF16, bias=True)
    w, b = w[:123], b[:123] if bias else None
    check_norm(kind, x[..., :123], w, b, dy[..., :123], record=record)  # strided rows, contiguous last dim
    xt, dyt = x.transpose(1, 2)[:, :123], dy.transpose(1, 2)[:, :123]  # last dim strided: copied
    check_norm(kind, xt, w[:7], None if b is None else b[:7], dyt, record=record)


@pytest.mark.parametrize("kind,bias", KINDS)
def test_weight_dtype_may_differ_from_x(kind, bias, record):
    """bf16 activations with fp32 weights: y, dx in bf16, dw (db) in fp32."""
    comparisons, got = check_norm(kind, *make_inputs((4, 33, 96), BF16, bias, w_dtype=FP32), record=record)
    assert got[2].dtype == FP32 and (not bias or got[3].dtype == FP32)


@pytest.mark.parametrize("kind,bias", KINDS)
def test_weight_grads_deterministic_for_any_program_count(kind, bias, record):
    inputs = make_inputs((3, 40, 123), FP32, bias)  # 120 rows: 8 tiles of 16
    _, first = check_norm(kind, *inputs, record=record)
    _, again = check_norm(kind, *inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for n_programs in (1, 3, 1000):  # one program for every row, a few, one per row tile
        check_norm(kind, *inputs, n_programs=n_programs, record=record)


@pytest.mark.parametrize("kind,bias", KINDS)
def test_saves_only_x_weight_and_fp32_stats(kind, bias):
    x, w, b, dy = make_inputs((3, 5, 48), BF16, bias)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops(kind)[0](x, w, b).backward(dy)
    stats = [((15,), FP32)] * (1 if kind == "rms" else 2)
    assert sorted(saved, key=str) == sorted([((15, 48), BF16), ((48,), BF16), *stats], key=str)


@pytest.mark.parametrize("kind,bias", KINDS)
def test_empty_input(kind, bias):
    x, w, b, _ = make_inputs((0, 3, 64), FP32, bias)
    got = forward_backward(ops(kind)[0], x, w, b, torch.zeros(0, 3, 64))
    assert got[0].shape == (0, 3, 64) and got[1].shape == (0, 3, 64)
    assert all(torch.equal(g, torch.zeros(64)) for g in got[2:])


def test_bad_inputs_raise_clear_errors():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(7), eps=EPS)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(x, torch.ones(8), torch.ones(2, 8), eps=EPS)
    with pytest.raises(ValueError, match=f"MAX_HIDDEN={MAX_HIDDEN}"):
        rms_norm(torch.zeros(1, MAX_HIDDEN + 1), torch.ones(MAX_HIDDEN + 1), eps=EPS)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        layer_norm(x.double(), torch.ones(8, dtype=torch.float64), None, eps=EPS)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_references_are_the_model_formulas(dtype):
    """rms_norm_reference is megalm's llama Norm bit for bit; layer_norm_reference is F.layer_norm in fp32."""
    x, w, b, _ = make_inputs((3, 17, 123), dtype)
    xf = x.float()
    model = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).type_as(x)
    assert torch.equal(rms_norm_reference(x, w, eps=EPS), model)
    expected = F.layer_norm(xf, (123,), w.float(), b.float(), EPS).to(dtype)
    assert torch.equal(layer_norm_reference(x, w, b, eps=EPS), expected)
    assert rms_norm_reference(x.double(), w, eps=EPS).dtype == torch.float64  # fp64 stays fp64


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    """With TRITON_INTERPRET unset, CPU tensors take the reference: results equal it bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("Triton must not run")

    monkeypatch.setattr(norm.RMSNormFunction, "apply", boom)
    monkeypatch.setattr(norm.LayerNormFunction, "apply", boom)
    x, w, b, _ = make_inputs((2, 5, 40), BF16)
    assert torch.equal(rms_norm(x, w, eps=EPS), rms_norm_reference(x, w, eps=EPS))
    assert torch.equal(layer_norm(x, w, b, eps=EPS), layer_norm_reference(x, w, b, eps=EPS))
    assert torch.equal(layer_norm(x, w, None, eps=EPS), layer_norm_reference(x, w, None, eps=EPS))
    x64 = x.double()  # dtypes the kernel refuses still work on the reference path
    assert rms_norm(x64, w.double(), eps=EPS).dtype == torch.float64


SWEEP_SHAPES = [(3, 768), (2, 4096), (2, 8192), (1, MAX_HIDDEN), (33, 17, 129), (300, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("shape", SWEEP_SHAPES)
@pytest.mark.parametrize("kind,bias", KINDS)
def test_sweep(kind, bias, shape, dtype, record):
    """Model-size rows (up to MAX_HIDDEN) and many short rows, with a few program counts."""
    inputs = make_inputs(shape, dtype, bias, seed=3)
    for n_programs in (None, 2):
        check_norm(kind, *inputs, n_programs=n_programs, record=record)

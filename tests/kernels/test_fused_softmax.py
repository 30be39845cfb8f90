"""kernels.fused_softmax against an fp64 reference, in the Triton CPU interpreter.

Tolerance (kernels.testing): kernel error <= 2 x error of eager torch softmax in the same dtype
(fused_softmax_reference(..., upcast=False)) + ABS_FLOOR[dtype], for the output and d(scores).
"""

import importlib

import pytest
import torch

import kernels
from kernels.testing import check_fused_softmax

fs = importlib.import_module("kernels.fused_softmax")  # the module; `kernels.fused_softmax` is the op

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # tests/kernels/conftest.py


def check_softmax(shape, dtype, causal, mask=None, max_block_n=None, record=None):
    run = None
    if max_block_n is not None:  # force the two-pass path for rows longer than max_block_n
        run = lambda x: fs.FusedSoftmaxFunction.apply(x, 0.7, causal, mask, max_block_n)
    comparisons, (y, dx) = check_fused_softmax(shape, dtype, causal, mask, scale=0.7, run=run)
    for c in comparisons:
        if record:
            record("fused_softmax", dtype, c)
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "\n".join(failed)
    return y, dx


CASES = [  # (shape, dtype, causal, mask shape or None, max_block_n or None)
    ((2, 3, 17, 17), FP32, True, None, None),
    ((5, 123, 123), FP16, False, (5, 1, 123), None),
    ((1, 3, 100, 257), BF16, True, None, None),  # T_q < T_k: bottom-right causal
    ((2, 3, 7, 1), FP32, True, None, None),  # T_k = 1, T_q > T_k: fully masked rows
    ((2, 3, 17, 100), BF16, True, (2, 1, 17, 100), 32),  # two-pass rows
    ((2, 2, 3, 17, 33), FP16, False, (2, 1, 3, 17, 33), None),  # mask dims that cannot be merged
    ((3, 1000), FP32, False, (1000,), None),  # 2-D scores, long rows
    ((1, 2, 9, 77), FP16, True, None, 16),
]


@pytest.mark.parametrize("shape,dtype,causal,mask_shape,max_block_n", CASES)
def test_matches_reference(shape, dtype, causal, mask_shape, max_block_n, record):
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) < 0.3
    check_softmax(shape, dtype, causal, mask, max_block_n, record)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("max_block_n", [None, 8])
def test_fully_masked_rows_give_zeros(dtype, max_block_n):
    mask = torch.zeros(2, 3, 6, 20, dtype=torch.bool)
    mask[:, :, 2] = True  # row 2 fully masked by `mask`
    mask[1, 2, 4, ::2] = True
    y, dx = check_softmax((2, 3, 6, 20), dtype, causal=False, mask=mask, max_block_n=max_block_n)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[mask] == 0).all() and (dx[mask] == 0).all()  # True = masked out: exactly zero
    assert (y[:, :, 2] == 0).all() and (dx[:, :, 2] == 0).all()
    live = ~mask[:, :, [0, 1, 3, 4, 5]]
    assert (y[:, :, [0, 1, 3, 4, 5]][live] > 0).all()

    y, dx = check_softmax((2, 3, 30, 20), dtype, causal=True, max_block_n=max_block_n)  # rows 0-9 see no key
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[:, :, :10] == 0).all() and (dx[:, :, :10] == 0).all()
    assert torch.allclose(y[:, :, 10:].float().sum(-1), torch.ones(2, 3, 20), atol=1e-2)


@pytest.mark.parametrize(
    "shape,mask,match",
    [
        ((4,), None, r"\(\.\.\., T_q, T_k\)"),
        ((2, 4, 4), torch.zeros(4, 4), "bool"),
        ((2, 4, 4), torch.zeros(3, 4, dtype=torch.bool), "broadcast"),
    ],
)
def test_bad_inputs_raise_clear_errors(shape, mask, match):
    with pytest.raises(ValueError, match=match):
        kernels.fused_softmax(torch.zeros(shape), scale=1.0, mask=mask)


SWEEP_T = [(1, 1), (17, 17), (100, 100), (100, 257), (257, 257), (5, 1000)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("t_q,t_k", SWEEP_T)
@pytest.mark.parametrize("causal", [True, False])
def test_sweep(dtype, t_q, t_k, causal, record):
    """Every dtype x row length x causal, with and without a mask, one- and two-pass."""
    mask = torch.rand(3, 1, t_q, t_k, generator=torch.Generator().manual_seed(2)) < 0.2
    for m in (None, mask):
        for max_block_n in (None, 64):
            check_softmax((3, 2, t_q, t_k), dtype, causal, m, max_block_n, record)

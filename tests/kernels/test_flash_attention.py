"""kernels.flash_attention against an fp64 reference, in the Triton CPU interpreter.

Tolerance (kernels.testing): kernel error <= 2 x error of eager torch attention in the same dtype
(kernels.flash_attention_reference run in that dtype) + ABS_FLOOR[dtype], for the output and the
gradients of q, k and v.
"""

import importlib
import itertools

import pytest
import torch

import kernels
from kernels.testing import ABS_FLOOR, attention_inputs, check_flash_attention

fa = importlib.import_module("kernels.flash_attention")  # the module; `kernels.flash_attention` is the op

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # tests/kernels/conftest.py


def check(B, H, H_KV, T_Q, T_K, D, dtype, causal, record, **kwargs):
    comparisons, got = check_flash_attention(B, H, H_KV, T_Q, T_K, D, dtype, causal, **kwargs)
    for c in comparisons:
        record("flash_attention", dtype, c)
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "\n".join(failed)
    return got


# (B, H, H_KV, T, D, dtype, causal): every T, GQA ratio (1, 2, 4, MQA), head dim, dtype and causal
# setting appears at least once, with B*H not a power of two. The full product is test_sweep (slow).
FAST_CASES = [
    (1, 3, 3, 17, 32, FP32, True),
    (2, 3, 3, 1, 64, BF16, True),
    (1, 6, 3, 100, 64, FP16, False),
    (1, 3, 1, 100, 80, BF16, True),
    (1, 12, 3, 33, 96, FP32, False),
    (1, 3, 1, 257, 128, BF16, True),
    (1, 2, 2, 100, 256, FP16, True),
    (3, 1, 1, 17, 80, FP32, False),
    (1, 4, 1, 17, 96, FP16, True),
    (1, 6, 6, 1, 256, BF16, False),
    (1, 6, 2, 65, 128, FP32, True),
    (1, 4, 1, 257, 64, FP16, False),
]


@pytest.mark.parametrize("B,H,H_KV,T,D,dtype,causal", FAST_CASES)
def test_matches_reference(B, H, H_KV, T, D, dtype, causal, record):
    check(B, H, H_KV, T, T, D, dtype, causal, record)


@pytest.mark.parametrize(
    "T_Q,T_K,causal,dtype",
    [(17, 100, True, BF16), (100, 17, True, FP32), (17, 100, False, FP16), (1, 257, True, FP32)],
)
def test_query_and_key_lengths_differ(T_Q, T_K, causal, dtype, record):
    """T_q != T_k; causal aligns to the bottom-right (T_q > T_k leaves rows that see no key)."""
    check(1, 4, 2, T_Q, T_K, 64, dtype, causal, record)


def test_rows_that_see_no_key_give_zeros(record):
    out, dq, dk, dv = check(1, 2, 1, 40, 17, 32, FP32, True, record)
    assert torch.equal(out[:, :, :23], torch.zeros_like(out[:, :, :23]))  # rows i < T_q - T_k
    assert torch.equal(dq[:, :, :23], torch.zeros_like(dq[:, :, :23]))
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


@pytest.mark.parametrize("blocks", [(16, 64, 64, 16), (32, 32, 16, 16)])
def test_other_tile_shapes(blocks, record):
    """Causal tile arithmetic with BLOCK_M < BLOCK_N in fwd/dq and BLOCK_M > BLOCK_N in dK/dV."""
    m, n, m2, n2 = blocks
    configs = {"fwd": {"BLOCK_M": m, "BLOCK_N": n}, "dq": {"BLOCK_M": m, "BLOCK_N": n}}
    configs["dkdv"] = {"BLOCK_M": m2, "BLOCK_N": n2}
    run = lambda q, k, v: fa.FlashAttentionFunction.apply(q, k, v, True, 0.125, configs)
    check(1, 3, 1, 100, 100, 64, FP32, True, record, run=run)
    check(1, 2, 2, 40, 70, 64, BF16, True, record, run=run)


@pytest.mark.parametrize("kv_split", [2, 4])
def test_split_kv_group_partial_sums(kv_split, monkeypatch, record):
    """dK/dV from fp32 partial sums over parts of a kv group (the GPU path for few kv heads)."""
    real = fa._pick_kv_split
    monkeypatch.setattr(fa, "_pick_kv_split", lambda q, k, split: real(q, k, kv_split))
    check(1, 8, 2, 33, 33, 32, FP32, True, record)
    check(1, 4, 1, 33, 33, 64, BF16, False, record)


def test_gqa_does_not_repeat_kv(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("k/v must not be repeated for grouped-query attention")

    q, k, v, do = attention_inputs(1, 4, 1, 17, 17, 32, FP32)
    for t in (q, k, v):
        t.requires_grad_()
    monkeypatch.setattr(torch, "repeat_interleave", forbidden)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", forbidden)
    monkeypatch.setattr(torch.Tensor, "repeat", forbidden)
    monkeypatch.setattr(torch.Tensor, "expand", forbidden)
    kernels.flash_attention(q, k, v).backward(do)
    assert k.grad.shape == k.shape


def test_non_contiguous_inputs_and_scale(record):
    """(B, T, H, D) tensors transposed to (B, H, T, D), as a model produces them; explicit scale."""

    def run(q, k, v):  # same values, laid out as a model's q/k/v projections would be
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert q.stride(-1) == 1 and not q.is_contiguous()
        return kernels.flash_attention(q, k, v, softmax_scale=0.3)

    check(2, 3, 1, 33, 33, 64, FP32, True, record, run=run, softmax_scale=0.3)


@pytest.mark.parametrize(
    "shapes,dtypes,match",
    [
        (((1, 4, 8, 32), (1, 3, 8, 32), (1, 3, 8, 32)), (FP32,) * 3, "multiple"),
        (((1, 4, 8, 32), (1, 4, 8, 16), (1, 4, 8, 16)), (FP32,) * 3, "head dim"),
        (((4, 8, 32), (4, 8, 32), (4, 8, 32)), (FP32,) * 3, r"\(B, H, T, D\)"),
        (((1, 4, 8, 32),) * 3, (FP32, FP16, FP16), "dtype"),
        (((1, 4, 8, 512),) * 3, (FP32,) * 3, "head dim 512"),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, dtypes, match):
    q, k, v = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes, strict=True))
    with pytest.raises(ValueError, match=match):
        kernels.flash_attention(q, k, v)


@pytest.mark.parametrize("name", ["_attn_fwd_tuned", "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned"])
def test_autotune_candidates_per_head_dim(name):
    """The CUDA autotuner tries the small-tile table only for D > 128, and short tiles for short T."""
    configs = getattr(fa, name).configs
    large = {id(c) for table in fa._LARGE_D_CONFIGS.values() for c in table}
    for head_dim in (64, 128, 256):
        kept = fa._prune_configs(configs, {"T_Q": 4096, "T_K": 4096}, HEAD_DIM=head_dim)
        assert kept and all((id(c) in large) == (head_dim > 128) for c in kept)
    short = fa._prune_configs(configs, {"T_Q": 100, "T_K": 100}, HEAD_DIM=64)
    assert short and all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64 for c in short)


def test_tolerance_table_covers_dtypes():
    assert set(ABS_FLOOR) == {FP16, BF16, FP32}


SWEEP = list(
    itertools.product([FP32, FP16, BF16], [32, 64, 80, 96, 128, 256], [True, False], [(6, 6), (6, 3), (12, 3), (3, 1)])
)
SWEEP_T = (1, 17, 100, 257)


@pytest.mark.slow
@pytest.mark.parametrize(
    "index", range(len(SWEEP)), ids=[f"{str(d)[6:]}-D{D}-causal{c:d}-H{h[0]}/{h[1]}" for d, D, c, h in SWEEP]
)
def test_sweep(index, record):
    """Every dtype x head dim x causal x GQA ratio (1, 2, 4, MQA), T cycling through 1, 17, 100, 257."""
    dtype, D, causal, (H, H_KV) = SWEEP[index]
    T = SWEEP_T[(index + index // 4) % 4]  # every (ratio, T) pair occurs
    check(1, H, H_KV, T, T, D, dtype, causal, record)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("T", SWEEP_T)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(6, 6), (6, 3), (12, 3), (3, 1)])
def test_sweep_lengths(dtype, T, causal, heads, record):
    """Every sequence length x GQA ratio x causal at D = 64, B = 2."""
    check(2, heads[0], heads[1], T, T, 64, dtype, causal, record)

"""kernels.linear_cross_entropy against an fp64 reference, in the Triton CPU interpreter.

Tolerance (kernels.testing.compare): kernel error <= 2 x error of the plain composition run in the same low
precision (linear_cross_entropy_reference(..., upcast=False)) + ABS_FLOOR[dtype], for the loss, grad_h and grad_W.
Also: the reference itself against F.cross_entropy and vocab_parallel_cross_entropy, the vocab-parallel (tp=2,
gloo) result against one rank on the full weight, the CPU fallback, and the peak memory saved (in a subprocess).
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels._utils import INTERPRET_AT_IMPORT
from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from kernels.testing import check_outputs
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.state import ParallelState
from tests.distributed import run_distributed

lce = importlib.import_module("kernels.linear_cross_entropy")

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # tests/kernels/conftest.py


def make_inputs(lead, d, v_local, vocab_size, *, seed=0, h_scale=1.0, ignore_every=7):
    """h (*lead, d), weight (v_local, d), targets (*lead) < vocab_size (every `ignore_every`-th ignored)."""
    g = torch.Generator().manual_seed(seed)
    h = h_scale * torch.randn(*lead, d, generator=g)
    w = torch.randn(v_local, d, generator=g) / d**0.25  # logits of std ~ d**0.25
    t = torch.randint(0, vocab_size or v_local, lead, generator=g)
    if ignore_every:
        t.view(-1)[::ignore_every] = -100
    return h, w, t


def run(fn, h, w, t, up, dtype, **kw):
    """[loss, grad_h, grad_W] of fn(h, w, t) with h and w cast to dtype and upstream gradient `up`."""
    hh, ww = (x.detach().to(dtype).requires_grad_() for x in (h, w))
    loss = fn(hh, ww, t, **kw)
    loss.backward(up.to(loss.dtype))
    return [loss.detach(), hh.grad, ww.grad]


def check(lead, d, v_local, vocab_size, dtype, reduction="mean", z_loss=0.0, chunk=8, record=None, **inputs):
    """Kernel vs fp64 and same-dtype references; returns the comparisons (asserted) and the kernel's results."""
    h, w, t = make_inputs(lead, d, v_local, vocab_size, **inputs)
    up = torch.randn(lead, generator=torch.Generator().manual_seed(9)) if reduction == "none" else torch.tensor(1.7)
    kw = dict(vocab_size=vocab_size, reduction=reduction, z_loss_weight=z_loss)
    got = run(linear_cross_entropy, h, w, t, up, dtype, chunk_tokens=chunk, **kw)
    hi = run(linear_cross_entropy_reference, h, w, t, up, torch.float64, **kw)
    lo = run(linear_cross_entropy_reference, h, w, t, up, dtype, upcast=False, **kw)
    assert got[0].dtype == FP32 and got[0].shape == (lead if reduction == "none" else ())
    assert got[1].dtype == dtype and got[1].shape == h.shape and got[2].dtype == dtype and got[2].shape == w.shape
    tag = f"{dtype} {lead}x{d} V={v_local}/{vocab_size} {reduction} z={z_loss} chunk={chunk}"
    comparisons = check_outputs("linear_ce", ("loss", "dh", "dw"), tag, got, hi, lo, dtype, record)
    return comparisons, got


CASES = [  # (lead, d, V_local, vocab_size, dtype, reduction, z_loss, chunk, MAX_BLOCK_V or None)
    ((37,), 48, 203, 190, FP32, "mean", 0.0, 8, None),
    ((37,), 48, 203, 190, FP16, "mean", 1e-3, 8, None),
    ((37,), 48, 203, 190, BF16, "mean", 0.0, 8, 64),  # 4 vocabulary tiles, the last one padding
    ((37,), 48, 203, 190, FP32, "none", 1e-3, 8, 64),
    ((37,), 48, 203, 190, FP16, "none", 0.0, 8, None),
    ((37,), 48, 203, 190, BF16, "none", 1e-3, 8, None),
    ((5, 7), 123, 123, None, BF16, "sum", 1e-3, 16, 32),  # hidden not a power of 2, no padding, 2-D lead
    ((3, 11), 80, 77, 77, FP16, "mean", 1e-2, 5, 16),
    ((1,), 80, 130, 100, FP32, "mean", 1e-3, None, None),  # one row, default chunk
]


@pytest.mark.parametrize("lead,d,v_local,vocab_size,dtype,reduction,z_loss,chunk,block_v", CASES)
def test_matches_reference(lead, d, v_local, vocab_size, dtype, reduction, z_loss, chunk, block_v, record, monkeypatch):
    if block_v is not None:  # force several tiles per row
        monkeypatch.setattr(lce, "MAX_BLOCK_V", block_v)
    check(lead, d, v_local, vocab_size, dtype, reduction, z_loss, chunk, record)


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_large_logits(dtype, record):
    """Logits ~ +-100 (fp16: exp would overflow without the max shift), a near one-hot softmax."""
    check((29,), 64, 150, 140, dtype, "mean", 1e-3, 8, record, h_scale=12.0 if dtype != FP16 else 8.0)


def test_non_contiguous_inputs(record):
    """h as a (B, T, d) transpose of (T, B, d), weight a column slice of a wider matrix, targets strided."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 5, 40, generator=g).transpose(0, 1)  # (5, 6, 40), not viewable as (30, 40)
    w = (torch.randn(97, 64, generator=g) / 3)[:, :40]  # row stride 64
    t = torch.randint(0, 90, (5, 12), generator=g)[:, ::2]
    assert not (h.is_contiguous() or w.is_contiguous() or t.is_contiguous())
    kw = dict(vocab_size=90, z_loss_weight=1e-3, reduction="none")
    up = torch.randn(5, 6, generator=g)
    got = run(linear_cross_entropy, h, w, t, up, FP32, chunk_tokens=7, **kw)
    ref = run(linear_cross_entropy_reference, h, w, t, up, torch.float64, **kw)
    for x, y in zip(got, ref, strict=True):
        torch.testing.assert_close(x.double(), y, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_and_no_grad(reduction, monkeypatch):
    h, w, t = make_inputs((9,), 16, 40, 33, ignore_every=0)
    t[:] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, t, vocab_size=33, reduction=reduction, z_loss_weight=0.1)
    loss.sum().backward()
    assert (loss == 0).all() and (hh.grad == 0).all() and (ww.grad == 0).all()
    t2 = make_inputs((9,), 16, 40, 33)[2]
    b = linear_cross_entropy(hh, w, t2, vocab_size=33, reduction=reduction, chunk_tokens=2)

    def boom(*args):
        raise AssertionError("no gradient work without grad mode")

    monkeypatch.setattr(lce, "_add_chunk_grads", boom)
    with torch.no_grad():  # statistics only, though hh and ww require grad
        a = linear_cross_entropy(hh, ww, t2, vocab_size=33, reduction=reduction)
    torch.testing.assert_close(a, b.detach())


def test_padding_gets_no_probability_and_no_gradient():
    h, w, t = make_inputs((13,), 24, 50, 41)
    ww = w.clone().requires_grad_()
    linear_cross_entropy(h, ww, t, vocab_size=41, chunk_tokens=4).backward()
    assert (ww.grad[41:] == 0).all() and (ww.grad[:41] != 0).any()


def test_backward_twice_is_a_clear_error():
    h, w, t = make_inputs((4,), 8, 20, 20)
    loss = linear_cross_entropy(h.requires_grad_(), w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_reference_matches_torch_cross_entropy():
    """The reference is F.cross_entropy on the real columns (+ z-loss), and vocab_parallel_cross_entropy at tp=1."""
    h, w, t = make_inputs((2, 19), 32, 70, 61)
    logits = F.linear(h, w)  # (2, 19, 70)
    lse = logits[..., :61].logsumexp(-1)
    ce = F.cross_entropy(logits[..., :61].flatten(0, 1), t.flatten(), reduction="none").view(2, 19)
    expected = torch.where(t != -100, ce + 0.01 * lse.square(), 0.0)
    ref = linear_cross_entropy_reference(h, w, t, vocab_size=61, reduction="none", z_loss_weight=0.01)
    torch.testing.assert_close(ref, expected)
    vp = vocab_parallel_cross_entropy(logits, t, ParallelState.single(), vocab_size=61)
    torch.testing.assert_close(linear_cross_entropy_reference(h, w, t, vocab_size=61), vp)


def test_default_chunk_tokens():
    assert lce.default_chunk_tokens(32000, BF16) == 4096  # llama_1b: 8 chunks of micro batch 8 x 4096
    assert lce.default_chunk_tokens(32000, FP32) == 2048
    assert lce.default_chunk_tokens(2**28, FP32) == 1  # a row over CHUNK_BYTES: one token at a time
    for v, dt in [(32000, BF16), (128256, FP32), (50304, FP16), (16000, FP32)]:
        n = lce.default_chunk_tokens(v, dt)
        assert n == 1 or n * v * torch.empty((), dtype=dt).element_size() <= lce.CHUNK_BYTES


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((4, 8), (10, 9), (4,)), {}, r"weight \(V_local, d\)"),
        (((4, 8), (10, 8), (5,)), {}, "leading shape"),
        (((4, 8), (10, 8), (4,)), {"reduction": "avg"}, "reduction"),
        (((4, 8), (10, 8), (4,)), {"chunk_tokens": 0}, "chunk_tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, kw, match):
    h, w, t = torch.zeros(shapes[0]), torch.zeros(shapes[1]), torch.zeros(shapes[2], dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, t, **kw)
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4))


def test_falls_back_to_reference_when_interpreter_unset(monkeypatch):
    """With TRITON_INTERPRET unset, CPU tensors take the reference: results equal it bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("Triton must not run")

    monkeypatch.setattr(lce.LinearCrossEntropyFunction, "apply", boom)
    h, w, t = make_inputs((3, 5), 16, 30, 27)
    kw = dict(vocab_size=27, z_loss_weight=1e-3, reduction="none")
    torch.testing.assert_close(linear_cross_entropy(h, w, t, **kw), linear_cross_entropy_reference(h, w, t, **kw),
                               rtol=0, atol=0)  # fmt: skip


# ---------------------------------------------------------------- vocab-parallel, 2 gloo processes

TP_CONFIGS = [  # (vocab_size, reduction, z_loss): 190 of 204 (rank 1 holds padding); 100 (rank 1 all padding)
    (190, "mean", 0.0),
    (190, "none", 1e-3),
    (100, "mean", 1e-2),
]


def check_vocab_parallel_matches_one_rank(rank: int, world_size: int) -> None:
    assert INTERPRET_AT_IMPORT, "the child processes need TRITON_INTERPRET=1 too"
    group = dist.group.WORLD
    for vocab_size, reduction, z_loss in TP_CONFIGS:
        h, w, t = make_inputs((37,), 48, 204, vocab_size)
        v_local = w.shape[0] // world_size
        up = torch.randn(37, generator=torch.Generator().manual_seed(5)) if reduction == "none" else torch.tensor(1.3)
        kw = dict(vocab_size=vocab_size, reduction=reduction, z_loss_weight=z_loss)
        for fn in (linear_cross_entropy, linear_cross_entropy_reference):
            one = run(fn, h, w, t, up, FP32, **kw)
            w_local = w[rank * v_local : (rank + 1) * v_local]
            tp = run(fn, h, w_local, t, up, FP32, vocab_start=rank * v_local, tp_group=group, chunk_tokens=10, **kw)
            dist.all_reduce(tp[1], group=group)  # grad_h: partial sums, as copy_to_tp_region's backward adds them
            tag = f"{fn.__name__} vocab={vocab_size} {reduction} z={z_loss}"
            torch.testing.assert_close(tp[0], one[0], atol=2e-6, rtol=1e-5, msg=f"loss {tag}")
            torch.testing.assert_close(tp[1], one[1], atol=2e-6, rtol=1e-5, msg=f"grad_h {tag}")
            one_w = one[2][rank * v_local : (rank + 1) * v_local]
            torch.testing.assert_close(tp[2], one_w, atol=2e-6, rtol=1e-5, msg=f"grad_W {tag}")


@pytest.mark.multiprocess
def test_vocab_parallel_matches_one_rank():
    run_distributed(check_vocab_parallel_matches_one_rank, 2)


# ---------------------------------------------------------------- peak memory, measured in a subprocess

_MEASURE = """
import sys, torch
torch.set_num_threads(1)
import importlib
lce = importlib.import_module("kernels.linear_cross_entropy")  # the module (kernels.linear_cross_entropy is the op)
lce.MAX_BLOCK_V = 1 << 15  # one tile per row: the interpreter's cost is per tile; memory does not depend on it
impl, N, d, V, chunk = sys.argv[1], *map(int, sys.argv[2:])
fn = lce.linear_cross_entropy if impl == "fused" else lce.linear_cross_entropy_reference
g = torch.Generator().manual_seed(0)
h = torch.randn(N, d, generator=g).requires_grad_()
w = (torch.randn(V, d, generator=g) / 8).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
small = (h[:4].detach().requires_grad_(), w[:64].detach().requires_grad_(), t[:4] % 64)
fn(*small, chunk_tokens=2).backward()  # warm up (lazy imports, kernel tracing)
def kib(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = kib("VmRSS")
fn(h, w, t, chunk_tokens=chunk).backward()
print(kib("VmHWM") - before)
"""


def peak_extra_mib(impl: str, n: int, d: int, v: int, chunk: int) -> float:
    """Peak RSS of forward + backward above the RSS before it, in MiB, in a fresh fp32 CPU process."""
    env = dict(os.environ, TRITON_INTERPRET="1" if impl == "fused" else "0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _MEASURE, impl, str(n), str(d), str(v), str(chunk)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1]) / 1024


def check_memory(n: int, d: int, v: int, chunk: int) -> None:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    logits_mib = n * v * 4 / 2**20
    fused, ref = peak_extra_mib("fused", n, d, v, chunk), peak_extra_mib("reference", n, d, v, chunk)
    print(f"\npeak extra memory, fp32 N={n} d={d} V={v}: fused (chunk {chunk}) {fused:.1f} MiB, "
          f"reference {ref:.1f} MiB, saved {ref - fused:.1f} MiB; full logits {logits_mib:.1f} MiB")  # fmt: skip
    assert fused < logits_mib / 2, "the fused op must not hold anything near the full logits"
    assert ref > logits_mib, "the reference materialises the logits (else this measurement is broken)"


def test_peak_memory_small():
    check_memory(512, 32, 32768, 64)


@pytest.mark.slow
def test_peak_memory():
    check_memory(2048, 64, 32768, 256)

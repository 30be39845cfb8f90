"""model.compile: compiled blocks train like eager (fp32, 20 AdamW steps) at tp=1 and tp=2, with and without
selective recomputation, keep every parameter name, and refuse what cannot work with a clear message.

Inductor compiles to C++ on CPU: these tests need a C++ compiler, and fall back to the aot_eager backend (same
graphs and autograd, no code generation) where none is installed. A first compile costs ~10-25 s on 2 CPU cores.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megalm.config import Config, Layout, ModelConfig
from megalm.errors import MegalmError
from megalm.model.compile import blocks_of, check_compile, compile_model, compile_seconds
from megalm.model.transformer import GPT
from megalm.parallel import ParallelState
from tests.distributed import run_distributed
from tests.helpers import train_adamw

BACKEND = "inductor" if shutil.which("c++") or shutil.which("g++") else "aot_eager"
CONFIGS = {
    "gpt2": dict(family="gpt2", n_layer=2, n_head=4, d_model=32, vocab_size=97, seq_len=16, kernels="torch"),
    "llama": dict(family="llama", n_layer=2, n_head=8, n_kv_head=4, d_model=64, vocab_size=97, seq_len=16,
                  kernels="torch"),
}  # fmt: skip
STEPS = 20
LR = 3e-3  # as tests/model/test_tp_model.py: the tiny models' 20-step trajectories stay smooth
LOSS_RTOL = 1e-5


def make_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 97, (2, 17), generator=gen) for _ in range(steps)]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def train(model: torch.nn.Module, batches) -> list[float]:
    return train_adamw(model, batches, LR)


def config(family: str, **model) -> Config:
    return Config(model=ModelConfig(**{**CONFIGS[family], "compile": True, **model}))


def compiled_vs_eager(cfg: Config, state: ParallelState, steps: int = STEPS, **gpt) -> tuple[float, float]:
    """(max relative loss difference over `steps` AdamW steps, seconds spent compiling) of a compiled model
    against the eager model of the same seed and layout."""
    torch._dynamo.reset()
    runs, seconds = [], 0.0
    for compiled in (False, True):
        state.seed(0)
        model = GPT(cfg.model, state, **gpt)
        if compiled:
            before = compile_seconds()
            model = compile_model(model, cfg, Layout(tp=state.tp), backend=BACKEND)
        runs.append(train(model, make_batches(steps)))
        seconds = compile_seconds() - before if compiled else seconds
    eager, comp = runs
    return max(abs(a - b) / abs(b) for a, b in zip(comp, eager, strict=True)), seconds


def report(capsys, key: str, rel: float, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n  {key}: max loss rel diff {rel:.1e}, compile {seconds:.1f} s ({BACKEND})", end="")


@pytest.mark.parametrize(
    "family, recompute",
    [("gpt2", "none"), ("llama", "selective"),
     pytest.param("gpt2", "selective", marks=pytest.mark.slow), pytest.param("llama", "none", marks=pytest.mark.slow)],
)  # fmt: skip
def test_compiled_trains_like_eager(family, recompute, capsys):
    rel, seconds = compiled_vs_eager(config(family), ParallelState.single(), recompute=recompute)
    report(capsys, f"{family} tp=1 recompute={recompute}", rel, seconds)
    assert rel <= LOSS_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_blocks_under_full_recompute(family, capsys):
    """recompute=full checkpoints segments of compiled blocks from outside, replaying the RNG tracker."""
    rel, seconds = compiled_vs_eager(config(family), ParallelState.single(), recompute_interval=1)
    report(capsys, f"{family} tp=1 recompute=full", rel, seconds)
    assert rel <= LOSS_RTOL


def check_tp_parity(rank: int, world_size: int, out: dict) -> None:
    torch.set_num_threads(1)
    state = ParallelState(tp=world_size)
    for family, sp, recompute in (("gpt2", False, "none"), ("llama", True, "selective")):
        rel, seconds = compiled_vs_eager(config(family), state, sequence_parallel=sp, recompute=recompute)
        assert rel <= LOSS_RTOL, f"{family} tp={world_size} sp={sp}: loss rel diff {rel:.2e}"
        if rank == 0:
            out[f"{family} tp={world_size} sp={sp} recompute={recompute}"] = (rel, seconds)


@pytest.mark.multiprocess
def test_compiled_trains_like_eager_tp2(capsys):
    """TP and SP collectives (autograd functions around torch.distributed) inside the compiled blocks."""
    import multiprocessing

    out = multiprocessing.Manager().dict()
    run_distributed(check_tp_parity, 2, out, timeout=300)
    for key, (rel, seconds) in sorted(out.items()):
        report(capsys, key, rel, seconds)
    assert len(out) == 2


def test_triton_kernels_compile_as_custom_ops(capsys):
    """model.kernels=triton (the interpreter on CPU): the kernels become custom ops, so the compiled block is one
    graph without breaks and computes exactly what the eager kernels compute."""
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = config("llama", kernels="triton")
    rel, seconds = compiled_vs_eager(cfg, ParallelState.single(), steps=4)
    report(capsys, "llama kernels=triton tp=1 (4 steps)", rel, seconds)
    assert rel == 0.0
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # both blocks share the one compiled graph


def test_compiled_flash_attention_custom_op_matches_kernel():
    """kernels.custom_ops.flash_attention (what attention_core must call for model.attention=flash) compiles in one
    graph and matches kernels.flash_attention, forward and backward."""
    import kernels
    from kernels import custom_ops

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 16, 8, requires_grad=True) for h in (4, 2, 2))

    def loss(attention, q, k, v):
        return (attention(q, k, v, causal=True) * torch.arange(8.0)).sum()

    want = loss(kernels.flash_attention, q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend=BACKEND)(custom_ops.flash_attention, q, k, v)
    for g, w in zip(torch.autograd.grad(got, (q, k, v)), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the weighted sum: inductor's C++ reduction order


def test_custom_ops_pass_opcheck():
    """Fake (meta) implementations, schemas and autograd registrations agree with the real kernels."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 24), torch.randn(24), torch.randn(24)
    norm = torch.ops.megalm.norm_fwd.default
    torch.library.opcheck(norm, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, False))
    torch.library.opcheck(norm, (x, w, None, 1e-5, True))
    q, k = torch.randn(2, 4, 6, 8, requires_grad=True), torch.randn(2, 2, 6, 8, requires_grad=True)
    cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    torch.library.opcheck(torch.ops.megalm.rope.default, (q, k, cos, sin, False))
    gate, up = torch.randn(3, 7, 40, requires_grad=True), torch.randn(3, 7, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.megalm.swiglu_fwd.default, (gate, up))


def test_compile_keeps_parameter_names():
    """Checkpoints and the Hugging Face conversion read parameter names: compiling must not change them."""
    cfg = config("llama")
    torch.manual_seed(0)
    eager = GPT(cfg.model)
    torch.manual_seed(0)
    model = compile_model(GPT(cfg.model), cfg, Layout(), backend=BACKEND)
    assert list(model.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert len(blocks_of(model)) == cfg.model.n_layer
    assert all(block._compiled_call_impl is not None for block in blocks_of(model))
    assert model.head._compiled_call_impl is not None  # the untied head and its loss


@pytest.mark.parametrize("attention", ["fused_softmax"])
def test_refuses_attention_kernels_it_cannot_trace(attention):
    cfg = config("gpt2", attention=attention)
    with pytest.raises(MegalmError, match=f"model.attention={attention} .*model.compile=false"):
        check_compile(cfg, Layout())
    with pytest.raises(MegalmError, match="use model.attention=sdpa or eager"):
        compile_model(GPT(cfg.model), cfg, Layout())


def test_check_compile_is_a_no_op_when_off():
    check_compile(Config(model=ModelConfig(attention="fused_softmax")), Layout())
    check_compile(config("llama", attention="sdpa"), Layout(tp=2, pp=2))

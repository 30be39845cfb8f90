"""VocabParallelEmbedding and vocab-parallel cross-entropy against nn.Embedding / F.cross_entropy, tp = 1, 2, 4."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.parallel import ParallelState, VocabParallelEmbedding, pad_vocab_size, vocab_parallel_cross_entropy
from megalm.parallel.mappings import copy_to_tp_region
from tests.distributed import run_distributed
from tests.parallel import close

B, T, V, D, PAD = 2, 8, 50, 6, 8  # V=50 padded to 56 (tp=1) or 64 (tp=2, 4): rank 3 at tp=4 holds ids 48..63


def _embedding_pair(state: ParallelState, sequence_parallel: bool = False):
    torch.manual_seed(7)
    emb = VocabParallelEmbedding(V, D, state=state, pad_to_multiple=PAD, sequence_parallel=sequence_parallel)
    torch.manual_seed(7)
    full = VocabParallelEmbedding(V, D, state=ParallelState.single(), pad_to_multiple=PAD)
    ref = torch.nn.Embedding(V, D)
    with torch.no_grad():
        ref.weight.copy_(full.weight[:V])
    return emb, full, ref


def _ids(emb: VocabParallelEmbedding) -> torch.Tensor:
    ids = torch.randint(0, V, (B, T))
    edge = min(emb.local_vocab_size, V - 1)
    ids[0, :4] = torch.tensor([0, V - 1, edge - 1, edge])  # shard edges
    return ids


def check_embedding(state: ParallelState) -> None:
    emb, full, ref = _embedding_pair(state)
    padded = pad_vocab_size(V, state.tp, PAD)
    assert emb.padded_vocab_size == padded and emb.local_vocab_size == padded // state.tp
    assert emb.local_vocab_range == (state.tp_rank * padded // state.tp, (state.tp_rank + 1) * padded // state.tp)
    assert full.padded_vocab_size == 56 and not full.weight[V:].any(), "padding rows start at zero"
    close(emb.weight, emb.shard(ref.weight), "tp-independent init of the embedding")
    ids, g = _ids(emb), torch.randn(B, T, D)
    (ref(ids) * g).sum().backward()
    for sp in (False, True):
        emb = _embedding_pair(state, sequence_parallel=sp)[0]
        out = emb(ids)
        chunk = (lambda t: t.chunk(state.tp, dim=1)[state.tp_rank]) if sp else (lambda t: t)
        close(out, chunk(ref(ids)), f"embedding output (sequence_parallel={sp})")
        (out * chunk(g)).sum().backward()
        close(emb.weight.grad, emb.shard(ref.weight.grad), f"embedding grad (sequence_parallel={sp})")


def _logits_and_targets(padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(B, T, padded) * 3
    logits[..., V:] = 1e4  # padding columns would win every softmax if they were not masked
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = torch.tensor([-100, 0, V - 1])
    targets[1, -1] = -100
    return logits, targets


def check_cross_entropy(state: ParallelState) -> None:
    padded = pad_vocab_size(V, state.tp, PAD)
    logits, targets = _logits_and_targets(padded)
    weights = torch.rand(B, T)
    for reduction in ("mean", "sum", "none"):
        ref_logits = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_logits[..., :V].transpose(1, 2), targets, reduction=reduction)  # (B, V, T) form
        local = logits.chunk(state.tp, dim=-1)[state.tp_rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, state, vocab_size=V, reduction=reduction)
        close(loss, ref, f"cross-entropy ({reduction})")
        (ref * weights).sum().backward() if reduction == "none" else ref.backward()
        (loss * weights).sum().backward() if reduction == "none" else loss.backward()
        expected = ref_logits.grad.chunk(state.tp, dim=-1)[state.tp_rank]
        close(local.grad, expected, f"cross-entropy logits grad ({reduction})")
        pad_from = max(V - state.tp_rank * local.size(-1), 0)
        assert not local.grad[..., pad_from:].any(), "padded ids got a gradient"


def check_tied_head(state: ParallelState) -> None:
    """embedding weight as the output head: local logits -> vocab-parallel loss == full linear + F.cross_entropy."""
    emb, _, ref = _embedding_pair(state)
    h_ref, targets = torch.randn(B, T, D, requires_grad=True), torch.randint(0, V, (B, T))
    F.cross_entropy(F.linear(h_ref, ref.weight).flatten(0, 1), targets.flatten()).backward()
    h = h_ref.detach().clone().requires_grad_()
    local_logits = F.linear(copy_to_tp_region(h, state.tp_group), emb.weight)  # (B, T, V_local)
    loss = vocab_parallel_cross_entropy(local_logits, targets, state, vocab_size=V)
    loss.backward()
    close(h.grad, h_ref.grad, "tied head: hidden grad")
    close(emb.weight.grad, emb.shard(ref.weight.grad), "tied head: weight grad (padding rows zero)")


def check_vocab_parallel(rank: int, world_size: int) -> None:
    state = ParallelState(tp=world_size)
    for check in (check_embedding, check_cross_entropy, check_tied_head):
        torch.manual_seed(200)
        check(state)
    dist.barrier()


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_matches_single_process(world_size):
    run_distributed(check_vocab_parallel, world_size)


def test_single_process_checks():
    state = ParallelState.single()
    for check in (check_embedding, check_cross_entropy, check_tied_head):
        torch.manual_seed(200)
        check(state)


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 1) == 50304 and pad_vocab_size(50257, 8) == 51200
    assert pad_vocab_size(128, 1) == 128 and pad_vocab_size(50, 4, multiple=1) == 52


def test_cross_entropy_edges():
    state = ParallelState.single()
    logits = torch.randn(3, 10, requires_grad=True)
    all_ignored = vocab_parallel_cross_entropy(logits, torch.full((3,), -100), state, vocab_size=10)
    assert all_ignored.item() == 0.0  # F.cross_entropy gives NaN here
    all_ignored.backward()
    assert not logits.grad.any()
    # bf16 logits: computed in fp32, gradient returned in bf16
    lowp = logits.detach().bfloat16().requires_grad_()
    targets = torch.tensor([1, 2, 9])
    loss = vocab_parallel_cross_entropy(lowp, targets, state, vocab_size=10)
    loss.backward()
    assert loss.dtype == torch.float32 and lowp.grad.dtype == torch.bfloat16
    close(loss, F.cross_entropy(lowp.float(), targets), "bf16 logits")
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(logits, targets, state, vocab_size=10, reduction="avg")
    loss = vocab_parallel_cross_entropy(logits, targets, state, vocab_size=10)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs only once"):
        loss.backward()

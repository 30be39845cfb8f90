"""Column/row-parallel linears against nn.Linear built from the same full weights, at tp = 1, 2 and 4."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.errors import MegalmError
from megalm.parallel import ColumnParallelLinear, ParallelState, RowParallelLinear
from tests.distributed import run_distributed
from tests.parallel import close

B, T = 2, 8  # T divisible by every tp tested (sequence parallelism splits it)


def _pair(cls, seed: int, state: ParallelState, *args, **kwargs):
    """The layer at `state` and the same layer at tp=1 (its full weights), both from `seed`; random biases."""
    torch.manual_seed(seed)
    layer = cls(*args, state=state, **kwargs)
    torch.manual_seed(seed)
    full = cls(*args, state=ParallelState.single(), **kwargs)
    with torch.no_grad():
        if full.bias is not None:
            full.bias.normal_()
            layer.bias.copy_(layer.shard(full.bias) if cls is ColumnParallelLinear else full.bias)
    return layer, full


def _linear(full) -> nn.Linear:
    ref = nn.Linear(full.in_features, full.out_features, bias=full.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(full.weight)
        if full.bias is not None:
            ref.bias.copy_(full.bias)
    return ref


def _last_dim_shard(layer: ColumnParallelLinear, t: torch.Tensor) -> torch.Tensor:
    return layer.shard(t.movedim(-1, 0)).movedim(0, -1)


def check_column_parallel(state: ParallelState) -> None:
    layer, full = _pair(ColumnParallelLinear, 1, state, 6, 8)
    close(layer.weight, layer.shard(full.weight), "tp-independent init of the column weight")
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
    ref = _linear(full)
    x_ref = torch.randn(B, T, 6, requires_grad=True)
    g = torch.randn(B, T, 8)
    (ref(x_ref) * g).sum().backward()
    x = x_ref.detach().clone().requires_grad_()
    y = layer(x)
    assert y.shape == (B, T, 8 // state.tp)
    close(y, _last_dim_shard(layer, ref(x_ref)), "column output")
    (y * _last_dim_shard(layer, g)).sum().backward()
    close(x.grad, x_ref.grad, "column input grad")
    close(layer.weight.grad, layer.shard(ref.weight.grad), "column weight grad")
    close(layer.bias.grad, layer.shard(ref.bias.grad), "column bias grad")
    close(full(x_ref), ref(x_ref), "tp=1 column layer == nn.Linear")


def check_fused_qkv_partition(state: ParallelState) -> None:
    """[q|k|v] with 8 query heads and 4 kv heads of size 2: each rank gets whole heads of q, k and v."""
    nh, nkv, hd, d = 8, 4, 2, 6
    sizes = [nh * hd, nkv * hd, nkv * hd]
    layer, full = _pair(ColumnParallelLinear, 2, state, d, sum(sizes), partition_sizes=sizes)
    ref = _linear(full)
    x = torch.randn(B, T, d)
    q_ref, k_ref, v_ref = ref(x).split(sizes, dim=-1)
    q, k, v = layer(x).split(layer.local_partition_sizes, dim=-1)
    r, nh_l, nkv_l = state.tp_rank, nh // state.tp, nkv // state.tp
    close(q.view(B, T, -1, hd), q_ref.view(B, T, nh, hd)[:, :, r * nh_l : (r + 1) * nh_l], "q heads")
    close(k.view(B, T, -1, hd), k_ref.view(B, T, nkv, hd)[:, :, r * nkv_l : (r + 1) * nkv_l], "k heads")
    close(v.view(B, T, -1, hd), v_ref.view(B, T, nkv, hd)[:, :, r * nkv_l : (r + 1) * nkv_l], "v heads")

    # gather_output puts the blocks back in [q|k|v] order, and its backward keeps each rank's part of the grad.
    gathered, full2 = _pair(ColumnParallelLinear, 2, state, d, sum(sizes), partition_sizes=sizes, gather_output=True)
    close(full2.weight, full.weight, "same seed, same full weight")
    x_ref, x = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(B, T, sum(sizes))
    y = gathered(x)
    close(y, ref(x_ref), "gathered fused output in block order")
    (y * g).sum().backward()
    (ref(x_ref) * g).sum().backward()
    close(x.grad, x_ref.grad, "fused input grad")
    close(gathered.weight.grad, gathered.shard(ref.weight.grad), "fused weight grad")
    close(gathered.bias.grad, gathered.shard(ref.bias.grad), "fused bias grad")


def check_row_parallel(state: ParallelState) -> None:
    for input_is_parallel in (True, False):
        layer, full = _pair(RowParallelLinear, 3, state, 8, 6, input_is_parallel=input_is_parallel)
        close(layer.weight, layer.shard(full.weight), "tp-independent init of the row weight")
        assert layer.weight.partition_dim == 1 and not hasattr(layer.bias, "tensor_model_parallel")
        ref = _linear(full)
        x_ref = torch.randn(B, T, 8, requires_grad=True)
        g = torch.randn(B, T, 6)
        (ref(x_ref) * g).sum().backward()
        x_in = x_ref.detach() if not input_is_parallel else x_ref.detach().chunk(state.tp, -1)[state.tp_rank]
        x = x_in.clone().requires_grad_()
        y = layer(x)
        close(y, ref(x_ref), f"row output (input_is_parallel={input_is_parallel})")
        (y * g).sum().backward()
        expected_grad = x_ref.grad if not input_is_parallel else x_ref.grad.chunk(state.tp, -1)[state.tp_rank]
        close(x.grad, expected_grad, "row input grad")
        close(layer.weight.grad, layer.shard(ref.weight.grad), "row weight grad")
        close(layer.bias.grad, ref.bias.grad, "row bias grad")


def _mlp(state: ParallelState, sequence_parallel: bool):
    col, col_full = _pair(ColumnParallelLinear, 4, state, 6, 8, sequence_parallel=sequence_parallel)
    row, row_full = _pair(RowParallelLinear, 5, state, 8, 6, sequence_parallel=sequence_parallel)
    return col, row, _linear(col_full), _linear(row_full)


def check_sequence_parallel_pair(state: ParallelState) -> None:
    """column(SP) -> gelu -> row(SP) on this rank's tokens == the non-SP pair == nn.Linear pair, values and grads."""
    r, tp = state.tp_rank, state.tp
    x_full, g = torch.randn(B, T, 6), torch.randn(B, T, 6)
    chunk = lambda t: t.chunk(tp, dim=1)[r]  # this rank's tokens

    col_ref, row_ref = _mlp(state, False)[2:]
    x_ref = x_full.clone().requires_grad_()
    y_ref = row_ref(F.gelu(col_ref(x_ref)))
    (y_ref * g).sum().backward()

    results = {}
    for sp in (False, True):
        col, row, _, _ = _mlp(state, sp)
        x = (chunk(x_full) if sp else x_full).clone().requires_grad_()
        y = row(F.gelu(col(x)))
        assert y.shape == ((B, T // tp, 6) if sp else (B, T, 6))
        close(y, chunk(y_ref) if sp else y_ref, f"MLP output (sequence_parallel={sp})")
        (y * (chunk(g) if sp else g)).sum().backward()
        close(x.grad, chunk(x_ref.grad) if sp else x_ref.grad, f"MLP input grad (sequence_parallel={sp})")
        grads = {"col weight": col.weight.grad, "col bias": col.bias.grad, "row weight": row.weight.grad,
                 "row bias": row.bias.grad}  # fmt: skip
        expected = {"col weight": col.shard(col_ref.weight.grad), "col bias": col.shard(col_ref.bias.grad),
                    "row weight": row.shard(row_ref.weight.grad), "row bias": row_ref.bias.grad}  # fmt: skip
        for name, got in grads.items():
            close(got, expected[name], f"MLP {name} grad (sequence_parallel={sp})")
        results[sp] = grads
    for name, got in results[True].items():
        close(got, results[False][name], f"{name} grad: SP pair == non-SP pair")


def check_size_errors(state: ParallelState) -> None:
    if state.tp == 1:
        return
    with pytest.raises(MegalmError, match=rf"partition_sizes\[1\] = 3 is not divisible by tp={state.tp}"):
        ColumnParallelLinear(4, 11, state=state, partition_sizes=[8, 3])
    with pytest.raises(MegalmError, match=f"in_features = {state.tp + 1} is not divisible"):
        RowParallelLinear(state.tp + 1, 4, state=state)
    with pytest.raises(MegalmError, match="sequence length must be a multiple of tp"):
        RowParallelLinear(8, 4, state=state, sequence_parallel=True)(torch.randn(1, state.tp + 1, 8 // state.tp))


def check_tp_layers(rank: int, world_size: int) -> None:
    state = ParallelState(tp=world_size)
    assert state.tp_group is not None
    for check in (check_column_parallel, check_fused_qkv_partition, check_row_parallel, check_sequence_parallel_pair,
                  check_size_errors):  # fmt: skip
        torch.manual_seed(100)  # the same inputs on every rank
        check(state)
    dist.barrier()


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tp_layers_match_single_process(world_size):
    run_distributed(check_tp_layers, world_size)


def test_single_state_layers_do_not_communicate(monkeypatch):
    """tp=1 without torch.distributed: plain linears, every check above, no collective called."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called at tp=1")

    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, forbidden)
    state = ParallelState.single()
    for check in (check_column_parallel, check_fused_qkv_partition, check_row_parallel, check_sequence_parallel_pair):
        torch.manual_seed(100)
        check(state)


def test_bad_layer_arguments():
    state = ParallelState.single()
    with pytest.raises(ValueError, match="do not add up"):
        ColumnParallelLinear(4, 8, state=state, partition_sizes=[4, 2])
    with pytest.raises(ValueError, match="exclude each other"):
        ColumnParallelLinear(4, 8, state=state, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel"):
        RowParallelLinear(4, 8, state=state, input_is_parallel=False, sequence_parallel=True)
    layout_only = ParallelState(tp=2, world_size=2, rank=0)  # no torch.distributed: no groups
    with pytest.raises(ValueError, match="no process groups"):
        ColumnParallelLinear(4, 8, state=layout_only)


def test_dtype_device_and_repr():
    layer = ColumnParallelLinear(4, 8, state=ParallelState.single(), dtype=torch.bfloat16, bias=False)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias is None
    assert "out=8 (local 8)" in repr(layer)

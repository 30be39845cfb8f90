"""TrainBatches and eval_batches: the window layout, dp invariance, determinism, resume, epochs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megalm.data.loader import Split, TrainBatches, eval_batches
from megalm.errors import MegalmError


def arange_split(num_tokens: int) -> Split:
    """A split whose token at position i is i, so every window shows where it came from."""
    manifest = {"format": "megalm-shards/1", "vocab_size": num_tokens, "tokenizer": {"type": "bytes"}}
    return Split(tokens=np.arange(num_tokens, dtype=np.uint32), manifest=manifest, path=Path("mem/train"))


def window_ids(batch, seq_len):
    """Window index of each row of an x batch."""
    return (batch[:, 0] // seq_len).tolist()


def step_windows(loader, seq_len):
    """Window indices of every micro-batch of the loader's next step (in micro-batch order)."""
    return [window_ids(x, seq_len) for x, _ in loader.next_step()]


def make(split, *, mbs=2, ga=2, rank=0, dp=1, seed=0, seq_len=8):
    """TrainBatches with short keyword names."""
    return TrainBatches(
        split, seq_len=seq_len, micro_batch_size=mbs, grad_accum=ga, dp_rank=rank, dp_size=dp, seed=seed
    )


def test_windows_shapes_and_shift():
    split = arange_split(8 * 50 + 1)
    loader = make(split, mbs=3, ga=2)
    batches = loader.next_step()
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1), "labels are the inputs shifted by one token"
        assert (x[:, 0] % 8 == 0).all(), "windows start at multiples of seq_len (non-overlapping)"
    assert loader.n_windows == 50 and loader.tokens_per_step == 6 * 8
    assert (loader.steps_per_epoch, loader.dropped_windows_per_epoch) == (8, 2)


@pytest.mark.parametrize("k", [1, 3])
def test_dp1_and_dp2_see_the_same_windows(k):
    split = arange_split(8 * 200 + 5)
    single = make(split, mbs=2, ga=2 * k, dp=1, seed=7)
    pair = [make(split, mbs=2, ga=k, rank=r, dp=2, seed=7) for r in range(2)]
    for _ in range(single.steps_per_epoch + 3):  # crosses into the next epoch
        want = step_windows(single, 8)
        got = [step_windows(p, 8) for p in pair]
        assert sorted(sum(want, [])) == sorted(sum(got[0] + got[1], []))
        # Stronger: micro-batch j = m * dp + r of the dp=2 run is micro-batch j of the dp=1 run.
        assert [got[j % 2][j // 2] for j in range(2 * k)] == want


def test_deterministic_and_seed_dependent():
    split = arange_split(8 * 100 + 1)
    a, b, c = make(split, seed=3), make(split, seed=3), make(split, seed=4)
    run = lambda loader: [step_windows(loader, 8) for _ in range(10)]
    ra = run(a)
    assert ra == run(b)
    assert ra != run(c)


def test_epoch_rollover_covers_each_window_once():
    split = arange_split(8 * 30 + 1)  # 30 windows, global batch 4: 7 steps, 2 dropped per epoch
    loader = make(split, mbs=2, ga=2)
    assert (loader.steps_per_epoch, loader.dropped_windows_per_epoch) == (7, 2)
    epoch0 = [w for _ in range(7) for mb in step_windows(loader, 8) for w in mb]
    assert loader.epoch == 1 and loader.step_in_epoch == 0
    epoch1 = [w for _ in range(7) for mb in step_windows(loader, 8) for w in mb]
    assert len(set(epoch0)) == len(set(epoch1)) == 28
    perm0 = np.random.Generator(np.random.PCG64(0)).permutation(30)
    assert epoch0 == perm0[:28].tolist()
    assert epoch0 != epoch1


def test_state_dict_resume_gives_the_same_batches():
    split = arange_split(8 * 40 + 1)
    loader = make(split, mbs=2, ga=2, seed=11)
    for _ in range(12):  # into epoch 1
        loader.next_step()
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    want = [step_windows(loader, 8) for _ in range(15)]
    resumed = make(split, mbs=2, ga=2, seed=11)
    resumed.load_state_dict(state)
    assert [step_windows(resumed, 8) for _ in range(15)] == want
    # Resuming on 2 ranks with the same global batch continues with the same windows.
    pair = [make(split, mbs=2, ga=1, rank=r, dp=2, seed=11) for r in range(2)]
    for p in pair:
        p.load_state_dict(state)
    got = [[w for p in pair for mb in step_windows(p, 8) for w in mb] for _ in range(15)]
    assert [sorted(g) for g in got] == [sorted(sum(w, [])) for w in want]


def test_resume_with_other_sizes_is_an_error():
    split = arange_split(8 * 40 + 1)
    state = make(split, mbs=2, ga=2).state_dict()
    with pytest.raises(MegalmError, match="saved global_batch_size is 4, now 6"):
        make(split, mbs=3, ga=2).load_state_dict(state)
    with pytest.raises(MegalmError, match="saved seq_len is 8, now 4"):
        make(split, mbs=2, ga=2, seq_len=4).load_state_dict(state)
    with pytest.raises(MegalmError, match="saved n_windows is 40, now 39"):
        make(arange_split(8 * 39 + 1), mbs=2, ga=2).load_state_dict(state)


def test_too_small_split_is_an_error():
    with pytest.raises(MegalmError, match=r"mem/train has 81 tokens: 10 windows of seq_len 8.*global batch of 12"):
        make(arange_split(81), mbs=3, ga=2, dp=2)
    with pytest.raises(MegalmError, match="dp_rank 2 is outside"):
        make(arange_split(81), rank=2, dp=2)


def test_eval_batches_in_order_split_by_rank():
    split = arange_split(8 * 11 + 1)  # 11 windows
    whole = list(eval_batches(split, seq_len=8, micro_batch_size=4, dp_rank=0, dp_size=1, max_windows=None))
    assert [window_ids(x, 8) for x, _ in whole] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert all(torch.equal(y, x + 1) for x, y in whole)
    ranks = [
        [window_ids(x, 8) for x, _ in eval_batches(split, seq_len=8, micro_batch_size=2, dp_rank=r, dp_size=3,
                                                   max_windows=8)]
        for r in range(3)
    ]  # fmt: skip
    assert ranks == [[[0, 3], [6]], [[1, 4], [7]], [[2, 5]]]
    again = list(eval_batches(split, seq_len=8, micro_batch_size=4, dp_rank=0, dp_size=1, max_windows=None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again, strict=True))
    with pytest.raises(MegalmError, match="too few for one window"):
        eval_batches(arange_split(8), seq_len=8, micro_batch_size=1, dp_rank=0, dp_size=1, max_windows=None)

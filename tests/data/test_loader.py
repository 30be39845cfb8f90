"""TrainBatches and eval_batches: layout invariance, epochs read each sample once, determinism, resume, errors."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from megalm.config import Layout
from megalm.data import loader as loader_mod
from megalm.data.lanes import Mixer
from megalm.data.loader import LoaderSpec, TrainBatches, eval_batches, load_split, produce
from megalm.data.shards import ShardCursor
from megalm.errors import MegalmError
from tests.data.shardgen import write_split


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """4,250 tokens (token i is i) in samples of 50, 10 samples a shard: 85 samples, 9 shards."""
    return load_split(write_split(tmp_path_factory.mktemp("arange") / "train", 4250, sample_tokens=50,
                                  shard_tokens=500))  # fmt: skip


def make(split, *, mbs=2, ga=2, rank=0, dp=1, seed=0, seq_len=8, workers=0, on_error="raise"):
    """TrainBatches with short keyword names."""
    return TrainBatches(split, seq_len=seq_len, layout=Layout(micro_batch_size=mbs, grad_accum=ga, dp=dp), dp_rank=rank,
                        seed=seed, num_workers=workers, on_error=on_error)  # fmt: skip


def starts(loader):
    """First token (= position in the split) of each row of each micro-batch of the loader's next step."""
    return [x[:, 0].tolist() for x, _ in loader.next_step()]


def test_shapes_labels_and_contiguous_windows(split):
    loader = make(split, mbs=3, ga=2, seq_len=8)
    for _ in range(5):
        batches = loader.next_step()
        assert len(batches) == 2
        for x, y in batches:
            assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1]), "labels are the inputs shifted by one token"
            assert x.is_contiguous() and y.is_contiguous()
    assert loader.tokens_per_step == 6 * 8 and loader.global_batch_size == 6
    plan = loader.spec.plans[0]
    assert (plan.q, plan.windows) == (85 // 6, (14 * 50 - 8) // 8), "one window kept as room for the offset"
    assert plan.max_offset == 7 and plan.block == 65536 // 8
    assert loader.steps_per_epoch == plan.windows and plan.dropped_samples_per_epoch == 85 - 14 * 6


@pytest.mark.parametrize("mbs,ga,dp", [(2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 2, 1)])
def test_layouts_take_the_same_rows(split, mbs, ga, dp):
    """Micro-batch j = m * dp + r of rank r is micro-batch j of a one-process run with the same global batch."""
    single = make(split, mbs=mbs, ga=ga * dp, seed=7)
    ranks = [make(split, mbs=mbs, ga=ga, rank=r, dp=dp, seed=7) for r in range(dp)]
    for _ in range(single.steps_per_epoch + 3):  # into the next epoch
        want = starts(single)
        got = [starts(r) for r in ranks]
        assert [got[j % dp][j // dp] for j in range(ga * dp)] == want


def test_deterministic_and_seed_dependent(split):
    run = lambda loader: [starts(loader) for _ in range(20)]
    a = run(make(split, seed=3))
    assert a == run(make(split, seed=3))
    assert a != run(make(split, seed=4))


def test_an_epoch_reads_each_sample_once_across_ranks_and_workers(tmp_path, monkeypatch):
    """One shard for 2 ranks x 2 workers and 16 lanes: every read sample is read once, by one (rank, worker)."""
    split = load_split(write_split(tmp_path / "one", 4250, sample_tokens=50, shard_tokens=5000))
    assert len(split.shards) == 1
    reads: Counter = Counter()
    owner: dict = {}
    real_read = ShardCursor.read
    current = {}

    def read(self, index):
        reads[(self.shard, index)] += 1
        owner.setdefault((self.shard, index), set()).add(current["who"])
        return real_read(self, index)

    monkeypatch.setattr(ShardCursor, "read", read)
    loaders = [make(split, mbs=2, ga=4, rank=r, dp=2, seq_len=8) for r in range(2)]
    plan = loaders[0].spec.plans[0]
    streams = {(r, w): produce(loaders[r].spec, np.zeros((1, 16), dtype=np.int64), 0, loaders[r].lanes[w::2])
               for r in range(2) for w in range(2)}  # fmt: skip
    tokens = Counter()
    for _ in range(plan.windows):  # one epoch
        for who, stream in streams.items():
            current["who"] = who
            for row in next(stream)["windows"][0]:  # (steps, lanes, T + 1): one step per item
                tokens.update(row[:-1].tolist())
    assert max(reads.values()) == 1 and all(len(v) == 1 for v in owner.values())
    assert len(reads) == plan.q * 16, "every sample but the epoch's left-out ones"
    assert max(tokens.values()) == 1 and len(tokens) == 16 * plan.windows * 8, "no input token twice in an epoch"
    assert {w for v in owner.values() for w in v} == set(streams), "no (rank, worker) starves"


def test_every_epoch_reshuffles_and_covers_each_lane(split):
    loader = make(split, mbs=2, ga=2, seq_len=8)
    w = loader.steps_per_epoch
    epochs = [[s for _ in range(w) for mb in starts(loader) for s in mb] for _ in range(2)]
    assert loader.epoch == 2 and loader.step_in_epoch == 0
    assert len(set(epochs[0])) == len(epochs[0]) == 4 * w
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != sorted(epochs[1])


def test_workers_give_the_same_batches_as_one_process(split):
    want = make(split, mbs=2, ga=3, seq_len=8)
    got = make(split, mbs=2, ga=3, seq_len=8, workers=2)
    try:
        for _ in range(want.steps_per_epoch + 2):
            assert starts(got) == starts(want)
        assert got.take_stats()["data_wait_s"] >= 0
    finally:
        got.close()


def test_resume_continues_exactly_under_any_layout(split):
    straight = make(split, mbs=2, ga=2, seed=11)
    want = [starts(straight) for _ in range(45)]  # crosses an epoch
    first = make(split, mbs=2, ga=2, seed=11)
    for _ in range(30):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    assert state["step"] == 30 and state == first.state_dict()
    resumed = make(split, mbs=2, ga=2, seed=11)
    resumed.load_state_dict(state)
    assert [starts(resumed) for _ in range(15)] == want[30:]
    # Another dp / worker count with the same global batch: the same rows in the same micro-batch slots.
    pair = [make(split, mbs=1, ga=2, rank=r, dp=2, seed=11, workers=r) for r in range(2)]
    for p in pair:
        p.load_state_dict(state)
    for step in range(30, 45):
        got = [starts(p) for p in pair]
        assert [got[j % 2][j // 2] for j in range(4)] == [[s] for mb in want[step] for s in mb]
    pair[1].close()


def test_resume_with_other_sizes_or_data_is_an_error(split, tmp_path):
    state = make(split, mbs=2, ga=2).state_dict()
    with pytest.raises(MegalmError, match="saved global_batch_size is 4, now 6"):
        make(split, mbs=3, ga=2).load_state_dict(state)
    with pytest.raises(MegalmError, match="saved seq_len is 8, now 4"):
        make(split, mbs=2, ga=2, seq_len=4).load_state_dict(state)
    other = load_split(write_split(tmp_path / "other", 4200, sample_tokens=50, shard_tokens=500))
    with pytest.raises(MegalmError, match="training data or blend weights changed"):
        make(other, mbs=2, ga=2).load_state_dict(state)
    with pytest.raises(MegalmError, match="format version None"):
        make(split).load_state_dict({"epoch": 0, "step_in_epoch": 3})


def test_shard_patterns_as_a_split_path_get_a_hint(split):
    with pytest.raises(MegalmError, match=r"looks like shard files: .*data.train=\[\{path: DIR, shards: "):
        load_split(split.path + "/shard-*.tar")


def test_too_little_data_is_an_error(split, tmp_path):
    with pytest.raises(MegalmError, match=r"85 samples, fewer than the 96 sequences of a global batch"):
        make(split, mbs=4, ga=12, dp=2)
    with pytest.raises(MegalmError, match=r"gets 2 samples, at least 100 tokens, fewer than one window of"):
        make(split, mbs=8, ga=5, seq_len=128)
    with pytest.raises(MegalmError, match="dp_rank 2 is outside"):
        make(split, rank=2, dp=2)
    with pytest.raises(MegalmError, match="data.on_error must be one of"):
        make(split, on_error="ignore")


def test_more_workers_than_lanes_are_capped(split):
    loader = make(split, mbs=1, ga=2, workers=8)
    assert loader.num_workers == 2


def test_worker_errors_arrive_as_one_message(split, monkeypatch):
    def boom(self, epoch, position):
        raise MegalmError("shard X: member Y: broken")

    monkeypatch.setattr(loader_mod.LaneReader, "window", boom)
    with pytest.raises(MegalmError, match=r"^shard X: member Y: broken$"):
        make(split).next_step()


def test_mixer_single_source_and_spec_pickles(split):
    import pickle

    loader = make(split)
    spec = pickle.loads(pickle.dumps(loader.spec))
    assert isinstance(spec, LoaderSpec) and spec.plans[0].windows == loader.spec.plans[0].windows
    m = Mixer([1.0], 4, 0)
    assert m.assign(3).tolist() == [0, 0, 0, 0]


def test_eval_batches_in_order_split_by_rank(split, tmp_path):
    whole = list(eval_batches(split, seq_len=8, micro_batch_size=4, dp_rank=0, dp_size=1, max_windows=11))
    assert [x[:, 0].tolist() for x, _ in whole] == [[0, 8, 16, 24], [32, 40, 48, 56], [64, 72, 80]]
    assert all(torch.equal(y, x + 1) for x, y in whole), "eval windows run across sample seams"
    ranks = [
        [x[:, 0].tolist() for x, _ in eval_batches(split, seq_len=8, micro_batch_size=2, dp_rank=r, dp_size=3,
                                                   max_windows=8)]
        for r in range(3)
    ]  # fmt: skip
    assert ranks == [[[0, 24], [48]], [[8, 32], [56]], [[16, 40]]]
    n = len(list(eval_batches(split, seq_len=100, micro_batch_size=1, dp_rank=0, dp_size=1, max_windows=None)))
    assert n == (4250 - 1) // 100
    tiny = load_split(write_split(tmp_path / "tiny", 8))
    with pytest.raises(MegalmError, match="too few for one window"):
        eval_batches(tiny, seq_len=8, micro_batch_size=1, dp_rank=0, dp_size=1, max_windows=None)

"""Blending: `data.train: [{path, weight}, ...]` mixes sources within one window of the weights, deterministically."""

import numpy as np
import pytest
import yaml

from megalm.config import Layout, load_config
from megalm.data.lanes import Mixer
from megalm.data.loader import Blend, TrainBatches, load_blend
from megalm.errors import MegalmError
from tests.data.shardgen import write_split

B_OFFSET = 1_000_000  # source b's tokens are B_OFFSET + position: a row shows its source


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    a = write_split(root / "a", 6000, sample_tokens=50, shard_tokens=500, vocab_size=2_000_000)
    b = write_split(root / "b", np.arange(B_OFFSET, B_OFFSET + 1600, dtype=np.uint32), sample_tokens=50,
                    shard_tokens=400, vocab_size=2_000_000)  # fmt: skip
    return a, b


def make(blend, *, rank=0, dp=1, ga=4, seed=0):
    layout = Layout(micro_batch_size=2, grad_accum=ga, dp=dp)
    return TrainBatches(blend, seq_len=8, layout=layout, dp_rank=rank, seed=seed)


def rows(loader):
    """Start token of every row of the next step, in micro-batch order (= lane order for dp=1)."""
    return [s for x, _ in loader.next_step() for s in x[:, 0].tolist()]


def test_load_blend_entries_and_errors(dirs, tmp_path):
    a, b = dirs
    single = load_blend(str(a))
    assert len(single.splits) == 1 and single.weights == [1.0]
    blend = load_blend([{"path": str(a), "weight": 7}, {"path": str(b), "weight": 3}])
    assert blend.weights == pytest.approx([0.7, 0.3])
    assert load_blend([str(a), {"path": str(b)}]).weights == [0.5, 0.5]
    for bad, match in [
        ([], "expected a path or a list"),
        ([{"weight": 1}], r"data.train\[0\]: no 'path'"),
        ([{"path": str(a), "wieght": 1}], r"data.train\[0\]: unknown key\(s\) wieght"),
        ([{"path": str(a)}, {"path": str(b), "weight": 0}], r"data.train\[1\].weight: must be a positive number"),
        ([{"path": str(a), "weight": "lots"}], r"data.train\[0\].weight"),
        ([str(a), 3], r"data.train\[1\]: expected \{path: DIR, weight: W\}"),
    ]:
        with pytest.raises(MegalmError, match=match):
            load_blend(bad)
    other = write_split(tmp_path / "c", 3000, sample_tokens=50, shard_tokens=500)
    manifest = (other / "manifest.json").read_text().replace('"type": "bytes"', '"type": "gpt2"')
    (other / "manifest.json").write_text(manifest)
    with pytest.raises(MegalmError, match=r"data.train\[1\]: .* same tokenizer"):
        load_blend([str(a), str(other)])


def test_config_takes_a_path_or_a_blend(dirs, tmp_path):
    a, b = dirs
    path = tmp_path / "c.yaml"
    blend = [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}]
    path.write_text(yaml.safe_dump({"data": {"train": blend}}))
    assert load_config(path).data.train[1] == {"path": str(b), "weight": 0.3}
    assert load_config(path, [f"data.train={a}"]).data.train == str(a)


def test_realised_mixture_is_within_one_window_of_the_weights(dirs):
    blend = load_blend([{"path": str(dirs[0]), "weight": 0.7}, {"path": str(dirs[1]), "weight": 0.3}])
    loader = make(blend)
    g, from_b, history = loader.global_batch_size, 0, []
    for step in range(1, 301):
        r = rows(loader)
        history.append(r)
        from_b += sum(s >= B_OFFSET for s in r)
        assert abs(from_b - 0.3 * g * step) < 1, step  # every step, not just on average
    assert loader.source_fractions() == pytest.approx([0.7, 0.3], abs=1 / (300 * g))
    again = make(blend)
    assert [rows(again) for _ in range(300)] == history, "deterministic"
    assert [rows(make(blend, seed=1)) for _ in range(1)] != history[:1]
    pair = [make(blend, rank=r, dp=2, ga=2) for r in range(2)]
    for step in range(300):  # and the same windows under another layout
        got = [[x[:, 0].tolist() for x, _ in p.next_step()] for p in pair]
        assert [s for j in range(4) for s in got[j % 2][j // 2]] == history[step]


def test_each_source_epoch_reads_each_window_once_per_lane(dirs):
    blend = load_blend([{"path": str(dirs[0]), "weight": 0.6}, {"path": str(dirs[1]), "weight": 0.4}])
    loader = make(blend)
    g, w_b = loader.global_batch_size, loader.spec.plans[1].windows
    lanes_b: list[list[int]] = [[] for _ in range(g)]
    while min(len(seq) for seq in lanes_b) < w_b + 2:  # source b goes round more than once
        for lane, s in enumerate(rows(loader)):
            if s >= B_OFFSET:
                lanes_b[lane].append(s)
    firsts = [s for seq in lanes_b for s in seq[:w_b]]
    assert len(set(firsts)) == len(firsts) == g * w_b, "source b's epoch 0: each planned window once"
    assert loader.epoch >= 0 and loader.steps_per_epoch >= w_b


@pytest.mark.parametrize("seed", range(5))
def test_mixer_bound_for_any_weights(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        k, g = int(rng.integers(2, 6)), int(rng.integers(1, 40))
        m = Mixer(list(rng.random(k) ** 3 + 1e-3), g, seed)
        for step in range(1, 101):
            src = m.assign(step)
            assert np.bincount(src, minlength=k).sum() == g
            m.advance(src)
            assert np.abs(m.counters.sum(axis=1) - m.weights * g * step).max() < 1


def test_blend_state_resumes_and_checks_weights(dirs):
    spec = [{"path": str(dirs[0]), "weight": 0.7}, {"path": str(dirs[1]), "weight": 0.3}]
    straight = make(load_blend(spec))
    want = [rows(straight) for _ in range(40)]
    first = make(load_blend(spec))
    for _ in range(25):
        first.next_step()
    resumed = make(load_blend(spec))
    resumed.load_state_dict(first.state_dict())
    assert [rows(resumed) for _ in range(15)] == want[25:]
    reweighted = make(Blend(load_blend(spec).splits, [0.5, 0.5]))
    with pytest.raises(MegalmError, match="blend weights changed"):
        reweighted.load_state_dict(first.state_dict())

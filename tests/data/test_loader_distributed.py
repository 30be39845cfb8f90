"""The loader in real data-parallel ranks with DataLoader workers: exact resume, and resume under another layout."""

import json
from collections import Counter

import pytest
import torch

from megalm.config import Layout
from megalm.data.loader import TrainBatches, load_split
from tests.data.shardgen import write_split
from tests.distributed import run_distributed

N, M = 7, 9  # steps before and after the interruption
SIZES = {"seq_len": 16, "seed": 5}  # global batch 8: grad_accum 2 x dp 2 x mbs 2


def _rows(batches):
    """Token ids of a step's micro-batches, as lists (x only; y is x shifted)."""
    return [x.tolist() for x, _ in batches]


def _loader(path, rank, dp, workers):
    layout = Layout(micro_batch_size=2, grad_accum=8 // (2 * dp), dp=dp)
    return TrainBatches(load_split(path), layout=layout, dp_rank=rank, num_workers=workers, **SIZES)


def check_resume_two_ranks_two_workers(rank, world_size, path, out):
    import multiprocessing

    import torch.distributed as dist

    # run_distributed's children are daemonic (so a failed test never leaves them behind), and daemonic
    # processes may not start DataLoader workers; ranks started by torchrun or deepspeed are not daemonic.
    multiprocessing.current_process()._config["daemon"] = False

    straight = _loader(path, rank, 2, 2)
    want = [_rows(straight.next_step()) for _ in range(N + M)]
    straight.close()
    first = _loader(path, rank, 2, 2)
    got = [_rows(first.next_step()) for _ in range(N)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    first.close()
    states = [None, None]
    dist.all_gather_object(states, state)
    assert states[0] == states[1], "the loader state is the same on every rank"
    resumed = _loader(path, rank, 2, 2)
    resumed.load_state_dict(state)
    got += [_rows(resumed.next_step()) for _ in range(M)]
    resumed.close()
    assert got == want, "a resumed rank sees exactly the batches of an uninterrupted run"
    one = _loader(path, 0, 1, 0)  # the one-process run of the same global batch
    for step in range(N + M):
        ref = _rows(one.next_step())
        assert [ref[m * 2 + rank] for m in range(2)] == want[step], step
    if rank == 0:
        out.write_text(json.dumps({"state": state, "before": want[:N]}))
    torch.save(got[:N], str(out) + f".rank{rank}")


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """3 shards of 20 samples of 40 tokens: fewer shards than the 4 (rank, worker) slots or the 8 lanes."""
    return write_split(tmp_path_factory.mktemp("dist") / "train", 2400, sample_tokens=40, shard_tokens=800)


@pytest.mark.multiprocess
def test_two_ranks_two_workers_resume_exactly_and_match_one_process(split_dir, tmp_path):
    out = tmp_path / "state.json"
    run_distributed(check_resume_two_ranks_two_workers, 2, split_dir, out)
    # The same checkpoint resumed by one process with 3 workers: the same windows, step by step, and over the
    # epoch no sample read twice or left out (beyond the epoch's planned left-outs).
    saved = json.loads(out.read_text())
    before = [torch.load(str(out) + f".rank{r}") for r in range(2)]
    one = _loader(split_dir, 0, 1, 3)
    one.load_state_dict(saved["state"])
    straight = _loader(split_dir, 0, 1, 0)
    seen = Counter()
    for step in range(N):
        rows = _rows(straight.next_step())
        assert sorted(sum(rows, [])) == sorted(sum(before[0][step] + before[1][step], []))
        seen.update(r[0] for r in sum(rows, []))
    windows = one.steps_per_epoch
    for _ in range(N, windows):
        after = _rows(one.next_step())
        assert after == _rows(straight.next_step())
        seen.update(r[0] for r in sum(after, []))
    one.close()
    assert max(seen.values()) == 1 and len(seen) == 8 * windows, "one epoch: every planned window exactly once"

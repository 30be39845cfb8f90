"""The loader inside a real training run: a blend with a missing shard under data.on_error=skip, one worker."""

import shutil

from tests.helpers import ok, read_metrics, run_pretrain, tiny_config


def test_blend_with_bad_shard_trains_and_reports_skips(dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset / "train", broken)
    (broken / "shard-000000.tar").unlink()  # 20 of its 42 samples
    blend = [{"path": str(dataset / "train"), "weight": 0.5}, {"path": str(broken), "weight": 0.5}]
    config = tiny_config(tmp_path, dataset, data={"train": blend, "on_error": "skip", "num_workers": 1},
                         train={"max_steps": 4, "eval_interval": 0})  # fmt: skip
    result = ok(run_pretrain(config))
    assert "shard-000000.tar listed in the manifest is missing; its samples will be skipped" in result.stderr
    rows = [r for r in read_metrics(tmp_path / "runs" / "tiny") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["data_wait_s"] >= 0 for r in rows)
    skipped = sum(r["skipped_samples"] for r in rows)
    assert skipped > 0 and f"{skipped} bad data samples skipped" in result.stdout
    assert "done: step 4" in result.stdout

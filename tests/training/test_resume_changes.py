"""A resume with a changed config says what differs from the checkpoint, and this run's values take effect."""

from __future__ import annotations

import pytest

from megalm.config import load_config
from megalm.training.engine import lr_at
from tests.helpers import ok, read_metrics, run_pretrain, tiny_config


def test_a_changed_lr_is_named_and_takes_effect_at_the_saved_step(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, train={"max_steps": 4, "eval_interval": 0})
    ok(run_pretrain(config))
    again = ok(run_pretrain(config, "train.max_steps=6", "optim.lr=0.001", "optim.betas=[0.8, 0.9]"))
    assert "the config differs from the checkpoint's, and this run's values take effect" in again.stdout
    for change in ("optim.lr: 0.003 there, 0.001 here", "optim.betas: [0.9, 0.95] there, [0.8, 0.9] here",
                   "train.max_steps: 4 there, 6 here"):  # fmt: skip
        assert change in again.stdout, again.stdout
    cfg = load_config(str(config), ["train.max_steps=6", "optim.lr=0.001"])
    rows = {r["step"]: r for r in read_metrics(tmp_path / "runs" / "tiny") if "lr" in r}
    assert rows[5]["lr"] == pytest.approx(lr_at(5, cfg), rel=1e-12)  # the new base lr, at the saved position
    same = ok(run_pretrain(config, "train.max_steps=7", "optim.lr=0.001", "optim.betas=[0.8, 0.9]"))
    assert "optim.lr" not in same.stdout and "train.max_steps: 6 there, 7 here" in same.stdout


def test_keys_an_older_checkpoint_lacks_are_not_changes():
    from megalm.training.changes import config_changes

    cfg = load_config(None, ["optim.lr=0.001"])
    saved = cfg.to_dict()
    del saved["checkpoint"]["async"]  # a setting that did not exist when the checkpoint was written
    saved["optim"]["lr"] = 0.003
    saved["parallel"]["tp"] = 2  # the layout may differ by design
    assert config_changes(saved, cfg) == ["optim.lr: 0.003 there, 0.001 here"]

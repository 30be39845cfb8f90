"""precision.dtype=fp16: the loss-scale keys reach DeepSpeed's config as DeepSpeed reads them; training is GPU-only."""

import math

import pytest
import torch

from megalm.config import Layout, load_config
from megalm.errors import MegalmError
from megalm.training.engine import check_dtype_supported, deepspeed_config
from tests.helpers import ok, run_pretrain, tiny_config, train_losses

FP16 = ["precision.dtype=fp16", "precision.initial_scale_power=12", "precision.loss_scale_window=200",
        "precision.hysteresis=3", "precision.min_loss_scale=4"]  # fmt: skip


def test_fp16_keys_map_into_the_deepspeed_config():
    ds = deepspeed_config(load_config(None, FP16), Layout())
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12, "loss_scale_window": 200,
                          "hysteresis": 3, "min_loss_scale": 4}  # fmt: skip
    assert ds["bf16"] == {"enabled": False}
    assert not deepspeed_config(load_config(None, []), Layout())["fp16"]["enabled"]
    static = deepspeed_config(load_config(None, [*FP16, "precision.loss_scale=1024"]), Layout())
    assert static["fp16"]["loss_scale"] == 1024.0


def test_deepspeed_reads_the_fp16_block_as_meant():
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig(deepspeed_config(load_config(None, FP16), Layout()))
    fp16 = ds.float16_config
    assert fp16.enabled and not ds.bfloat16_config.enabled
    assert fp16.loss_scale == 0 and fp16.initial_dynamic_scale() == 2**12
    args = fp16.dynamic_loss_scale_args()
    assert sorted(args.values()) == sorted([2**12, 200, 3, False, 4])
    assert (fp16.loss_scale_window, fp16.hysteresis, fp16.min_loss_scale) == (200, 3, 4)


@pytest.mark.parametrize(
    "override, key",
    [("precision.loss_scale=-1", "precision.loss_scale"), ("precision.initial_scale_power=70", "initial_scale_power"),
     ("precision.loss_scale_window=0", "precision.loss_scale_window"), ("precision.hysteresis=0", "hysteresis"),
     ("precision.min_loss_scale=0.5", "precision.min_loss_scale")],
)  # fmt: skip
def test_bad_loss_scale_keys_are_named(override, key):
    with pytest.raises(MegalmError, match=key):
        load_config(None, ["precision.dtype=fp16", override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU accelerator's refusal")
def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(MegalmError, match="precision.dtype=fp16 is not supported on the cpu accelerator"):
        check_dtype_supported(load_config(None, FP16))
    check_dtype_supported(load_config(None, ["precision.dtype=bf16"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs a CUDA GPU (DeepSpeed's CPU "
                                                          "accelerator does not support fp16)")  # fmt: skip
def test_fp16_training_tracks_fp32(dataset, tmp_path):
    config = tiny_config(tmp_path, dataset, train={"eval_interval": 0, "max_steps": 10})
    ok(run_pretrain(config, f"train.run_dir={tmp_path / 'fp32'}"))
    ok(run_pretrain(config, f"train.run_dir={tmp_path / 'fp16'}", *FP16))
    ref, got = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "fp16")
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert math.isfinite(got[step]) and got[step] == pytest.approx(loss, rel=2e-2), (step, loss, got[step])

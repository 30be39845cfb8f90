import pytest

from megalm.config import Config, Layout, load_config, parse_overrides
from megalm.errors import MegalmError
from megalm.training.engine import deepspeed_config, lr_at


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_fill_typed_fields(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: 3\noptim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n")
    cfg = load_config(p, ["train.max_steps=7", "model.dropout=0.1", "data.val=null"])
    assert cfg.model.n_layer == 3 and cfg.train.max_steps == 7
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.dropout == 0.1 and cfg.data.val is None
    assert cfg.name == "run" and cfg.run_dir.as_posix() == "runs/run"


@pytest.mark.parametrize(
    "yaml_text, overrides, expected",
    [
        ("model:\n  n_heads: 4\n", [], "unknown key 'model.n_heads'; did you mean 'model.n_head'?"),
        ("trian:\n  max_steps: 4\n", [], "unknown key 'trian'; did you mean 'train'?"),
        ("", ["train.max_steps=ten"], "train.max_steps: expected int, got str 'ten'"),
        ("", ["model.n_head=3"], "model.n_head: 3 does not divide model.d_model=128"),
        ("", ["model.n_kv_head=3"], "model.n_kv_head: 3 must be positive and divide model.n_head=4"),
        ("", ["model.family=bert"], "model.family: 'bert' is not one of gpt2 | llama"),
        ("", ["optim.min_lr=1.0"], "need 0 <= min_lr <= lr"),
        ("", ["train.global_batch_size=12", "train.micro_batch_size=8"], "not a multiple of"),
        ("", ["zero.stage=4"], "zero.stage: must be 0, 1, 2 or 3"),
        ("", ["parallel.pp=2", "zero.stage=2"], "pipeline engine supports ZeRO stage 0 or 1 only"),
        ("", ["parallel.pp=9"], "9 stages for 8 layers"),
        ("", ["parallel.tp=3"], "model.n_head: 4 is not divisible by parallel.tp=3"),
        ("", ["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
        ("model: 3\n", [], "model: expected a mapping"),
    ],
)
def test_bad_config_names_the_key_and_file(tmp_path, yaml_text, overrides, expected):
    p = write(tmp_path, yaml_text)
    with pytest.raises(MegalmError) as err:
        load_config(p, overrides)
    assert expected in str(err.value)
    assert str(p) in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MegalmError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(MegalmError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))


def test_bad_override_syntax():
    with pytest.raises(MegalmError, match="expected section.key=value"):
        parse_overrides(["train.max_steps"])


def test_world_size_checks_batch_divisibility():
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 8
    cfg.validate(world_size=2)
    with pytest.raises(MegalmError, match="micro_batch_size\\*dp = 4\\*4"):
        cfg.validate(world_size=4)


def test_deepspeed_config_is_generated_and_expert_block_merged(tmp_path):
    p = write(tmp_path, "train: {micro_batch_size: 2, global_batch_size: 8}\nzero: {stage: 2}\n"
                        "precision: {dtype: bf16}\ndeepspeed: {zero_optimization: {overlap_comm: true}}\n")  # fmt: skip
    cfg = load_config(p)
    ds = deepspeed_config(cfg, cfg.layout(world_size=2))
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


@pytest.mark.parametrize(
    "dtype,stage,pp,given",
    [("bf16", 0, 1, 1), ("bf16", 0, 2, 0), ("bf16", 2, 1, 2), ("fp32", 0, 1, 0), ("fp16", 0, 1, 0)],
)
def test_bf16_at_zero0_without_pipeline_runs_as_zero1(dtype, stage, pp, given):
    """DeepSpeed's ZeRO-0 bf16 path accumulates gradients in bf16 (FP16_UnfusedOptimizer); ZeRO-1 does not."""
    cfg = load_config(None, [f"precision.dtype={dtype}", f"zero.stage={stage}", f"parallel.pp={pp}",
                             "model.n_layer=2"])  # fmt: skip
    assert deepspeed_config(cfg, cfg.layout(world_size=pp))["zero_optimization"]["stage"] == given


def test_zero_knobs_reach_deepspeed_and_offload_is_checked():
    cfg = load_config(None, ["zero.stage=3", "zero.offload_param=cpu", "zero.offload_optimizer=cpu",
                             "zero.overlap_comm=true", "zero.reduce_bucket_size=20000000"])  # fmt: skip
    assert deepspeed_config(cfg, Layout(dp=2))["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
        "overlap_comm": True, "reduce_bucket_size": 20000000,
    }  # fmt: skip
    assert deepspeed_config(load_config(None, []), Layout())["zero_optimization"] == {"stage": 0}, "DeepSpeed defaults"
    with pytest.raises(MegalmError, match="zero.offload_param"):
        load_config(None, ["zero.stage=2", "zero.offload_param=cpu"])
    with pytest.raises(MegalmError, match="zero.reduce_bucket_size"):
        load_config(None, ["zero.stage=1", "zero.reduce_bucket_size=0"])


def test_lr_schedule_warmup_cosine_floor():
    cfg = Config()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.max_steps = 1.0, 0.1, 10, 110
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_every_field_has_a_docstring():
    import dataclasses

    from megalm import config as c

    for cls in (c.ModelConfig, c.ParallelConfig, c.ZeroConfig, c.PrecisionConfig, c.OptimConfig,
                c.DataConfig, c.TrainConfig, c.CheckpointConfig, c.LogConfig, c.Config):  # fmt: skip
        docs = c.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(p)

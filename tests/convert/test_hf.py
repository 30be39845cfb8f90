"""Hugging Face export/import (`megalm convert to-hf` / `from-hf`): logits match transformers both ways, a tp=2 model
loaded from an imported directory gives the same logits, and bad directories end in errors naming the culprit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (bench extra)")

from megalm.cli import main  # noqa: E402
from megalm.config import Config, ModelConfig  # noqa: E402
from megalm.convert.consolidate import load_consolidated  # noqa: E402
from megalm.convert.hf import (  # noqa: E402
    from_hf_state,
    model_config_from_hf,
    read_hf_config,
    read_hf_weights,
    write_hf_dir,
)
from megalm.errors import MegalmError  # noqa: E402
from megalm.model.transformer import GPT  # noqa: E402

LOGITS_ATOL = 1e-4
VOCAB, T = 300, 16  # not a multiple of 128: our embedding pads it, HF must not see the padding; >= bytes (257)

# Our models, exported: GPT-2 as the family defaults; a GPT-2 without biases, untied and with GQA (key/value heads
# repeated on export); Llama with GQA; Llama with MQA, tied embeddings and biases.
OURS = {
    "gpt2": dict(family="gpt2"),
    "gpt2-gqa-untied-nobias": dict(family="gpt2", n_kv_head=2, tie_embeddings=False, bias=False),
    "llama-gqa": dict(family="llama", n_kv_head=2, rope_theta=500.0, norm_eps=1e-6),
    "llama-mqa-tied-bias": dict(family="llama", n_kv_head=1, tie_embeddings=True, bias=True),
}
# Hugging Face models built from a small config with random weights (no download).
THEIRS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=T, activation_function="gelu_new")),
    "llama-gqa": ("LlamaConfig", dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)),
    "llama-mqa-tied": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=T,
                                           tie_word_embeddings=True, rope_theta=5000.0)),
}  # fmt: skip


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights and biases too, so a swapped or missing tensor shows in the logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))


def hf_logits(path: Path) -> tuple[torch.Tensor, torch.nn.Module]:
    """Load `path` with AutoModelForCausalLM (offline), check every tensor was used, return its logits."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"{path}: {problems}"
    with torch.no_grad():
        return model.eval()(ids()).logits, model


def our_logits(cfg: ModelConfig, state: dict) -> torch.Tensor:
    model = GPT(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(ids())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", OURS)
def test_export_matches_transformers_and_imports_back(name, tmp_path, capsys):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=VOCAB, seq_len=T, **OURS[name])
    ours = randomize_(GPT(cfg), seed=1)
    with torch.no_grad():
        want = ours(ids())
    out = write_hf_dir(Config(model=cfg), ours.state_dict(), tmp_path / "hf")
    got, model = hf_logits(out)
    expected_class = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[cfg.family]
    assert type(model).__name__ == expected_class
    assert model.config.vocab_size == VOCAB and model.get_output_embeddings().weight.shape[0] == VOCAB
    export = max_diff(got, want)
    assert export <= LOGITS_ATOL
    # And back: the same logits, and (but for GPT-2's repeated key/value heads) the very same tensors.
    back_cfg = model_config_from_hf(read_hf_config(out))
    back = from_hf_state(back_cfg, read_hf_weights(out))
    back_diff = max_diff(our_logits(back_cfg, back), got)
    assert back_diff <= LOGITS_ATOL
    assert back_cfg.tied == cfg.tied and back_cfg.norm_eps == cfg.norm_eps and back_cfg.rope_theta == cfg.rope_theta
    if back_cfg.kv_heads == cfg.kv_heads:  # a bias-free GPT-2 comes back with zero biases: a superset of keys
        for k, v in ours.state_dict().items():
            if k in ("embed.wte.weight", "head.proj.weight"):  # rows past the vocabulary are padding, never used
                assert not back[k][VOCAB:].any(), k
                back[k], v = back[k][:VOCAB], v[:VOCAB]
            assert torch.equal(back[k], v), k
    with capsys.disabled():
        print(f"\n  to-hf {name}: logits max diff {export:.1e}; back to megalm {back_diff:.1e}", end="")


def build_hf(name: str, path: Path) -> torch.Tensor:
    """A random-weight transformers model saved to `path`; returns its logits."""
    config_class, kw = THEIRS[name]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **kw)
    torch.manual_seed(0)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(config), seed=2)
    model.save_pretrained(path)
    with torch.no_grad():
        return model(ids()).logits


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Each THEIRS model saved once for the module: name -> (directory, logits)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, build_hf(name, root / name)) for name in THEIRS}


@pytest.fixture(scope="module")
def hf_dirs(hf_models) -> dict[str, Path]:
    return {name: path for name, (path, _) in hf_models.items()}


@pytest.mark.parametrize("name", THEIRS)
def test_import_from_transformers_and_export_back(name, hf_models, tmp_path, capsys):
    hf_dir, want = hf_models[name]
    with pytest.raises(SystemExit) as e:
        main(["convert", "from-hf", str(hf_dir), str(tmp_path / "ours")])
    assert e.value.code == 0
    cfg, state = load_consolidated(tmp_path / "ours")
    assert cfg.model.seq_len == T and cfg.model.vocab_size == VOCAB
    if name == "gpt2":  # family defaults stay unset, as in a hand-written config
        assert (cfg.model.n_kv_head, cfg.model.ffn_hidden, cfg.model.bias, cfg.model.tie_embeddings) == (None,) * 4
    imported = max_diff(our_logits(cfg.model, state), want)
    assert imported <= LOGITS_ATOL
    with pytest.raises(SystemExit) as e:
        main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")])
    assert e.value.code == 0
    again, _ = hf_logits(tmp_path / "hf2")
    exported = max_diff(again, want)
    assert exported <= LOGITS_ATOL
    with capsys.disabled():
        print(f"\n  from-hf {name}: logits max diff {imported:.1e}; to-hf again {exported:.1e}", end="")


def test_pytorch_bin_and_sharded_safetensors_import(hf_models, tmp_path):
    """pytorch_model.bin (read with weights_only=True) and a sharded safetensors index import like one file."""
    one, want = hf_models["llama-gqa"]
    state = read_hf_weights(one)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((one / "config.json").read_bytes())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    model = transformers.AutoModelForCausalLM.from_pretrained(one)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for variant in ("bin", "sharded"):
        main_ok(["convert", "from-hf", str(tmp_path / variant), str(tmp_path / f"ours-{variant}")])
        cfg, ours = load_consolidated(tmp_path / f"ours-{variant}")
        assert max_diff(our_logits(cfg.model, ours), want) <= LOGITS_ATOL, variant


def test_bf16_export(tmp_path):
    """--dtype bf16 writes bf16 weights and says so in config.json; the logits move by bf16 rounding only."""
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, d_model=32, vocab_size=VOCAB, seq_len=T)
    ours = randomize_(GPT(cfg), seed=5)
    with torch.no_grad():
        want = ours(ids())
    out = write_hf_dir(Config(model=cfg), ours.state_dict(), tmp_path / "hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in read_hf_weights(out).values())
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ids()).logits
    assert 0 < max_diff(got, want) <= 0.05 * want.abs().max().item()


def test_gpt2_tokenizer_is_exported(tmp_path):
    """data.tokenizer=gpt2 exports GPT-2's vocab.json/merges.txt; the padded vocab_size stays in config.json."""
    m = ModelConfig(family="gpt2", n_layer=1, n_head=2, d_model=16, vocab_size=50304, seq_len=T)
    cfg = Config(model=m)
    cfg.data.tokenizer = "gpt2"
    out = write_hf_dir(cfg, GPT(m).state_dict(), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world").input_ids == [15496, 995] and tok.eos_token_id == 50256
    conf = json.loads((out / "config.json").read_text())
    assert conf["vocab_size"] == 50304 and conf["eos_token_id"] == 50256
    main_ok(["convert", "from-hf", str(out), str(tmp_path / "ours")])  # and back: recognised as GPT-2's tokenizer
    assert load_consolidated(tmp_path / "ours")[0].data.tokenizer == "gpt2"


def test_tokenizer_json_is_exported(tmp_path, capsys):
    """A tokenizer.json tokenizer is copied (AutoTokenizer encodes like ours); one that is gone is skipped, warned."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megalm.data.tokenizer import load_tokenizer

    hf_tok = Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    hf_tok.train_from_iterator(["the king and the queen speak of love"] * 20, trainer)
    hf_tok.save(str(tmp_path / "tok.json"))
    m = ModelConfig(family="llama", n_layer=1, n_head=2, d_model=16, vocab_size=VOCAB, seq_len=T)
    cfg = Config(model=m)
    cfg.data.tokenizer = str(tmp_path / "tok.json")
    out = write_hf_dir(cfg, GPT(m).state_dict(), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(str(tmp_path / "tok.json"))
    assert tok("the king speaks", add_special_tokens=False).input_ids == ours.encode("the king speaks")
    assert tok.eos_token_id == ours.eot_id == json.loads((out / "config.json").read_text())["eos_token_id"]
    (tmp_path / "tok.json").unlink()
    out = write_hf_dir(cfg, GPT(m).state_dict(), tmp_path / "hf2")
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()
    assert "warning: the tokenizer is not exported" in capsys.readouterr().err


def test_megalm_eval_of_imported_model_matches_transformers_loss(hf_models, tmp_path):
    """`megalm eval` on a from-hf directory gives the loss transformers computes over the same windows."""
    hf_dir, _ = hf_models["gpt2"]
    main_ok(["convert", "from-hf", str(hf_dir), str(tmp_path / "ours")])
    text = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 2
    (tmp_path / "text.txt").write_text(text)
    main_ok(["eval", "--checkpoint", str(tmp_path / "ours"), "--data", str(tmp_path / "text.txt"), "--tokenizer",
             "bytes", "--batch-size", "3", "--device", "cpu", "--output", str(tmp_path / "eval.json")])  # fmt: skip
    got = json.loads((tmp_path / "eval.json").read_text())["loss"]
    ids = torch.tensor(list(text.encode()))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    nats, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, T):  # window w feeds [wT, wT+T) and predicts [wT+1, wT+T+1)
            target = ids[start + 1 : start + T + 1]
            logits = model(ids[start : start + len(target)][None]).logits[0]  # (t, V)
            nats += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            n += len(target)
    assert abs(got - nats / n) <= 1e-5 * nats / n, (got, nats / n)


def test_to_hf_from_a_training_checkpoint(one_process_losses, tmp_path):
    """`megalm convert to-hf` reads a run's checkpoint directory (the newest checkpoint) as well."""
    from megalm.convert.consolidate import load_full_state

    config, _ = one_process_losses  # a 6-step tiny GPT-2 run (shared with the launcher tests)
    ckpt = config.parent / "runs" / "tiny" / "checkpoints"
    main_ok(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")])
    cfg, state = load_full_state(ckpt)
    got, _ = hf_logits(tmp_path / "hf")
    assert max_diff(got, our_logits(cfg.model, state)) <= LOGITS_ATOL


@pytest.mark.slow
def test_train_init_from_an_imported_model_and_export_again(dataset, tmp_path):
    """from-hf -> `train.init_from` (one step at a negligible lr) -> to-hf gives back the original model's logits."""
    from tests.helpers import ok, run_pretrain, tiny_config

    config = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(config), seed=4)
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = model(ids()).logits
    main_ok(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")])
    run_config = tiny_config(tmp_path, dataset, name="from_hf", train={"max_steps": 1, "eval_interval": 0})
    ok(run_pretrain(run_config, f"train.init_from={tmp_path / 'ours'}", "optim.lr=1e-12", "optim.min_lr=0"))
    main_ok(["convert", "to-hf", str(tmp_path / "runs" / "from_hf" / "checkpoints"), str(tmp_path / "hf2")])
    got, _ = hf_logits(tmp_path / "hf2")
    assert max_diff(got, want) <= LOGITS_ATOL


def main_ok(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, argv


# --------------------------------------------------------------------------------------------------- tp=2


def check_tp_logits(rank: int, world_size: int, cases: list[tuple[str, torch.Tensor]]) -> None:
    from megalm.convert.reshard import load_into  # what train.init_from uses
    from megalm.parallel import ParallelState

    state = ParallelState(tp=world_size)
    for path, want in cases:
        cfg, full = load_consolidated(path)
        model = GPT(cfg.model, state).eval()
        load_into(model, full, cfg.model.n_layer, pipeline=False)
        with torch.no_grad():
            diff = max_diff(model(ids()), want)
        assert diff <= LOGITS_ATOL, f"{path} at tp={world_size}: logits differ by {diff:.2e}"


@pytest.mark.multiprocess
def test_imported_model_at_tp2_gives_transformers_logits(hf_models, tmp_path):
    from tests.distributed import run_distributed

    cases = []
    for name in ("gpt2", "llama-gqa"):  # the MQA model's single key/value head cannot be split
        hf_dir, want = hf_models[name]
        main_ok(["convert", "from-hf", str(hf_dir), str(tmp_path / f"ours-{name}")])
        cases.append((str(tmp_path / f"ours-{name}"), want))
    run_distributed(check_tp_logits, 2, cases, timeout=120)


# --------------------------------------------------------------------------------------------------- bad input


def copy_dir(src: Path, dst: Path, config_edits: dict | None = None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config_edits:
        conf = json.loads((dst / "config.json").read_text())
        conf.update(config_edits)
        (dst / "config.json").write_text(json.dumps(conf))
    return dst


BAD_CONFIGS = [
    ("llama-gqa", {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "architectures"),
    ("llama-gqa", {"architectures": ["LlamaModel"]}, "LlamaModel"),
    ("llama-gqa", {"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ("gpt2", {"model_type": None}, "model_type"),
    ("llama-gqa", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama-gqa", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
    ("llama-gqa", {"sliding_window": 8}, "sliding_window"),
    ("llama-gqa", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama-gqa", {"attention_bias": True}, "attention_bias"),
    ("llama-gqa", {"head_dim": 16}, "head_dim"),
    ("llama-gqa", {"num_key_value_heads": 3}, "n_kv_head"),
    ("gpt2", {"activation_function": "gelu"}, "activation_function"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
]


@pytest.mark.parametrize(("base", "edits", "culprit"), BAD_CONFIGS, ids=[c for _, _, c in BAD_CONFIGS])
def test_unsupported_config_is_refused_naming_the_field(hf_dirs, tmp_path, capsys, base, edits, culprit):
    bad = copy_dir(hf_dirs[base], tmp_path / "bad", edits)
    with pytest.raises(SystemExit) as e:
        main(["convert", "from-hf", str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and culprit in err, err
    assert not (tmp_path / "out").exists()


def edit_weights(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


BAD_WEIGHTS = {
    "missing": (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight' is missing"),
    "extra": (lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}), "q_proj.bias"),
    "shape": (lambda s: s.update({"model.norm.weight": torch.ones(31)}), "'model.norm.weight' has shape (31,)"),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_bad_weights_are_refused_naming_the_tensor(hf_dirs, tmp_path, case):
    fn, culprit = BAD_WEIGHTS[case]
    bad = copy_dir(hf_dirs["llama-gqa"], tmp_path / "bad")
    edit_weights(bad, fn)
    with pytest.raises(MegalmError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        main_import(bad, tmp_path / "out")


def main_import(hf_dir: Path, out: Path, seq_len: int | None = None) -> Path:
    from megalm.convert.hf import import_hf

    return import_hf(hf_dir, out, seq_len)


class NotATensor:
    pass


def test_bad_directories_are_refused(hf_dirs, tmp_path):
    with pytest.raises(MegalmError, match="does not exist"):
        main_import(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MegalmError, match="has no config.json"):
        main_import(tmp_path / "empty", tmp_path / "out")
    no_weights = copy_dir(hf_dirs["gpt2"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(MegalmError, match="has no model.safetensors or pytorch_model.bin"):
        main_import(no_weights, tmp_path / "out")
    torch.save({"transformer.wte.weight": NotATensor()}, no_weights / "pytorch_model.bin")  # weights_only refuses
    with pytest.raises(MegalmError, match="cannot read weight file .*pytorch_model.bin"):
        main_import(no_weights, tmp_path / "out")
    truncated = copy_dir(hf_dirs["gpt2"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MegalmError, match="cannot read weight file .*model.safetensors"):
        main_import(truncated, tmp_path / "out")
    (truncated / "config.json").write_text("{not json")
    with pytest.raises(MegalmError, match="config.json is not valid JSON"):
        main_import(truncated, tmp_path / "out")
    with pytest.raises(MegalmError, match="longer than the 16 learned positions"):
        main_import(hf_dirs["gpt2"], tmp_path / "out", seq_len=32)
    assert not (tmp_path / "out").exists()


def test_bad_export_arguments(hf_dirs, tmp_path, capsys):
    from megalm.convert.hf import export_hf

    with pytest.raises(MegalmError, match="nowhere"):
        export_hf(tmp_path / "nowhere", tmp_path / "hf")
    main_ok(["convert", "from-hf", str(hf_dirs["gpt2"]), str(tmp_path / "ours"), "--seq-len", "8"])
    assert load_consolidated(tmp_path / "ours")[0].model.seq_len == 8
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "taken")])
    assert e.value.code == 2 and "is not empty" in capsys.readouterr().err
    main_ok(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "taken"), "--force"])
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    with pytest.raises(MegalmError, match="is not empty"):
        main_import(hf_dirs["gpt2"], tmp_path / "taken")
    main_ok(["convert", "from-hf", str(hf_dirs["gpt2"]), str(tmp_path / "taken"), "--force"])
    with pytest.raises(SystemExit) as e:
        main(["convert", "from-hf", str(hf_dirs["gpt2"]), str(tmp_path / "x"), "--seq-len", "0"])
    assert e.value.code == 2 and "--seq-len" in capsys.readouterr().err

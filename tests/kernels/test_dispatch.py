"""Which implementation the public ops pick: Triton on CUDA, Triton on CPU under TRITON_INTERPRET=1,
the torch reference otherwise."""

import importlib

import pytest
import torch

import kernels
from kernels import _utils


def test_cpu_without_interpreter_uses_reference():
    x = torch.zeros(2)
    assert _utils.use_triton(x, env={}) is False
    assert _utils.use_triton(x, env={"TRITON_INTERPRET": "0"}) is False


def test_cpu_with_interpreter_uses_triton():
    assert _utils.INTERPRET_AT_IMPORT, "kernel tests need TRITON_INTERPRET=1 before `kernels` is imported"
    for value in ("1", "true", "ON"):
        assert _utils.use_triton(torch.zeros(2), env={"TRITON_INTERPRET": value}) is True


def test_other_devices_use_reference():
    assert _utils.use_triton(torch.zeros(2, device="meta"), env={"TRITON_INTERPRET": "1"}) is False


def test_interpreter_requested_after_import_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET_AT_IMPORT", False)
    with pytest.raises(RuntimeError, match="before importing kernels"):
        _utils.use_triton(torch.zeros(2), env={"TRITON_INTERPRET": "1"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_uses_triton():
    assert _utils.use_triton(torch.zeros(2, device="cuda"), env={}) is True


def test_public_ops_fall_back_to_reference_when_interpreter_unset(monkeypatch):
    """With TRITON_INTERPRET unset, CPU tensors take the reference: results equal it bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("Triton must not run")

    fa = importlib.import_module("kernels.flash_attention")
    fs = importlib.import_module("kernels.fused_softmax")
    monkeypatch.setattr(fa.FlashAttentionFunction, "apply", boom)
    monkeypatch.setattr(fs.FusedSoftmaxFunction, "apply", boom)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    assert torch.equal(kernels.flash_attention(q, k, v), kernels.flash_attention_reference(q, k, v))
    s = torch.randn(1, 2, 5, 5, generator=g)
    expected = kernels.fused_softmax_reference(s, scale=0.5, causal=True)
    assert torch.equal(kernels.fused_softmax(s, scale=0.5), expected)

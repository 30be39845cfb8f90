"""model.compile: torch.compile each Transformer block in place.

    model = build_model(cfg, layout, state)
    if cfg.model.compile:
        model = compile_model(model, cfg, layout)      # refuses what cannot work, with a MegalmError

Every `Block` of the model (a GPT, or this rank's stage of the pipeline module) is compiled with
``nn.Module.compile()``: the module stays where it is, so parameter names, state_dict keys, checkpoints, the
Hugging Face conversion and DeepSpeed's hooks and parameter groups see exactly the eager model. The blocks share
one compiled graph (same code, same shapes), so compiling costs about one block, paid lazily in the first step
(forward at the first call, backward at the first backward); `compile_seconds()` reads that time back.

What the compiled blocks contain:
- TP and SP collectives (megalm.parallel.mappings) are autograd Functions around torch.distributed calls. Dynamo
  traces plain TP's all-reduces into the graph (as functional collectives: one graph per block, no break); SP's
  list-based all-gather and reduce-scatter break the graph and run eagerly. Either way the same collectives run.
- Selective recomputation (torch.utils.checkpoint inside the block) runs eagerly inside the compiled block; full
  recomputation wraps the compiled blocks from outside (GPT.forward and the pipeline's RecomputeSegment), so the
  RNG-rewinding checkpoint is untouched.
- DeepSpeed ZeRO 0-2 act on gradients after the blocks' backward. ZeRO-3 gathers parameters in module hooks that
  DeepSpeed marks torch.compiler.disable: the block's graph breaks at every linear (correct, little speed-up).
- The pipeline engine calls the same (compiled) Block modules; its RecomputeSegment wraps them from outside.
- model.kernels=triton and model.attention=flash reach the Triton kernels through kernels.custom_ops (torch.library
  custom ops), which compile keeps as opaque nodes instead of breaking the graph at each launch.
- Dropout > 0 trains correctly (masks outside TP regions stay identical across TP ranks: the RNG fork breaks the
  graph), but inductor draws its own masks, so runs with dropout match eager only in distribution.

Refused (check_compile): model.attention=fused_softmax (its kernel is called through an autograd function that is
not a custom op). Flash attention reaches its kernels through kernels.custom_ops, like model.kernels=triton.

The untied head (llama) is compiled with its vocab-parallel loss under model.kernels=torch (model.kernels=triton
fuses it into one kernel already); the tied head's loss (gpt2: TokenEmbedding.loss, a method, not the module's
forward), the embedding and the final norm stay eager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from megalm.errors import MegalmError
from megalm.model.ops import TorchOps

if TYPE_CHECKING:
    from megalm.config import Config, Layout

BACKEND = "inductor"
"""torch.compile's backend (inductor: Triton on GPU, C++/OpenMP on CPU, which needs a C++ compiler)."""


def compile_problems(cfg: Config, layout: Layout) -> list[str]:
    """Why model.compile cannot run with this config and layout (empty when it can), one sentence each."""
    attention = cfg.model.attention
    if attention == "auto":  # as attention_core resolves it
        attention = "flash" if torch.cuda.is_available() else "sdpa"
    if attention == "fused_softmax":
        return [
            f"model.attention={attention} launches Triton kernels from an autograd function that torch.compile "
            f"cannot trace (it is not a kernels.custom_ops op); use model.attention=sdpa or eager"
        ]
    return []


def check_compile(cfg: Config, layout: Layout) -> None:
    """Raise a MegalmError naming every setting that model.compile=true cannot run with (a no-op when it is off)."""
    if not cfg.model.compile:
        return
    problems = compile_problems(cfg, layout)
    if problems:
        raise MegalmError(f"model.compile=true cannot run with this configuration ({cfg.source}): "
                          f"{'; '.join(problems)}. Change that, or set model.compile=false")  # fmt: skip


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of a GPT or of a pipeline stage, in order."""
    from megalm.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def compile_model(model: nn.Module, cfg: Config, layout: Layout, *, backend: str | None = None) -> nn.Module:
    """Compile every Transformer block of `model` in place (nn.Module.compile: names and state_dict unchanged), and
    the untied head with its loss under model.kernels=torch; returns `model`. Refuses (MegalmError) what
    check_compile refuses. `backend` defaults to BACKEND."""
    from megalm.model.transformer import Head

    check_compile(cfg, layout)
    heads = [m for m in model.modules() if isinstance(m, Head) and m.ops is TorchOps]  # triton: one fused kernel
    for module in blocks_of(model) + heads:
        module.compile(backend=backend or BACKEND)
    return model


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo and the backend, forward and backward graphs)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(times) for name, times in compilation_time_metrics.items() if name in _COMPILE_PHASES)


_COMPILE_PHASES = ("_compile.compile_inner", "backward._backward_impl")  # forward; lazy backward

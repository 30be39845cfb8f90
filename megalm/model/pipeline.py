"""The model as a list of DeepSpeed LayerSpecs for the pipeline engine (parallel.pp > 1).

The stages are built from the same layer classes as `GPT`, each seeded with `layer_seed(seed, index)`, so a model
split into pipeline stages starts from exactly the weights of the unsplit model, in any (tp, pp) layout:

    0 TokenEmbedding | 1 Positions | 2..L+1 Block | L+2 Norm | L+3 Head, or the tied TokenEmbedding.logits

Tied models (gpt2) repeat the token embedding on the last stage as a TiedLayerSpec; DeepSpeed copies its weight
from the first stage at start and sums the two stages' gradients of `wte.weight` every step.
"""

from __future__ import annotations

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from megalm.config import Config, Layout
from megalm.model.context import ParallelContext
from megalm.model.transformer import Block, Head, Norm, Positions, TokenEmbedding, layer_seed, lm_loss
from megalm.parallel import ParallelState, recompute_in_backward


def _tied_logits(embedding: TokenEmbedding, x):
    return embedding.logits(x)


class PipelineLoss:
    """loss_fn(local_logits, labels) for the last stage: the vocab-parallel cross-entropy."""

    def __init__(self, par: ParallelContext):
        self.par = par

    def __call__(self, local_logits, labels):
        return lm_loss(local_logits, labels, self.par)


class RecomputeSegment:
    """The pipeline's activation_checkpoint_func: torch's non-reentrant checkpoint, replaying dropout masks of the
    default generators and of the TP stream (DeepSpeed's own checkpoint does not know megalm's RNG tracker)."""

    def __init__(self, state: ParallelState):
        self.state = state

    def __call__(self, fn, *inputs):
        return recompute_in_backward(fn, *inputs, rng=self.state.rng)


def layer_specs(par: ParallelContext, seed: int) -> list[LayerSpec]:
    """The model's layers in order, as specs that the pipeline engine builds on the stage owning them."""
    L = par.cfg.n_layer
    if par.cfg.tied:
        first = TiedLayerSpec("embed", TokenEmbedding, par, layer_seed(seed, 0), tied_weight_attr="wte.weight")
        last = TiedLayerSpec("embed", TokenEmbedding, par, layer_seed(seed, 0), forward_fn=_tied_logits,
                             tied_weight_attr="wte.weight")  # fmt: skip
    else:
        first = LayerSpec(TokenEmbedding, par, layer_seed(seed, 0))
        last = LayerSpec(Head, par, layer_seed(seed, L + 3))
    blocks = [LayerSpec(Block, par, layer_seed(seed, 2 + i)) for i in range(L)]
    return [first, LayerSpec(Positions, par, layer_seed(seed, 1)), *blocks, LayerSpec(Norm, par), last]


def build_pipeline(cfg: Config, layout: Layout, state: ParallelState) -> PipelineModule:
    """The PipelineModule for layout.pp stages over `state`'s topology (tp fastest, then dp, then pp)."""
    par = ParallelContext(cfg.model, state, sequence_parallel=layout.sequence_parallel,
                          recompute=cfg.parallel.recompute)  # fmt: skip
    return PipelineModule(
        layers=layer_specs(par, cfg.train.seed),
        loss_fn=PipelineLoss(par),
        topology=state.topology(),
        partition_method=cfg.parallel.partition,
        activation_checkpoint_interval=cfg.parallel.recompute_interval,  # recompute=full, or the interval alone
        activation_checkpoint_func=RecomputeSegment(state),
        checkpointable_layers=["Block"],  # recompute Transformer blocks only (the embedding takes integer ids)
    )

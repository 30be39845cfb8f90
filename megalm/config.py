"""Typed run configuration: dataclasses filled from YAML plus `section.key=value` overrides.

Every field has a one-line docstring (the string literal under it); `megalm train --print-config` shows the
resolved values. Errors name the key and the file and suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megalm.errors import MegalmError


@dataclass
class ModelConfig:
    family: Literal["gpt2", "llama"] = "gpt2"
    """gpt2: LayerNorm, GELU, learned positions, tied embeddings, biases; llama: RMSNorm, SwiGLU, RoPE, GQA."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Number of query heads."""
    n_kv_head: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_head (multi-head attention)."""
    d_model: int = 128
    """Hidden size."""
    ffn_hidden: int | None = None
    """MLP hidden size; None means 4*d_model (gpt2) or 2/3*4*d_model rounded up to a multiple of 64 (llama)."""
    vocab_size: int = 50304
    """Vocabulary (>= the tokenizer's); the embedding is padded to a multiple of 128*tp rows, never predicted."""
    seq_len: int = 256
    """Context length in tokens (also the training window length)."""
    attention: Literal["auto", "flash", "fused_softmax", "sdpa", "eager"] = "auto"
    """Attention path; auto means flash (Triton) on CUDA and sdpa elsewhere."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Norms, RoPE and SwiGLU: megalm's fused Triton kernels (triton) or eager torch ops; auto: triton on CUDA."""
    compile: bool = False
    """torch.compile each Transformer block (megalm.model.compile); the first step's log line says how long."""
    dropout: float = 0.0
    """Dropout probability on attention probabilities and residual branches."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    tie_embeddings: bool | None = None
    """Share the input embedding and output head; None means the family default (gpt2 yes, llama no)."""
    bias: bool | None = None
    """Biases in linears and norms; None means the family default (gpt2 yes, llama no)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init; residual projections get init_std/sqrt(2*n_layer)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.family == "gpt2":
            return 4 * self.d_model
        return -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def tied(self) -> bool:
        return self.family == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def use_bias(self) -> bool:
        return self.family == "gpt2" if self.bias is None else self.bias


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: heads, MLP columns and the vocabulary are split across tp ranks (inside a node)."""
    pp: int = 1
    """Pipeline stages (DeepSpeed's pipeline engine, 1F1B); dp is world_size / (tp * pp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside TP regions (needs tp > 1)."""
    micro_batches: int | None = None
    """Pipeline micro-batches per step and data-parallel rank; must equal global/(micro*dp) when set."""
    partition: str = "parameters"
    """How layers are split into pipeline stages: parameters (balance parameter counts), uniform, or
    type:Block (balance the Transformer blocks)."""
    activation_checkpoint_interval: int = 0
    """Full recomputation every this many Transformer blocks (0: recompute none, or every block with recompute=full)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation in backward: none; full (whole blocks, every activation_checkpoint_interval); or
    selective (only the attention core, whose (B, nh, T, T) scores dominate activation memory)."""

    @property
    def recompute_interval(self) -> int:
        """Blocks per fully recomputed segment; 0 when blocks are not recomputed as a whole."""
        if self.recompute == "full" or (self.recompute == "none" and self.activation_checkpoint_interval > 0):
            return max(1, self.activation_checkpoint_interval)
        return 0


@dataclass
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (shard optimizer state, +gradients, +parameters across data-parallel ranks)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state in CPU memory (ZeRO stage >= 1)."""
    offload_param: Literal["none", "cpu"] = "none"
    """Keep the parameter partitions in CPU memory between uses (ZeRO stage 3)."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with the backward pass (ZeRO >= 1); None keeps DeepSpeed's default."""
    contiguous_gradients: bool | None = None
    """Copy gradients into one contiguous buffer as they are produced (ZeRO >= 1); None: DeepSpeed's default."""
    reduce_bucket_size: int | None = None
    """Elements reduced at once (ZeRO >= 1): larger is faster, smaller holds less memory; None: DeepSpeed's 5e8."""


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype; bf16/fp16 keep fp32 master weights. fp16 needs a GPU."""
    loss_scale: float = 0.0
    """fp16 static loss scale; 0 means dynamic loss scaling."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the scale halves."""
    min_loss_scale: float = 1.0
    """fp16: lowest dynamic loss scale (a whole number >= 1, as DeepSpeed requires)."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""
    decay_steps: int | None = None
    """Step at which the cosine reaches min_lr; None means train.max_steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay of 2-D weights (linears, embeddings); never applied to norms or biases."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class DataConfig:
    train: str | list[dict] = "data/shakespeare/train"
    """Training shards from `megalm prepare`: a split directory, or a blend [{path: DIR, weight: W, shards: URLS}]."""
    val: str | None = "data/shakespeare/val"
    """Held-out shards for evaluation; None disables evaluation."""
    tokenizer: str | None = None
    """Expected tokenizer name; checked against the shards' manifest when set."""
    num_workers: int = 0
    """DataLoader worker processes per rank reading shards (0: read in the training process)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad shards or samples: stop with an error naming them, or skip them (counted in metrics and the summary)."""
    verify: bool = False
    """Check every shard's sha256 against its manifest before training (reads all the data once, split across
    ranks); off, loading checks each shard's size, its tar headers and every sample's length and token range."""


@dataclass
class TrainConfig:
    run_dir: str | None = None
    """Run directory for config.yaml, metrics.jsonl, TensorBoard events and checkpoints; None: runs/<config>."""
    max_steps: int = 200
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on each data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks; gradient accumulation = global / (micro * dp)."""
    seed: int = 1234
    """Seed of parameters init, data order and dropout."""
    resume: str = "auto"
    """auto: the newest valid checkpoint in checkpoint.dir (damaged ones skipped with a warning; none: start
    fresh); none: start fresh; or a checkpoint or checkpoint directory."""
    init_from: str | None = None
    """Start from these weights in this run's layout (a consolidated directory, or a checkpoint of any layout);
    step, optimizer and data loader start fresh. A checkpoint that train.resume finds takes precedence."""
    log_interval: int = 10
    """Steps between metrics.jsonl rows and progress lines."""
    eval_interval: int = 100
    """Steps between evaluations on data.val (also after the last step); 0 disables."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait (a rank died or hangs) before the run fails, naming the rank that stopped."""
    eval_iters: int = 50
    """Evaluation reads the first eval_iters * global_batch_size windows of data.val (the same for any layout)."""
    signal_check_interval: int = 10
    """Steps between the ranks' agreement on stop signals (SIGTERM/SIGUSR1): a signal ends the run, with a
    checkpoint, at the next multiple of this (or the last step); each agreement waits for the device once."""
    sync_debug: Literal["off", "warn", "error"] = "off"
    """CUDA only: torch.cuda.set_sync_debug_mode around the training steps after the first: warn or raise on
    every host-device sync inside a step (a debugging aid; the metrics rows and signal checks are outside)."""


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint directory; None means <run_dir>/checkpoints."""
    interval: int = 0
    """Steps between checkpoints; 0 means only at the end of training."""
    keep_last: int = 2
    """How many recent checkpoints to keep; 0 keeps all."""
    at_end: bool = True
    """Save after the last step; false for throughput runs (a stop signal still saves, so no progress is lost)."""
    async_: bool = False
    """`checkpoint.async`: interval saves snapshot the state into host memory and write it in the background while
    training goes on (one copy of the state per rank in host memory; at most one save in flight)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars to <run_dir>/tensorboard when tensorboard is installed."""
    wandb: bool = False
    """Log the metrics rows to Weights & Biases (needs `pip install wandb`); offline unless an API key is set."""
    wandb_project: str = "megalm"
    """Weights & Biases project; the run is named after the config and resumes with the run directory."""
    peak_tflops: float | None = None
    """Peak FLOP/s (in TFLOP/s) per device that MFU divides by; None: looked up from the device name."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress display on rank 0: a bar on a terminal, plain lines otherwise."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Transformer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline layout; data parallelism fills the rest of the world."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO sharding."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Mixed precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation shards."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, batch sizes and run directory."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Expert settings merged last into the generated DeepSpeed config."""
    name: str = "default"
    """Run name (runs/<name> by default): the config file's name, unless the file sets `name:` itself."""
    source: str = "<defaults>"
    """Where this config came from (file and overrides), for error messages."""

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.name}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml in the run directory holds)."""
        d = _keys_of(dataclasses.asdict(self))
        d["optim"]["betas"] = list(d["optim"]["betas"])
        d.pop("source")
        return d

    def validate(self, world_size: int | None = None) -> None:
        """Check values that depend on each other; world_size adds the layout checks of `layout`."""
        _validate_model(self)
        _validate_parallel(self)
        _validate_precision(self)
        _validate_optim_and_batch(self)
        _validate_deepspeed(self)
        if world_size is not None:
            self.layout(world_size)

    def layout(self, world_size: int) -> Layout:
        """The run's parallel layout for `world_size` processes (MegalmError naming the key when it cannot be)."""
        return Layout.resolve(self, world_size)


@dataclass(frozen=True)
class Layout:
    """The parallel layout of a run, resolved once from the config and the world size (`Config.layout`).

    Every value derived from the layout lives here: validate(), the engine, the loader, the loop, describe and
    checkpoints read it and never recompute it. Rank order (ParallelState): tp fastest, then dp, then pp.
    """

    tp: int = 1
    """Tensor-parallel ranks."""
    pp: int = 1
    """Pipeline stages."""
    dp: int = 1
    """Data-parallel ranks: world_size / (tp * pp)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on each data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each data-parallel rank (the pipeline's micro-batches at pp > 1)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group (only ever True at tp > 1)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch_size * self.grad_accum * self.dp

    @property
    def pipeline(self) -> bool:
        """Whether DeepSpeed's pipeline engine runs the model (pp > 1)."""
        return self.pp > 1

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step and data-parallel rank (= grad_accum)."""
        return self.grad_accum

    @classmethod
    def resolve(cls, cfg: Config, world_size: int) -> Layout:
        """Check `cfg`'s batch sizes and parallel sizes against `world_size` and derive dp and grad_accum."""
        p, t = cfg.parallel, cfg.train
        if world_size < 1 or world_size % (p.tp * p.pp):
            _fail(cfg, "parallel", f"tp*pp={p.tp * p.pp} does not divide the world size {world_size}")
        dp = world_size // (p.tp * p.pp)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            _fail(cfg, "train.global_batch_size",
                  f"{t.global_batch_size} is not a multiple of micro_batch_size*dp = "
                  f"{t.micro_batch_size}*{dp}; change one of them or the number of processes")  # fmt: skip
        accum = t.global_batch_size // per_step
        if p.micro_batches is not None and p.micro_batches != accum:
            msg = f"{p.micro_batches}, but global/(micro*dp) = {accum} micro-batches per step"
            _fail(cfg, "parallel.micro_batches", f"{msg}; leave it unset or change train.global_batch_size")
        return cls(tp=p.tp, pp=p.pp, dp=dp, micro_batch_size=t.micro_batch_size, grad_accum=accum,
                   sequence_parallel=p.sequence_parallel)  # fmt: skip


def _fail(cfg: Config, key: str, msg: str) -> typing.NoReturn:
    raise MegalmError(f"config error in {cfg.source}: {key}: {msg}")


_ZERO_MEANS = {"checkpoint.interval": "only at the end", "checkpoint.keep_last": "keep all",
               "train.eval_interval": "only at the end", "optim.decay_steps": "train.max_steps",
               "optim.grad_clip": "no clipping", "data.num_workers": "load in the training process"}  # fmt: skip


def _validate_model(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.d_model": m.d_model,
        "model.vocab_size": m.vocab_size, "model.seq_len": m.seq_len, "train.max_steps": t.max_steps,
        "train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
        "parallel.tp": cfg.parallel.tp, "parallel.pp": cfg.parallel.pp, "train.log_interval": t.log_interval,
        "train.signal_check_interval": t.signal_check_interval,
    }  # fmt: skip
    for key, value in positive.items():
        if value <= 0:
            _fail(cfg, key, f"must be positive, got {value}")
    c, o = cfg.checkpoint, cfg.optim
    non_negative = {
        "checkpoint.interval": c.interval, "checkpoint.keep_last": c.keep_last, "train.eval_interval": t.eval_interval,
        "train.eval_iters": t.eval_iters, "data.num_workers": cfg.data.num_workers, "optim.decay_steps": o.decay_steps,
        "optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip, "optim.eps": o.eps,
    }  # fmt: skip
    for key, value in non_negative.items():
        if value is not None and value < 0:
            zero = f" (0: {_ZERO_MEANS[key]})" if key in _ZERO_MEANS else ""
            _fail(cfg, key, f"must be >= 0{zero}, got {value}")
    if t.collective_timeout_s <= 0:
        _fail(cfg, "train.collective_timeout_s", f"must be positive (seconds), got {t.collective_timeout_s}")
    if m.init_std <= 0:
        _fail(cfg, "model.init_std", f"must be positive, got {m.init_std}")
    if m.d_model % m.n_head:
        _fail(cfg, "model.n_head", f"{m.n_head} does not divide model.d_model={m.d_model}")
    if m.n_kv_head is not None and (m.n_kv_head <= 0 or m.n_head % m.n_kv_head):
        _fail(cfg, "model.n_kv_head", f"{m.n_kv_head} must be positive and divide model.n_head={m.n_head}")
    if m.family == "llama" and m.head_dim % 2:
        _fail(cfg, "model.d_model", f"llama's RoPE needs an even head dim, got {m.head_dim}")
    if not 0.0 <= m.dropout < 1.0:
        _fail(cfg, "model.dropout", f"must be in [0, 1), got {m.dropout}")


def _validate_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if p.pp > 1 and cfg.zero.stage > 1:
        why = "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
        _fail(cfg, "zero.stage", f"{cfg.zero.stage} with parallel.pp={p.pp}: {why}; use zero.stage=1 with pipelines")
    if p.pp > m.n_layer + 4:
        _fail(cfg, "parallel.pp", f"{p.pp} stages for {m.n_layer + 4} layers (embedding, positions, blocks, "
                                  "norm, head): use fewer stages")  # fmt: skip
    if p.activation_checkpoint_interval < 0:
        _fail(cfg, "parallel.activation_checkpoint_interval", "must be >= 0")
    if p.recompute == "selective" and p.activation_checkpoint_interval > 0:
        why = "selective recomputes the attention core only; parallel.activation_checkpoint_interval > 0 is full"
        _fail(cfg, "parallel.recompute", f"{why} recomputation: set one of them")
    for key, value in (("model.n_head", m.n_head), ("model.n_kv_head", m.kv_heads), ("model.ffn_hidden", m.ffn_size)):
        if value % p.tp:
            _fail(cfg, key, f"{value} is not divisible by parallel.tp={p.tp}: every tensor-parallel rank needs "
                            "whole heads and an equal share of the MLP")  # fmt: skip
    if p.sequence_parallel and p.tp == 1:
        _fail(cfg, "parallel.sequence_parallel", "needs parallel.tp > 1")
    if p.sequence_parallel and m.seq_len % p.tp:
        _fail(cfg, "parallel.sequence_parallel", f"model.seq_len={m.seq_len} is not divisible by parallel.tp={p.tp}")
    z = cfg.zero
    if z.stage not in (0, 1, 2, 3):
        _fail(cfg, "zero.stage", f"must be 0, 1, 2 or 3, got {z.stage}")
    if z.offload_optimizer == "cpu" and z.stage == 0:
        _fail(cfg, "zero.offload_optimizer", "cpu offload needs zero.stage >= 1")
    if z.offload_param == "cpu" and z.stage != 3:
        _fail(cfg, "zero.offload_param", "parameter offload needs zero.stage=3 (only stage 3 partitions parameters)")
    if z.reduce_bucket_size is not None and z.reduce_bucket_size < 1:
        _fail(cfg, "zero.reduce_bucket_size", f"must be >= 1 element, got {z.reduce_bucket_size}")


def _validate_optim_and_batch(cfg: Config) -> None:
    o, t = cfg.optim, cfg.train
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        _fail(cfg, "optim.min_lr", f"need 0 <= min_lr <= lr and lr > 0, got lr={o.lr} min_lr={o.min_lr}")
    if o.warmup_steps < 0:
        _fail(cfg, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if t.global_batch_size % t.micro_batch_size:
        _fail(cfg, "train.global_batch_size",
              f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")  # fmt: skip


def _validate_precision(cfg: Config) -> None:
    """The fp16 loss-scale keys, in the ranges DeepSpeed's dynamic loss scaler accepts."""
    pr = cfg.precision
    if pr.loss_scale < 0:
        _fail(cfg, "precision.loss_scale", f"must be >= 0 (0: dynamic loss scaling), got {pr.loss_scale}")
    if not 0 <= pr.initial_scale_power <= 63:
        _fail(cfg, "precision.initial_scale_power", f"must be in 0..63 (scale 2**power), got {pr.initial_scale_power}")
    for key, value in (("loss_scale_window", pr.loss_scale_window), ("hysteresis", pr.hysteresis)):
        if value < 1:
            _fail(cfg, f"precision.{key}", f"must be >= 1, got {value}")
    if pr.min_loss_scale < 1 or not float(pr.min_loss_scale).is_integer():
        _fail(cfg, "precision.min_loss_scale", f"must be a whole number >= 1 (DeepSpeed), got {pr.min_loss_scale}")


# --------------------------------------------------------------------------- loading


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"duplicate key {key!r} at line {line} (first at line {seen[key] + 1}): the "
                                    f"second would silently replace the first; merge them")  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation = global / (micro x dp))",
    "gradient_clipping": "optim.grad_clip", "bf16": "precision.dtype", "fp16": "precision.dtype and precision.*",
    "optimizer": "optim.* (megalm builds AdamW)", "scheduler": "optim.lr, warmup_steps, decay_steps, min_lr",
    "zero_optimization.stage": "zero.stage", "zero_optimization.offload_optimizer": "zero.offload_optimizer",
    "zero_optimization.offload_param": "zero.offload_param",
}  # fmt: skip
"""DeepSpeed keys megalm sets from its own sections: a `deepspeed:` block may not set them too."""


def _validate_deepspeed(cfg: Config) -> None:
    given = set(cfg.deepspeed) | {f"{k}.{sub}" for k, v in cfg.deepspeed.items() if isinstance(v, dict) for sub in v}
    for key, own in _DEEPSPEED_OWNED.items():
        if key in given:
            _fail(cfg, f"deepspeed.{key}", f"megalm sets this from {own}; set it there instead (two places for one "
                                           f"setting would disagree)")  # fmt: skip


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, src)
            except MegalmError as e:
                errors.append(str(e))
        raise MegalmError(errors[0])
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise MegalmError(f"config error in {src}: {key}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise MegalmError(f"config error in {src}: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MegalmError(f"config error in {src}: {key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and type(value) is not tp:
        raise MegalmError(f"config error in {src}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # YAML's .nan and .inf, or "nan" given on the command line
        raise MegalmError(f"config error in {src}: {key}: {value!r} is not a finite number")
    return value


def _unknown_key(key: str, valid: list[str], src: str) -> MegalmError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1)
    where = f"{prefix}." if prefix else ""
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
    return MegalmError(f"config error in {src}: unknown key '{key}'{hint}")


def _fill(obj: Any, data: dict[str, Any], prefix: str, src: str) -> None:
    """Set fields of dataclass `obj` from `data`, recursing into nested sections."""
    hints = typing.get_type_hints(type(obj))
    names = [_key(f.name) for f in dataclasses.fields(obj) if f.name != "source"]  # `name`: what --print-config writes
    if not isinstance(data, dict):
        raise MegalmError(f"config error in {src}: {prefix.rstrip('.') or 'top level'}: expected a mapping")
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, names, src)
        key = key + "_" if keyword.iskeyword(key) else key  # checkpoint.async is the field async_
        tp = hints[key]
        if _is_dataclass_type(tp):
            _fill(getattr(obj, key), value, f"{full}.", src)
        elif key == "deepspeed":
            obj.deepspeed = _merge(obj.deepspeed, _coerce(value, tp, full, src))
        else:
            setattr(obj, key, _coerce(value, tp, full, src))


def _key(field_name: str) -> str:
    """The config key of a dataclass field: its name, less the '_' that a Python keyword needs (async_ -> async)."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _keys_of(d: Any) -> Any:
    """dataclasses.asdict output with every field name turned into its config key."""
    return {_key(k): _keys_of(v) for k, v in d.items()} if isinstance(d, dict) else d


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge; `extra` wins."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings -> nested dict; values parse as YAML (numbers, booleans, lists, null)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MegalmError(f"bad override '{item}': expected section.key=value, e.g. train.max_steps=100")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Build a Config from a YAML file (or defaults when None) and `key=value` overrides, then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MegalmError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise MegalmError(f"config file {path} is not valid YAML: {e}") from None
        except _DuplicateKey as e:
            raise MegalmError(f"config error in {path}: {e}") from None
        cfg.name, cfg.source = path.stem, str(path)
        _fill(cfg, data, "", str(path))
    if overrides:
        src = f"{cfg.source} + command-line overrides"
        _fill(cfg, parse_overrides(overrides), "", src)
        cfg.source = src
    cfg.validate()
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> its one-line docstring, read from the class source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs

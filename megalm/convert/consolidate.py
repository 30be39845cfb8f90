"""Consolidate a training checkpoint of any layout into one layout-free, fp32 state dict (and back into any layout).

    megalm convert consolidate runs/tiny/checkpoints OUT      # the checkpoint `latest` names, verified
    megalm convert consolidate runs/tiny/checkpoints/step_00000200 OUT

OUT holds `model.safetensors` (full fp32 tensors named exactly like ``GPT(cfg.model).state_dict()`` at tp=1, no
ParallelState: the layout-free names) and `config.yaml` (the run's resolved config with parallel.tp/pp reset to 1).

Where the weights come from, per layout (one process, no torch.distributed; every file read with weights_only=True):

    pp=1                     mp_rank_<tp>_model_states.pt["module"]        one file per tensor-parallel rank
    pp>1                     layer_<i>-model_<tp>-model_states.pt          one file per layer and TP rank
    ZeRO 1/2, or bf16        [bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt: the fp32 master weights, split
                             across data-parallel ranks and located by DeepSpeed's `param_slice_mappings`
    ZeRO 3                   the same files' `fp32_flat_groups`: every parameter split in ceil(numel/dp) pieces, in
                             the order of `param_shapes` (zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt)

where mp = tp_rank at pp=1 and pp_stage * tp + tp_rank at pp>1 (DeepSpeed's model-parallel rank). The fp32 master
weights win over the module's copy when the optimizer holds them (in bf16 the module holds only bf16 weights).
Tensor-parallel shards are then merged by the layer that owns them (column-parallel: rows, block by block for fused
q|k|v and gate|up; row-parallel: columns; vocabulary: rows, with the tp-dependent padding trimmed to tp=1's).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megalm.config import Config, ModelConfig, _fill
from megalm.errors import MegalmError
from megalm.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalm.training import checkpoint

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


@dataclass
class Source:
    """What was read: the checkpoint (or consolidated directory), its step and layout."""

    path: Path
    step: int | None
    layout: str


# --- config <-> dict -----------------------------------------------------------------------------------------------


def config_from_dict(data: dict, source: str) -> Config:
    """A Config from Config.to_dict() output (e.g. a checkpoint's metadata); unknown keys name `source`."""
    data = dict(data)
    name = data.pop("name", None)
    cfg = Config()
    _fill(cfg, data, "", source)
    cfg.name, cfg.source = name or cfg.name, source
    return cfg


def layout_free_config(cfg: Config) -> Config:
    """A copy of cfg with parallel.tp and parallel.pp reset to 1 (what a consolidated directory records)."""
    out = config_from_dict(cfg.to_dict(), cfg.source)
    out.parallel.tp = out.parallel.pp = 1
    return out


# --- the layout-free model --------------------------------------------------------------------------------------------


def skeleton(model_cfg: ModelConfig) -> torch.nn.Module:
    """GPT(model_cfg) at tp=1 on the meta device: the layout-free names, shapes and owning layers, no memory."""
    from megalm.model.transformer import GPT

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # GPT seeds each layer: keep the caller's RNG
        return GPT(model_cfg)


def expected_shapes(model_cfg: ModelConfig) -> dict[str, torch.Size]:
    """The layout-free state dict's keys and shapes."""
    return {k: v.shape for k, v in skeleton(model_cfg).state_dict().items()}


def owners(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Parameter name -> (the module that owns it, its attribute name)."""
    out = {}
    for prefix, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            out[f"{prefix}.{attr}" if prefix else attr] = (module, attr)
    return out


def check_state(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, where: str) -> None:
    """MegalmError unless state_dict has exactly the keys and shapes of GPT(model_cfg) at tp=1."""
    shapes = expected_shapes(model_cfg)
    missing, extra = sorted(set(shapes) - set(state_dict)), sorted(set(state_dict) - set(shapes))
    if missing or extra:
        raise MegalmError(f"{where}: the weights do not match the model config: missing {missing[:5] or 'none'}, "
                          f"unexpected {extra[:5] or 'none'}")  # fmt: skip
    for k, shape in shapes.items():
        if state_dict[k].shape != shape:
            raise MegalmError(f"{where}: {k} has shape {tuple(state_dict[k].shape)}, but the model config "
                              f"({model_cfg.family}, d_model {model_cfg.d_model}) needs {tuple(shape)}")  # fmt: skip


# --- consolidated directories --------------------------------------------------------------------------------------


def save_consolidated(cfg: Config, state_dict: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write OUT/model.safetensors (fp32, contiguous) and OUT/config.yaml (tp/pp reset to 1); returns OUT."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MegalmError(f"output {out} exists and is not a directory")
    check_state(state_dict, cfg.model, f"save_consolidated({out})")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "megalm-consolidated/1"})
    data = layout_free_config(cfg).to_dict()
    data.pop("name", None)  # not a config key: config.yaml stays loadable with load_config()
    (out / CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def is_consolidated(path: Path) -> bool:
    return (path / WEIGHTS).is_file()


def load_consolidated(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config and fp32 state dict of a directory written by save_consolidated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise MegalmError(f"{path} has {WEIGHTS} but no {CONFIG}: not a consolidated megalm directory")
    try:
        data = yaml.safe_load((path / CONFIG).read_text()) or {}
    except yaml.YAMLError as e:
        raise MegalmError(f"{path / CONFIG} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MegalmError(f"{path / CONFIG}: expected a mapping of config sections")
    cfg = config_from_dict(data, str(path / CONFIG))
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise MegalmError(f"cannot read {path / WEIGHTS} (truncated or corrupted?): {e}") from None
    state = {k: v.float() for k, v in state.items()}
    check_state(state, cfg.model, str(path / WEIGHTS))
    return cfg, state


# --- training checkpoints --------------------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """The verified step directory `path` names: itself, or in a checkpoint directory the one `latest` names; when
    that one is damaged, the newest valid one, with a warning naming the damaged files (as train.resume does)."""
    path = Path(path)
    if not path.exists():
        raise MegalmError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise MegalmError(f"checkpoint {path} is not a directory (give a checkpoint.dir or a step_N directory)")
    if (path / checkpoint.MANIFEST).is_file():
        problems = checkpoint.verify(path)
        if problems:
            raise MegalmError(f"checkpoint {path} is damaged: {'; '.join(problems)}; name an older step_N "
                              f"directory instead")  # fmt: skip
        return path
    tags = list(reversed(checkpoint.list_tags(path)))
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not tag or not (path / tag).is_dir():
            raise MegalmError(f"{path / 'latest'} names {tag!r}, which is not a checkpoint in {path}")
        tags = [tag] + [t for t in tags if t != tag]
    if not tags:
        raise MegalmError(f"{path} is neither a megalm checkpoint (no {checkpoint.MANIFEST}, `latest` or step_N "
                          f"directories) nor a consolidated directory (no {WEIGHTS})")  # fmt: skip
    damaged = []
    for tag in tags:
        problems = checkpoint.verify(path / tag)
        if not problems:
            if damaged:
                checkpoint._warn(f"skipping damaged checkpoint(s) {'; '.join(damaged)}: using {path / tag}")
            return path / tag
        damaged.append(f"{path / tag}: {'; '.join(problems)}")
    raise MegalmError(f"no valid checkpoint in {path}: {'; '.join(damaged)}")


def _metadata(step_dir: Path) -> dict:
    file = checkpoint.model_states_file(step_dir, 0)
    if file is None:
        raise MegalmError(f"checkpoint {step_dir}: no mp_rank_00 model states file (not a DeepSpeed checkpoint?)")
    meta = checkpoint.safe_load(file, map_location="cpu", mmap=True).get("megalm")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise MegalmError(f"checkpoint {file} holds no megalm metadata (config): not written by megalm")
    return meta


def _pipeline_prefixes(n_layer: int) -> dict[str, str]:
    """Pipeline layer index (as DeepSpeed names the stage's modules) -> the layout-free name prefix."""
    names = {"0": "embed.", "1": "pos.", str(n_layer + 2): "norm_f.", str(n_layer + 3): "head."}
    names.update({str(2 + i): f"blocks.{i}." for i in range(n_layer)})
    return names


def layout_free_name(name: str, n_layer: int, pipeline: bool) -> str:
    """A parameter name of the pipeline module ('3.attn.qkv.weight', 'tied_modules.embed.wte.weight') or of GPT
    -> its layout-free (GPT) name."""
    if not pipeline:
        return name
    if name.startswith("tied_modules.embed."):
        return "embed." + name[len("tied_modules.embed.") :]
    index, _, rest = name.partition(".")
    prefix = _pipeline_prefixes(n_layer).get(index)
    if prefix is None:
        raise MegalmError(f"unexpected pipeline parameter {name!r} for a {n_layer}-layer model")
    return prefix + rest


def _module_weights(step_dir: Path, cfg: Config, tp_rank: int) -> dict[str, torch.Tensor]:
    """This TP rank's weights as the modules saved them (fp32, or bf16/fp16; empty placeholders under ZeRO-3)."""
    L = cfg.model.n_layer
    if cfg.parallel.pp > 1:
        out = {}
        for index, f in checkpoint.layer_files(step_dir, tp_rank):
            for k, v in checkpoint.safe_load(f, map_location="cpu").items():
                out[layout_free_name(f"{index}.{k}", L, True)] = v
        return out
    file = checkpoint.model_states_file(step_dir, tp_rank)
    if file is None:
        raise MegalmError(f"checkpoint {step_dir}: no model states file for tensor-parallel rank {tp_rank}")
    module = checkpoint.safe_load(file, map_location="cpu").get("module")
    if not isinstance(module, dict):
        raise MegalmError(f"checkpoint {file} holds no module weights")
    return dict(module)


def _optim_files(step_dir: Path, mp: int) -> list[Path]:
    """The optimizer shard files of model-parallel rank `mp`, in data-parallel rank order (complete or none)."""
    found = checkpoint.optimizer_files(step_dir, mp)
    if found and sorted(found) != list(range(len(found))):
        raise MegalmError(f"checkpoint {step_dir}: optimizer shards of model-parallel rank {mp} are incomplete "
                          f"(data-parallel ranks {sorted(found)})")  # fmt: skip
    return [found[d] for d in sorted(found)]


MASTER = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
"""The per-parameter state a resume in another layout carries: the fp32 master weights and AdamW's two moments."""


def _sharded_state(step_dir: Path, mp: int, shapes: dict[str, torch.Size], keys=(MASTER,)) -> tuple[dict, list]:
    """({key: {engine name: full tensor}}, Adam's steps) of model-parallel rank `mp` from its ZeRO / bf16 optimizer
    shards; ({}, []) if it has none. Key MASTER is the fp32 master weights, the others AdamW's state of that name.

    `shapes` gives the shapes of parameters whose shards carry no shape (stages 0-2); ZeRO-3 records its own."""
    files = _optim_files(step_dir, mp)
    if not files:
        return {}, []
    states = [checkpoint.safe_load(f, map_location="cpu", mmap=True)["optimizer_state_dict"] for f in files]
    count = states[0].get("partition_count")  # how many ways DeepSpeed split the state: per group, or one int
    count = max(count) if isinstance(count, list) else count
    if count is not None and count != len(files):
        raise MegalmError(
            f"checkpoint {step_dir}: model-parallel rank {mp} has {len(files)} optimizer shard(s) "
            f"({files[0].name}, ...), but its state was split {count} ways: a shard is missing"
        )
    if "fp32_flat_groups" in states[0]:
        return _zero3_state(step_dir, mp, states, keys)
    if any("single_partition_of_fp32_groups" not in s or "param_slice_mappings" not in s for s in states):
        raise MegalmError(f"checkpoint {step_dir}: optimizer shards {files[0].name}... hold no fp32 partitions with "
                          f"slice mappings (an unsupported DeepSpeed optimizer format)")  # fmt: skip
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {k: {} for k in keys}
    steps = []
    for f, s in zip(files, states, strict=True):
        adam = s.get("base_optimizer_state", {}).get("state", {})
        for g, mapping in enumerate(s["param_slice_mappings"]):
            flats = {MASTER: s["single_partition_of_fp32_groups"][g]}
            flats.update({k: v for k, v in adam.get(g, {}).items() if k != "step"})
            steps += [int(adam[g]["step"])] if "step" in adam.get(g, {}) else []
            for key in keys:
                if key not in flats:
                    raise MegalmError(f"checkpoint {f}: no optimizer state {key!r} (saved before the first step, "
                                      f"or not by AdamW)")  # fmt: skip
                for name, frag in mapping.items():
                    pieces[key].setdefault(name, []).append(flats[key][frag.start : frag.start + frag.numel])
    out = {k: {n: torch.cat(p).view(shapes[n]) for n, p in pieces[k].items() if n in shapes} for k in keys}
    return out, steps


def _zero3_state(step_dir: Path, mp: int, states: list[dict], keys) -> tuple[dict, list]:
    """ZeRO-3: each parameter is split into dp pieces of ceil(numel/dp), consecutive in each rank's flat groups (the
    groups of a rank concatenated, in order), in the order of `param_shapes`."""
    dp = len(states)
    model_file = checkpoint.model_states_file(step_dir, mp)
    if model_file is None:
        raise MegalmError(f"checkpoint {step_dir}: no ZeRO-3 model states file of model-parallel rank {mp}")
    param_shapes = checkpoint.safe_load(model_file, map_location="cpu")["param_shapes"]
    flats, steps = {k: [] for k in keys}, []
    for d, s in enumerate(states):
        adam = s.get("optimizer_state_dict", {}).get("state", {})
        steps += [int(v["step"]) for v in adam.values() if "step" in v]
        for key in keys:
            if key == MASTER:
                groups = s["fp32_flat_groups"]
            elif all(key in adam.get(i, {}) for i in range(len(s["fp32_flat_groups"]))):
                groups = [adam[i][key] for i in range(len(s["fp32_flat_groups"]))]
            else:
                raise MegalmError(f"checkpoint {step_dir}: the ZeRO-3 shard of data-parallel rank {d} holds no "
                                  f"optimizer state {key!r}")  # fmt: skip
            flats[key].append(torch.cat(list(groups)))
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    offset = 0
    for group_shapes in param_shapes:
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            part = -(-numel // dp)
            for key in keys:
                full = torch.cat([flats[key][d][offset : offset + part] for d in range(dp)])
                out[key][name] = full[:numel].view(tuple(shape))
            offset += part
    return out, steps


def _torch_optimizer_state(step_dir: Path, mp: int) -> tuple[dict, list]:
    """({key: {engine name: tensor}}, steps) of AdamW's per-parameter state kept by DeepSpeed without ZeRO (stage 0,
    fp32): torch's optimizer state dict in model-parallel rank `mp`'s model states file, its parameters numbered in
    the order megalm recorded by name at save time (checkpoint.PARAM_NAMES)."""
    file = checkpoint.model_states_file(step_dir, mp)
    saved = checkpoint.safe_load(file, map_location="cpu", mmap=True) if file is not None else {}
    optim, names = saved.get("optimizer"), saved.get(checkpoint.PARAM_NAMES)
    if not isinstance(optim, dict) or "state" not in optim or "param_groups" not in optim:
        raise MegalmError(
            f"checkpoint {step_dir}: no AdamW state for model-parallel rank {mp} (an fp16 checkpoint "
            f"without ZeRO, or not a DeepSpeed checkpoint): it can be resumed only in its own layout"
        )
    if names is None:
        raise MegalmError(
            f"checkpoint {file} does not name its optimizer's parameters (saved by a megalm before "
            f"resume across layouts existed): resume it in its own layout, or use train.init_from"
        )
    ids = [i for g in optim["param_groups"] for i in g["params"]]
    flat_names = [n for group in names for n in group]
    if len(ids) != len(flat_names):
        raise MegalmError(f"checkpoint {file}: {len(ids)} optimizer parameters but {len(flat_names)} names")
    out = {k: {} for k in MOMENTS}
    steps = []
    for i, name in zip(ids, flat_names, strict=True):
        state = optim["state"].get(i, {})
        for k in MOMENTS:
            if k not in state:
                raise MegalmError(f"checkpoint {file}: parameter {name} has no optimizer state {k!r}")
            out[k][name] = state[k]
        steps.append(int(state["step"]))
    return out, steps


def _rank_weights(step_dir: Path, cfg: Config, tp_rank: int, keys=(MASTER,)) -> tuple[dict, list]:
    """({key: TP rank `tp_rank`'s full (all stages, all dp shards) tensors under layout-free names}, Adam's steps):
    the weights (MASTER: fp32 masters where the optimizer holds them, else the module's) and any of MOMENTS."""
    tp, pp, L = cfg.parallel.tp, cfg.parallel.pp, cfg.model.n_layer
    module = {k: v.float() for k, v in _module_weights(step_dir, cfg, tp_rank).items()}
    out = {k: {} for k in keys}
    out[MASTER] = module
    steps = []
    for stage in range(pp) if pp > 1 else [0]:
        mp = stage * tp + tp_rank  # the optimizer state is named like the engine's module: pipeline names at pp>1
        found, s = _sharded_state(step_dir, mp, _engine_shapes(module, L, pp > 1), keys)
        if not found and any(k in MOMENTS for k in keys):
            found, s = _torch_optimizer_state(step_dir, mp)
        steps += s
        for key, tensors in found.items():
            for name, value in tensors.items():
                out[key][layout_free_name(name, L, pp > 1)] = value.float()
    return out, steps


def _engine_shapes(weights: dict[str, torch.Tensor], n_layer: int, pipeline: bool) -> dict[str, torch.Size]:
    """Shapes under the engine's parameter names (pipeline: '3.attn.qkv.weight', 'tied_modules.embed.wte.weight')."""
    if not pipeline:
        return {k: v.shape for k, v in weights.items()}
    back = {prefix: index for index, prefix in _pipeline_prefixes(n_layer).items()}
    out = {}
    for name, v in weights.items():
        if name.startswith("embed."):
            out["tied_modules." + name] = v.shape
        head, _, rest = name.partition(".")
        prefix = f"blocks.{rest.split('.')[0]}." if head == "blocks" else f"{head}."
        tail = rest.split(".", 1)[1] if head == "blocks" else rest
        out[f"{back[prefix]}.{tail}"] = v.shape
    return out


def merge_tp(
    shards: list[dict[str, torch.Tensor]], model_cfg: ModelConfig, where: str, wanted: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Full tensors from the TP ranks' shards, by the layer that owns each one; padding trimmed to tp=1's.
    `wanted`: merge only those names (all by default)."""
    tp = len(shards)
    ref = skeleton(model_cfg)
    shapes = {k: v.shape for k, v in ref.state_dict().items() if wanted is None or k in wanted}
    missing = sorted(set(shapes) - set(shards[0]))
    if missing:
        raise MegalmError(f"{where}: weights missing from the checkpoint: {', '.join(missing[:5])}")
    out = {}
    for name, (module, attr) in owners(ref).items():
        if name not in shapes:
            continue
        parts = [s[name] for s in shards]
        if isinstance(module, ColumnParallelLinear):
            full = _merge_column(parts, module.partition_sizes, tp)
        elif isinstance(module, RowParallelLinear) and attr == "weight":
            full = torch.cat(parts, dim=1)
        elif isinstance(module, VocabParallelEmbedding):
            full = torch.cat(parts, dim=0)
        else:  # replicated: norms, positions, the row-parallel bias
            full = parts[0]
        full = full[: shapes[name][0]] if full.dim() and full.shape[0] > shapes[name][0] else full  # vocab padding
        if full.shape != shapes[name]:
            raise MegalmError(f"{where}: {name} merges to shape {tuple(full.shape)} from {tp} tensor-parallel "
                              f"shards, but the model config needs {tuple(shapes[name])}")  # fmt: skip
        out[name] = full.contiguous()
    return out


def _merge_column(parts: list[torch.Tensor], sizes: list[int], tp: int) -> torch.Tensor:
    """Rows of column-parallel shards; a fused projection ([q|k|v], [gate|up]) is merged block by block."""
    if len(sizes) == 1:
        return torch.cat(parts, dim=0)
    local = [s // tp for s in sizes]
    blocks = [p.split(local, dim=0) for p in parts]  # per rank: its slice of each block
    return torch.cat([torch.cat([b[i] for b in blocks], dim=0) for i in range(len(sizes))], dim=0)


def read_checkpoint(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], Source]:
    """A training checkpoint (checkpoint.dir or step_N) of any layout -> config, full fp32 state dict, what was read."""
    step_dir = find_checkpoint(path)
    meta = _metadata(step_dir)
    cfg = config_from_dict(meta["config"], f"the config saved in {step_dir}")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    files = checkpoint.saved_layout(step_dir)
    if (files["tp"], files["pp"]) != (tp, pp):
        raise MegalmError(f"checkpoint {step_dir}: its config says tp {tp} pp {pp}, but its files are those of tp "
                          f"{files['tp']} pp {files['pp']}")  # fmt: skip
    shards = [_rank_weights(step_dir, cfg, t)[0][MASTER] for t in range(tp)]
    state = merge_tp(shards, cfg.model, str(step_dir))
    layout = f"tp {tp} pp {pp} dp {files['dp']}, zero {cfg.zero.stage}, {cfg.precision.dtype}"
    return cfg, state, Source(step_dir, meta.get("step"), layout)


@dataclass
class TrainingState:
    """Everything a checkpoint of any layout holds, layout-free: what a resume in another layout carries over.

    `tensors` maps MASTER (fp32 master weights) and each of MOMENTS to full tensors under GPT's tp=1 names (only
    `wanted` ones, when given); `adam_step` is AdamW's step count, `scheduler` and `engine` DeepSpeed's saved lr
    scheduler state and step counters, `meta` megalm's metadata (loop and loader state, config)."""

    cfg: Config
    tensors: dict[str, dict[str, torch.Tensor]]
    adam_step: int
    scheduler: dict
    engine: dict
    meta: dict
    source: Source
    dp: int


def read_training_state(path: str | Path, wanted: set[str] | None = None) -> TrainingState:
    """The layout-free TrainingState of training checkpoint `path` (verified first: a collective when
    torch.distributed is initialised); `wanted` limits the tensors kept to those names (a pipeline stage's)."""
    step_dir = find_checkpoint(path)
    meta = _metadata(step_dir)
    cfg = config_from_dict(meta["config"], f"the config saved in {step_dir}")
    tp = cfg.parallel.tp
    keys = (MASTER, *MOMENTS)
    shards, steps = [], []
    for t in range(tp):
        found, s = _rank_weights(step_dir, cfg, t, keys)
        steps += s
        shards.append({k: {n: v for n, v in d.items() if wanted is None or n in wanted} for k, d in found.items()})
    if not steps or len(set(steps)) != 1:
        raise MegalmError(f"checkpoint {step_dir}: AdamW step counts {sorted(set(steps)) or 'missing'}; expected one "
                          f"step count for every parameter")  # fmt: skip
    tensors = {k: merge_tp([s[k] for s in shards], cfg.model, str(step_dir), wanted) for k in keys}
    saved = checkpoint.safe_load(checkpoint.model_states_file(step_dir, 0), map_location="cpu", mmap=True)
    counters = {k: saved[k] for k in ("global_steps", "global_samples", "skipped_steps") if k in saved}
    files = checkpoint.saved_layout(step_dir)
    layout = f"tp {tp} pp {cfg.parallel.pp} dp {files['dp']}, zero {cfg.zero.stage}, {cfg.precision.dtype}"
    return TrainingState(cfg, tensors, steps[0], saved.get("lr_scheduler") or {}, counters, meta,
                         Source(step_dir, meta.get("step"), layout), files["dp"])  # fmt: skip


def load_full_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and full layout-free fp32 state dict of a consolidated directory or a training checkpoint
    (a checkpoint.dir, whose `latest` is used, or a step_N directory) of any (tp, pp, dp, ZeRO) layout.

    The state dict has exactly the keys and shapes of ``GPT(cfg.model).state_dict()`` at tp=1. A checkpoint is
    verified first (sizes, checksums); when torch.distributed is initialised that is a collective (the files are
    split across ranks), so every rank must call this."""
    cfg, state, _ = load_with_source(path)
    return cfg, state


def load_with_source(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], Source]:
    """load_full_state, plus a description of what was read."""
    path = Path(path)
    if path.is_dir() and is_consolidated(path):
        cfg, state = load_consolidated(path)
        return cfg, state, Source(path, None, "consolidated")
    return read_checkpoint(path)


def consolidate(ckpt: str | Path, out: str | Path, log=print) -> Path:
    """Write the consolidated form of checkpoint `ckpt` (any layout) to directory `out`; returns `out`."""
    cfg, state, src = read_checkpoint(ckpt)
    n = sum(v.numel() for v in state.values())
    log(f"read {src.path}: step {src.step}, layout {src.layout}, {len(state)} tensors, {n:,} parameters")
    out = save_consolidated(cfg, state, out)
    log(f"wrote {out / WEIGHTS} (fp32, layout-free) and {out / CONFIG} (parallel.tp = parallel.pp = 1)")
    return out


def add_consolidate_args(parser) -> None:
    """Arguments of `megalm convert consolidate`."""
    parser.add_argument("checkpoint", help="a checkpoint.dir (its `latest` is used) or a step_N directory")
    parser.add_argument("out", help="output directory for model.safetensors and config.yaml")
    parser.set_defaults(convert_run=run_consolidate)


def run_consolidate(args) -> int:
    consolidate(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":  # python -m megalm.convert.consolidate CKPT OUT
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_consolidate_args(p)
    try:
        sys.exit(run_consolidate(p.parse_args()))
    except MegalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

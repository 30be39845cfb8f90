"""`megalm check-parity`: train one config in several parallel layouts and compare each loss curve to one process.

    megalm check-parity --config configs/tiny.yaml --steps 20 --tolerance 1e-5 [section.key=value ...]
    megalm check-parity --config CFG --layouts "1,4,1,0;2,1,2,3;2,2,1,1,full"

A layout is `tp,pp,dp,zero[,recompute]` (recompute: none | full | selective); it runs in tp*pp*dp processes. The
baseline (1,1,1,0) and every layout are separate launches of launcher/pretrain.py with the same seed, global
batch and data (the loader's order does not depend on the layout), so each run gets exactly the world its layout
needs. Locally they start under `python -m torch.distributed.run` (gloo on CPU, NCCL on GPUs). On a cluster, run
check-parity inside the allocation and pass `--launcher` what goes before launcher/pretrain.py, with `{nproc}`
(and `{python}` for this interpreter): `--launcher "srun --ntasks {nproc} --gpus-per-task 1 {python}"` or
`--launcher "deepspeed --num_gpus {nproc}"`.

Resume across layouts (`--resume-at N`): the baseline (say the layout a job runs in, `--baseline 2,2,1,1`) trains
--steps steps and saves a checkpoint at step N; every layout then resumes that checkpoint (train.resume, weights,
AdamW state, schedule and data position carried into its own layout) and trains to --steps; steps N+1.. are
compared with the baseline's own:

    megalm check-parity --config CFG --baseline 2,2,1,1 --resume-at 10 --steps 30 --layouts "1,1,4,1;2,1,2,2"

A layout that the config or the model cannot take (tp not dividing the heads, ZeRO >= 2 with pipelines, a batch
that dp does not divide, more processes than --max-procs) is reported as skipped with the reason. The table shows,
per layout, the worst relative loss difference over the steps, |loss - loss_baseline| / |loss_baseline|; the exit
code is 1 when any layout fails or exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.launch.local import free_port

REPO = Path(__file__).resolve().parent.parent
RECOMPUTE = ("none", "full", "selective")
DEFAULT_LAYOUTS = "1,1,1,0; 1,2,1,0; 1,4,1,0; 2,2,1,0; 1,2,2,1; 2,1,2,1; 2,1,2,2; 2,1,2,3; 1,1,4,3; 2,2,1,1,full"
"""The matrix of issue #6: (tp, pp, dp, zero), the last with activation checkpointing."""


@dataclass(frozen=True)
class Layout:
    """One parallel layout: tensor, pipeline and data-parallel sizes, ZeRO stage and recomputation."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    recompute: str = "none"
    micro_batch_size: int | None = None  # set by fit_micro_batch when the config's does not fit this dp

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        extra = f",{self.recompute}" if self.recompute != "none" else ""
        return f"({self.tp},{self.pp},{self.dp},{self.zero}{extra})"

    def overrides(self) -> list[str]:
        """The config overrides that select this layout (dp follows from the number of processes)."""
        micro = [f"train.micro_batch_size={self.micro_batch_size}"] if self.micro_batch_size else []
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"zero.stage={self.zero}",
                f"parallel.recompute={self.recompute}", *micro]  # fmt: skip


BASELINE = Layout()


@dataclass
class Outcome:
    """What became of one layout: losses per step, or why it was skipped or failed."""

    layout: Layout
    losses: dict[int, float] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0


def parse_layouts(text: str) -> list[Layout]:
    """`"tp,pp,dp,zero[,recompute]; ..."` -> layouts; errors name the item that is wrong."""
    layouts = []
    for item in (s.strip() for s in text.split(";")):
        if not item:
            continue
        parts = [p.strip() for p in item.strip("()").split(",")]
        if len(parts) not in (4, 5) or not all(p.isdigit() for p in parts[:4]):
            raise MegalmError(f"--layouts: {item!r} is not tp,pp,dp,zero[,recompute], e.g. 2,1,2,3 or 2,2,1,1,full")
        tp, pp, dp, zero = (int(p) for p in parts[:4])
        recompute = parts[4] if len(parts) == 5 else "none"
        if min(tp, pp, dp) < 1 or zero > 3:
            raise MegalmError(f"--layouts: {item!r}: tp, pp and dp must be >= 1 and zero 0-3")
        if recompute not in RECOMPUTE:
            raise MegalmError(f"--layouts: {item!r}: recompute {recompute!r} is not one of {' | '.join(RECOMPUTE)}")
        layouts.append(Layout(tp, pp, dp, zero, recompute))
    if not layouts:
        raise MegalmError(f"--layouts: no layout in {text!r}")
    return layouts


def run_overrides(user: list[str], steps: int, run_dir: Path) -> list[str]:
    """The user's overrides plus what makes runs comparable: every step logged, no eval, a fresh start."""
    return [*user, f"train.max_steps={steps}", "train.log_interval=1", "train.eval_interval=0", "data.val=null",
            "train.resume=none", f"train.run_dir={run_dir}", "log.tensorboard=false", "log.progress=lines",
            "checkpoint.keep_last=1"]  # fmt: skip


def fit_micro_batch(layout: Layout, global_batch: int, micro: int) -> tuple[Layout, str | None]:
    """`layout` with the largest micro batch <= `micro` that makes micro x dp divide the global batch (the loss curve
    depends on the global batch only), and a line saying so; unchanged when the config's micro batch fits."""
    if global_batch % (micro * layout.dp) == 0 or global_batch % layout.dp:
        return layout, None
    fit = max(m for m in range(1, micro + 1) if (global_batch // layout.dp) % m == 0)
    note = (f"{layout.label}: train.micro_batch_size={fit} instead of {micro}, so that micro x dp divides the "
            f"global batch {global_batch}")  # fmt: skip
    return dataclasses.replace(layout, micro_batch_size=fit), note


def skip_reason(config: str, overrides: list[str], layout: Layout, max_procs: int | None) -> str | None:
    """Why `layout` cannot run this config (None when it can): the config's own validation, for its world size."""
    if max_procs is not None and layout.world > max_procs:
        return f"needs {layout.world} processes, --max-procs is {max_procs}"
    try:
        load_config(config, [*overrides, *layout.overrides()]).validate(layout.world)
    except MegalmError as e:
        return str(e).split(" + command-line overrides: ", 1)[-1]
    return None


def launch_command(template: str | None, nproc: int) -> list[str]:
    """What precedes launcher/pretrain.py to start `nproc` processes: torch.distributed.run on this machine, or the
    user's template with {nproc} (and {python}: this interpreter), e.g. 'srun --ntasks {nproc} {python}'."""
    if template:
        if "{nproc}" not in template:
            example = "'srun --ntasks {nproc} {python}'"
            raise MegalmError(f"--launcher {template!r} must contain {{nproc}}, e.g. {example}")
        return shlex.split(template.replace("{nproc}", str(nproc)).replace("{python}", shlex.quote(sys.executable)))
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]  # fmt: skip


def _child_env(local: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if local:  # the local launcher sets the rendezvous; stale values from the caller's shell would confuse it
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
    return env


def read_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_dir_for(out: Path, layout: Layout, resumed: bool = False) -> Path:
    return out / (layout.label.strip("()").replace(",", "-") + ("-resumed" if resumed else ""))


def resume_overrides(args: argparse.Namespace, out: Path, baseline: Layout, resumed: bool) -> list[str]:
    """With --resume-at N: the baseline keeps its checkpoint of step N; the others resume from it."""
    n = getattr(args, "resume_at", None)
    if n is None:
        return []
    if not resumed:
        return [f"checkpoint.interval={n}", "checkpoint.keep_last=0"]
    return [f"train.resume={run_dir_for(out, baseline) / 'checkpoints' / f'step_{n:08d}'}"]


def run_layout(args: argparse.Namespace, layout: Layout, out: Path, extra: list[str] = (), resumed=False) -> Outcome:
    """Train `layout` to args.steps steps in its own process group (`extra`: more overrides); never raises for a
    failed run."""
    run_dir = run_dir_for(out, layout, resumed)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*run_overrides(args.overrides, args.steps, run_dir), *layout.overrides(), *extra]
    cmd = launch_command(args.launcher, layout.world) + [str(REPO / "launcher" / "pretrain.py"), "--config",
                                                         args.config, *overrides]  # fmt: skip
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, env=_child_env(args.launcher is None), capture_output=True, text=True,
                                timeout=args.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome(layout, error=f"timed out after {args.timeout} s", seconds=time.monotonic() - start)
    seconds = time.monotonic() - start
    (out / f"{run_dir.name}.log").write_text(f"$ {shlex.join(cmd)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        return Outcome(layout, error=f"exit {result.returncode}: {first_error(result.stderr + result.stdout)}",
                       seconds=seconds)  # fmt: skip
    return Outcome(layout, losses=read_losses(run_dir), seconds=seconds)


def first_error(text: str) -> str:
    """The line that says what went wrong in a failed run's output: megalm's own one-line error, else the first
    exception of a traceback (the other ranks' errors usually follow from it), else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    own = [ln for ln in lines if re.match(r"^(\[rank \d+\] )?error: ", ln) and "collective failed" not in ln]
    exceptions = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b: ", ln)]
    return (own or exceptions or lines[-1:] or ["no output"])[0]


def worst_relative(base: dict[int, float], other: dict[int, float]) -> tuple[float, int]:
    """(max over steps of |other - base| / |base|, the step where it occurs); inf when a step is missing."""
    worst, at = 0.0, 0
    for step, ref in sorted(base.items()):
        if step not in other:
            return float("inf"), step
        rel = abs(other[step] - ref) / max(abs(ref), 1e-12)
        if rel > worst:
            worst, at = rel, step
    return worst, at


def format_table(base: Outcome, outcomes: list[Outcome], tolerance: float) -> tuple[str, bool]:
    """The report table and whether every layout that ran passed."""
    lines = [f"{'layout (tp,pp,dp,zero)':<24} {'procs':>5} {'worst rel diff':>14} {'at step':>7} {'time':>6}  result",
             "-" * 72]  # fmt: skip
    all_ok = True
    for o in outcomes:
        head = f"{o.layout.label:<24} {o.layout.world:>5}"
        if o.skipped:
            lines.append(f"{head} {'-':>14} {'-':>7} {'-':>6}  SKIP: {o.skipped}")
            continue
        if o.error:
            all_ok = False
            lines.append(f"{head} {'-':>14} {'-':>7} {o.seconds:>5.0f}s  FAIL: {o.error}")
            continue
        rel, step = (0.0, 0) if o is base else worst_relative(base.losses, o.losses)
        ok = rel <= tolerance
        all_ok &= ok
        verdict = "baseline" if o is base else ("pass" if ok else f"FAIL (> {tolerance:g})")
        lines.append(f"{head} {rel:>14.3e} {step:>7} {o.seconds:>5.0f}s  {verdict}")
    return "\n".join(lines), all_ok


def check_parity(args: argparse.Namespace) -> int:
    """Run the baseline and each layout, print the table; 0 when all that ran agree within the tolerance."""
    if not Path(args.config).is_file():
        raise MegalmError(f"config file not found: {args.config}")
    if args.steps < 1 or args.tolerance < 0:
        raise MegalmError(f"--steps must be >= 1 and --tolerance >= 0, got {args.steps} and {args.tolerance}")
    resume_at = getattr(args, "resume_at", None)
    if resume_at is not None and not 1 <= resume_at < args.steps:
        raise MegalmError(f"--resume-at must be a step between 1 and --steps - 1 = {args.steps - 1}, got {resume_at}")
    layouts = parse_layouts(args.layouts)
    launch_command(args.launcher, 2)  # a bad --launcher template fails here, before any run
    cfg = load_config(args.config, run_overrides(args.overrides, args.steps, Path("parity")))
    out = Path(args.out or f"runs/parity-{cfg.name}")
    out.mkdir(parents=True, exist_ok=True)
    what = f"{cfg.model.family}, {cfg.precision.dtype}, {args.steps} steps, global batch {cfg.train.global_batch_size}"
    print(f"check-parity: {cfg.name}, {what}, seed {cfg.train.seed}; runs and logs in {out}", flush=True)
    baseline = _baseline(getattr(args, "baseline", None))
    if reason := skip_reason(args.config, args.overrides, baseline, None):
        raise MegalmError(f"the baseline {baseline.label} cannot run: {reason}")
    resume_at = getattr(args, "resume_at", None)
    base = _announce(run_layout(args, baseline, out, resume_overrides(args, out, baseline, False)))
    if base.error:
        raise MegalmError(f"the baseline {baseline.label} failed: {base.error} (log in {out})")
    if resume_at is not None:  # the steps after the checkpoint are compared
        print(f"every layout resumes the baseline's checkpoint of step {resume_at}", flush=True)
        base.losses = {s: v for s, v in base.losses.items() if s > resume_at}
    outcomes = []
    for layout in layouts:
        layout, note = fit_micro_batch(layout, cfg.train.global_batch_size, cfg.train.micro_batch_size)
        if note:
            print(note, flush=True)
        if layout == baseline and resume_at is None:
            outcomes.append(base)
        elif reason := skip_reason(args.config, args.overrides, layout, args.max_procs):
            outcomes.append(_announce(Outcome(layout, skipped=reason)))
        else:
            extra = resume_overrides(args, out, baseline, True)
            outcomes.append(_announce(run_layout(args, layout, out, extra, resumed=resume_at is not None)))
    table, all_ok = format_table(base, outcomes, args.tolerance)
    print(table, flush=True)
    skipped = sum(1 for o in outcomes if o.skipped)
    verdict = "all layouts match"
    if skipped:
        verdict = f"the {len(outcomes) - skipped} layouts that ran match; {skipped} skipped (see SKIP above)"
    print(f"{verdict if all_ok else 'PARITY FAILED'} (tolerance {args.tolerance:g})", flush=True)
    return 0 if all_ok else 1


def _baseline(text: str | None) -> Layout:
    if not text:
        return BASELINE
    layouts = parse_layouts(text)
    if len(layouts) != 1:
        raise MegalmError(f"--baseline: one layout, e.g. 1,1,1,1; got {text!r}")
    return layouts[0]


def _announce(o: Outcome) -> Outcome:
    what = f"skipped ({o.skipped})" if o.skipped else (f"failed: {o.error}" if o.error else "done")
    print(f"  {o.layout.label}: {what} [{o.seconds:.0f} s]", flush=True)
    return o


def add_parity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help="'tp,pp,dp,zero[,recompute];...' (default: the issue #6 matrix)")  # fmt: skip
    parser.add_argument("--baseline", default="1,1,1,0",
                        help="the reference layout (default 1,1,1,0: one process, no ZeRO)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max relative loss difference (default 1e-5)")
    parser.add_argument("--launcher", default=None,
                        help="what starts {nproc} ranks before launcher/pretrain.py, e.g. 'srun --ntasks {nproc} "
                             "{python}' (default: python -m torch.distributed.run on this machine)")  # fmt: skip
    parser.add_argument("--resume-at", type=int, default=None, metavar="N",
                        help="the baseline saves at step N; every layout resumes from that checkpoint and steps "
                             "after N are compared (resume across layouts)")  # fmt: skip
    parser.add_argument("--max-procs", type=int, default=None, help="skip layouts needing more processes")
    parser.add_argument("--out", default=None, help="directory for the runs and their logs (runs/parity-<config>)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one run may take (default 1800)")

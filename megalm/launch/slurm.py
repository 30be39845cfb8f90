"""`megalm slurm`: write a readable sbatch script that starts one srun task per GPU (template in templates/)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.training.signals import PREEMPTED_EXIT_CODE

TEMPLATE = Path(__file__).parent / "templates" / "pretrain.sbatch"


def add_slurm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe to train")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for the run")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per node; 0 for CPU tasks")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node (default: gpus per node)")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (data workers, etc.)")
    parser.add_argument("--time", default="24:00:00", help="time limit, e.g. 2-00:00:00")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--job-name", default=None, help="job name (default: megalm-<config name>)")
    parser.add_argument("--signal-seconds", type=int, default=120, help="SIGUSR1 this long before the time limit")
    parser.add_argument("--python", default=sys.executable, help="Python interpreter on the compute nodes")
    parser.add_argument("--workdir", default=str(Path.cwd()), help="directory the job runs in (the repository)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")  # fmt: skip


def _check_time(value: str) -> str:
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", value):
        raise MegalmError(f"--time {value!r} is not a SLURM time such as 30:00, 12:00:00 or 2-00:00:00")
    return value


def log_dir(args: argparse.Namespace) -> Path:
    """Absolute run directory of the job (SLURM writes its log there but does not create it)."""
    return Path(args.workdir) / load_config(args.config, args.overrides).run_dir


def render(args: argparse.Namespace) -> str:
    """The sbatch script text for `args` (the config is loaded and checked against the world size first)."""
    cfg = load_config(args.config, args.overrides)
    tasks = args.tasks_per_node or args.gpus_per_node
    if args.nodes < 1 or tasks < 1:
        raise MegalmError("--nodes and --tasks-per-node (or --gpus-per-node) must be at least 1")
    cfg.validate(world_size=args.nodes * tasks)
    q = shlex.quote
    values = {
        "job_name": args.job_name or f"megalm-{cfg.name}",
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task,
        "gpu_line": f"#SBATCH --gpus-per-node={args.gpus_per_node}\n" if args.gpus_per_node else "",
        "partition_line": f"#SBATCH --partition={args.partition}\n" if args.partition else "",
        "account_line": f"#SBATCH --account={args.account}\n" if args.account else "",
        "time": _check_time(args.time),
        "log_dir": q(str(log_dir(args))),
        "signal_seconds": args.signal_seconds,
        "preempt_code": PREEMPTED_EXIT_CODE,
        "extra_lines": "".join(f"#SBATCH {opt}\n" for opt in args.sbatch),
        "workdir": q(args.workdir),
        "omp_threads": args.cpus_per_task,
        "python": q(args.python),
        "config": q(args.config),
        "overrides": " ".join(q(o) for o in args.overrides),
    }
    return TEMPLATE.read_text().format(**values)


def run_slurm(args: argparse.Namespace) -> int:
    """Print the sbatch script; create the run directory its log goes to."""
    text = render(args)
    log_dir(args).mkdir(parents=True, exist_ok=True)
    sys.stdout.write(text)
    return 0

"""`megalm` console script: prepare shards, train, show the config."""

from __future__ import annotations

import argparse
import sys

from megalm.errors import MegalmError


def build_parser() -> argparse.ArgumentParser:
    from launcher.pretrain import add_train_args
    from launcher.slurm import add_slurm_args
    from megalm.data.prepare import add_prepare_args

    parser = argparse.ArgumentParser(prog="megalm", description="Pretrain decoder-only Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_args(sub.add_parser("prepare", help="turn .txt/.jsonl(.gz) files into token shards"))
    add_train_args(sub.add_parser("train", help="train (one process, or under deepspeed/torchrun/srun/mpirun)"))
    add_slurm_args(sub.add_parser("slurm", help="write an sbatch script for a SLURM cluster to stdout"))
    return parser


def _dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from megalm.data.prepare import run_prepare

        return run_prepare(args)
    if args.command == "slurm":
        from launcher.slurm import run_slurm

        return run_slurm(args)
    from launcher.pretrain import train

    return train(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `megalm` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from launcher.pretrain import run_and_exit

        run_and_exit(_dispatch, argv)
    try:
        sys.exit(_dispatch(argv))
    except MegalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

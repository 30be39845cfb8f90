"""`megalm` console script: prepare, train, slurm, check-parity, plot, convert, eval, generate."""

from __future__ import annotations

import argparse
import importlib
import sys

from megalm.errors import MegalmError

# name -> (module, function adding its arguments, function running it, help). Only the module of the command
# given is imported: `megalm plot` or `megalm eval` start without importing DeepSpeed (seconds sooner, and none of
# its logging on stdout, where `generate` streams its text).
COMMANDS = {
    "prepare": (
        "megalm.data.prepare",
        "add_prepare_args",
        "run_prepare",
        "turn .txt/.jsonl(.gz) files into token shards",
    ),
    "train": (
        "megalm.training.pretrain",
        "add_train_args",
        "train",
        "train (one process, or under deepspeed/torchrun/srun/mpirun)",
    ),
    "slurm": (
        "megalm.launch.slurm",
        "add_slurm_args",
        "run_slurm",
        "write an sbatch script for a SLURM cluster to stdout",
    ),
    "check-parity": (
        "megalm.parity",
        "add_parity_args",
        "check_parity",
        "train in several parallel layouts, compare to one process",
    ),
    "plot": (
        "megalm.plot",
        "add_plot_args",
        "run_plot",
        "plot loss, lr and tokens/s of one or more runs into an image",
    ),
    "convert": (
        "megalm.cli",
        "add_convert_args",
        "run_convert",
        "convert checkpoints (Hugging Face export/import, consolidation)",
    ),
    "eval": (
        "megalm.inference.evaluate",
        "add_eval_args",
        "run_eval",
        "loss, perplexity, bits per byte or cloze accuracy of a checkpoint",
    ),
    "generate": (
        "megalm.inference.generate",
        "add_generate_args",
        "run_generate",
        "sample text from a checkpoint (KV cache, streamed)",
    ),
}


def _command(name: str, attr: int):
    module, *names, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), names[attr])


def version() -> str:
    """The installed package's version (pyproject.toml's), or 'unknown (not installed)' in a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("megalm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `megalm` parser; with `only`, the other subcommands are listed but their modules are not imported."""
    parser = argparse.ArgumentParser(prog="megalm", description="Pretrain decoder-only Transformers.")
    parser.add_argument("--version", action="version", version=f"megalm {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (*_, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if only is None or name == only:
            _command(name, 0)(p)
    return parser


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """`megalm convert <what>`: each sub-subcommand sets `convert_run`, the function that runs it."""
    from megalm.convert.consolidate import add_consolidate_args
    from megalm.convert.hf import add_from_hf_args, add_to_hf_args

    what = p.add_subparsers(dest="convert_command", required=True)
    add_to_hf_args(what.add_parser("to-hf", help="a checkpoint or consolidated directory -> a transformers model"))
    add_from_hf_args(what.add_parser("from-hf", help="a transformers model directory -> a consolidated directory"))
    add_consolidate_args(what.add_parser("consolidate", help="a checkpoint of any layout -> one fp32 safetensors"))


def run_convert(args: argparse.Namespace) -> int:
    return args.convert_run(args)


def _dispatch(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    return _command(args.command, 1)(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `megalm` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from megalm.training.signals import install_early

        install_early()  # before the slow imports: a SIGTERM during start-up exits 75, not 143
        from megalm.training.pretrain import run_and_exit

        run_and_exit(_dispatch, argv)
    try:
        sys.exit(_dispatch(argv))
    except MegalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # python -m megalm.cli ...
    main()

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
    from megalm.parity import add_parity_args

    add_parity_args(sub.add_parser("check-parity", help="train in several parallel layouts, compare to one process"))
    from megalm.plot import add_plot_args

    add_plot_args(sub.add_parser("plot", help="plot loss, lr and tokens/s of one or more runs into an image"))
    add_convert_args(sub.add_parser("convert", help="convert checkpoints (Hugging Face export/import, consolidation)"))
    from megalm.inference.evaluate import add_eval_args
    from megalm.inference.generate import add_generate_args

    add_eval_args(sub.add_parser("eval", help="loss, perplexity, bits per byte or cloze accuracy of a checkpoint"))
    add_generate_args(sub.add_parser("generate", help="sample text from a checkpoint (KV cache, streamed)"))
    return parser


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """`megalm convert <what>`: each sub-subcommand sets `convert_run`, the function that runs it."""
    from megalm.convert.hf import add_from_hf_args, add_to_hf_args

    what = p.add_subparsers(dest="convert_command", required=True)
    add_to_hf_args(what.add_parser("to-hf", help="a checkpoint or consolidated directory -> a transformers model"))
    add_from_hf_args(what.add_parser("from-hf", help="a transformers model directory -> a consolidated directory"))
    from megalm.convert.consolidate import add_consolidate_args

    add_consolidate_args(what.add_parser("consolidate", help="a checkpoint of any layout -> one fp32 safetensors"))


def _run_inference(argv: list[str]) -> int:
    """`megalm eval|generate` through a parser of their own: they start without importing DeepSpeed (seconds
    sooner, and nothing of DeepSpeed's logging on stdout, where generate streams its text)."""
    from megalm.inference.evaluate import add_eval_args, run_eval
    from megalm.inference.generate import add_generate_args, run_generate

    parser = argparse.ArgumentParser(prog="megalm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_args(sub.add_parser("eval", help="loss, perplexity, bits per byte or cloze accuracy of a checkpoint"))
    add_generate_args(sub.add_parser("generate", help="sample text from a checkpoint (KV cache, streamed)"))
    args = parser.parse_args(argv)
    return run_eval(args) if args.command == "eval" else run_generate(args)


def _dispatch(argv: list[str] | None) -> int:
    if argv and argv[0] in ("eval", "generate"):
        return _run_inference(argv)
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from megalm.data.prepare import run_prepare

        return run_prepare(args)
    if args.command == "check-parity":
        from megalm.parity import check_parity

        return check_parity(args)
    if args.command == "plot":
        from megalm.plot import run_plot

        return run_plot(args)
    if args.command == "convert":
        return args.convert_run(args)
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

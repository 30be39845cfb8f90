"""Pretrain a megalm model: the entry point for `deepspeed`, `torchrun`, `srun`, `mpirun` and `python`.

    deepspeed launcher/pretrain.py --config configs/tiny.yaml [section.key=value ...]
    python launcher/pretrain.py --config configs/tiny.yaml train.max_steps=20

A thin script over megalm.training.pretrain (the recipe, shared with `megalm train`).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.training.signals import install_early  # noqa: E402  (imports nothing heavy)

install_early()  # a SIGTERM during the imports and engine build exits 75 (requeue), not 143

from megalm.training.pretrain import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit()

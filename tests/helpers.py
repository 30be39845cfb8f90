"""Shared test helpers: small real-looking corpora, tiny run configs and subprocess runs of the launcher."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from megalm.launch.local import free_port as free_port  # re-exported: the launcher tests take it from here

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the king queen speak night day love death sword crown heart fair foul lord lady come go "
         "what why who thou thee thy hath doth shall will not now never ever more").split()  # fmt: skip


def train_adamw(model, batches, lr: float) -> list[float]:
    """Train `model` one AdamW step (weight decay 0.1) per (x, y) batch; returns the losses."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for x, y in batches:
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def write_corpus(directory: Path, n_docs: int = 6, words_per_doc: int = 1500, seed: int = 0) -> list[Path]:
    """A few text files of seeded pseudo-verse (each file is one document)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 8):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + ".")
        path = directory / f"doc{d}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def prepare_bytes_dataset(root: Path) -> Path:
    """Byte-level shards with a 10% validation split under root/data; returns that directory."""
    from megalm.data.prepare import prepare

    out = root / "data"
    prepare([str(p) for p in write_corpus(root / "text")], "bytes", out, val_fraction=0.1,
            sample_tokens=1000, shard_tokens=20_000, progress=False)  # fmt: skip
    return out


def tiny_config(root: Path, data_dir: Path, name: str = "tiny", **sections: dict) -> Path:
    """A YAML file for a 2-layer model on byte shards; `sections` override whole keys per section."""
    import yaml

    cfg = {
        "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "vocab_size": 320,
                  "seq_len": 32},
        "data": {"train": str(data_dir / "train"), "val": str(data_dir / "val"), "tokenizer": "bytes"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 12},
        "train": {"run_dir": str(root / "runs" / name), "max_steps": 6, "micro_batch_size": 2,
                  "global_batch_size": 8, "log_interval": 1, "eval_interval": 3, "eval_iters": 4,
                  "seed": 7},
        "log": {"tensorboard": False},
    }  # fmt: skip
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _pretrain_cmd(config: Path, overrides, launcher: list[str] | None) -> list[str]:
    cmd = (launcher or [sys.executable]) + [str(REPO / "launcher" / "pretrain.py"), "--config", str(config)]
    return cmd + list(overrides)


def run_pretrain(config: Path, *overrides: str, launcher: list[str] | None = None, timeout: int = 300):
    """Run launcher/pretrain.py in a subprocess (optionally under a launcher command); returns the result."""
    return subprocess.run(_pretrain_cmd(config, overrides, launcher), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def start_pretrain(config: Path, *overrides: str) -> subprocess.Popen:
    """Start launcher/pretrain.py without waiting (to signal or kill it)."""
    return subprocess.Popen(_pretrain_cmd(config, overrides, None), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert a subprocess succeeded, showing its output if not."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result

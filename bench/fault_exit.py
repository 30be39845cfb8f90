"""Seconds from a fault to a clean exit of a 2-process CPU training run, and what the run says.

    python bench/fault_exit.py [--timeout 20]

Three faults, each in a fresh tiny run (GPT-2, 2 layers, d_model 32) under torchrun with 2 processes:

    dead rank    SIGKILL to rank 1 after its 3rd logged step
    hung rank    SIGSTOP to rank 1 after its 3rd logged step (train.collective_timeout_s=--timeout)
    full disk    every file capped at 64 KiB (RLIMIT_FSIZE, as `ulimit -f 64` would) from the start, so the first
                 checkpoint save fails writing its larger files with EFBIG, the way a full disk fails with ENOSPC

Reported per fault: the seconds from the fault (for the full disk: from the save's start, the last metrics row)
to the first `error:` line and to the exit of the launcher (torchrun waits for the other workers to end: a
stopped one only ends when it is killed), the exit code, and that line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megalm.launch.local import free_port  # noqa: E402
from tests.helpers import prepare_bytes_dataset, read_metrics, subprocess_env, tiny_config  # noqa: E402


def _cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(REPO / "launcher" / "pretrain.py"), "--config", str(config), *overrides]  # fmt: skip


def _rank1(launcher_pid: int):
    import psutil

    tree = psutil.Process(launcher_pid).children(recursive=True)
    workers = [p for p in tree if "pretrain.py" in " ".join(p.cmdline())]
    return next(p for p in workers if p.environ().get("RANK") == "1")


def _wait_rows(run_dir: Path, proc: subprocess.Popen, rows: int) -> None:
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= rows):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended before {rows} rows:\n{proc.communicate()[0][-2000:]}")
        time.sleep(0.01)


def _first_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    return lines[0].strip()[:300] if lines else text.strip().splitlines()[-1][:300] if text.strip() else ""


def fault(kind: str, config: Path, root: Path, timeout: float) -> dict:
    run_dir = root / kind.replace(" ", "_")
    overrides = [f"train.run_dir={run_dir}", f"train.collective_timeout_s={timeout}"]
    preexec = None
    if kind == "full disk":
        overrides += ["checkpoint.interval=4"]
        preexec = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # noqa: E731
    proc = subprocess.Popen(_cmd(config, *overrides), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=preexec)  # fmt: skip
    if kind == "full disk":
        _wait_rows(run_dir, proc, 4)  # the save after step 4 starts once its row is written
    else:
        _wait_rows(run_dir, proc, 3)
        _rank1(proc.pid).send_signal(signal.SIGKILL if kind == "dead rank" else signal.SIGSTOP)
    t0 = time.perf_counter()
    lines, reported = [], None
    for line in proc.stdout:  # timestamp the first error line: the launcher may take longer to exit than megalm
        lines.append(line)
        if reported is None and "error:" in line:
            reported = time.perf_counter() - t0
    proc.wait(timeout=timeout * 4 + 300)
    seconds, out = time.perf_counter() - t0, "".join(lines)
    if kind == "hung rank":  # the stopped rank may outlive the launcher: end it
        subprocess.run(["pkill", "-KILL", "-f", str(run_dir)], check=False)
    return {"fault": kind, "seconds": seconds, "reported_s": reported, "exit_code": proc.returncode,
            "says": _first_error(out)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=20.0, help="train.collective_timeout_s of the runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="megalm-fault-"))
    data = prepare_bytes_dataset(root)
    config = tiny_config(root, data, train={"max_steps": 100_000, "eval_interval": 0, "log_interval": 1})
    results = [fault(kind, config, root, args.timeout) for kind in ("dead rank", "hung rank", "full disk")]
    for r in results:
        said = f"{r['reported_s']:.1f} s" if r["reported_s"] is not None else "never"
        print(f"{r['fault']:<10} error line after {said}, launcher exit {r['exit_code']} after {r['seconds']:.1f} s: "
              f"{r['says']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

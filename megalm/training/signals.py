"""Preemption: SIGTERM or SIGUSR1 (SLURM's pre-kill signal), or Ctrl-C (SIGINT), ends the run cleanly at the next
signal check (train.signal_check_interval steps); a second Ctrl-C exits at once, without saving.

The handler only records the signal; at each step boundary the ranks agree (one all-reduce of a flag), so a
signal that reached any rank stops all of them after the same step. The run then saves a checkpoint and
exits with PREEMPTED_EXIT_CODE, which the sbatch script answers with a requeue.
"""

from __future__ import annotations

import signal
import sys

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED_EXIT_CODE = 130  # after Ctrl-C, as a shell reports it (128 + SIGINT)
EARLY_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C during start-up still interrupts at once
_early: list[signal.Signals] = []  # what arrived between install_early() and StopSignals


def install_early() -> None:
    """At process start, before the slow imports and the engine build: record SIGTERM/SIGUSR1 instead of dying of
    them (143/138, which a scheduler does not requeue); StopSignals takes them over, and the run then exits
    PREEMPTED_EXIT_CODE before its first step. This module imports nothing heavy, so it can run first."""
    for s in EARLY_SIGNALS:
        signal.signal(s, lambda signum, frame: _early.append(signal.Signals(signum)))


class StopSignals:
    """Installs handlers that record SIGTERM/SIGUSR1; `agreed()` tells every rank whether any rank got one."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: signal.Signals | None = _early[0] if _early else None  # during start-up (install_early)
        self._previous = {s: signal.signal(s, self._record) for s in signals}

    def _record(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: leave now (the entry point exits 130 without saving)
        if signum == signal.SIGINT:
            print("Ctrl-C: finishing the current steps, then saving a checkpoint (press Ctrl-C again to exit at once, "
                  "without saving)", file=sys.stderr, flush=True)  # fmt: skip
        self.received = signal.Signals(signum)

    def agreed(self, device, health=None) -> bool:
        """Collective: True on every rank if any rank has received a stop signal. `health` (a NonFiniteGuard) rides
        in the same all-reduce: NonFiniteError on every rank if any rank saw a non-finite step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if self.received is None else 1.0], dtype=torch.float64, device=device)
        if health is not None:
            flag = torch.cat([flag, health.first])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        values = flag.tolist()
        if health is not None:
            health.raise_if_bad(values[1:])
        return bool(values[0])

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

"""The non-finite guard (train.on_nonfinite: stop): a NaN or infinite loss or gradient norm stops the run, and no
checkpoint is ever written from such a state.

Every step is checked on the device (isfinite of the step's losses and of its gradient norm, the first bad step
kept in a device tensor): no host sync of its own. The loop acts on it where it reads values back anyway:

    a metrics row (every train.log_interval steps)   its all-reduced loss and its grad norm are finite or not
    the stop-signal check (signal_check_interval)    the first bad steps ride in the same all-reduce as the flag
    before every checkpoint save                     one all-reduce, so that nothing non-finite is ever written

so a non-finite step stops the run within min(log_interval, signal_check_interval) steps and before any save,
with one error naming the step, what went non-finite and the newest checkpoint to go back to.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megalm.errors import MegalmError


class NonFiniteError(MegalmError):
    """The loss or the gradient norm of a step was NaN or infinite."""


class NonFiniteGuard:
    """First steps with a non-finite loss and with a non-finite gradient norm, on the device (0: none yet)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first = torch.zeros(2, dtype=torch.float64, device=device)
        """[first step with a non-finite loss, first with a non-finite gradient norm] on the device (0: none)."""

    def observe(self, step: int, losses: torch.Tensor, grad_norm) -> None:
        """Record step `step` (its losses on the device; its gradient norm: a device tensor, a float or None);
        device operations only, nothing waits for the device."""
        bad_loss = ~torch.isfinite(losses).all()
        if isinstance(grad_norm, torch.Tensor):
            bad = torch.stack([bad_loss, ~torch.isfinite(grad_norm.to(self.device)).all()])
        else:  # a float DeepSpeed already read back (the host knows), or no norm
            bad = torch.stack([bad_loss, torch.zeros_like(bad_loss)])
            if grad_norm is not None and not math.isfinite(grad_norm):
                bad[1] = True
        self.first = torch.where((self.first == 0) & bad, float(step), self.first)

    def raise_if_bad(self, first: list[float], where: str = "") -> None:
        """NonFiniteError if `first` (the all-reduced or local first bad steps) names one."""
        loss_step, norm_step = (int(v) for v in first)
        if not loss_step and not norm_step:
            return
        what = []
        if loss_step:
            what.append(f"the loss at step {loss_step}")
        if norm_step:
            what.append(f"the gradient norm at step {norm_step}")
        verb = "is" if len(what) == 1 else "are"
        raise NonFiniteError(f"{' and '.join(what)} {verb} not finite (NaN or inf){where}")

    def check(self) -> None:
        """Collective: NonFiniteError on every rank if any rank saw a non-finite step."""
        first = self.first.clone()
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        self.raise_if_bad(first.tolist())

    def check_row(self, row: dict) -> None:
        """A metrics row (the same on every rank: its loss is all-reduced, its grad norm global): NonFiniteError
        if its loss or grad norm is not finite, naming this rank's first bad steps when it saw them."""
        bad = [k for k in ("loss", "grad_norm") if row.get(k) is not None and not math.isfinite(row[k])]
        if not bad:
            return
        self.raise_if_bad(self.first.tolist())
        verb = "is" if len(bad) == 1 else "are"
        raise NonFiniteError(f"the {' and '.join(bad)} of the steps up to {row['step']} {verb} not finite (NaN or "
                             f"inf) on another rank")  # fmt: skip

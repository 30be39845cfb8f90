"""TP-aware RNG: named generator streams that temporarily replace the default generators (Megatron's RNG tracker).

Outside TP regions every TP rank holds the same activations, so dropout there must draw the same mask on every TP
rank: the default generators are seeded alike on all TP ranks (``ParallelState.seed``). Inside TP regions each rank
holds a different slice (its attention heads, its FFN columns), so dropout there must draw independent masks::

    with state.rng.fork():            # this rank's TP stream: masks differ across TP ranks
        probs = F.dropout(probs, p, training)
    x = F.dropout(x, p, training)     # default stream: same mask on all TP ranks

``fork`` swaps the CPU generator and, when CUDA is initialised, the current CUDA device's generator; the stream's
state advances across forks and the default generators resume exactly where they were.

Recomputation lives here too (``recompute_in_backward``): a recomputed forward must draw the same dropout masks, so
the wrapper saves the tracker's ``state_dict()`` before the forward and restores it around the recompute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

TP_RNG = "tensor-parallel"
"""Name of the stream for dropout inside TP regions (seeded per TP rank)."""


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.append(f"cuda:{torch.cuda.current_device()}")
    return devices


def _get_state(device: str) -> torch.Tensor:
    if device == "cpu":
        return torch.get_rng_state()
    return torch.cuda.get_rng_state(device)


def _set_state(device: str, state: torch.Tensor) -> None:
    if device == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


class RNGTracker:
    """Named RNG streams, each a seed plus the generator state per device, used through :meth:`fork`."""

    def __init__(self) -> None:
        self._seeds: dict[str, int] = {}
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._forked: str | None = None

    def add(self, name: str, seed: int) -> None:
        """Register a stream; its per-device states are created from `seed` on first use."""
        if name in self._seeds:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._seeds[name] = int(seed)
        self._states[name] = {}

    def seed_all(self, seed: int, *, tp_offset: int) -> None:
        """Seed the default generators with `seed` and (re)create the TP stream with `seed + tp_offset`."""
        torch.manual_seed(seed)
        self._seeds.clear()
        self._states.clear()
        self.add(TP_RNG, seed + tp_offset)

    @contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        """Draw from stream `name` inside the block; the default generators are untouched by what happens inside."""
        if name not in self._seeds:
            raise RuntimeError(f"RNG stream {name!r} is not seeded: call ParallelState.seed(seed) before training")
        if self._forked is not None:
            raise RuntimeError(f"RNG stream {name!r} forked inside stream {self._forked!r}: forks do not nest")
        devices = _devices()
        saved = {d: _get_state(d) for d in devices}
        for d in devices:
            _set_state(d, self._device_state(name, d))
        self._forked = name
        try:
            yield
        finally:
            self._forked = None
            for d in devices:
                self._states[name][d] = _get_state(d)
                _set_state(d, saved[d])

    def _device_state(self, name: str, device: str) -> torch.Tensor:
        if device not in self._states[name]:
            generator = torch.Generator(device=device).manual_seed(self._seeds[name])
            self._states[name][device] = generator.get_state()
        return self._states[name][device]

    def state_dict(self) -> dict:
        """Seeds and generator states of every stream (for checkpoints; tensors are CPU uint8)."""
        return {"seeds": dict(self._seeds), "states": {n: dict(s) for n, s in self._states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._seeds = {n: int(s) for n, s in state["seeds"].items()}
        self._states = {n: dict(state["states"].get(n, {})) for n in self._seeds}


def recompute_in_backward(fn, *args, rng: RNGTracker | None = None):
    """fn(*args) without keeping its activations: torch's non-reentrant checkpoint runs it again in backward.

    Dropout draws the same masks in the recompute: torch restores the default generators (inside a TP fork that
    is the TP stream's state), and for `rng` (an RNGTracker that fn itself forks, as whole blocks do) the stream is
    rewound to its state before the forward for the recompute and put back afterwards."""
    if not torch.is_grad_enabled():
        return fn(*args)
    before = rng.state_dict() if rng is not None else None
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1 or before is None:
            return fn(*inputs)
        now = rng.state_dict()
        rng.load_state_dict(before)
        try:
            return fn(*inputs)
        finally:
            rng.load_state_dict(now)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

"""Name the rank that died: heartbeats in the rendezvous store, read when a collective fails.

Every rank stamps `megalm/alive/<rank>` in torch.distributed's store (hosted by rank 0's process) every
`interval` seconds from a daemon thread. When a collective fails on a survivor (gloo: the peer closed its
connection; any backend: the collective timed out after `train.collective_timeout_s`), `explain()` watches the
stamps for a few intervals: ranks whose stamp stops advancing are the ones that died or hang. If the store
itself is gone, rank 0 (its host) is the one that died.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from megalm.errors import MegalmError

KEY = "megalm/alive/{}"


def _store():
    from torch.distributed.distributed_c10d import _get_default_store  # the rendezvous store of the default group

    return _get_default_store()


class Heartbeat:
    """A daemon thread that stamps this rank's liveness into the rendezvous store."""

    def __init__(self, interval: float = 2.0):
        self.interval, self.rank, self.world = interval, dist.get_rank(), dist.get_world_size()
        self.store = _store()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="megalm-heartbeat", daemon=True)

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            try:
                self.store.set(KEY.format(self.rank), str(count))
            except Exception:  # noqa: BLE001 - the store's host is gone; explain() reports that
                return
            count += 1
            self._stop.wait(self.interval)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _stamps(self) -> dict[int, str]:
        self.store.set_timeout(timedelta(seconds=max(5.0, 2 * self.interval)))
        return {r: self.store.get(KEY.format(r)).decode() for r in range(self.world) if r != self.rank}

    def silent_ranks(self, watch: float | None = None) -> list[int] | None:
        """Ranks whose stamp did not advance over `watch` seconds; None if the store cannot be reached."""
        watch = 3 * self.interval if watch is None else watch
        try:
            before = self._stamps()
            time.sleep(watch)
            after = self._stamps()
        except Exception:  # noqa: BLE001 - any store failure means its host, rank 0, is gone
            return None
        return [r for r in before if before[r] == after[r]]


def is_collective_failure(error: BaseException) -> bool:
    """Whether a RuntimeError came from the communication backend (a dead peer, a timeout), not from the model."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")
    )


def explain(error: BaseException, heartbeat: Heartbeat | None) -> MegalmError:
    """One clear message for a failed collective, naming the rank(s) that stopped if they can be found."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    me = dist.get_rank() if dist.is_initialized() else 0
    if heartbeat is None:
        return MegalmError(f"a collective failed on rank {me} ({first}); another rank probably died: see its log")
    silent = heartbeat.silent_ranks()
    if silent is None:
        who = "rank 0 (it hosts the rendezvous store, which no longer answers)"
    elif silent:
        who = "rank" + ("s " if len(silent) > 1 else " ") + ", ".join(map(str, silent))
    else:
        who = "no rank visibly (all heartbeats still advance: a rank may be stuck in a collective)"
    return MegalmError(f"a collective failed on rank {me} ({first}); stopped: {who}; see that rank's log")

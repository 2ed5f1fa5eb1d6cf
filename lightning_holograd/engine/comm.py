"""The engine's collectives: one process group, one communication device, every byte counted.

Every collective of the package goes through ``Comm``: it passes ``group`` to
``torch.distributed``, stages tensors on ``device`` (CPU for gloo, the rank's GPU for
NCCL) and records its payload in the ``TrafficMeter`` under a traffic ``kind``
(``kind=None``: not counted, for simulation side channels that are not protocol traffic).
Ranks are ranks *within* ``group``; point-to-point calls translate them to global ranks.

Call contract: every collective method is a blocking collective that every rank of
``group`` must call, in the same order, with tensors of the same shape and dtype. Without
an initialised process group every method acts as the single-rank case (world size 1) and
moves nothing. Point-to-point transfers of the verification transport use their own
process group (``engine/verification.py``).

Failures: a collective that fails (a peer crashed, or did not join within the process
group's timeout) raises ``RankFailureError`` naming the step (``Comm.step``, set by the
exchange), the collective, and the ranks that did not answer a liveness probe through
the rendezvous store, instead of a bare backend trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .traffic import Op, TrafficMeter

__all__ = ["Comm", "RankFailureError", "unresponsive_ranks"]

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_SECONDS = 5.0  # how long the survivors of a failed collective wait for each other in the store


class RankFailureError(RuntimeError):
    """A collective failed: a rank crashed, hung, or stopped joining the per-step collectives."""


def unresponsive_ranks(tag: str, rank: int, world_size: int, wait_s: float = PROBE_SECONDS) -> list[int] | None:
    """Ranks (of the default group) that do not check in under ``tag`` within ``wait_s``.

    Every survivor of a failed collective calls this with the same ``tag``: each writes
    one key to the rendezvous store and waits for the others' keys. Returns None when the
    store itself cannot be reached (it is hosted by rank 0, or by torchrun's agent).
    """
    try:
        store = dist.distributed_c10d._get_default_store()  # the only private torch name of the package
        store.set(f"holograd/alive/{tag}/{rank}", "1")
        keys = {r: f"holograd/alive/{tag}/{r}" for r in range(world_size)}
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r, key in keys.items() if not store.check([key])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # DistStoreError / a dead store host
        return None


class Comm:
    """Collectives on ``group`` (None: the default group) staged on ``device``."""

    def __init__(self, traffic: TrafficMeter, group: Any = None, device: torch.device | str = "cpu",
                 timeout: timedelta | None = None) -> None:
        self.traffic = traffic
        self.group = group
        self.device = torch.device(device)  # CPU for gloo, the rank's GPU for NCCL
        self.timeout = timeout  # the process group's (None: torch's default); bounds every blocking wait
        self.step = 0  # the HoloGrad step in progress, for error messages (set by the exchange)

    # -- topology -------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.distributed else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.distributed else 0

    def _global(self, rank: int) -> int:
        """Global rank of ``rank`` in ``group`` (what point-to-point calls and ``src`` expect)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _record(self, kind: str | None, op: Op, payload_bytes: int) -> None:
        if kind is not None:
            self.traffic.record(kind, op, payload_bytes)

    def run(self, what: str, collective: Callable[[], T]) -> T:
        """Run ``collective``; turn a backend failure into ``RankFailureError`` naming the step
        and the ranks that did not answer the liveness probe."""
        try:
            return collective()
        except RuntimeError as error:  # DistBackendError and gloo's plain RuntimeErrors
            raise self._failure(what, error) from error

    def _failure(self, what: str, error: BaseException) -> RankFailureError:
        if self.group is not None:
            silent = None  # the probe speaks for the default group only
        else:
            silent = unresponsive_ranks(f"{self.step}/{what}", self.rank, self.world_size)
        if silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not answer"
        elif silent is None:
            who = "the rendezvous store is unreachable too (it lives on rank 0 or torchrun's agent)"
        else:
            who = "every rank answered the probe afterwards"
        limit = f"{self.timeout.total_seconds():g} s" if self.timeout is not None else "the timeout"
        return RankFailureError(
            f"step {self.step}: the {what} collective failed on rank {self.rank}: {who}. A rank crashed, hung, or "
            f"stopped joining the per-step collectives (process-group timeout {limit}); the backend said: "
            f"{str(error).splitlines()[0][:300]} HINT: see that rank's log; README 'Failure and recovery' "
            "gives the restart recipe (the job resumes from its last checkpoint).")

    # -- tensor collectives -------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor, kind: str | None) -> torch.Tensor:
        """Every rank's ``tensor`` stacked in rank order: (N, *tensor.shape) on ``device``."""
        self._record(kind, "all_gather", tensor.numel() * tensor.element_size())
        flat = tensor.detach().to(self.device).contiguous().reshape(-1)
        if not self.distributed:
            return flat.reshape(1, *tensor.shape).clone()
        out = torch.empty(self.world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.run(kind or "all_gather", lambda: gather(out, flat, group=self.group))
        return out.reshape(self.world_size, *tensor.shape)

    def broadcast(self, tensors: Iterable[torch.Tensor], kind: str | None, src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (buffers, the initial state)."""
        for tensor in tensors:
            self._record(kind, "p2p", tensor.numel() * tensor.element_size())
            if self.distributed:
                staged = tensor.detach().to(self.device)  # the tensor itself when already there
                self.run(kind or "broadcast", lambda: dist.broadcast(staged, src=self._global(src), group=self.group))
                if staged.data_ptr() != tensor.data_ptr():
                    tensor.detach().copy_(staged)

    def all_reduce_sum(self, tensor: torch.Tensor, kind: str | None) -> torch.Tensor:
        """The sum of every rank's ``tensor``, as a new tensor on ``device``."""
        self._record(kind, "all_reduce", tensor.numel() * tensor.element_size())
        total = tensor.detach().to(self.device, copy=True)
        if self.distributed:
            self.run(kind or "all_reduce", lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group))
        return total

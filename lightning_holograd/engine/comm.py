"""The engine's collectives: one process group, one communication device, every byte counted.

Every collective of the package goes through ``Comm``: it passes ``group`` to
``torch.distributed``, stages tensors on ``device`` (CPU for gloo, the rank's GPU for
NCCL) and records its payload in the ``TrafficMeter`` under a traffic ``kind``
(``kind=None``: not counted, for simulation side channels that are not protocol traffic).
Ranks are ranks *within* ``group``; point-to-point calls translate them to global ranks.

Call contract: every method except ``send_object``/``recv_object`` is a blocking
collective that every rank of ``group`` must call, in the same order, with tensors of the
same shape and dtype. ``send_object`` on rank a and ``recv_object`` on rank b block until
they meet. Without an initialised process group every method acts as the single-rank
case (world size 1) and moves nothing.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .torch_private import broadcast_coalesced
from .traffic import Op, TrafficMeter

__all__ = ["BROADCAST_BUCKET_BYTES", "Comm"]

BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024  # DDP's and Lightning's module-state sync bucket


class Comm:
    """Collectives on ``group`` (None: the default group) staged on ``device``."""

    def __init__(self, traffic: TrafficMeter, group: Any = None, device: torch.device | str = "cpu") -> None:
        self.traffic = traffic
        self.group = group
        self.device = torch.device(device)  # CPU for gloo, the rank's GPU for NCCL

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

    # -- tensor collectives -------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor, kind: str | None) -> torch.Tensor:
        """Every rank's ``tensor`` stacked in rank order: (N, *tensor.shape) on ``device``."""
        self._record(kind, "all_gather", tensor.numel() * tensor.element_size())
        flat = tensor.detach().to(self.device).contiguous().reshape(-1)
        if not self.distributed:
            return flat.reshape(1, *tensor.shape).clone()
        out = torch.empty(self.world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.reshape(self.world_size, *tensor.shape)

    def broadcast(self, tensors: Iterable[torch.Tensor], kind: str | None, src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values (buffers, the initial state).

        Coalesced as DDP's module-state sync is: tensors are packed into buckets of at most
        ``BROADCAST_BUCKET_BYTES`` (grouped by dtype) and each bucket is one broadcast.
        """
        tensors = [tensor.detach() for tensor in tensors]
        self._record(kind, "p2p", sum(tensor.numel() * tensor.element_size() for tensor in tensors))
        if not self.distributed or not tensors:
            return
        staged = [tensor.to(self.device) for tensor in tensors]  # the tensors themselves when already there
        broadcast_coalesced(self.group, staged, BROADCAST_BUCKET_BYTES, src)
        for tensor, copy in zip(tensors, staged):
            if copy is not tensor:
                tensor.copy_(copy)

    def all_reduce_sum(self, tensor: torch.Tensor, kind: str | None) -> torch.Tensor:
        """The sum of every rank's ``tensor``, as a new tensor on ``device``."""
        self._record(kind, "all_reduce", tensor.numel() * tensor.element_size())
        total = tensor.detach().to(self.device, copy=True)
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    # -- objects (pickled; for verification payloads) ---------------------------------------------
    def send_object(self, obj: Any, dst: int, kind: str | None) -> None:
        """Send a picklable ``obj`` to rank ``dst``; blocks until ``dst`` receives it."""
        payload = [obj]
        self._record(kind, "p2p", len(pickle.dumps(payload)))
        dist.send_object_list(payload, dst=self._global(dst), group=self.group, device=self.device)

    def recv_object(self, src: int) -> Any:
        """The object rank ``src`` sends with ``send_object``; blocks until it arrives."""
        payload: list[Any] = [None]
        dist.recv_object_list(payload, src=self._global(src), group=self.group, device=self.device)
        return payload[0]

    def all_gather_object(self, obj: Any, kind: str | None) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order. NCCL stages on the current CUDA device."""
        self._record(kind, "all_gather", len(pickle.dumps(obj)))
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

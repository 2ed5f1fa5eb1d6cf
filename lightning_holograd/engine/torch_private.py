"""The private ``torch.distributed`` names the package uses, in one place.

``tests/test_private_names.py`` pins each one (it exists, with the signature used here),
so a torch upgrade that renames or changes one fails there rather than inside a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_group, _get_default_store
from torch.nn.modules.dropout import _DropoutNd as DropoutNd

__all__ = ["DropoutNd", "broadcast_coalesced", "default_store"]


def broadcast_coalesced(group: Any, tensors: Sequence[torch.Tensor], bucket_bytes: int, src: int) -> None:
    """Broadcast ``tensors`` in place from rank ``src`` of ``group`` (None: the default group),
    packed into buckets of at most ``bucket_bytes``: what DistributedDataParallel and
    Lightning's ``_sync_module_states`` use to sync module state (one collective per
    bucket instead of one per tensor). ``src`` is a rank within ``group``."""
    dist._broadcast_coalesced(group if group is not None else _get_default_group(), list(tensors), bucket_bytes,
                              src)


def default_store() -> Any:
    """The default process group's rendezvous store (a ``dist.Store``), which the liveness
    probe of a failed collective writes to; raises when it cannot be reached."""
    return _get_default_store()

"""spawn/fork launcher that also ships rank 0's protocol state back to the parent process.

Lightning's multiprocessing launcher brings rank 0's weights back to the process that
called ``fit``; the exchange state (chain, family, traffic, slashed ranks) lives only in
the workers, so this launcher brings it back too, into the strategy's declared
``final_protocol_state``. Like Lightning's weights, the state travels through a temporary
file: the result pipe is read only after the ranks exit, so a large payload (a codebook
basis) sent through it would block the rank forever.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from typing_extensions import override

from .lightning_private import MultiProcessingLauncher

__all__ = ["HoloGradLauncher", "ShipProtocolStateMixin"]

_EXTRA_KEY = "holograd_state_path"


class ShipProtocolStateMixin:
    """Placed before Lightning's spawn/fork launcher (``_MultiProcessingLauncher``) in the MRO."""

    @override
    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        """Rank 0, in the worker: save the exchange state to a temporary file."""
        extra = super().get_extra_results(trainer)  # type: ignore[misc]
        exchange = trainer.strategy.exchange
        if exchange is not None:
            handle, path = tempfile.mkstemp(prefix="holograd-state-", suffix=".pt")
            os.close(handle)
            torch.save(exchange.state_dict(), path)
            extra[_EXTRA_KEY] = path
        return extra

    @override
    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        """In the parent: load that file into ``strategy.final_protocol_state`` and delete it."""
        super().update_main_process_results(trainer, extra)  # type: ignore[misc]
        path = extra.get(_EXTRA_KEY)
        if path is not None:
            try:
                trainer.strategy.final_protocol_state = torch.load(path, weights_only=True)
            finally:
                os.remove(path)


class HoloGradLauncher(ShipProtocolStateMixin, MultiProcessingLauncher):
    """The spawn/fork launcher of ``HoloGradStrategy`` (``lightning.pytorch``)."""

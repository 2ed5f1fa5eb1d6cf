"""spawn/fork launcher that ships rank 0's protocol state back to the parent process, and
whose ranks die with that parent (Linux): a parent killed by SIGKILL, such as a test run
that timed out, leaves no rank behind blocked in a collective.

Lightning's multiprocessing launcher brings rank 0's weights back to the process that
called ``fit``; the exchange state (chain, family, traffic, slashed ranks) lives only in
the workers, so this launcher brings it back too, into the strategy's declared
``final_protocol_state``. Like Lightning's weights, the state travels through a temporary
file: the result pipe is read only after the ranks exit, so a large payload (a codebook
basis) sent through it would block the rank forever.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import tempfile
from typing import Any

import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from typing_extensions import override

__all__ = ["HoloGradLauncher", "ShipProtocolStateMixin", "die_with_parent"]

_PR_SET_PDEATHSIG = 1

_EXTRA_KEY = "holograd_state_path"


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when ``parent_pid`` (its parent) exits (Linux only)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not hasattr(os, "getppid"):
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:  # the parent died before the request: nobody would send it
        os.kill(os.getpid(), signal.SIGKILL)


class ShipProtocolStateMixin:
    """Placed before a ``_MultiProcessingLauncher`` in the MRO."""

    parent_pid: int | None = None  # the process that called fit; ranks die with it

    @override
    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.parent_pid = os.getpid()
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]

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


class HoloGradLauncher(ShipProtocolStateMixin, _MultiProcessingLauncher):
    """The spawn/fork launcher of ``HoloGradStrategy`` (``lightning.pytorch``)."""

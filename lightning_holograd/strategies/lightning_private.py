"""The private Lightning names the package uses, in one place.

Lightning offers no public way to do these few things (a launcher that ships extra state,
a strategy's start method and launcher slot, its process-group backend, Fabric's
gradient-sync switch). ``tests/test_private_names.py`` pins every name here, so a
Lightning upgrade that renames or changes one fails there rather than inside a run.
Overridden private hooks (``_configure_launcher``, ``_register_ddp_hooks``) are pinned by
``tests/strategy/test_overrides.py``.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher as FabricMultiProcessingLauncher,
)
from lightning.fabric.strategies.strategy import _BackwardSyncControl as BackwardSyncControl
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher as MultiProcessingLauncher

__all__ = [
    "BackwardSyncControl",
    "FabricMultiProcessingLauncher",
    "MultiProcessingLauncher",
    "pl_multiprocessing_launcher",
    "process_group_backend",
    "set_backward_sync_control",
    "set_launcher",
    "start_method",
]


def pl_multiprocessing_launcher() -> type:
    """``pytorch_lightning``'s spawn/fork launcher class (import only when that package is installed)."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return _MultiProcessingLauncher


def start_method(strategy: Any) -> str:
    """The ``start_method`` a DDP strategy (Trainer or Fabric) was built with."""
    return strategy._start_method


def set_launcher(strategy: Any, launcher: Any) -> None:
    """Replace the launcher that ``_configure_launcher`` chose."""
    strategy._launcher = launcher


def process_group_backend(strategy: Any) -> str:
    """The backend the strategy's process group uses (the argument, or the device's default)."""
    return strategy._get_process_group_backend()


def set_backward_sync_control(strategy: Any, control: Any) -> None:
    """Install the object ``Fabric.no_backward_sync`` asks to block gradient sync."""
    strategy._backward_sync_control = control

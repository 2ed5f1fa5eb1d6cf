"""The private Lightning names the package uses, in one place.

Lightning offers no public way to do these few things (a launcher that ships extra state,
a strategy's start method and launcher slot, its process-group backend and timeout, Fabric's
gradient-sync switch, the Trainer's SIGTERM collectives). ``tests/test_private_names.py``
and ``tests/strategy/test_lightning_private.py`` pin every name here, so a Lightning
upgrade that renames or changes one fails there rather than inside a run. Overridden
private hooks (``_configure_launcher``, ``_register_ddp_hooks``) are pinned by
``tests/strategy/test_overrides.py``.

SIGTERM: Lightning propagates it with collectives. Its signal handler calls
``dist.broadcast`` inside the handler, and its training loop broadcasts an 8-byte flag
from rank 0 before every batch (``_TrainingEpochLoop._broadcast_sigterm_tensor``). A
handler that runs while the main thread is between two collectives then joins a
collective the other ranks are not in, and a SIGTERM on a rank other than 0 is never seen
by the others. HoloGrad carries every rank's stop flag in the first collective of each
step instead (docs/PROTOCOL.md §1.1), so both are replaced, per trainer instance:

- ``trainer._signal_connector._sigterm_notifier_fn``: the SIGTERM handler's first part,
  replaced before ``Trainer._run`` registers the handlers (which happens after the
  strategy's ``setup``);
- ``trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor``: replaced by a no-op.

Both names exist, with these roles, in ``lightning.pytorch`` and ``pytorch_lightning`` 2.4-2.6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.fabric.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher as FabricMultiProcessingLauncher,
)
from lightning.fabric.strategies.strategy import (
    _BackwardSyncControl as BackwardSyncControl,
)
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher as MultiProcessingLauncher,
)

__all__ = [
    "PINNED",
    "BackwardSyncControl",
    "FabricMultiProcessingLauncher",
    "MultiProcessingLauncher",
    "pl_multiprocessing_launcher",
    "process_group_backend",
    "process_group_timeout",
    "replace_sigterm_collectives",
    "set_backward_sync_control",
    "set_launcher",
    "start_method",
]

# (owner, attribute) pairs ``replace_sigterm_collectives`` replaces; the test checks that Lightning still has them.
PINNED = (
    ("trainer.connectors.signal_connector._SignalConnector", "_sigterm_notifier_fn"),
    ("loops.training_epoch_loop._TrainingEpochLoop", "_broadcast_sigterm_tensor"),
)


def pl_multiprocessing_launcher() -> type:
    """``pytorch_lightning``'s spawn/fork launcher class (import only when that package is installed)."""
    from pytorch_lightning.strategies.launchers.multiprocessing import (
        _MultiProcessingLauncher,
    )

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


def process_group_timeout(strategy: Any) -> Any:
    """The ``timeout`` a DDP strategy (Trainer or Fabric) was built with (a ``timedelta`` or None)."""
    return strategy._timeout


def set_backward_sync_control(strategy: Any, control: Any) -> None:
    """Install the object ``Fabric.no_backward_sync`` asks to block gradient sync."""
    strategy._backward_sync_control = control


def replace_sigterm_collectives(trainer: Any, notifier: Callable[[int, Any], None]) -> None:
    """Make ``notifier(signum, frame)`` the trainer's SIGTERM notifier and drop the per-batch broadcast."""
    connector = trainer._signal_connector
    loop = trainer.fit_loop.epoch_loop
    for owner, name in ((connector, "_sigterm_notifier_fn"), (loop, "_broadcast_sigterm_tensor")):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(f"{type(owner).__name__}.{name} is missing: this Lightning version is not supported "
                               "by HoloGrad's SIGTERM handling. HINT: use lightning 2.4-2.6.")
    connector._sigterm_notifier_fn = notifier
    loop._broadcast_sigterm_tensor = _no_broadcast


def _no_broadcast() -> None:
    """The stop flag travels in the exchange's commit instead."""

"""The one place that touches Lightning's private names (pinned by ``tests/strategy/test_lightning_private.py``).

Lightning propagates SIGTERM with collectives: its signal handler calls ``dist.broadcast``
inside the handler, and its training loop broadcasts an 8-byte flag from rank 0 before
every batch (``_TrainingEpochLoop._broadcast_sigterm_tensor``). A handler that runs while
the main thread is between two collectives then joins a collective the other ranks are
not in, and a SIGTERM on a rank other than 0 is never seen by the others. HoloGrad carries
every rank's stop flag in the first collective of each step instead (docs/PROTOCOL.md
§1.1), so both are replaced, per trainer instance:

- ``trainer._signal_connector._sigterm_notifier_fn``: the SIGTERM handler's first part,
  replaced before ``Trainer._run`` registers the handlers (which happens after the
  strategy's ``setup``);
- ``trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor``: replaced by a no-op.

Both names exist, with these roles, in ``lightning.pytorch`` and ``pytorch_lightning`` 2.4-2.6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PINNED", "replace_sigterm_collectives"]

# (owner, attribute) pairs this module replaces; the test checks that Lightning still has them.
PINNED = (
    ("trainer.connectors.signal_connector._SignalConnector", "_sigterm_notifier_fn"),
    ("loops.training_epoch_loop._TrainingEpochLoop", "_broadcast_sigterm_tensor"),
)


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

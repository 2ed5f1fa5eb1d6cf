"""The Lightning private names that ``strategies/lightning_private.py`` replaces still exist
and still play their role, in ``lightning.pytorch`` and ``pytorch_lightning``. If Lightning
renames or inlines them, this fails instead of SIGTERM handling silently going back to
Lightning's collectives (a broadcast inside the signal handler, and one every batch)."""

from __future__ import annotations

import importlib
import inspect
import signal

import pytest

from lightning_holograd.strategies.lightning_private import PINNED, replace_sigterm_collectives

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _owner(package: str, dotted: str) -> type:
    module_name, _, class_name = dotted.rpartition(".")
    return getattr(importlib.import_module(f"{package}.{module_name}"), class_name)


@pytest.mark.parametrize("package", PACKAGES)
def test_pinned_names_exist_and_are_used_where_replaced(package):
    for dotted, name in PINNED:
        assert callable(getattr(_owner(package, dotted), name, None)), f"{package}: {dotted}.{name} is gone"
    connector = _owner(package, "trainer.connectors.signal_connector._SignalConnector")
    # the handler list is built from the instance attribute at registration: an instance override is used
    assert "self._sigterm_notifier_fn" in inspect.getsource(connector.register_signal_handlers)
    loop = _owner(package, "loops.training_epoch_loop._TrainingEpochLoop")
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(loop.advance)
    assert "broadcast" in inspect.getsource(loop._broadcast_sigterm_tensor)
    trainer_module = importlib.import_module(f"{package}.trainer.trainer")
    run = inspect.getsource(trainer_module.Trainer._run)  # handlers are registered after strategy.setup
    assert run.index("self.strategy.setup(self)") < run.index("register_signal_handlers()")


@pytest.mark.parametrize("package", PACKAGES)
def test_replacement_reaches_the_registered_handler(package):
    trainer = importlib.import_module(package).Trainer(accelerator="cpu", devices=1, logger=False,
                                                       enable_checkpointing=False, enable_progress_bar=False)
    seen = []
    replace_sigterm_collectives(trainer, lambda signum, frame: seen.append(signum))
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None  # no collective
    previous = signal.getsignal(signal.SIGTERM)
    try:
        trainer._signal_connector.register_signal_handlers()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        trainer._signal_connector.teardown()
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]

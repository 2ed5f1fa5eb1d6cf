"""Concrete strategy classes for ``lightning.pytorch`` and ``pytorch_lightning``.

The two packages keep separate class hierarchies and strategy registries, so one class
is built per installed package from the package-independent mixins and registered as
``holograd`` (Lightning's script launcher), ``holograd_spawn`` and ``holograd_fork``.
Registering again (a second import, a reload) is harmless: a reload reuses the classes. Classes are
bound to module-level names so that spawn can pickle them.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Any

import torch

from .callbacks.metrics import HoloGradMetricsMixin
from .strategy import HoloGradStrategyMixin

__all__ = ["HoloGradStrategy", "PLHoloGradStrategy", "register_strategies", "STRATEGY_NAMES"]

STRATEGY_NAMES = {"holograd": "popen", "holograd_spawn": "spawn", "holograd_fork": "fork"}


class _ShipStateMixin:
    """spawn/fork launcher: send rank 0's protocol state back to the parent process.

    Like Lightning's own weights, the state travels through a temporary file: the result
    pipe is read only after the ranks exit, so a large payload (a codebook basis) sent
    through it would block the rank forever.
    """

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)  # type: ignore[misc]
        exchange = trainer.strategy.exchange
        if exchange is not None:
            handle, path = tempfile.mkstemp(prefix="holograd-state-", suffix=".pt")
            os.close(handle)
            torch.save(exchange.state_dict(), path)
            extra["holograd_state_path"] = path
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)  # type: ignore[misc]
        path = extra.get("holograd_state_path")
        if path is not None:
            try:
                trainer.strategy.final_state = torch.load(path, weights_only=True)
            finally:
                os.remove(path)


def _build(package: str, prefix: str) -> type:
    """The strategy class for ``package``; a reload reuses the classes it already built,
    so ``isinstance`` checks and pickling keep working across reloads."""
    existing = globals().get(f"{prefix}Strategy")
    if existing is not None:
        return existing
    ddp = importlib.import_module(f"{package}.strategies.ddp")
    launchers = importlib.import_module(f"{package}.strategies.launchers.multiprocessing")
    callbacks = importlib.import_module(f"{package}.callbacks")
    launcher_name, metrics_name, strategy_name = (f"_{prefix}Launcher", f"{prefix}Metrics", f"{prefix}Strategy")
    launcher_cls = type(launcher_name, (_ShipStateMixin, launchers._MultiProcessingLauncher),
                        {"__module__": __name__, "__qualname__": launcher_name})
    metrics_cls = type(metrics_name, (HoloGradMetricsMixin, callbacks.Callback),
                       {"__module__": __name__, "__qualname__": metrics_name})

    def _configure_launcher(self: Any) -> None:
        if self._start_method == "popen":
            ddp.DDPStrategy._configure_launcher(self)
        else:
            self._launcher = launcher_cls(self, start_method=self._start_method)

    strategy_cls = type(strategy_name, (HoloGradStrategyMixin, ddp.DDPStrategy), {
        "__module__": __name__, "__qualname__": strategy_name, "__doc__": HoloGradStrategyMixin.__doc__,
        "_configure_launcher": _configure_launcher, "metrics_callback_cls": metrics_cls,
    })
    globals()[launcher_name], globals()[metrics_name] = launcher_cls, metrics_cls
    return strategy_cls


def register_strategies(strategy_cls: type, package: str) -> None:
    registry = importlib.import_module(f"{package}.strategies").StrategyRegistry
    for name, start_method in STRATEGY_NAMES.items():
        registry.register(name, strategy_cls, description=f"HoloGrad scalar exchange ({start_method} launcher)",
                          override=True, start_method=start_method)


HoloGradStrategy = _build("lightning.pytorch", "HoloGrad")
register_strategies(HoloGradStrategy, "lightning.pytorch")

try:
    PLHoloGradStrategy = _build("pytorch_lightning", "PLHoloGrad")
    register_strategies(PLHoloGradStrategy, "pytorch_lightning")
except ImportError:  # pytorch_lightning is optional
    PLHoloGradStrategy = None

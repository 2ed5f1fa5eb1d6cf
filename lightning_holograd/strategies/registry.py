"""The strategy names, registered on import in each registry that should know them.

``lightning.pytorch``, ``pytorch_lightning`` and ``lightning.fabric`` keep separate
registries with the same ``register`` API; Lightning has no entry point for third-party
strategies, so the package registers its own on import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STRATEGY_NAMES", "register_names"]

STRATEGY_NAMES = {"holograd": "popen", "holograd_spawn": "spawn", "holograd_fork": "fork"}


def register_names(cls: type, strategy_registry: Any) -> None:
    """Register ``holograd`` (script launcher), ``holograd_spawn`` and ``holograd_fork`` for ``cls``.

    Registering again replaces only this package's own entries (a re-import, a module
    reload); a name that another package registered is refused.
    """
    for name, start_method in STRATEGY_NAMES.items():
        existing = strategy_registry[name]["strategy"] if name in strategy_registry else None
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__,
                                                                                      cls.__qualname__):
            raise ValueError(f"strategy name {name!r} is already registered to {existing.__module__}."
                             f"{existing.__qualname__}. HINT: pass {cls.__name__}(...) as an instance.")
        strategy_registry.register(name, cls, description=f"HoloGrad scalar exchange ({start_method} launcher)",
                                   override=True, start_method=start_method)

"""The Lightning layer: ``HoloGradStrategy`` and its ``pytorch_lightning`` twin.

Importing this package registers ``holograd``, ``holograd_spawn`` and ``holograd_fork``
with ``lightning.pytorch`` and, when it is installed, with ``pytorch_lightning`` (the two
packages keep separate registries). Registering again is harmless.
"""

from importlib.util import find_spec

import lightning.pytorch.strategies as _lightning_strategies

from .config import HoloGradConfig
from .strategy import STRATEGY_NAMES, HoloGradStrategy, HoloGradStrategyMixin

HoloGradStrategy.register_strategies(_lightning_strategies.StrategyRegistry)

if find_spec("pytorch_lightning") is not None:
    import pytorch_lightning.strategies as _pl_strategies

    from .pl import PLHoloGradStrategy

    PLHoloGradStrategy.register_strategies(_pl_strategies.StrategyRegistry)
else:  # pytorch_lightning is optional
    PLHoloGradStrategy = None  # type: ignore[assignment,misc]

__all__ = ["HoloGradConfig", "HoloGradStrategy", "HoloGradStrategyMixin", "PLHoloGradStrategy", "STRATEGY_NAMES"]

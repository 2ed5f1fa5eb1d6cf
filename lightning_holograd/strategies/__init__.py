"""The Lightning layer: ``HoloGradStrategy`` (Trainer), ``HoloGradFabricStrategy`` (Fabric) and
the ``pytorch_lightning`` twin.

Importing this package registers ``holograd``, ``holograd_spawn`` and ``holograd_fork``
with ``lightning.pytorch`` (``Trainer(strategy=...)``), with ``lightning.fabric``
(``Fabric(strategy=...)``) and, when the ``pl`` extra is installed, with
``pytorch_lightning`` (the three keep separate registries). Registering again is harmless.
"""

import lightning.fabric.strategies as _fabric_strategies
import lightning.pytorch.strategies as _lightning_strategies

from .advice import HoloGradSetupWarning
from .config import HoloGradConfig
from .fabric import HoloGradFabricStrategy
from .registry import STRATEGY_NAMES
from .strategy import HoloGradStrategy, HoloGradStrategyMixin

HoloGradStrategy.register_strategies(_lightning_strategies.StrategyRegistry)
HoloGradFabricStrategy.register_strategies(_fabric_strategies.STRATEGY_REGISTRY)

try:  # the standalone pytorch_lightning package is optional: pip install lightning-holograd[pl]
    import pytorch_lightning.strategies as _pl_strategies
except ModuleNotFoundError as missing:
    if missing.name != "pytorch_lightning":
        raise
    PLHoloGradStrategy = None  # type: ignore[assignment,misc]
else:
    from .pl import PLHoloGradStrategy

    PLHoloGradStrategy.register_strategies(_pl_strategies.StrategyRegistry)

__all__ = ["HoloGradConfig", "HoloGradFabricStrategy", "HoloGradSetupWarning", "HoloGradStrategy",
           "HoloGradStrategyMixin", "PLHoloGradStrategy", "STRATEGY_NAMES"]

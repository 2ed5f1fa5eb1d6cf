"""The same strategy for the standalone ``pytorch_lightning`` package.

``pytorch_lightning`` keeps its own class hierarchy and strategy registry, so it needs its
own concrete classes, built from the same mixins. Imported only when it is installed.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from .launcher import ShipProtocolStateMixin
from .metrics import HoloGradMetricsMixin
from .strategy import HoloGradStrategyMixin

__all__ = ["PLHoloGradStrategy"]


class PLHoloGradMetrics(HoloGradMetricsMixin, Callback):
    """The metrics callback for ``pytorch_lightning``."""


class PLHoloGradLauncher(ShipProtocolStateMixin, _MultiProcessingLauncher):
    """The spawn/fork launcher of ``PLHoloGradStrategy``."""


class PLHoloGradStrategy(HoloGradStrategyMixin, DDPStrategy):
    __doc__ = HoloGradStrategyMixin.__doc__
    metrics_callback_cls = PLHoloGradMetrics
    launcher_cls = PLHoloGradLauncher

"""lightning-holograd: HoloGrad data-parallel training for PyTorch Lightning.

``import lightning_holograd`` registers ``strategy="holograd"`` (and ``holograd_spawn``,
``holograd_fork``) with ``lightning.pytorch`` and, when installed, ``pytorch_lightning``.
"""

from . import protocol
from .callbacks import ADCBootstrap, ByzantineSimulator, ProofVerifier
from .config import HoloGradConfig
from .exchange import HoloGradExchange, ReplicaDivergenceError, StepContext
from .registration import HoloGradStrategy, PLHoloGradStrategy
from .traffic import TrafficMeter

__version__ = "0.1.0"

__all__ = [
    "ADCBootstrap",
    "ByzantineSimulator",
    "HoloGradConfig",
    "HoloGradExchange",
    "HoloGradStrategy",
    "PLHoloGradStrategy",
    "ProofVerifier",
    "ReplicaDivergenceError",
    "StepContext",
    "TrafficMeter",
    "protocol",
    "__version__",
]

"""lightning-holograd: HoloGrad data-parallel training for PyTorch Lightning.

``import lightning_holograd`` registers ``strategy="holograd"`` (and ``holograd_spawn``,
``holograd_fork``) with ``lightning.pytorch`` and, when installed, ``pytorch_lightning``.

Layers (README "Architecture"): ``protocol`` (pure torch), ``engine`` (torch.distributed),
``strategies`` (Lightning), ``callbacks`` (user-facing settings); ``demos`` holds the
example tasks.
"""

from . import protocol
from .callbacks import ADCBootstrap, ByzantineSimulator, ProofVerifier
from .engine import HoloGradExchange, ReplicaDivergenceError, StepContext, TrafficMeter
from .strategies import HoloGradConfig, HoloGradStrategy, PLHoloGradStrategy

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

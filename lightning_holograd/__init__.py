"""lightning-holograd: HoloGrad data-parallel training for PyTorch Lightning.

``import lightning_holograd`` registers ``strategy="holograd"`` with Lightning.
"""

from . import protocol

__version__ = "0.1.0"

__all__ = ["protocol", "__version__"]

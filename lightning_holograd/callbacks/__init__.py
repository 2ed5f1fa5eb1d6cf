"""Lightning callbacks that drive the protocol around the strategy."""

from .bootstrap import ADCBootstrap

__all__ = ["ADCBootstrap"]

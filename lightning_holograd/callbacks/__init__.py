"""Lightning callbacks that drive the protocol around the strategy."""

from .bootstrap import ADCBootstrap
from .byzantine import ByzantineSimulator
from .verifier import ProofVerifier

__all__ = ["ADCBootstrap", "ByzantineSimulator", "ProofVerifier"]

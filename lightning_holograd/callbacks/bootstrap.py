"""Codebook (ADC) bootstrap and refresh: when to take a true-gradient step (docs/PROTOCOL.md §5, §8)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["ADCBootstrap"]


class ADCBootstrap(Callback):
    """Take a true-gradient step on the first ``bootstrap_steps`` optimizer steps (the
    bootstrap) and then every ``refresh_every`` steps (a refresh; 0: never refresh).

    A true-gradient step all-reduces the mean gradient of the honest (not slashed) ranks
    (one full all-reduce, counted as ``true_gradient`` traffic), feeds it to the direction
    family (the codebook's Oja update; the momentum family's average), logs the captured
    energy ``holograd/captured_energy`` measured against it, and applies it as the step's
    gradient. Such steps carry no scalar claims, so they cannot be verified; they are
    marked with ``holograd/true_gradient_step = 1``. The decision depends only on the
    global step, so every rank takes the same one.
    """

    def __init__(self, bootstrap_steps: int = 10, refresh_every: int = 0) -> None:
        if isinstance(bootstrap_steps, bool) or not isinstance(bootstrap_steps, int) or bootstrap_steps < 0:
            raise ValueError(f"bootstrap_steps={bootstrap_steps!r} must be an integer >= 0.")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"refresh_every={refresh_every!r} must be an integer >= 0. HINT: 0 disables refresh.")
        self.bootstrap_steps = bootstrap_steps
        self.refresh_every = refresh_every

    def is_true_gradient_step(self, step: int) -> bool:
        """``step`` counts optimizer steps from 0."""
        if step < self.bootstrap_steps:
            return True
        return bool(self.refresh_every) and (step - self.bootstrap_steps) % self.refresh_every == self.refresh_every - 1

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        request = getattr(trainer.strategy, "request_true_gradient", None)
        if request is None:
            raise TypeError(f"ADCBootstrap needs strategy='holograd', got {type(trainer.strategy).__name__}.")
        if self.is_true_gradient_step(trainer.global_step):
            request()

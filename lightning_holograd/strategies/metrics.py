"""Logs the strategy's per-step protocol metrics through the Lightning loggers."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["HoloGradMetrics", "HoloGradMetricsMixin", "PROGRESS_BAR_METRICS", "SPARSE_METRICS"]

# Shown in the progress bar; everything else goes to the loggers only.
PROGRESS_BAR_METRICS = ("holograd/bytes_per_step", "holograd/compression")
# Measured only on some steps: written straight to the loggers at that step, because
# self.log would repeat the last value on every later step.
SPARSE_METRICS = ("holograd/captured_energy",)


class HoloGradMetricsMixin:
    """Logs ``strategy.pop_step_metrics()`` once per optimizer step; the strategy adds
    this callback itself.

    Metrics describe the shared step and are identical on every rank, so they are
    logged without cross-rank reduction.
    """

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.strategy.pop_step_metrics()
        if not metrics:  # not the last micro-batch of an optimizer step
            return
        sparse = {name: value for name, value in metrics.items() if name in SPARSE_METRICS}
        if sparse and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(sparse, step=trainer.global_step - 1)  # the step just taken
        for name, value in metrics.items():
            if name not in SPARSE_METRICS:
                pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name in PROGRESS_BAR_METRICS,
                              batch_size=1)


class HoloGradMetrics(HoloGradMetricsMixin, Callback):
    """The metrics callback for ``lightning.pytorch``."""

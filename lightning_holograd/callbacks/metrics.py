"""Logs the strategy's per-step protocol metrics through the Lightning loggers."""

from __future__ import annotations

from typing import Any

__all__ = ["HoloGradMetricsMixin", "PROGRESS_BAR_METRICS"]

# Shown in the progress bar; everything else goes to the loggers only.
PROGRESS_BAR_METRICS = ("holograd/bytes_per_step", "holograd/compression")
# Measured only on some steps: written straight to the loggers at that step, because
# self.log would repeat the last value on every later step.
SPARSE_METRICS = ("holograd/captured_energy",)


class HoloGradMetricsMixin:
    """Logs ``strategy.fresh_metrics`` once per optimizer step; the strategy adds it itself.

    Metrics describe the shared step and are identical on every rank, so they are
    logged without cross-rank reduction. Concrete ``Callback`` classes for
    ``lightning.pytorch`` and ``pytorch_lightning`` are built in ``registration.py``.
    """

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log_fresh(trainer, pl_module)

    @staticmethod
    def _log_fresh(trainer: Any, pl_module: Any) -> None:
        metrics = getattr(trainer.strategy, "fresh_metrics", None)
        if not metrics:
            return
        trainer.strategy.fresh_metrics = {}
        sparse = {name: value for name, value in metrics.items() if name in SPARSE_METRICS}
        if sparse and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(sparse, step=trainer.global_step - 1)  # the step just taken
        for name, value in metrics.items():
            if name not in SPARSE_METRICS:
                pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name in PROGRESS_BAR_METRICS,
                              batch_size=1)

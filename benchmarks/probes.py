"""Callbacks that measure a rank during a benchmark fit and write one JSON file per rank.

- ``StepProbe`` (``bench_strategy``): step times, train losses, RSS (peak and at train
  start), the strategy's traffic meter, and a digest of the final parameters.
- ``NetProbe`` (``netbench_worker``): step times, the validation curve with training seconds
  (validation excluded) and the bytes the rank's network interface sent, read from the
  kernel (``/proc/net/dev`` of the rank's namespace).

Both time a step from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
exchange, optimizer step) and write ``<out>/<name>_rank<r>.json`` at train end.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch


def vm_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (VmRSS: current RSS, VmHWM: peak RSS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def iface_tx_bytes(iface: str | None, proc_net_dev: str = "/proc/net/dev") -> int | None:
    """Bytes sent by ``iface`` in this process's network namespace (None if unknown)."""
    if not iface:
        return None
    try:
        with open(proc_net_dev) as fh:
            for line in fh:
                name, sep, rest = line.partition(":")
                if sep and name.strip() == iface:
                    return int(rest.split()[8])  # receive: 8 fields, then transmit bytes
    except OSError:
        return None
    return None


def traffic_meter(trainer: Any) -> Any:
    """HoloGrad's traffic meter (ring model), or None under another strategy."""
    exchange = getattr(trainer.strategy, "exchange", None)
    return None if exchange is None else exchange.traffic


class StepTimer(L.Callback):
    """Wall seconds of every training step, and the rank file writer."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.step_times: list[float] = []
        self._t_step = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._t_step)

    def write(self, rank: int, payload: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.name}_rank{rank}.json").write_text(json.dumps(payload))


class StepProbe(StepTimer):
    """Per-rank step times, losses, RSS, traffic and final parameters (``bench_strategy``);
    rank 0 also writes its parameters to ``<name>_params.f32``."""

    def __init__(self, out: Path, name: str, warmup: int) -> None:
        super().__init__(out, name)
        self.warmup = warmup
        self.losses: list[float] = []
        self.rss_start_kb: int | None = None
        self.maxrss_start_kb = 0
        self.traffic_at_warmup: tuple[float, int] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.rss_start_kb = vm_kb("VmRSS")
        self.maxrss_start_kb = maxrss_kb()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        traffic = traffic_meter(trainer)
        if trainer.global_step == self.warmup and traffic is not None:
            self.traffic_at_warmup = (traffic.run_wire(), traffic.steps)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()) if loss is not None else math.nan)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        rank = trainer.global_rank
        flat = torch.cat([p.detach().reshape(-1).float() for p in pl_module.parameters() if p.requires_grad])
        if rank == 0:
            flat.numpy().tofile(self.out / f"{self.name}_params.f32")
        out: dict[str, Any] = {
            "rank": rank, "world_size": trainer.world_size, "threads": torch.get_num_threads(),
            "step_times_s": self.step_times, "losses": self.losses, "global_step": trainer.global_step,
            "num_params": int(flat.numel()), "param_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            "rss_start_kb": self.rss_start_kb, "maxrss_start_kb": self.maxrss_start_kb,
            "maxrss_end_kb": maxrss_kb(), "rss_end_kb": vm_kb("VmRSS"), "hwm_end_kb": vm_kb("VmHWM"),
        }
        traffic = traffic_meter(trainer)
        if traffic is not None:
            out["traffic"] = {
                "steps": traffic.steps, "run_wire": traffic.run_wire(), "total_wire": dict(traffic.total_wire),
                "total_payload": dict(traffic.total_payload),
                "allreduce_bytes_per_step": traffic.allreduce_bytes_per_step, "at_warmup": self.traffic_at_warmup,
                "num_directions": trainer.strategy.exchange.family.num_directions,
            }
        self.write(rank, out)


class NetProbe(StepTimer):
    """Step times, validation curve with training seconds and bytes, peak RSS (``netbench_worker``)."""

    def __init__(self, out: Path, name: str, iface: str | None, warmup: int) -> None:
        super().__init__(out, name)
        self.iface, self.warmup = iface, warmup
        self.curve: list[dict[str, Any]] = []
        self.train_s = 0.0  # training time so far, validation excluded
        self._t_resume = 0.0
        self.bytes_start: int | None = None
        self.bytes_warm: int | None = None

    def sent(self) -> int | None:
        """Bytes the interface sent since train start."""
        now = iface_tx_bytes(self.iface)
        return None if now is None or self.bytes_start is None else now - self.bytes_start

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.bytes_start = iface_tx_bytes(self.iface)
        self._t_resume = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.bytes_warm = self.sent()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.train_s += time.perf_counter() - self._t_resume

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val_loss")
        self.curve.append({"step": trainer.global_step, "val_loss": float(val) if val is not None else math.nan,
                           "train_s": self.train_s, "bytes": self.sent()})
        self._t_resume = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        timed = self.step_times[self.warmup:] or self.step_times
        sent = self.sent()
        steps_after_warmup = trainer.global_step - self.warmup
        out = {
            "name": self.name, "rank": trainer.global_rank, "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "num_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "step_median_s": statistics.median(timed), "step_mean_s": statistics.fmean(timed),
            "step_times_s": self.step_times, "curve": self.curve, "peak_rss_mb": maxrss_kb() / 1024,
            "iface": self.iface, "bytes_sent_train": sent,
            "bytes_per_step_after_warmup": (None if sent is None or self.bytes_warm is None or steps_after_warmup <= 0
                                            else (sent - self.bytes_warm) / steps_after_warmup),
        }
        traffic = traffic_meter(trainer)
        if traffic is not None:  # HoloGrad's own ring-model meter, for comparison with the interface
            out["holograd_meter_wire"] = dict(traffic.total_wire)
        self.write(trainer.global_rank, out)

#!/usr/bin/env python3
"""One rank of a two-node benchmark run (started by ``torchrun`` inside a network namespace).

``frontier.py`` and ``slow_link.py`` start this file on both "nodes" (network namespaces
joined by a veth pair, see ``netns.py``) with ``torchrun --nnodes 2 --nproc-per-node 1``.
It trains the tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml`` under one communication
strategy, described by a JSON spec (``--spec``):

  {"name": ..., "kind": "ddp" | "ddp_hook" | "localsgd" | "diloco" | "holograd", ...}

- ``ddp``: Lightning's ``DDPStrategy``; the gradient all-reduce is DDP's C++ reducer.
- ``ddp_hook``: DDP with a torch comm hook, ``"hook": "bf16" | "fp16" | "powersgd"``
  (``"rank"``, ``"start_iter"`` for PowerSGD). Lightning registers comm hooks only on
  CUDA; the strategy here registers them on CPU too (they work on gloo).
- ``localsgd``: no gradient communication; torch's ``PeriodicModelAverager`` (through
  Lightning's post-local-SGD support) averages the parameters every ``"period"`` steps.
- ``diloco``: no gradient communication; every ``"period"`` steps the pseudo-gradient
  (anchor - local parameters) is all-reduced and an outer ``torch.optim.SGD`` (Nesterov,
  ``"outer_lr"``, ``"outer_momentum"``) steps the shared anchor, which every rank copies.
- ``holograd``: ``HoloGradStrategy(**spec["init_args"])``, plus ``ADCBootstrap`` when
  ``"bootstrap"`` (and ``"refresh"``) are given.

Every rank writes ``<out>/<name>_rank<r>.json`` with its step times, peak RSS, the
validation curve (val_loss, train-time seconds and bytes sent at each check) and the
bytes its network interface sent (``/proc/net/dev`` of its namespace, interface
``--iface``) between train start and train end. Bytes are read from the kernel, so they
include everything the rank sent: gradients or scalars, Lightning's own collectives,
TCP/IP headers and ACKs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from benchmarks.bench_strategy import DATA_KW as _STRATEGY_DATA_KW  # noqa: E402
from benchmarks.bench_strategy import MODEL_KW, SEED  # noqa: E402  the tiny GPT-2 of configs/gpt2-tiny-cpu.yaml

DATA_KW = {**_STRATEGY_DATA_KW, "max_bytes": 4_000_000}


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


class CPUHookDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that registers its comm hook on any device (Lightning: CUDA only)."""

    def _register_ddp_hooks(self) -> None:
        # Lightning's helper refuses bf16 without CUDA; DDP's own registration works on gloo.
        if self._ddp_comm_hook is not None:
            self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)


def bf16_compress_hook_gloo(state, bucket):  # noqa: ANN001, ANN201  DDP checks annotations: none
    """torch's ``bf16_compress_hook`` under another name: DDP refuses that hook by name unless
    NCCL >= 2.10 is present, but gloo all-reduces bfloat16 tensors fine."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(state, bucket)


def powersgd_hook_in_order(state, bucket):  # noqa: ANN001, ANN201  DDP checks annotations: none
    """torch's ``powerSGD_hook``, finished before the next bucket's starts. Its second
    all-reduce is issued from a future callback; gloo completes buckets on several threads,
    so with several buckets in flight the ranks can issue those all-reduces in different
    orders and gloo aborts on a size mismatch. Waiting keeps the order; it gives up
    overlapping communication with the rest of the backward pass."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    fut = powerSGD_hook.powerSGD_hook(state, bucket)
    fut.wait()
    return fut


class DiLoCoAverager:
    """DiLoCo outer step every ``period`` inner steps, in the ``average_parameters`` slot of
    Lightning's model averager: all-reduce the mean pseudo-gradient (anchor - theta_local),
    step the anchor with ``torch.optim.SGD(nesterov=True)``, copy it into the parameters."""

    def __init__(self, params: list[torch.Tensor], period: int, outer_lr: float, outer_momentum: float) -> None:
        self.period = period
        self.step = 0
        self.anchor = [p.detach().clone().requires_grad_(True) for p in params]
        self.outer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum, nesterov=True)

    @torch.no_grad()
    def average_parameters(self, params: Any) -> None:
        params = list(params)
        self.step += 1
        if self.step % self.period:
            return
        if len(params) != len(self.anchor):
            raise RuntimeError(f"DiLoCo: {len(params)} parameters have gradients, expected {len(self.anchor)}.")
        flat = torch.cat([(a - p).reshape(-1) for a, p in zip(self.anchor, params)])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for a, g in zip(self.anchor, flat.split([a.numel() for a in self.anchor])):
            a.grad = g.view_as(a)
        self.outer.step()
        for a, p in zip(self.anchor, params):
            p.copy_(a)


class DiLoCoStrategy(CPUHookDDPStrategy):
    """Post-local-SGD plumbing of ``DDPStrategy`` with a ``DiLoCoAverager`` as the averager."""

    def __init__(self, period: int, outer_lr: float, outer_momentum: float, **kwargs: Any) -> None:
        super().__init__(model_averaging_period=period, **kwargs)
        self._outer = (outer_lr, outer_momentum)

    def _enable_model_averaging(self) -> None:
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self._model_averager = DiLoCoAverager(params, self._model_averaging_period, *self._outer)


def build_strategy(spec: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The strategy (and extra callbacks) of one benchmark run."""
    kind = spec["kind"]
    if kind == "ddp":
        return DDPStrategy(), []
    if kind == "ddp_hook":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        hook = spec["hook"]
        if hook == "bf16":
            return CPUHookDDPStrategy(ddp_comm_hook=bf16_compress_hook_gloo), []
        if hook == "fp16":
            return CPUHookDDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook), []
        if hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=spec["rank"],
                                                start_powerSGD_iter=spec.get("start_iter", 10))
            return CPUHookDDPStrategy(ddp_comm_state=state, ddp_comm_hook=powersgd_hook_in_order), []
        raise ValueError(f"hook={hook!r} is unknown. HINT: bf16, fp16 or powersgd.")
    if kind in ("localsgd", "diloco"):
        from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as post

        # start_localSGD_iter=0, post_local_gradient_allreduce=False: no gradient traffic at all.
        common = {"ddp_comm_state": post.PostLocalSGDState(None, None, start_localSGD_iter=0,
                                                           post_local_gradient_allreduce=False),
                  "ddp_comm_hook": post.post_localSGD_hook}
        if kind == "localsgd":
            return CPUHookDDPStrategy(model_averaging_period=spec["period"], **common), []
        return DiLoCoStrategy(spec["period"], spec.get("outer_lr", 0.7), spec.get("outer_momentum", 0.9),
                              **common), []
    if kind == "holograd":
        from lightning_holograd import ADCBootstrap, HoloGradStrategy

        callbacks = []
        if spec.get("bootstrap"):
            callbacks.append(ADCBootstrap(bootstrap_steps=spec["bootstrap"], refresh_every=spec.get("refresh", 0)))
        return HoloGradStrategy(**spec.get("init_args", {})), callbacks
    raise ValueError(f"kind={kind!r} is unknown. HINT: ddp, ddp_hook, localsgd, diloco or holograd.")


class NetProbe(L.Callback):
    """Step times, validation curve with train-time and bytes, peak RSS; one JSON per rank."""

    def __init__(self, out: Path, name: str, iface: str | None, warmup: int) -> None:
        self.out, self.name, self.iface, self.warmup = out, name, iface, warmup
        self.step_times: list[float] = []
        self.curve: list[dict[str, Any]] = []
        self._t_step = 0.0
        self._train_s = 0.0  # training time so far, validation excluded
        self._t_resume = 0.0
        self.bytes_start: int | None = None
        self.bytes_warm: int | None = None

    def _sent(self) -> int | None:
        now = iface_tx_bytes(self.iface)
        return None if now is None or self.bytes_start is None else now - self.bytes_start

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.bytes_start = iface_tx_bytes(self.iface)
        self._t_resume = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.bytes_warm = self._sent()
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._t_step)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._train_s += time.perf_counter() - self._t_resume

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val_loss")
        self.curve.append({"step": trainer.global_step, "val_loss": float(val) if val is not None else math.nan,
                           "train_s": self._train_s, "bytes": self._sent()})
        self._t_resume = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        rank = trainer.global_rank
        timed = self.step_times[self.warmup:] or self.step_times
        sent = self._sent()
        steps_after_warmup = trainer.global_step - self.warmup
        out = {
            "name": self.name, "rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "num_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "step_median_s": statistics.median(timed), "step_mean_s": statistics.fmean(timed),
            "step_times_s": self.step_times, "curve": self.curve,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "iface": self.iface, "bytes_sent_train": sent,
            "bytes_per_step_after_warmup": (None if sent is None or self.bytes_warm is None or steps_after_warmup <= 0
                                            else (sent - self.bytes_warm) / steps_after_warmup),
        }
        exchange = getattr(trainer.strategy, "exchange", None)
        if exchange is not None:  # HoloGrad's own ring-model meter, for comparison with the interface
            out["holograd_meter_wire"] = dict(exchange.traffic.total_wire)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.name}_rank{rank}.json").write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="JSON run spec (see the module docstring)")
    p.add_argument("--out", required=True, help="directory for <name>_rank<r>.json")
    p.add_argument("--iface", default=None, help="network interface whose sent bytes are counted")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of step times and bytes/step")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)

    torch.set_num_threads(1)
    from lightning_holograd.demos.gpt2_data import GPT2DataModule
    from lightning_holograd.demos.gpt2_module import GPT2Module

    import lightning_holograd  # noqa: F401

    L.seed_everything(SEED, verbose=False)
    strategy, callbacks = build_strategy(spec)
    probe = NetProbe(Path(args.out), spec["name"], args.iface, args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=int(os.environ.get("WORLD_SIZE", "1")), strategy=strategy,
        max_steps=args.steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, *callbacks],
        default_root_dir=str(Path(args.out) / "lightning"),
    )
    trainer.fit(GPT2Module(**MODEL_KW), datamodule=GPT2DataModule(**DATA_KW))


if __name__ == "__main__":
    main()

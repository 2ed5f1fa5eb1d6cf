"""The communication strategies a network benchmark run can use, from a JSON spec.

``build_strategy(spec)`` returns the strategy and extra callbacks of one run:

- ``{"kind": "ddp"}``: Lightning's ``DDPStrategy``; the gradient all-reduce is DDP's C++ reducer.
- ``{"kind": "ddp_hook", "hook": "bf16" | "fp16" | "powersgd"}`` (``"rank"``, ``"start_iter"``
  for PowerSGD): DDP with a torch comm hook. Lightning registers comm hooks only on CUDA;
  ``CPUHookDDPStrategy`` registers them on CPU too (they work on gloo).
- ``{"kind": "localsgd", "period": H}``: no gradient communication; torch's
  ``PeriodicModelAverager`` (through Lightning's post-local-SGD support) averages the
  parameters every H steps.
- ``{"kind": "diloco", "period": H}``: no gradient communication; every H steps the
  pseudo-gradient (anchor - local parameters) is all-reduced and an outer
  ``torch.optim.SGD`` (Nesterov, ``"outer_lr"``, ``"outer_momentum"``) steps the shared
  anchor, which every rank copies.
- ``{"kind": "holograd", "init_args": {...}}``: ``HoloGradStrategy(**init_args)``, plus
  ``ADCBootstrap`` when ``"bootstrap"`` (and ``"refresh"``) are given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy


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


def _hook_strategy(spec: dict[str, Any]) -> CPUHookDDPStrategy:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    hook = spec["hook"]
    if hook == "bf16":
        return CPUHookDDPStrategy(ddp_comm_hook=bf16_compress_hook_gloo)
    if hook == "fp16":
        return CPUHookDDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook)
    if hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=spec["rank"],
                                            start_powerSGD_iter=spec.get("start_iter", 10))
        return CPUHookDDPStrategy(ddp_comm_state=state, ddp_comm_hook=powersgd_hook_in_order)
    raise ValueError(f"hook={hook!r} is unknown. HINT: bf16, fp16 or powersgd.")


def _averaging_strategy(spec: dict[str, Any]) -> CPUHookDDPStrategy:
    from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as post

    # start_localSGD_iter=0, post_local_gradient_allreduce=False: no gradient traffic at all.
    common = {"ddp_comm_state": post.PostLocalSGDState(None, None, start_localSGD_iter=0,
                                                       post_local_gradient_allreduce=False),
              "ddp_comm_hook": post.post_localSGD_hook}
    if spec["kind"] == "localsgd":
        return CPUHookDDPStrategy(model_averaging_period=spec["period"], **common)
    return DiLoCoStrategy(spec["period"], spec.get("outer_lr", 0.7), spec.get("outer_momentum", 0.9), **common)


def _holograd_strategy(spec: dict[str, Any]) -> tuple[Any, list[Any]]:
    from lightning_holograd import ADCBootstrap, HoloGradStrategy

    callbacks = []
    if spec.get("bootstrap"):
        callbacks.append(ADCBootstrap(bootstrap_steps=spec["bootstrap"], refresh_every=spec.get("refresh", 0)))
    return HoloGradStrategy(**spec.get("init_args", {})), callbacks


def build_strategy(spec: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The strategy (and extra callbacks) of one benchmark run (see the module docstring)."""
    kind = spec["kind"]
    if kind == "ddp":
        return DDPStrategy(), []
    if kind == "ddp_hook":
        return _hook_strategy(spec), []
    if kind in ("localsgd", "diloco"):
        return _averaging_strategy(spec), []
    if kind == "holograd":
        return _holograd_strategy(spec)
    raise ValueError(f"kind={kind!r} is unknown. HINT: ddp, ddp_hook, localsgd, diloco or holograd.")

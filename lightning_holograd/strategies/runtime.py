"""What the Trainer strategy and the Fabric strategy share, so the protocol is written once.

- ``build_exchange``: the exchange for a module (K resolved from its D, the family on the
  module's device, the collectives on the communication device).
- ``TrainableSet``: the trainable parameters the family was built for. When they change
  (Lightning's ``BaseFinetuning`` unfreezing a backbone at an epoch start), the next step
  rebuilds a stateless family for the new D, and records the change in the chain
  (docs/PROTOCOL.md §1.5); a stateful family (codebook, momentum) stops the run instead.
- ``run_exchange``: one exchange (batch hash, true-gradient or HoloGrad step, estimate
  scale) and the write of g_hat into ``.grad``.
- ``after_step``: buffer sync, replica audit and the step's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from ..engine import Comm, HoloGradExchange, StepContext, TrafficMeter
from ..protocol import CommitmentChain, hash_batch, step_batch_hash
from .claims import Inputs, flat_grad, trainable_parameters, write_grad
from .config import HoloGradConfig

__all__ = ["TrainableSet", "after_step", "build_exchange", "load_exchange_state", "module_state", "run_exchange"]

log = logging.getLogger(__name__)

STATEFUL_FAMILIES = ("codebook", "momentum")


def module_state(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter (trainable or not), then every buffer: what setup broadcasts and the audit hashes."""
    return [p.data for p in module.parameters()] + list(module.buffers())


def build_exchange(config: HoloGradConfig, module: nn.Module, world_size: int, root_device: torch.device,
                   backend: str, recompute: Callable[..., torch.Tensor] | None = None,
                   resumed: Mapping[str, Any] | None = None,
                   timeout: timedelta | None = None) -> tuple[HoloGradExchange, HoloGradConfig]:
    """The exchange for ``module``'s trainable parameters, and ``config`` resolved for their D;
    ``resumed`` (the family state of a checkpoint about to be loaded) sets the direction version;
    ``timeout`` (the process group's) bounds every wait of the exchange."""
    params = trainable_parameters(module)
    if not params:
        raise ValueError("the module has no parameter with requires_grad=True: nothing to train. HINT: unfreeze "
                         "at least one parameter before fit (BaseFinetuning freezes in its setup hook).")
    dim = sum(p.numel() for p in params)
    resolved = config.resolve(dim)
    comm_device = root_device if backend == "nccl" else torch.device("cpu")
    comm = Comm(TrafficMeter(world_size, dim), device=comm_device, timeout=timeout)
    family = _family_on(resolved, dim, root_device, resumed, param_shapes(params))
    chain = CommitmentChain(resolved.seed, direction_version=family.direction_version)
    exchange = HoloGradExchange(family, resolved.build_aggregator(), chain, comm, recompute=recompute,
                                to_cpu=lambda inputs: move_data_to_device(inputs, "cpu"),
                                aggregation_path=resolved.aggregation_path,
                                num_groups=resolved.num_groups(world_size), scalar_bits=resolved.scalar_bits,
                                scalar_block=resolved.scalar_block)
    return exchange, resolved


def param_shapes(params: Sequence[nn.Parameter]) -> list[tuple[int, ...]]:
    """Shapes in flat-gradient order (the codebook's blocks); a 0-d parameter is one coordinate."""
    return [tuple(p.shape) or (1,) for p in params]


def _family_on(config: HoloGradConfig, dim: int, device: torch.device,
               resumed: Mapping[str, Any] | None = None,
               shapes: Sequence[Sequence[int]] | None = None) -> Any:
    family = config.build_family(dim, resumed, param_shapes=shapes)
    if hasattr(family, "to"):
        family.to(device)
    return family


class TrainableSet:
    """Which parameters the exchange's family is built for: D and the digest of the mask of
    ``requires_grad`` over ``module.parameters()`` (with each parameter's size)."""

    def __init__(self, module: nn.Module) -> None:
        self.dim, self.digest = self.describe(module)

    @staticmethod
    def describe(module: nn.Module) -> tuple[int, bytes]:
        params = list(module.parameters())
        mask = torch.tensor([p.requires_grad for p in params], dtype=torch.uint8)
        sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        return int(sum(p.numel() for p in params if p.requires_grad)), hash_batch([mask, sizes])

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "mask_digest": self.digest.hex()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dim, self.digest = int(state["dim"]), bytes.fromhex(state["mask_digest"])

    def follow(self, module: nn.Module, exchange: HoloGradExchange, config: HoloGradConfig,
               device: torch.device) -> HoloGradConfig | None:
        """Before a step: if the trainable parameters changed, rebuild the family for them,
        record the change in the chain and return the newly resolved config (else None)."""
        dim, digest = self.describe(module)
        if digest == self.digest:
            return None
        step = exchange.chain.step + 1
        if exchange.family.name in STATEFUL_FAMILIES:
            raise RuntimeError(
                f"step {step}: the trainable parameters changed from {self.dim} to {dim} coordinates, and "
                f"directions={exchange.family.name!r} keeps a basis over the old ones. HINT: freeze or unfreeze "
                "before fit, or use a stateless family (directions='sketch', the default), which follows the change.")
        if dim == 0:
            raise RuntimeError(f"step {step}: no parameter requires a gradient any more (was {self.dim}). "
                               "HINT: keep at least one parameter trainable while fitting.")
        resolved = config.resolve(dim)
        exchange.family = _family_on(resolved, dim, device, exchange.family.state_dict())
        exchange.traffic.num_params = dim  # the all-reduce baseline of the compression ratio
        exchange.chain.record_trainable_change(dim, exchange.family.num_directions, digest)
        log.info("HoloGrad step %d: trainable parameters changed from %d to %d coordinates; K=%d from now on",
                 step, self.dim, dim, exchange.family.num_directions)
        self.dim, self.digest = dim, digest
        return resolved


def load_exchange_state(exchange: HoloGradExchange, state: Mapping[str, Any], config: HoloGradConfig,
                        device: torch.device, rank_map: Mapping[int, int] | None = None) -> HoloGradConfig | None:
    """Load a checkpoint's exchange state (``rank_map``: see ``HoloGradExchange.load_state_dict``).
    The family is rebuilt with the saved D and K first when it is stateless and was saved
    for another D (the trainable set differed at save time; the next step follows the
    current one) or, with ``num_directions=None``, another K (a checkpoint of another
    default, e.g. 0.1.x's 1024: the run keeps its K). Returns the config the family now follows, if rebuilt."""
    saved = state["family"]
    family = exchange.family
    other_k = config.num_directions is None and saved["num_directions"] != family.num_directions
    if ((saved["dim"] != family.dim or other_k) and saved["name"] == family.name
            and family.name not in STATEFUL_FAMILIES):
        resolved = replace(config, num_directions=int(saved["num_directions"]))
        exchange.family = _family_on(resolved, int(saved["dim"]), device, saved)
        exchange.traffic.num_params = int(saved["dim"])
        exchange.load_state_dict(state, rank_map)
        return resolved
    exchange.load_state_dict(state, rank_map)
    return None


def run_exchange(exchange: HoloGradExchange, params: Sequence[nn.Parameter], inputs: Inputs,
                 project: Callable[[list[int]], torch.Tensor] | None, true_gradient: bool = False,
                 scale: float = 1.0, diagnostic_every: int = 0) -> StepContext:
    """One step on every rank: commit ``inputs``' batches, exchange, write the estimate (times
    ``scale``) or the true gradient into ``params``' ``.grad``. ``project`` may be None on a
    true-gradient step. Every ``diagnostic_every`` steps (0-based step index s with
    s % M == 0; 0: never) the local gradient also goes to the captured-energy measurement.
    Call contract: every rank, once per optimizer step (blocking)."""
    batch_hash = step_batch_hash([batch for batch, _ in inputs])
    if true_gradient:
        estimate = exchange.true_gradient_step(flat_grad(params), batch_hash)
    else:
        assert project is not None
        measure = diagnostic_every and exchange.chain.step % diagnostic_every == 0
        estimate = exchange.step(batch_hash, project, extras={"inputs": inputs},
                                 diagnostic=flat_grad(params) if measure else None)
        if scale != 1.0:
            estimate = estimate * scale
    write_grad(params, estimate)
    assert exchange.last_context is not None
    return exchange.last_context


def after_step(exchange: HoloGradExchange, config: HoloGradConfig, module: nn.Module) -> dict[str, float]:
    """After the optimizer step, on every rank: buffers from rank 0, the audit when due; the step's metrics."""
    if config.sync_buffers:
        buffers = list(module.buffers())
        if buffers:
            exchange.comm.broadcast(buffers, kind="buffers")
    step = exchange.chain.step
    if config.audit_every and step % config.audit_every == 0:
        exchange.audit(module_state(module), step)
    ctx = exchange.last_context
    if ctx is None:
        return {}
    metrics = exchange.traffic.metrics()
    metrics["holograd/true_gradient_step"] = float(ctx.true_gradient)
    metrics["holograd/slashed_ranks"] = float(len(exchange.slashing.slashed))
    if "captured_energy" in ctx.extras:
        metrics["holograd/captured_energy"] = float(ctx.extras["captured_energy"])
    return metrics

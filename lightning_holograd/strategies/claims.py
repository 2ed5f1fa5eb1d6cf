"""What a rank claims: its K scalars for one step, computed from the LightningModule
(docs/PROTOCOL.md §1, §6 and §7).

Symbols: D trainable coordinates, K scalars, v_j the step's directions, g the gradient of
the step's loss (D,) at the current parameters theta_t.

- Flat gradient: the ``.grad`` of the trainable parameters (``requires_grad``, in module
  order) concatenated as float32 (D,); a parameter without ``.grad`` contributes zeros.
- Projection ``projection="backward"``: a_j = <g, v_j> from the local backward
  (``family.project``). ``projection="jvp"``: each a_j is the tangent of the loss under
  ``torch.func.jvp`` through the module's own ``training_step``, with v_j split into
  parameter shapes as tangents: one forward-mode pass per direction, no backward.
- Loss scaling: each micro-batch loss is divided by the number of micro-batches of the
  optimizer step (``accumulate_grad_batches``), as Lightning scales it for backward;
  with manual optimization by 1.
- Recompute: a verifier rank recomputes a claimant's a for its micro-batches at theta_t
  with the same ``training_step``, scaling and projection, leaving no trace (buffers and
  the RNG stream are restored; ``.grad`` is overwritten, and replaced by g_hat right after).

Stochastic layers (dropout) draw a fresh mask in each pass, so claims that use them are
not exactly recomputable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from ..protocol import DirectionFamily

__all__ = ["Claims", "Inputs", "flat_grad", "jvp_scalars", "training_loss", "write_grad"]

Inputs = Sequence[tuple[Any, int]]  # the step's micro-batches: [(batch, batch_idx), ...]


def training_loss(output: Any, purpose: str) -> torch.Tensor:
    """The loss in a ``training_step`` output: the tensor itself, or ``output["loss"]``."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{purpose} needs training_step to return the loss (a tensor, or a dict with 'loss'), "
                        f"got {type(output).__name__}. HINT: with manual optimization, return the loss "
                        "passed to manual_backward.")
    return loss


def flat_grad(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The gradients of ``params`` as one float32 vector (D,); zeros where ``.grad`` is None."""
    grads = [p.grad.reshape(-1).to(torch.float32) if p.grad is not None
             else torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params]
    return torch.cat(grads)


def write_grad(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    """Write the (D,) vector ``flat`` into the ``.grad`` of ``params``, in their dtypes."""
    offset = 0
    for param in params:
        piece = flat[offset : offset + param.numel()].view_as(param)
        if param.grad is None:
            param.grad = piece.to(param.dtype).clone()
        else:
            param.grad.copy_(piece)
        offset += param.numel()


@contextmanager
def logging_disabled(module: nn.Module) -> Iterator[None]:
    """``self.log`` inside a re-run ``training_step`` would log twice (or log dual tensors): mute it."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log
        del module.log_dict


class _TrainingStepCall(nn.Module):
    """Calls ``inner.training_step`` as ``forward`` so ``functional_call`` can swap parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return training_loss(self.inner.training_step(batch, batch_idx), "projection='jvp'")


def jvp_scalars(module: nn.Module, params: Sequence[nn.Parameter], inputs: Inputs, accumulate: int,
                family: DirectionFamily, seeds: Sequence[int]) -> torch.Tensor:
    """(K,) scalars <g, v_j> for the micro-batches ``inputs``, by forward mode."""
    wrapper = _TrainingStepCall(module)
    by_id = {id(p): name for name, p in module.named_parameters()}
    names = [f"inner.{by_id[id(p)]}" for p in params]
    primals = tuple(p.detach() for p in params)

    def loss_of(*tensors: torch.Tensor) -> torch.Tensor:
        values = dict(zip(names, tensors))
        total = sum(torch.func.functional_call(wrapper, values, (batch, idx)) for batch, idx in inputs)
        return total / accumulate

    device = primals[0].device
    scalars = torch.empty(family.num_directions, dtype=torch.float32, device=device)
    with logging_disabled(module):
        for j in range(family.num_directions):
            direction = family.direction(seeds, j, device=device)
            tangents = tuple(piece.view_as(p).to(p.dtype) for piece, p in
                             zip(torch.split(direction, [p.numel() for p in params]), params))
            _, derivative = torch.func.jvp(loss_of, primals, tangents)
            scalars[j] = derivative.to(torch.float32)
    return scalars


class Claims:
    """This rank's claims and recomputed claims, for the strategy's module and ``family``."""

    def __init__(self, strategy: Any, family: DirectionFamily) -> None:
        self.strategy = strategy  # a HoloGradStrategy: its module, precision plugin and device
        self.family = family

    def parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are exchanged, in a fixed order (module order)."""
        return [p for p in self.strategy.lightning_module.parameters() if p.requires_grad]

    def projector(self, inputs: Inputs) -> Callable[[list[int]], torch.Tensor]:
        """``project(seeds)`` for ``HoloGradExchange.step``: this rank's claim for ``inputs``."""
        module, params = self.strategy.lightning_module, self.parameters()
        if self.strategy.config.projection == "jvp":
            accumulate = module.trainer.accumulate_grad_batches
            return lambda seeds: jvp_scalars(module, params, inputs, accumulate, self.family, seeds)
        grad = flat_grad(params)  # after the local backward
        return lambda seeds: self.family.project(grad, seeds)

    @torch.no_grad()
    def recompute(self, inputs: Inputs, seeds: list[int]) -> torch.Tensor:
        """The (K,) claim an honest rank would submit for ``inputs`` at the current parameters.

        Called on verifier ranks inside the exchange, before the update. It overwrites this
        rank's ``.grad``, which the exchange replaces with g_hat right after.
        """
        module, params = self.strategy.lightning_module, self.parameters()
        inputs = move_data_to_device(list(inputs), self.strategy.root_device)
        if self.strategy.config.projection == "jvp":
            return jvp_scalars(module, params, inputs, module.trainer.accumulate_grad_batches, self.family, seeds)
        for param in params:
            param.grad = None
        scale = module.trainer.accumulate_grad_batches if module.automatic_optimization else 1
        buffers = [buffer.detach().clone() for buffer in module.buffers()]
        with torch.enable_grad(), logging_disabled(module), torch.random.fork_rng(devices=self._rng_devices()):
            for batch, batch_idx in inputs:
                with self.strategy.precision_plugin.train_step_context():
                    output = module.training_step(batch, batch_idx)
                (training_loss(output, "verification") / scale).backward()
        for buffer, saved in zip(module.buffers(), buffers):
            buffer.copy_(saved)
        return self.family.project(flat_grad(params), seeds)

    def _rng_devices(self) -> list[int]:
        device = self.strategy.root_device
        return [device.index or 0] if device.type == "cuda" else []

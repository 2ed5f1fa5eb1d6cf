"""Forward-mode projection: a_j = <g, v_j> as a Jacobian-vector product, no backward.

For each direction j the LightningModule's own ``training_step`` is re-run under
``torch.func.jvp`` with the trainable parameters as primals and v_j (split into
parameter shapes) as tangents; the tangent of the loss is the directional derivative
<g, v_j>. One forward-mode pass per direction, so this suits small K and tight memory.
With gradient accumulation the micro-batch losses are summed and divided by the
number of micro-batches, exactly as Lightning scales them for backward. Stochastic
layers (dropout) draw a fresh mask in each pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .protocol import DirectionFamily

__all__ = ["jvp_scalars"]


class _TrainingStepCall(nn.Module):
    """Calls ``inner.training_step`` as ``forward`` so ``functional_call`` can swap parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any, batch_idx: int) -> torch.Tensor:
        output = self.inner.training_step(batch, batch_idx)
        loss = output["loss"] if isinstance(output, dict) else output
        if not isinstance(loss, torch.Tensor):
            raise TypeError("projection='jvp' needs training_step to return a loss tensor (or a dict with 'loss').")
        return loss


@contextmanager
def _logging_disabled(module: nn.Module) -> Iterator[None]:
    """``self.log`` inside the re-run training_step would log dual tensors: mute it."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log
        del module.log_dict


def jvp_scalars(
    module: nn.Module,
    params: Sequence[nn.Parameter],
    inputs: Sequence[tuple[Any, int]],
    accumulate: int,
    family: DirectionFamily,
    seeds: Sequence[int],
) -> torch.Tensor:
    """(K,) scalars <g, v_j> for the micro-batches ``inputs`` = [(batch, batch_idx), ...]."""
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
    with _logging_disabled(module):
        for j in range(family.num_directions):
            direction = family.direction(seeds, j, device=device)
            tangents = tuple(piece.view_as(p).to(p.dtype) for piece, p in
                             zip(torch.split(direction, [p.numel() for p in params]), params))
            _, derivative = torch.func.jvp(loss_of, primals, tangents)
            scalars[j] = derivative.to(torch.float32)
    return scalars

"""What the strategies refuse, and what they warn about once, at construction and at setup.

Refused (``ValueError`` naming the argument, its value and a HINT):
- ``DistributedDataParallel``/``DDPStrategy`` arguments: HoloGrad never wraps the module in
  DDP, so they would be accepted and silently do nothing; ``block_size`` (removed).
- more than one optimizer (checked once the optimizers exist, at setup).

Warned about once, on global rank 0, at setup (``advise`` returns the messages):
- HoloGrad sending more bytes than the all-reduce it replaces (compression < 1, or K >= D);
- an optimizer that is not scale-invariant (SGD) with an unbiased estimate whose norm is
  about sqrt(1 + v) times the gradient's (docs/PROTOCOL.md §3.9): a learning rate tuned
  for DDP is then too large.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..protocol.quantize import row_bytes
from .config import HoloGradConfig

__all__ = ["HoloGradSetupWarning", "INFLATION_WARNING", "SCALE_INVARIANT_OPTIMIZERS", "advise", "check_single_optimizer",
           "check_strategy_arguments", "compression_at"]



class HoloGradSetupWarning(UserWarning):
    """A setting that works but is probably not what the user wants (issued once, by rank 0, at setup)."""


# Lightning's own constructor arguments that the accelerator connector may pass.
_LIGHTNING_ARGUMENTS = ("accelerator", "parallel_devices", "cluster_environment", "checkpoint_io",
                        "precision_plugin", "precision")
_NO_BUCKETS = "HoloGrad has no gradient buckets and no DDP wrapper."
_REFUSED = {
    "block_size": "removed: directions no longer depend on it. HINT: remove it; chunk_size caps the memory "
                  "of direction generation.",
    "find_unused_parameters": "HoloGrad handles unused and frozen parameters without it. HINT: remove it.",
    "static_graph": f"{_NO_BUCKETS} HINT: remove it.",
    "gradient_as_bucket_view": f"{_NO_BUCKETS} HINT: remove it.",
    "bucket_cap_mb": f"{_NO_BUCKETS} HINT: remove it; num_directions sets the bytes per step.",
    "broadcast_buffers": "HoloGrad syncs buffers after each optimizer step. HINT: use sync_buffers=True/False.",
    "ddp_comm_hook": "HoloGrad replaces the gradient all-reduce that a comm hook compresses. HINT: remove it; "
                     "num_directions sets the bytes per step.",
    "ddp_comm_state": "HoloGrad registers no DDP comm hook. HINT: remove it.",
    "ddp_comm_wrapper": "HoloGrad registers no DDP comm hook. HINT: remove it.",
    "model_averaging_period": "post-local-SGD model averaging is a DDP comm-hook feature. HINT: remove it.",
}
INFLATION_WARNING = math.sqrt(2.0)  # warn above v = 1: the estimate's noise larger than the gradient
SCALE_INVARIANT_OPTIMIZERS: tuple[type, ...] = tuple(
    getattr(torch.optim, name) for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad",
                                            "Adadelta", "RMSprop", "Rprop", "Adafactor", "Muon")
    if hasattr(torch.optim, name))


def check_strategy_arguments(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse DDP-only arguments (and any unknown one) that the strategy would otherwise ignore;
    return Lightning's own (``accelerator``, ``precision_plugin``, ...) to pass on. A comm-hook
    argument left at None is dropped."""
    passed = {}
    for name, value in kwargs.items():
        if name in _LIGHTNING_ARGUMENTS:
            passed[name] = value
            continue
        if value is None and name.startswith(("ddp_comm", "model_averaging")):
            continue
        reason = _REFUSED.get(name, "it is not an argument of HoloGradStrategy (DistributedDataParallel arguments "
                                    "have no effect: the module is not wrapped). HINT: remove it; README "
                                    "\"Strategy settings\" lists the arguments.")
        raise ValueError(f"{name}={value!r} is not supported: {reason}")
    return passed


def check_single_optimizer(optimizers: Sequence[Any]) -> None:
    if len(optimizers) > 1:
        names = ", ".join(type(opt).__name__ for opt in optimizers)
        raise ValueError(
            f"{len(optimizers)} optimizers were set up ({names}), but HoloGrad exchanges one "
            "gradient estimate per step for one optimizer. HINT: use a single optimizer with parameter groups "
            "(a GAN can step its generator and discriminator on alternate steps of one optimizer), or "
            "strategy='ddp'.")


def compression_at(world_size: int, dim: int, num_directions: int, scalar_bits: int = 32,
                   scalar_block: int = 0) -> float:
    """Ring all-reduce wire bytes of D floats over HoloGrad's 32 + 4K bytes per step at N ranks
    (docs/PROTOCOL.md §8): 2D / (N (K + 8)); with ``scalar_bits`` b < 32 the row is
    ceil(K b / 8) + 4 nb bytes instead of 4K (docs/PROTOCOL.md §9.5). N = 1 is counted as N = 2."""
    n = max(world_size, 2)
    return 8.0 * dim / (n * (32 + row_bytes(num_directions, 0, scalar_bits, scalar_block)))


def advise(config: HoloGradConfig, dim: int, world_size: int, optimizers: Sequence[Any]) -> list[str]:
    """The setup warnings for a resolved ``config`` on D = ``dim`` (empty when all is well)."""
    assert config.num_directions is not None, "resolve(dim) first"
    k, messages = config.num_directions, []
    ratio = compression_at(world_size, dim, k, config.scalar_bits, config.scalar_block)
    if config.directions != "identity" and (k >= dim or ratio < 1.0):
        largest = max(1, math.floor(2 * dim / max(world_size, 2)) - 9)
        messages.append(
            f"num_directions={k} on a model with D={dim} trainable parameters sends more bytes per step than "
            f"DDP's all-reduce would at {max(world_size, 2)} ranks (compression {ratio:.3g} < 1). HINT: use "
            f"strategy='ddp' (all-reduce) for a model this small, directions='identity' (exact, K = D), or "
            f"num_directions <= {largest}.")
    inflation = config.norm_inflation(dim)
    sgd_like = [type(opt).__name__ for opt in optimizers if not isinstance(opt, SCALE_INVARIANT_OPTIMIZERS)]
    if config.estimate_scale == "unbiased" and inflation is not None and inflation > INFLATION_WARNING and sgd_like:
        messages.append(
            f"the gradient estimate is about {inflation:.1f}x longer than the gradient (sqrt(1 + (D-1)/K) with "
            f"D={dim}, K={k}), and {sgd_like[0]} is not scale-invariant: a learning rate tuned for DDP is too "
            f"large for it. HINT: divide the learning rate by {inflation:.1f} (estimate_scale='norm' does this; "
            f"the faster fix), or by up to {inflation ** 2:.0f} = 1 + (D-1)/K if that still diverges "
            f"(estimate_scale='min_variance': as stable as the DDP recipe, slower); or raise num_directions; "
            f"or use an Adam-family optimizer (Adam, AdamW, ...), which ignores the gradient's scale.")
    return messages

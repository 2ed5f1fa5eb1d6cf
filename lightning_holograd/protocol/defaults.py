"""Settings that depend on the model: the default K, and the scale of the estimate (docs/PROTOCOL.md §3.9).

Symbols: D trainable coordinates, K scalars per rank and step, g the gradient, g_hat the
estimate. Everything here is a pure function of (family name, D, K): nothing is built or
allocated, so the strategy can resolve and check its settings before training.

- Default K (``num_directions=None``): K = ceil(D / target_compression), at least
  min(64, floor(D / 2)) so that small models still learn, and at least 1. At 2 ranks
  the logged ``holograd/compression`` is then about ``target_compression``.
- Variance ratio v: for the unbiased families E||g_hat - g||^2 = v ||g||^2, so
  E||g_hat||^2 = (1 + v) ||g||^2: the estimate is about sqrt(1 + v) times longer than
  the gradient. v = (D - 1)/K for sketch and rademacher, (D + 1)/K for gaussian (its
  table's fourth moment is 3 to 4 digits), 0 for identity, sum_j n_j (n_j - 1) / D for
  subsample with strata of n_j coordinates (D/K - 1 when K divides D; its v depends on g,
  sum_j (n_j - 1) ||g_{S_j}||^2 / ||g||^2, and this is its value when every coordinate has
  the same mean square, docs/PROTOCOL.md §3.10); the codebook and momentum
  families are biased and have no such v (None).
- ``estimate_scale``: c g_hat is written instead of g_hat.
  ``unbiased``: c = 1. ``min_variance``: c = 1/(1 + v), the c minimising
  E||c g_hat - g||^2 (it shrinks the step toward zero: E[c g_hat] = c g, a bias of
  (1 - c) g). ``norm``: c = 1/sqrt(1 + v), so that E||c g_hat||^2 = ||g||^2 (the
  public HoloGrad code's sqrt(K/D) factor, up to the 1 +).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

__all__ = [
    "DEFAULT_TARGET_COMPRESSION",
    "ESTIMATE_SCALES",
    "EstimateScale",
    "MIN_DEFAULT_DIRECTIONS",
    "default_num_directions",
    "estimate_scale_factor",
    "subsample_variance_ratio",
    "variance_ratio",
]

DEFAULT_TARGET_COMPRESSION = 100.0
MIN_DEFAULT_DIRECTIONS = 64  # floor of the default K (never above D / 2)
EstimateScale = Literal["unbiased", "min_variance", "norm"]
ESTIMATE_SCALES: tuple[str, ...] = get_args(EstimateScale)
_UNBIASED_RANDOM = ("sketch", "subsample", "rademacher", "gaussian")


def default_num_directions(dim: int, target_compression: float = DEFAULT_TARGET_COMPRESSION) -> int:
    """The K used when ``num_directions`` is not given: ceil(D / target_compression),
    raised to min(64, floor(D / 2)), and at least 1."""
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1.")
    return max(1, math.ceil(dim / target_compression), min(MIN_DEFAULT_DIRECTIONS, dim // 2))


def variance_ratio(family: str, dim: int, num_directions: int) -> float | None:
    """v with E||g_hat - g||^2 = v ||g||^2 for an unbiased family; None for a biased one."""
    if family == "identity":
        return 0.0
    if family in ("sketch", "rademacher"):
        return (dim - 1) / num_directions
    if family == "gaussian":
        return (dim + 1) / num_directions
    if family == "subsample":
        return subsample_variance_ratio(dim, num_directions)
    return None


def subsample_variance_ratio(dim: int, num_directions: int) -> float:
    """sum_j n_j (n_j - 1) / D over the subsample family's K strata: q = floor(D/K) coordinates
    in K - r of them and q + 1 in r = D - q K. A stratum of n coordinates, each of mean square
    sigma^2, adds (n - 1) n sigma^2 to E||g_hat - g||^2 (docs/PROTOCOL.md §3.10)."""
    q, r = divmod(dim, num_directions)
    return (r * (q + 1) * q + (num_directions - r) * q * (q - 1)) / dim


def estimate_scale_factor(scale: str, family: str, dim: int, num_directions: int) -> float:
    """c, the factor applied to g_hat for ``estimate_scale=scale`` (1.0 for ``unbiased``)."""
    if scale not in ESTIMATE_SCALES:
        raise ValueError(f"estimate_scale={scale!r} is unknown. HINT: choose one of "
                         f"{', '.join(map(repr, ESTIMATE_SCALES))}.")
    if scale == "unbiased":
        return 1.0
    ratio = variance_ratio(family, dim, num_directions)
    if ratio is None:
        raise ValueError(f"estimate_scale={scale!r} needs an unbiased family, got directions={family!r}. "
                         f"HINT: use directions in {_UNBIASED_RANDOM}, or estimate_scale='unbiased'.")
    return 1.0 / (1.0 + ratio) if scale == "min_variance" else 1.0 / math.sqrt(1.0 + ratio)

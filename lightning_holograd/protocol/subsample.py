"""The stratified coordinate-sampling direction family, ``subsample`` (docs/PROTOCOL.md §3.10).

Symbols: D coordinates, K <= D directions (strata), s the step's one seed.

Stratum j is the index range [lo_j, hi_j) with lo_j = floor(j D / K), so the K strata tile
[0, D) in order and each holds n_j = hi_j - lo_j >= 1 coordinates (floor(D/K) or
ceil(D/K)). Direction j is the unit vector at one coordinate of stratum j:

    p_j = lo_j + ((word(s, j) * n_j) >> 32)        v_j = e_{p_j}

with ``word`` the hash of ``direction_hash`` (evaluated at the stratum index j, not at a
coordinate). So a_j = <g, v_j> = g[p_j] is one coordinate of the gradient, sent as it is,
and the estimate scales it by its stratum's size:

    g_hat = sum_j n_j a_j e_{p_j}

Over the seed, p_j is uniform on stratum j (to within n_j / 2^32, see ``pick_probability``),
so E[g_hat] = g, and E||g_hat - g||^2 = sum_j (n_j - 1) sum_{d in S_j} g_d^2 (in stratum j,
E||n_j g_p e_p||^2 = n_j sum g_d^2 and the mean's square is sum g_d^2).
For K = D every stratum is one coordinate and g_hat = g. A stratum of one coordinate carries
no noise at all, a stratum of two coordinates a and b carries g_a^2 + g_b^2, so for K/D above
about 1/2 this is far below the count sketch's (D - 1)/K ||g||^2: 2 (1 - K/D) ||g||^2 when
every coordinate has the same mean square (0.82 against 1.70 at K/D = 0.59).

Cost: K hash words and a gather of K values for ``project``, a scatter of K values into D
zeros for ``synthesize``: O(K) hashing and one pass over D, on any device, with no chunking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .direction_hash import hash_words
from .directions import DirectionFamily

__all__ = ["SubsampleDirections", "pick_probability", "stratum_bounds"]


def stratum_bounds(dim: int, num_directions: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, n): each (K,) int64, stratum j = [lo_j, lo_j + n_j) with lo_j = floor(j D / K)."""
    edges = torch.arange(num_directions + 1, dtype=torch.int64, device=device).mul_(dim).div_(
        num_directions, rounding_mode="floor")
    return edges[:-1], edges[1:] - edges[:-1]


def pick_probability(size: int, offset: int) -> float:
    """P(p_j = lo_j + offset) in a stratum of ``size`` coordinates: the share of the 2^32 words
    w with floor(w size / 2^32) = offset. It is floor(2^32/size)/2^32 or that plus 2^-32:
    within size/2^32 relative of 1/size (5e-10 at size 2)."""
    if not 0 <= offset < size:
        raise ValueError(f"offset={offset} must lie in [0, size={size}).")
    first = -(-(offset << 32) // size)  # smallest w with w * size >= offset * 2^32
    after = -(-((offset + 1) << 32) // size)
    return (after - first) / float(1 << 32)


class SubsampleDirections(DirectionFamily):
    """Stratified coordinate sampling: one coordinate per stratum of about D/K coordinates.

    Unbiased; E||g_hat - g||^2 = sum_j (n_j - 1) sum_{S_j} g^2. When every coordinate has the
    same mean square (over whatever g is drawn from) its expectation is v ||g||^2 with
    v = sum_j n_j (n_j - 1) / D (``defaults.subsample_variance_ratio``): D/K - 1 when K divides
    D, 2 (1 - K/D) for D/2 < K < D, 0 at K = D. One seed per step (the first direction seed).
    """

    name = "subsample"
    unbiased = True

    def __init__(self, dim: int, num_directions: int) -> None:
        super().__init__(dim, num_directions)
        if num_directions > dim:
            raise ValueError(
                f"num_directions={num_directions} exceeds dim={dim}: subsample picks one coordinate in each of K "
                f"strata of [0, D). HINT: use num_directions <= {dim} (K = D sends every coordinate exactly)."
            )
        if -(-dim // num_directions) >= 1 << 31:
            raise ValueError(f"dim={dim} over num_directions={num_directions} gives strata of 2^31 coordinates or "
                             f"more. HINT: use num_directions >= {-(-dim // ((1 << 31) - 1))}.")
        if dim * num_directions >= 1 << 62:
            raise ValueError(f"dim={dim} times num_directions={num_directions} must stay below 2^62 (int64 "
                             "stratum bounds). HINT: use fewer directions.")
        self._picked: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_seeds(self) -> int:
        return 1

    def picks(self, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(p, n): the picked coordinate and the stratum size of every direction, (K,) int64 each.

        The last seed's picks are kept (O(K) memory): every rank projects its claim and then
        synthesises with the same seed, and a hit is the same integers as a recomputation."""
        device = torch.device(device)
        cached = self._picked
        if cached is not None and cached[0] == seed and cached[1] == device:
            return cached[2], cached[3]
        lo, size = stratum_bounds(self.dim, self.num_directions, device)
        words = hash_words([seed], 0, self.num_directions, device)[0]  # (K,) in [0, 2^32)
        picked = words.mul_(size).bitwise_right_shift_(32).add_(lo)  # words * n < 2^32 * 2^31
        self._picked = (seed, device, picked, size)
        return picked, size

    def clear_picks(self) -> None:
        """Forget the kept picks (the next call hashes its seed's K indices again)."""
        self._picked = None

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        (seed,) = self._check_seeds(seeds)
        picked, _ = self.picks(seed, grad.device)
        return torch.index_select(grad, 0, picked)

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        scalars = self._check_scalars(scalars)
        (seed,) = self._check_seeds(seeds)
        picked, size = self.picks(seed, scalars.device)
        out = torch.zeros(self.dim, dtype=torch.float32, device=scalars.device)
        # n_j a_j in float32 (n_j is exact in float32 up to 2^24 coordinates per stratum)
        return out.index_copy_(0, picked, scalars * size.to(torch.float32))

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        (seed,) = self._check_seeds(seeds)
        self._check_index(index)
        picked, _ = self.picks(seed, device)
        out = torch.zeros(self.dim, dtype=torch.float32, device=device)
        out[int(picked[index])] = 1.0
        return out

"""Families built on a shared orthonormal basis: codebook (ADC) and momentum-centric.

Symbols: D coordinates, r basis columns (``rank``), e exploration directions
(``num_exploration``), K = r + e scalars per step. U (D, r) has orthonormal columns and
is identical on every rank (PROTOCOL.md sections 5 and 7).

Scalars are a = [U^T g (r,), <g, z_j> for the e Gaussian exploration directions].
Two estimates are built from them:
- the *full* estimate  u = U a_U + P x,  with x = (1/e) sum_j a_j z_j and
  P = I - U U^T. E[u] = U U^T g + P g = g: unbiased. It feeds the basis update, so new
  directions enter the basis through exploration (an estimate inside span(U) could
  never rotate it).
- the *step* estimate  g_hat = U a_U + w P x,  w = ``exploration_weight``. With w = 1 it
  equals u (unbiased, but the exploration term has variance ~ (D/e) ||P g||^2); with
  w = 0 (default) it is the exact projection of g onto span(U): low variance, biased
  toward span(U). Both families are marked biased (``unbiased = False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .chain import direction_seeds
from .directions import DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE, DirectionFamily, GaussianDirections

__all__ = ["CodebookDirections", "MomentumDirections", "captured_energy"]


def captured_energy(basis: torch.Tensor, true_grad: torch.Tensor) -> float:
    """gamma = ||U^T g||^2 / ||g||^2, to be measured against a *true* gradient."""
    grad = true_grad.to(torch.float32)
    norm_sq = float(grad.dot(grad))
    if norm_sq == 0.0:
        return float("nan")
    coords = basis.T @ grad
    return float(coords.dot(coords)) / norm_sq


def _check_fraction(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} must lie in [{low}, {high}{bracket}.")


class _SubspaceFamily(DirectionFamily):
    """Basis columns plus Gaussian exploration directions (see module docstring)."""

    unbiased = False

    def __init__(
        self,
        dim: int,
        rank: int,
        num_exploration: int,
        exploration_weight: float,
        init_seed: int,
        block_size: int,
        chunk_size: int,
    ) -> None:
        if num_exploration < 0:
            raise ValueError(f"num_exploration={num_exploration} must be >= 0.")
        if not 0 <= init_seed < 2**64:
            raise ValueError(f"init_seed={init_seed!r} must be an unsigned 64-bit integer.")
        if rank < 1 or rank > dim:
            raise ValueError(
                f"rank={rank} must lie in [1, dim={dim}]. HINT: choose a codebook rank no larger "
                "than the number of trainable parameters."
            )
        super().__init__(dim, rank + num_exploration)
        _check_fraction("exploration_weight", exploration_weight, 0.0, 1.0)
        self.rank = rank
        self.num_exploration = num_exploration
        self.exploration_weight = float(exploration_weight)
        self.exploration = (
            GaussianDirections(dim, num_exploration, block_size=block_size, chunk_size=chunk_size)
            if num_exploration
            else None
        )
        self.basis = torch.empty(dim, rank, dtype=torch.float32)  # (D, r), set by subclasses

    @property
    def num_seeds(self) -> int:
        return self.num_exploration

    def to(self, device: torch.device | str) -> "_SubspaceFamily":
        """Move the shared basis (and any other state tensors) to ``device``."""
        self.basis = self.basis.to(device)
        return self

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        seeds = self._check_seeds(seeds)
        coords = self.basis.T @ grad  # (r,)
        if self.exploration is None:
            return coords
        return torch.cat([coords, self.exploration.project(grad, seeds)])

    def _perp(self, vector: torch.Tensor) -> torch.Tensor:
        return vector - self.basis @ (self.basis.T @ vector)

    def _estimates(self, scalars: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U a_U, P x) where P x is None without exploration."""
        scalars = self._check_scalars(scalars)
        seeds = self._check_seeds(seeds)
        inside = self.basis @ scalars[: self.rank]
        if self.exploration is None:
            return inside, None
        return inside, self._perp(self.exploration.synthesize(scalars[self.rank :], seeds))

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if self.exploration_weight == 0.0:  # the exploration term would be discarded
            scalars = self._check_scalars(scalars)
            self._check_seeds(seeds)
            return self.basis @ scalars[: self.rank]
        inside, outside = self._estimates(scalars, seeds)
        return inside if outside is None else inside + self.exploration_weight * outside

    def full_estimate(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The unbiased estimate u = U a_U + P x used to update the basis."""
        inside, outside = self._estimates(scalars, seeds)
        return inside if outside is None else inside + outside

    def reconstruct(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        inside, outside = self._estimates(scalars, seeds)
        full = inside if outside is None else inside + outside
        step = inside if outside is None else inside + self.exploration_weight * outside
        self.observe_gradient(full)
        return step

    def update(self, scalars: torch.Tensor, seeds: Sequence[int]) -> None:
        self.observe_gradient(self.full_estimate(scalars, seeds))

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        self._check_index(index)
        if index < self.rank:
            return self.basis[:, index].to(device).clone()
        assert self.exploration is not None
        return self.exploration.direction(self._check_seeds(seeds), index - self.rank, device)

    def captured_energy(self, true_grad: torch.Tensor) -> float:
        """gamma of the current basis against a true gradient (never against g_hat)."""
        return captured_energy(self.basis, self._check_grad(true_grad).to(self.basis.device))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "basis": self.basis.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        basis = state["basis"]
        if tuple(basis.shape) != tuple(self.basis.shape):
            raise ValueError(f"checkpoint basis has shape {tuple(basis.shape)}, expected {tuple(self.basis.shape)}.")
        self.basis = basis.to(device=self.basis.device, dtype=torch.float32).clone()


def _orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR with a positive diagonal of R (a unique, reproducible basis)."""
    q, r = torch.linalg.qr(matrix, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


class CodebookDirections(_SubspaceFamily):
    """ADC codebook: r orthonormal columns, normalised Oja update, periodic QR.

    Update with estimate u (unit-normalised û = u/||u||, so ``oja_lr`` is scale-free):
    U' = U + alpha û b^T, b = U^T û. Because U^T û = b, U'^T U' = I + (2 alpha + alpha^2) b b^T
    exactly, so U' is re-orthonormalised in O(D r) by its inverse square root (a rank-one
    correction). Float drift is removed by a full QR every ``qr_every`` updates.
    """

    name = "codebook"

    def __init__(
        self,
        dim: int,
        rank: int,
        num_exploration: int = 0,
        oja_lr: float = 0.1,
        qr_every: int = 50,
        exploration_weight: float = 0.0,
        init_seed: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(dim, rank, num_exploration, exploration_weight, init_seed, block_size, chunk_size)
        if not oja_lr > 0.0:
            raise ValueError(f"oja_lr={oja_lr!r} must be > 0.")
        if qr_every < 1:
            raise ValueError(f"qr_every={qr_every} must be >= 1.")
        self.oja_lr = float(oja_lr)
        self.qr_every = qr_every
        self.num_updates = 0
        init = GaussianDirections(dim, rank, block_size=block_size, chunk_size=chunk_size)
        seeds = direction_seeds(init_seed.to_bytes(8, "little"), rank)
        columns = torch.stack([init.direction(seeds, j) for j in range(rank)], dim=1)  # (D, r)
        self.basis = _orthonormalize(columns)

    def observe_gradient(self, true_grad: torch.Tensor) -> None:
        grad = true_grad.to(device=self.basis.device, dtype=torch.float32)
        norm = grad.norm()
        if not torch.isfinite(norm) or norm == 0:
            return
        unit = grad / norm
        coords = self.basis.T @ unit  # b (r,)
        coords_norm = coords.norm()
        if coords_norm > 0:
            alpha = self.oja_lr
            growth = (2 * alpha + alpha * alpha) * coords_norm**2
            beta = torch.rsqrt(1 + growth) - 1
            coords_unit = coords / coords_norm
            column = (1 + beta) * alpha * coords_norm * unit + beta * (self.basis @ coords_unit)
            self.basis.add_(torch.outer(column, coords_unit))
        self.num_updates += 1
        if self.num_updates % self.qr_every == 0:
            self.basis = _orthonormalize(self.basis)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.num_updates = int(state["num_updates"])


class MomentumDirections(_SubspaceFamily):
    """Momentum-centric mode: one direction is the normalised shared momentum m/||m||.

    m <- beta m + (1 - beta) u after every step, u the unbiased full estimate, so the
    exploration directions rotate m. Alone (no exploration) g_hat would stay parallel to
    m forever, so at least one exploration direction is required. Biased: the step
    estimate with ``exploration_weight`` < 1 favours the momentum direction.
    Before the first update the direction is a seeded random unit vector.
    """

    name = "momentum"

    def __init__(
        self,
        dim: int,
        num_exploration: int,
        beta: float = 0.9,
        exploration_weight: float = 0.0,
        init_seed: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if num_exploration < 1:
            raise ValueError(
                f"num_exploration={num_exploration} must be >= 1: the momentum direction alone never "
                "rotates. HINT: use num_directions >= 2 (one momentum + exploration directions)."
            )
        super().__init__(dim, 1, num_exploration, exploration_weight, init_seed, block_size, chunk_size)
        _check_fraction("beta", beta, 0.0, 1.0, high_open=True)
        self.beta = float(beta)
        init = GaussianDirections(dim, 1, block_size=block_size, chunk_size=chunk_size)
        start = init.direction(direction_seeds(init_seed.to_bytes(8, "little"), 1), 0)
        self.basis = (start / start.norm()).unsqueeze(1)  # (D, 1)
        self.momentum = torch.zeros(dim, dtype=torch.float32)

    def to(self, device: torch.device | str) -> "MomentumDirections":
        super().to(device)
        self.momentum = self.momentum.to(device)
        return self

    def observe_gradient(self, true_grad: torch.Tensor) -> None:
        grad = true_grad.to(device=self.momentum.device, dtype=torch.float32)
        if not bool(torch.isfinite(grad).all()):
            return
        self.momentum.mul_(self.beta).add_(grad, alpha=1 - self.beta)
        norm = self.momentum.norm()
        if norm > 0:
            self.basis = (self.momentum / norm).unsqueeze(1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momentum": self.momentum.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.momentum = state["momentum"].to(device=self.momentum.device, dtype=torch.float32).clone()

"""Families built on a shared orthonormal basis: codebook (ADC) and momentum-centric.

Symbols: D coordinates, r basis scalars (``rank``), e exploration directions
(``num_exploration``), K = r + e scalars per step. U (D, r) has orthonormal columns and
is identical on every rank (docs/PROTOCOL.md §5 and §7); the codebook may hold it in
structured form (``codebook_layout``).

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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .chain import direction_seeds
from .codebook_fit import GradientSketch, check_codebook_settings, default_layout, fit_layout
from .codebook_layout import Layout, Segment, segments_from_shapes
from .directions import DEFAULT_CHUNK_SIZE, DirectionFamily, GaussianDirections

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


def _finite_nonzero(grad: torch.Tensor) -> bool:
    norm = grad.norm()
    return bool(torch.isfinite(norm)) and float(norm) > 0.0


class _SubspaceFamily(DirectionFamily):
    """Basis columns plus Gaussian exploration directions (see module docstring).

    Subclasses define ``_coords(g)`` (U^T g), ``_expand(a)`` (U a), ``_column(j)`` and
    ``_learn(u, scalars)``: what the full estimate u does to their state.
    """

    unbiased = False

    def __init__(self, dim: int, rank: int, num_exploration: int, exploration_weight: float, init_seed: int,
                 chunk_size: int | None) -> None:
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
        self.init_seed = init_seed
        self.chunk_size = chunk_size
        self.exploration = (
            GaussianDirections(dim, num_exploration, chunk_size=chunk_size)
            if num_exploration
            else None
        )

    @property
    def num_seeds(self) -> int:
        return self.num_exploration

    def _seeded_columns(self, tag: bytes, rows: int, count: int, device: torch.device | str) -> torch.Tensor:
        """(rows, count) Gaussian columns from seeds derived from ``init_seed`` and ``tag``."""
        if count == 0:
            return torch.zeros(rows, 0, device=device)
        init = GaussianDirections(rows, count, chunk_size=self.chunk_size)
        seeds = direction_seeds(self.init_seed.to_bytes(8, "little") + tag, count)
        return torch.stack([init.direction(seeds, j, device) for j in range(count)], dim=1)

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        seeds = self._check_seeds(seeds)
        coords = self._coords(grad)  # (r,)
        if self.exploration is None:
            return coords
        return torch.cat([coords, self.exploration.project(grad, seeds)])

    def _perp(self, vector: torch.Tensor) -> torch.Tensor:
        return vector - self._expand(self._coords(vector))

    def _estimates(self, scalars: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U a_U, P x) where P x is None without exploration."""
        scalars = self._check_scalars(scalars)
        seeds = self._check_seeds(seeds)
        inside = self._expand(scalars[: self.rank])
        if self.exploration is None:
            return inside, None
        return inside, self._perp(self.exploration.synthesize(scalars[self.rank :], seeds))

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if self.exploration_weight == 0.0:  # the exploration term would be discarded
            scalars = self._check_scalars(scalars)
            self._check_seeds(seeds)
            return self._expand(scalars[: self.rank])
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
        self._learn(full, scalars.to(torch.float32))
        return step

    def update(self, scalars: torch.Tensor, seeds: Sequence[int]) -> None:
        self._learn(self.full_estimate(scalars, seeds), scalars.to(torch.float32))

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        self._check_index(index)
        if index < self.rank:
            return self._column(index).to(device).clone()
        assert self.exploration is not None
        return self.exploration.direction(self._check_seeds(seeds), index - self.rank, device)

    def captured_energy(self, true_grad: torch.Tensor) -> float:
        """gamma of the current basis against a true gradient (never against g_hat)."""
        grad = self._check_grad(true_grad)
        norm_sq = float(grad.dot(grad))
        if norm_sq == 0.0:
            return float("nan")
        coords = self._coords(grad)
        return float(coords.dot(coords)) / norm_sq


class CodebookDirections(_SubspaceFamily):
    """ADC codebook: r basis scalars, fitted to true gradients, tracked from public estimates.

    ``structure``: ``dense`` (one D x r basis), ``block`` (per-parameter column blocks) or
    ``factor`` (per-matrix left/right bases with k^2 scalars, 1-D parameters as column
    blocks); ``param_shapes`` lists the trainable parameters' shapes in the order their
    gradients are concatenated (without it, g is one 1-D parameter and every structure
    is dense). Memory: dense D r floats; block sum_b d_b k_b (at most D r); factor
    sum over matrices of (m + n) k plus the 1-D columns; the sketch D ``sketch_size``.

    ``fit="sketch"`` (default): ``observe_gradient`` (bootstrap/refresh steps) stores the
    true gradient in a ``sketch_size``-column sketch and the basis is refitted from it, at
    the next use of the basis, to the sketch's top principal directions under the
    structure (``codebook_fit``). Every rank refits the same U from the same sketch. After
    that, ``update`` rotates U with the public full estimate u (``tracking_lr`` > 0 and
    exploration directions needed, see ``_track``); a later true gradient (refresh)
    refits from the sketch, dropping what tracking did.
    ``fit="oja"``: the pre-sketch rule (dense only): normalised Oja, U <- U + oja_lr
    u_hat (u_hat^T U), u_hat = u/||u||, with true gradients and full estimates alike.

    Orthonormality: every block's bases are re-orthonormalised exactly at each update
    (rank-one correction for column blocks, QR for factor sides); a QR every ``qr_every``
    updates removes float drift. Idle slots (see ``codebook_layout``) hold zero columns.
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
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        *,
        structure: str = "dense",
        param_shapes: Sequence[Sequence[int]] | None = None,
        fit: str = "sketch",
        sketch_size: int = 16,
        sketch_decay: float = 1.0,
        tracking_lr: float = 0.0,
    ) -> None:
        super().__init__(dim, rank, num_exploration, exploration_weight, init_seed, chunk_size)
        check_codebook_settings(structure, fit, oja_lr, qr_every, sketch_size, sketch_decay, tracking_lr)
        self.structure, self.fit = structure, fit
        self.oja_lr, self.qr_every, self.tracking_lr = float(oja_lr), qr_every, float(tracking_lr)
        self.num_updates = 0
        segments = [Segment(0, (dim,))] if structure == "dense" else segments_from_shapes(dim, param_shapes)
        self.sketch = GradientSketch(dim, segments, sketch_size, float(sketch_decay))
        self._layout = default_layout(dim, rank, segments, structure, self._init_columns, torch.device("cpu"))
        self._refit_due = False

    def _init_columns(self, index: int, side: str, rows: int, count: int, device: torch.device) -> torch.Tensor:
        """Seeded Gaussian columns; the dense codebook's initial basis keeps its historic seeds."""
        tag = b"" if self.structure == "dense" and side == "columns" else f"/{self.structure}/{index}/{side}".encode()
        return self._seeded_columns(tag, rows, count, device)

    @property
    def layout(self) -> Layout:
        """The current structured basis; refitted from the sketch first if a true gradient arrived."""
        if self._refit_due:
            self._layout = fit_layout(self.sketch, self.rank, self.structure, self._init_columns)
            self._refit_due = False
        return self._layout

    @property
    def basis(self) -> torch.Tensor:
        """U (D, r) as a dense matrix (the dense codebook's own tensor; a copy for structured ones)."""
        return self.layout.materialize()

    def to(self, device: torch.device | str) -> "CodebookDirections":
        """Move the basis and the sketch to ``device``."""
        self._layout.to(device)
        self.sketch.to(device)
        return self

    def _coords(self, grad: torch.Tensor) -> torch.Tensor:
        return self.layout.project(grad)

    def _expand(self, coords: torch.Tensor) -> torch.Tensor:
        return self.layout.expand(coords)

    def _column(self, index: int) -> torch.Tensor:
        return self.layout.column(index)

    def observe_gradient(self, true_grad: torch.Tensor) -> None:
        """A true (all-reduced) gradient: into the sketch (refit at the next use) or an Oja step."""
        grad = true_grad.to(device=self._layout.device, dtype=torch.float32)
        if not _finite_nonzero(grad):
            return
        if self.fit == "sketch":
            self.sketch.add(grad)
            self._refit_due = True
            return
        self.layout.blocks[0].oja(grad, self.oja_lr)
        self._count_update()

    def _learn(self, full: torch.Tensor, scalars: torch.Tensor) -> None:
        if self.fit == "oja":
            self.observe_gradient(full)
        else:
            self._track(full, scalars)

    def _track(self, full: torch.Tensor, scalars: torch.Tensor) -> None:
        """Oja with the public full estimate u: U <- U + (tracking_lr / N) u (u^T U), per block.

        u^T U = a_U exactly (P x is orthogonal to U), so E[update] is the true-gradient Oja
        step and the exploration noise enters only linearly, as P x a_U^T. N estimates ||g||^2
        as max(mean_j a_j^2, ||a_U||^2) (E[a_j^2] = ||g||^2 for Gaussian z_j). Normalising by
        ||u||^2 instead, about (D/e) ||g||^2, shrinks the step by e/D: the stall of the old
        rule. Without exploration u lies in span(U) and cannot rotate it: nothing to do.
        """
        if self.tracking_lr == 0.0 or self.exploration is None:
            return
        norm_sq = max(float(scalars[self.rank :].square().mean()), float(scalars[: self.rank].square().sum()))
        if not math.isfinite(norm_sq) or norm_sq <= 0.0 or not bool(torch.isfinite(full).all()):
            return
        self.layout.track(full, self.tracking_lr / norm_sq)
        self._count_update()

    def _count_update(self) -> None:
        self.num_updates += 1
        if self.num_updates % self.qr_every == 0:
            self._layout.reorthonormalize()

    def refit(self) -> None:
        """Refit from the sketch now (it happens anyway at the next use of the basis)."""
        if self.sketch.count:
            self._refit_due = True
            _ = self.layout

    def state_dict(self) -> dict[str, Any]:
        layout = self._layout.state_dict()
        state = {**super().state_dict(), "structure": self.structure, "fit": self.fit,
                 "num_updates": self.num_updates, "layout": layout, "refit_due": self._refit_due,
                 "sketch": self.sketch.state_dict()}
        if self.structure == "dense":
            state["basis"] = layout["tensors"][0][0]  # (D, r)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("structure", "fit"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint codebook has {key}={state[key]!r}, this run has "
                                 f"{key}={getattr(self, key)!r}. HINT: resume with the same codebook settings.")
        device = self._layout.device
        self._layout = Layout.from_state(self.dim, self.rank, self.sketch.segments, state["layout"], device)
        self.sketch.load_state_dict(state["sketch"], device)
        self._refit_due = bool(state["refit_due"])
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
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if num_exploration < 1:
            raise ValueError(
                f"num_exploration={num_exploration} must be >= 1: the momentum direction alone never "
                "rotates. HINT: use num_directions >= 2 (one momentum + exploration directions)."
            )
        super().__init__(dim, 1, num_exploration, exploration_weight, init_seed, chunk_size)
        _check_fraction("beta", beta, 0.0, 1.0, high_open=True)
        self.beta = float(beta)
        start = self._seeded_columns(b"", dim, 1, "cpu")[:, 0]
        self.basis = (start / start.norm()).unsqueeze(1)  # (D, 1)
        self.momentum = torch.zeros(dim, dtype=torch.float32)

    def to(self, device: torch.device | str) -> "MomentumDirections":
        self.basis = self.basis.to(device)
        self.momentum = self.momentum.to(device)
        return self

    def _coords(self, grad: torch.Tensor) -> torch.Tensor:
        return self.basis.T @ grad

    def _expand(self, coords: torch.Tensor) -> torch.Tensor:
        return self.basis @ coords

    def _column(self, index: int) -> torch.Tensor:
        return self.basis[:, index]

    def _learn(self, full: torch.Tensor, scalars: torch.Tensor) -> None:
        self.observe_gradient(full)

    def observe_gradient(self, true_grad: torch.Tensor) -> None:
        grad = true_grad.to(device=self.momentum.device, dtype=torch.float32)
        if not bool(torch.isfinite(grad).all()):
            return
        self.momentum.mul_(self.beta).add_(grad, alpha=1 - self.beta)
        norm = self.momentum.norm()
        if norm > 0:
            self.basis = (self.momentum / norm).unsqueeze(1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "basis": self.basis.detach().cpu().clone(),
                "momentum": self.momentum.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if tuple(state["basis"].shape) != (self.dim, 1):
            raise ValueError(f"checkpoint basis has shape {tuple(state['basis'].shape)}, expected ({self.dim}, 1).")
        self.basis = state["basis"].to(device=self.momentum.device, dtype=torch.float32).clone()
        self.momentum = state["momentum"].to(device=self.momentum.device, dtype=torch.float32).clone()

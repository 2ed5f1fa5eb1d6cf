"""Fitting the codebook to true gradients: a bounded sketch and a deterministic refit.

Symbols: D, r, segments and blocks as in ``codebook_layout``; l = ``sketch_size``
columns, c <= l of them in use.

Sketch. Every observed true gradient is scaled to unit norm (so the large early
gradients do not outweigh later ones) and stored as a column; before each insertion the
stored columns are multiplied by sqrt(``decay``). When all l columns are in use, each
segment is shrunk on its own by one frequent-directions step (Liberty 2013): rotate the
segment's columns to their principal directions, subtract the (l/2 + 1)-th largest
squared singular value from every squared singular value and keep the l/2 that stay
positive. Memory stays D l floats; for each segment the sketch's second moment S S^T
under-estimates the observed one by at most 2 ||observations||_F^2 / l.

Refit. From the sketch, every segment offers the next column (a ``vector`` segment:
its next principal direction, value = that direction's squared singular value) or the
next factor rank (a ``factor`` segment: top-k eigenvectors of the side second moments
sum_j S_j S_j^T and sum_j S_j^T S_j, value = the energy the k x k core gains, cost
(k+1)^2 - k^2 scalars). A greedy pass takes the best value per scalar until the r
scalars are spent: the block-diagonal basis of r columns that holds the most sketch
energy, and its factor counterpart. Vector columns the sketch cannot fill (it has only c
directions per segment) are seeded Gaussian columns orthogonalised against the others.

Determinism (every rank must get the same U bitwise): Gram matrices are float64 sums
over fixed row chunks on the sketch's device, the small eigenproblems run on the CPU in
float64 with a canonical sign per eigenvector, greedy ties go to the earlier segment.
Ranks on the same hardware and torch build therefore refit identically, like every other
step of the protocol (a CPU rank and a GPU rank would not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch

from .codebook_layout import Block, FactorBlock, Layout, Segment, VectorBlock, orthonormalize

__all__ = [
    "CODEBOOK_FITS",
    "CODEBOOK_STRUCTURES",
    "CodebookFit",
    "CodebookStructure",
    "GradientSketch",
    "allocate",
    "check_codebook_settings",
    "default_layout",
    "fit_layout",
]

CodebookStructure = Literal["dense", "block", "factor"]
CodebookFit = Literal["sketch", "oja"]
CODEBOOK_STRUCTURES: tuple[str, ...] = get_args(CodebookStructure)
CODEBOOK_FITS: tuple[str, ...] = get_args(CodebookFit)

GRAM_LIMIT = 4096  # side dimensions above this use subspace iteration instead of an m x m Gram
_ROW_CHUNK = 1 << 20
_SUBSPACE_ITERATIONS = 8
_OVERSAMPLE = 8

# init(segment_index, side, rows, count, device) -> (rows, count) seeded Gaussian columns
InitColumns = Callable[[int, str, int, int, torch.device], torch.Tensor]
Move = Callable[[int], "tuple[int, float] | None"]


def check_codebook_settings(structure: str, fit: str, oja_lr: float, qr_every: int, sketch_size: int,
                            sketch_decay: float, tracking_lr: float) -> None:
    """Reject bad ``CodebookDirections`` settings with the argument, its value and a hint."""
    if structure not in CODEBOOK_STRUCTURES:
        raise ValueError(f"structure={structure!r} is unknown. HINT: choose one of {', '.join(CODEBOOK_STRUCTURES)}.")
    if fit not in CODEBOOK_FITS:
        raise ValueError(f"fit={fit!r} is unknown. HINT: choose one of {', '.join(CODEBOOK_FITS)}.")
    if fit == "oja" and structure != "dense":
        raise ValueError(f"fit='oja' works on structure='dense' only, got structure={structure!r}. "
                         "HINT: use fit='sketch' with a structured codebook.")
    if not oja_lr > 0.0:
        raise ValueError(f"oja_lr={oja_lr!r} must be > 0.")
    if qr_every < 1:
        raise ValueError(f"qr_every={qr_every} must be >= 1.")
    if isinstance(sketch_size, bool) or not isinstance(sketch_size, int) or sketch_size < 1:
        raise ValueError(f"sketch_size={sketch_size!r} must be an integer >= 1. HINT: it bounds the stored "
                         "true gradients (D x sketch_size floats); 16 keeps a 10-step bootstrap exactly.")
    if not 0.0 < sketch_decay <= 1.0:
        raise ValueError(f"sketch_decay={sketch_decay!r} must lie in (0, 1]. HINT: 1 weighs all true "
                         "gradients alike; 0.7 lets each new one outweigh the older ones.")
    if not (math.isfinite(tracking_lr) and tracking_lr >= 0.0):
        raise ValueError(f"tracking_lr={tracking_lr!r} must be a finite number >= 0. HINT: 0 disables tracking.")


def _gram(columns: torch.Tensor) -> torch.Tensor:
    """columns^T columns in float64 on the CPU, summed over fixed row chunks."""
    count = columns.shape[1]
    total = torch.zeros(count, count, dtype=torch.float64, device=columns.device)
    for start in range(0, columns.shape[0], _ROW_CHUNK):
        part = columns[start : start + _ROW_CHUNK].double()
        total += part.T @ part
    return total.cpu()


def _eigh_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, float64 CPU) and eigenvectors with their largest entry positive."""
    values, vectors = torch.linalg.eigh(gram.double().cpu())
    values, vectors = values.flip(0), vectors.flip(1)
    pivots = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivots, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return values, vectors * signs


class GradientSketch:
    """Up to ``size`` unit-scaled true gradients, shrunk per segment when full (see module doc)."""

    def __init__(self, dim: int, segments: Sequence[Segment], size: int, decay: float) -> None:
        self.dim, self.segments, self.size, self.decay = dim, list(segments), size, decay
        self.columns: torch.Tensor | None = None  # (D, size), allocated at the first gradient
        self.count = 0

    def add(self, grad: torch.Tensor) -> None:
        """Insert a finite, non-zero float32 gradient (D,)."""
        if self.columns is None:
            self.columns = torch.zeros(self.dim, self.size, dtype=torch.float32, device=grad.device)
        if self.decay < 1.0:
            self.columns[:, : self.count] *= math.sqrt(self.decay)
        if self.count == self.size:
            self._shrink()
        self.columns[:, self.count] = grad / grad.norm()
        self.count += 1

    def _shrink(self) -> None:
        assert self.columns is not None
        keep = self.size // 2
        for segment in self.segments:
            rows = self.columns[segment.offset : segment.offset + segment.size]  # (d, size) view
            values, vectors = _eigh_desc(_gram(rows))
            floor = values[keep].clamp(min=0.0)
            kept = values[:keep].clamp(min=0.0)
            scale = torch.where(kept > 0, ((kept - floor).clamp(min=0.0) / kept.clamp(min=1e-300)).sqrt(),
                                torch.zeros_like(kept))
            mix = (vectors[:, :keep] * scale).to(rows)
            shrunk = rows @ mix  # (d, keep)
            rows[:, :keep] = shrunk
            rows[:, keep:] = 0.0
        self.count = keep

    def view(self, segment: Segment) -> torch.Tensor:
        """The segment's rows of the columns in use: (d, c)."""
        assert self.columns is not None
        return self.columns[segment.offset : segment.offset + segment.size, : self.count]

    def to(self, device: torch.device | str) -> None:
        if self.columns is not None:
            self.columns = self.columns.to(device)

    def state_dict(self) -> dict[str, Any]:
        used = None if self.columns is None else self.columns[:, : self.count].detach().cpu().clone()
        return {"columns": used, "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        used, count = state["columns"], int(state["count"])
        if count > self.size or (used is not None and tuple(used.shape) != (self.dim, count)):
            raise ValueError(f"checkpoint sketch holds {count} columns of {None if used is None else used.shape}, "
                             f"this codebook has sketch_size={self.size} and dim={self.dim}. HINT: resume with "
                             "the same sketch_size and model.")
        self.columns, self.count = None, count
        if used is not None:
            self.columns = torch.zeros(self.dim, self.size, dtype=torch.float32, device=device)
            self.columns[:, :count] = used.to(device)


def allocate(budget: int, moves: Sequence[Move]) -> list[int]:
    """Greedy ranks per segment: repeatedly grow the segment whose next move, (cost, value) =
    ``moves[i](rank_i)``, has the best value per scalar and still fits; ties go to the earlier
    segment. Stops when the budget is spent or nothing fits (the rest stays idle)."""
    ranks, left = [0] * len(moves), budget
    while left > 0:
        best: tuple[float, int, int] | None = None
        for index, move in enumerate(moves):
            offer = move(ranks[index])
            if offer is None or offer[0] > left:
                continue
            score = offer[1] / offer[0]
            if best is None or score > best[0]:
                best = (score, index, offer[0])
        if best is None:
            break
        ranks[best[1]] += 1
        left -= best[2]
    return ranks


def _factored(segment: Segment, structure: str) -> bool:
    return structure == "factor" and segment.is_matrix


def _prior_move(segment: Segment, factored: bool) -> Move:
    """Before any gradient: D'Hondt by segment size over the scalars (size / scalars after the move)."""
    if factored:
        top = min(segment.rows, segment.cols)
        return lambda k: None if k >= top else (2 * k + 1, (2 * k + 1) * segment.size / (k + 1) ** 2)
    return lambda k: None if k >= segment.size else (1, segment.size / (k + 1))


def _random_block(index: int, segment: Segment, factored: bool, rank: int, init: InitColumns,
                  device: torch.device) -> Block:
    if factored:
        left = orthonormalize(init(index, "left", segment.rows, rank, device))
        right = orthonormalize(init(index, "right", segment.cols, rank, device))
        return FactorBlock(segment, left, right)
    return VectorBlock(segment, orthonormalize(init(index, "columns", segment.size, rank, device)))


def default_layout(dim: int, rank: int, segments: Sequence[Segment], structure: str, init: InitColumns,
                   device: torch.device) -> Layout:
    """Seeded random bases, ranks by segment size (the codebook before its first fit)."""
    factored = [_factored(s, structure) for s in segments]
    ranks = allocate(rank, [_prior_move(s, f) for s, f in zip(segments, factored)])
    return Layout(dim, rank, [_random_block(i, s, f, k, init, device)
                              for i, (s, f, k) in enumerate(zip(segments, factored, ranks))])


class _VectorFit:
    """Principal directions of one segment's sketch columns."""

    def __init__(self, columns: torch.Tensor) -> None:
        self.columns = columns  # (d, c)
        self.values, self.vectors = _eigh_desc(_gram(columns)) if columns.shape[1] else (torch.zeros(0), None)
        tol = 1e-12 * float(self.values[0]) if len(self.values) else 0.0
        self.fitted = int((self.values > tol).sum()) if len(self.values) and self.values[0] > 0 else 0

    def move(self, size: int) -> Move:
        return lambda k: None if k >= size else (1, float(self.values[k]) if k < self.fitted else 0.0)

    def block(self, index: int, segment: Segment, rank: int, init: InitColumns) -> VectorBlock:
        take = min(rank, self.fitted)
        device = self.columns.device
        parts = []
        if take:
            mix = self.vectors[:, :take] / self.values[:take].sqrt()
            parts.append(self.columns @ mix.to(self.columns))
        if rank > take:
            parts.append(init(index, "columns", segment.size, rank - take, device))
        columns = torch.cat(parts, dim=1) if parts else torch.zeros(segment.size, 0, device=device)
        return VectorBlock(segment, orthonormalize(columns) if rank else columns)


def _side_basis(apply: Callable[[torch.Tensor], torch.Tensor], gram: Callable[[], torch.Tensor], rows: int,
                rank: int, start: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Top ``rank`` eigenvectors (rows, rank) of a PSD side moment, given as a Gram or as a product."""
    if rank == 0:
        return torch.zeros(rows, 0)
    if rows <= GRAM_LIMIT:
        return _eigh_desc(gram())[1][:, :rank].float()
    basis = orthonormalize(start(rank + _OVERSAMPLE))  # subspace iteration from seeded columns
    for _ in range(_SUBSPACE_ITERATIONS):
        basis = orthonormalize(apply(basis))
    small = (basis.T @ apply(basis)).double().cpu()
    return (basis @ _eigh_desc((small + small.T) / 2)[1][:, :rank].to(basis)).cpu()


class _FactorFit:
    """Side bases and core energies E(k) of one matrix segment's sketch columns."""

    def __init__(self, columns: torch.Tensor, segment: Segment, max_rank: int, index: int,
                 init: InitColumns) -> None:
        m, n, device = segment.rows, segment.cols, columns.device
        mats = [columns[:, j].view(m, n) for j in range(columns.shape[1])]
        top = min(m, n, max_rank)

        def side(transpose: bool, rows: int, name: str) -> torch.Tensor:
            sides = [mat.T if transpose else mat for mat in mats]

            def gram() -> torch.Tensor:
                total = torch.zeros(rows, rows, dtype=torch.float64, device=device)
                for mat in sides:
                    total += mat.double() @ mat.double().T
                return total

            def apply(x: torch.Tensor) -> torch.Tensor:
                return sum((mat @ (mat.T @ x) for mat in sides), torch.zeros_like(x))

            return _side_basis(apply, gram, rows, top, lambda k: init(index, name + "-start", rows, k, device))

        self.left, self.right = side(False, m, "left").to(device), side(True, n, "right").to(device)
        energy = torch.zeros(top + 1, dtype=torch.float64)
        for mat in mats:
            core = (self.left.T @ mat @ self.right).double().cpu()
            squared = core.square()
            energy += torch.tensor([0.0] + [float(squared[:k, :k].sum()) for k in range(1, top + 1)])
        self.energy, self.top = energy, top

    def move(self, k: int) -> tuple[int, float] | None:
        if k >= self.top:
            return None
        return 2 * k + 1, float(self.energy[k + 1] - self.energy[k])

    def block(self, segment: Segment, rank: int) -> FactorBlock:
        return FactorBlock(segment, self.left[:, :rank].contiguous(), self.right[:, :rank].contiguous())


def fit_layout(sketch: GradientSketch, rank: int, structure: str, init: InitColumns) -> Layout:
    """The layout that holds the most sketch energy in ``rank`` scalars (see module doc)."""
    fits: list[_VectorFit | _FactorFit] = []
    moves: list[Move] = []
    max_rank = math.isqrt(rank)
    for index, segment in enumerate(sketch.segments):
        if _factored(segment, structure):
            fit = _FactorFit(sketch.view(segment), segment, max_rank, index, init)
            moves.append(fit.move)
        else:
            fit = _VectorFit(sketch.view(segment))
            moves.append(fit.move(segment.size))
        fits.append(fit)
    ranks = allocate(rank, moves)
    blocks: list[Block] = []
    for index, (segment, fit, k) in enumerate(zip(sketch.segments, fits, ranks)):
        blocks.append(fit.block(segment, k) if isinstance(fit, _FactorFit) else fit.block(index, segment, k, init))
    return Layout(sketch.dim, rank, blocks)

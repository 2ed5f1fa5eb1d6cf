"""Robust aggregation of the (ranks x directions) scalar matrix (docs/PROTOCOL.md §4).

Symbols: N ranks, K directions, A (N, K) with one row per rank, tau the trim ratio.

Each column (direction) is aggregated across ranks independently: a direction is a
separate measurement, so values are never trimmed across the K directions of a step.
Before aggregating, rows of slashed ranks (a permanent set, kept by the engine) and rows
holding any non-finite value (dropped for this step only) are left out and reported; the
divisor is the number of rows kept.

Two defences act on whole rows (a rank's K scalars together) instead:

- Krum (Blanchard et al., 2017), f the assumed number of Byzantine rows: each row's score
  is the sum of squared L2 distances to its n - f - 2 nearest other rows; the ``multi``
  rows with the lowest scores are averaged (multi = 1: Krum, > 1: Multi-Krum). Needs
  n >= 2f + 3 rows.
- Row-norm clipping (``clip_row_norms=True`` on any aggregator): rows whose L2 norm
  exceeds the median norm of the kept rows are scaled down to it before aggregating.
  Rows at or below the median are untouched; honest rows above it are shrunk too.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from fractions import Fraction
from dataclasses import dataclass
from typing import ClassVar

import torch
from typing_extensions import override

__all__ = [
    "AggregationResult",
    "Aggregator",
    "MeanAggregator",
    "MedianAggregator",
    "TrimmedMeanAggregator",
    "KrumAggregator",
    "NotEnoughRanksError",
    "AGGREGATION_NAMES",
    "make_aggregator",
]


class NotEnoughRanksError(RuntimeError):
    """Too few usable rows remain for the aggregator to produce an estimate."""


@dataclass(frozen=True)
class AggregationResult:
    scalars: torch.Tensor  # (K,)
    kept_ranks: tuple[int, ...]
    nonfinite_ranks: tuple[int, ...]  # dropped this step for NaN/inf scalars
    slashed_ranks: tuple[int, ...]  # left out because they are slashed
    clipped_ranks: tuple[int, ...] = ()  # kept rows scaled down to the median norm


class Aggregator(abc.ABC):
    """Aggregation of usable rows: ``aggregate(rows (n, K)) -> (K,)``.

    ``clip_row_norms``: before aggregating, scale every kept row whose L2 norm exceeds
    the median norm of the kept rows down to that median (see the module docstring).
    """

    name: ClassVar[str]
    clip_row_norms: bool = False  # set per instance by __init__

    def __init__(self, clip_row_norms: bool = False) -> None:
        if not isinstance(clip_row_norms, bool):
            raise ValueError(f"clip_row_norms={clip_row_norms!r} must be True or False.")
        self.clip_row_norms = clip_row_norms

    def min_rows(self) -> int:
        """Fewest rows the aggregator can work with."""
        return 1

    def _min_rows_hint(self) -> str:
        return ""

    def robustness_warning(self, num_rows: int) -> str | None:
        """Why this aggregator is no more robust than the mean with ``num_rows`` rows, or None."""
        return None

    @abc.abstractmethod
    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        """Combine finite rows (n, K), n >= min_rows(), into one (K,) vector."""

    def __call__(self, matrix: torch.Tensor, slashed: Iterable[int] = ()) -> AggregationResult:
        """Leave out slashed rows and drop non-finite rows of ``matrix`` (N, K), then aggregate the rest."""
        if matrix.dim() != 2:
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}, expected (ranks, directions).")
        slashed_set = {int(r) for r in slashed}
        finite = torch.isfinite(matrix).all(dim=1).tolist()
        kept, nonfinite = [], []
        for rank, ok in enumerate(finite):
            if rank in slashed_set:
                continue
            (kept if ok else nonfinite).append(rank)
        if len(kept) < self.min_rows():
            raise NotEnoughRanksError(
                f"{self.name} aggregation needs at least {self.min_rows()} usable ranks, got {len(kept)} "
                f"(slashed={sorted(slashed_set)}, non-finite={nonfinite}).{self._min_rows_hint()}"
            )
        rows = matrix[kept].to(torch.float32)  # (n, K)
        clipped: tuple[int, ...] = ()
        if self.clip_row_norms:
            rows, mask = clip_to_median_norm(rows)
            clipped = tuple(rank for rank, hit in zip(kept, mask.tolist()) if hit)
        return AggregationResult(
            scalars=self.aggregate(rows),
            kept_ranks=tuple(kept),
            nonfinite_ranks=tuple(nonfinite),
            slashed_ranks=tuple(sorted(slashed_set & set(range(matrix.shape[0])))),
            clipped_ranks=clipped,
        )


def median_value(values: torch.Tensor) -> torch.Tensor:
    """Median of a 1-D tensor; the mean of the two middle values when its length is even."""
    ordered, _ = torch.sort(values)
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def clip_to_median_norm(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale rows (n, K) whose L2 norm exceeds the median row norm down to it.

    Returns the clipped rows and a (n,) bool mask of the rows that were scaled. Rows at
    or below the median are returned bit for bit.
    """
    norms = torch.linalg.vector_norm(rows, dim=1)  # (n,)
    limit = median_value(norms)
    over = norms > limit
    factors = torch.where(over, limit / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))
    clipped = torch.where(over.unsqueeze(1), rows * factors.unsqueeze(1), rows)
    return clipped, over


class MeanAggregator(Aggregator):
    """Column mean. Summed in rank order, so every rank gets bitwise the same result."""

    name = "mean"

    @override
    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        total = rows[0].clone()
        for row in rows[1:]:
            total += row
        return total / rows.shape[0]


class MedianAggregator(Aggregator):
    """Column median; the mean of the two middle values when the row count is even."""

    name = "median"

    @override
    def robustness_warning(self, num_rows: int) -> str | None:
        if num_rows <= 2:
            return (f"median aggregation with {num_rows} ranks is the mean of the rows: one liar moves it "
                    "arbitrarily. HINT: use at least 3 ranks for a robust median.")
        return None

    @override
    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        ordered, _ = torch.sort(rows, dim=0)
        n = ordered.shape[0]
        if n % 2:
            return ordered[n // 2].clone()
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMeanAggregator(Aggregator):
    """Per column, drop the floor(tau n) largest and smallest values, average the rest."""

    name = "trimmed_mean"

    def __init__(self, trim_ratio: float = 0.1, clip_row_norms: bool = False) -> None:
        super().__init__(clip_row_norms)
        if not (isinstance(trim_ratio, (int, float)) and 0.0 <= trim_ratio < 0.5):
            raise ValueError(
                f"trim_ratio={trim_ratio!r} must lie in [0, 0.5). HINT: 0.25 tolerates up to a "
                "quarter of the ranks being arbitrary per direction."
            )
        self.trim_ratio = float(trim_ratio)

    def num_trimmed(self, num_rows: int) -> int:
        """floor(tau n), exactly, for tau as written (0.29 * 100 trims 29, not the float product's 28)."""
        return math.floor(Fraction(repr(self.trim_ratio)) * num_rows)

    @override
    def robustness_warning(self, num_rows: int) -> str | None:
        if self.num_trimmed(num_rows) == 0:
            return (f"trimmed_mean with trim_ratio={self.trim_ratio} and {num_rows} ranks trims floor("
                    f"{self.trim_ratio} x {num_rows}) = 0 rows at each end: it is the plain mean. HINT: use "
                    f"trim_ratio >= {1 / num_rows:.3g} (one row per end) with more than 2 ranks.")
        return None

    @override
    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        ordered, _ = torch.sort(rows, dim=0)
        cut = self.num_trimmed(ordered.shape[0])
        kept = ordered[cut : ordered.shape[0] - cut]
        return MeanAggregator().aggregate(kept)


class KrumAggregator(Aggregator):
    """Krum / Multi-Krum over whole rows; f = ``num_byzantine``, m = ``multi``.

    score(i) = sum of the n - f - 2 smallest ||A_i - A_j||^2 over j != i (float64).
    The m rows with the lowest scores (ties: lower rank first) are averaged in rank order.
    Needs n >= max(2f + 3, f + m) rows.
    """

    name = "krum"

    def __init__(self, num_byzantine: int = 1, multi: int = 1, clip_row_norms: bool = False) -> None:
        super().__init__(clip_row_norms)
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
            raise ValueError(f"num_byzantine={num_byzantine!r} must be an integer >= 0. HINT: the number of "
                             "ranks that may lie; Krum needs at least 2 * num_byzantine + 3 ranks.")
        if isinstance(multi, bool) or not isinstance(multi, int) or multi < 1:
            raise ValueError(f"multi={multi!r} must be an integer >= 1. HINT: 1 is Krum, more averages the "
                             "best-scored rows (Multi-Krum).")
        self.num_byzantine = num_byzantine
        self.multi = multi

    @override
    def min_rows(self) -> int:
        return max(2 * self.num_byzantine + 3, self.num_byzantine + self.multi)

    @override
    def _min_rows_hint(self) -> str:
        return (f" HINT: krum with num_byzantine={self.num_byzantine}, multi={self.multi} needs "
                f"max(2 * num_byzantine + 3, num_byzantine + multi) = {self.min_rows()} ranks; lower "
                "num_byzantine or use median / trimmed_mean.")

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """Krum score of every row of ``rows`` (n, K): (n,) float64."""
        n = rows.shape[0]
        wide = rows.to(torch.float64)
        distances = torch.stack([((wide - wide[i]) ** 2).sum(dim=1) for i in range(n)])  # (n, n)
        distances.fill_diagonal_(float("inf"))
        nearest, _ = torch.sort(distances, dim=1)
        return nearest[:, : n - self.num_byzantine - 2].sum(dim=1)

    def select(self, rows: torch.Tensor) -> list[int]:
        """Indices (into ``rows``) of the ``multi`` selected rows, ascending."""
        scores = self.scores(rows).tolist()
        ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return sorted(ranked[: self.multi])

    @override
    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        return MeanAggregator().aggregate(rows[self.select(rows)])


AGGREGATION_NAMES = ("mean", "median", "trimmed_mean", "krum")


def make_aggregator(name: str, trim_ratio: float = 0.1, num_byzantine: int = 1,
                    clip_row_norms: bool = False) -> Aggregator:
    """Aggregator by name (one of ``AGGREGATION_NAMES``); ``num_byzantine`` is Krum's f."""
    if name == "mean":
        return MeanAggregator(clip_row_norms)
    if name == "median":
        return MedianAggregator(clip_row_norms)
    if name == "trimmed_mean":
        return TrimmedMeanAggregator(trim_ratio, clip_row_norms)
    if name == "krum":
        return KrumAggregator(num_byzantine, clip_row_norms=clip_row_norms)
    raise ValueError(f"aggregation={name!r} is unknown. HINT: choose one of "
                     f"{', '.join(map(repr, AGGREGATION_NAMES))}.")

"""Robust aggregation of the (ranks x directions) scalar matrix (PROTOCOL.md section 4).

Symbols: N ranks, K directions, A (N, K) with one row per rank, tau the trim ratio.

Each column (direction) is aggregated across ranks independently: a direction is a
separate measurement, so values are never trimmed across the K directions of a step.
Before aggregating, rows of excluded (slashed) ranks and rows holding any non-finite
value are dropped and reported; the divisor is the number of rows kept.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "AggregationResult",
    "Aggregator",
    "MeanAggregator",
    "MedianAggregator",
    "TrimmedMeanAggregator",
    "NotEnoughRanksError",
    "make_aggregator",
]


class NotEnoughRanksError(RuntimeError):
    """Too few usable rows remain for the aggregator to produce an estimate."""


@dataclass(frozen=True)
class AggregationResult:
    scalars: torch.Tensor  # (K,)
    kept_ranks: tuple[int, ...]
    nonfinite_ranks: tuple[int, ...]  # dropped this step for NaN/inf scalars
    excluded_ranks: tuple[int, ...]  # dropped because they were excluded (slashed)


class Aggregator(abc.ABC):
    """Per-direction aggregation of usable rows: ``aggregate(rows (n, K)) -> (K,)``."""

    name: ClassVar[str]

    def min_rows(self) -> int:
        """Fewest rows the aggregator can work with."""
        return 1

    @abc.abstractmethod
    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        """Combine finite rows (n, K), n >= min_rows(), into one (K,) vector."""

    def __call__(self, matrix: torch.Tensor, excluded: Iterable[int] = ()) -> AggregationResult:
        """Drop excluded and non-finite rows of ``matrix`` (N, K), then aggregate the rest."""
        if matrix.dim() != 2:
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}, expected (ranks, directions).")
        excluded_set = {int(r) for r in excluded}
        finite = torch.isfinite(matrix).all(dim=1).tolist()
        kept, nonfinite = [], []
        for rank, ok in enumerate(finite):
            if rank in excluded_set:
                continue
            (kept if ok else nonfinite).append(rank)
        if len(kept) < self.min_rows():
            raise NotEnoughRanksError(
                f"{self.name} aggregation needs at least {self.min_rows()} usable ranks, got {len(kept)} "
                f"(excluded={sorted(excluded_set)}, non-finite={nonfinite})."
            )
        scalars = self.aggregate(matrix[kept].to(torch.float32))
        return AggregationResult(
            scalars=scalars,
            kept_ranks=tuple(kept),
            nonfinite_ranks=tuple(nonfinite),
            excluded_ranks=tuple(sorted(excluded_set & set(range(matrix.shape[0])))),
        )


class MeanAggregator(Aggregator):
    """Column mean. Summed in rank order, so every rank gets bitwise the same result."""

    name = "mean"

    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        total = rows[0].clone()
        for row in rows[1:]:
            total += row
        return total / rows.shape[0]


class MedianAggregator(Aggregator):
    """Column median; the mean of the two middle values when the row count is even."""

    name = "median"

    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        ordered, _ = torch.sort(rows, dim=0)
        n = ordered.shape[0]
        if n % 2:
            return ordered[n // 2].clone()
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMeanAggregator(Aggregator):
    """Per column, drop the floor(tau n) largest and smallest values, average the rest."""

    name = "trimmed_mean"

    def __init__(self, trim_ratio: float = 0.1) -> None:
        if not (isinstance(trim_ratio, (int, float)) and 0.0 <= trim_ratio < 0.5):
            raise ValueError(
                f"trim_ratio={trim_ratio!r} must lie in [0, 0.5). HINT: 0.25 tolerates up to a "
                "quarter of the ranks being arbitrary per direction."
            )
        self.trim_ratio = float(trim_ratio)

    def num_trimmed(self, num_rows: int) -> int:
        return math.floor(self.trim_ratio * num_rows)

    def aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        ordered, _ = torch.sort(rows, dim=0)
        cut = self.num_trimmed(ordered.shape[0])
        kept = ordered[cut : ordered.shape[0] - cut]
        return MeanAggregator().aggregate(kept)


def make_aggregator(name: str, trim_ratio: float = 0.1) -> Aggregator:
    """Aggregator by name: ``mean``, ``median`` or ``trimmed_mean``."""
    if name == "mean":
        return MeanAggregator()
    if name == "median":
        return MedianAggregator()
    if name == "trimmed_mean":
        return TrimmedMeanAggregator(trim_ratio)
    raise ValueError(f"aggregation={name!r} is unknown. HINT: choose one of 'mean', 'median', 'trimmed_mean'.")

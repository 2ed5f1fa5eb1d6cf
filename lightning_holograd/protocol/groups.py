"""Direction groups: independent directions per group of ranks (docs/PROTOCOL.md §9.1).

Symbols: N ranks, G groups, K scalars per rank and step, A (N, K) the submitted rows,
n_g the rows of group g that are aggregated at a step, n = sum_g n_g.

- Assignment: rank i belongs to group g(i) = i mod G; ``"per_rank"`` is G = N (every
  rank alone). Groups differ in size by at most one rank.
- Seeds: group g projects onto the directions of the seeds s_{t,g,j} (``chain.direction_seeds``
  with ``group=g``); group 0's seeds are those of a run without groups.
- Aggregation: rows are selected as without groups (slashed rows left out, non-finite
  rows dropped for the step) and, with ``clip_row_norms``, clipped to the median norm of
  all kept rows (norms of projections onto different directions of an unbiased family
  have the same expectation, ||g||^2, so one median serves every group). Then each
  group's rows are aggregated per direction by the run's aggregator into a_g (K,). A
  group with fewer kept rows than the aggregator needs is left out of the step (n_g = 0).
- Estimate: g_hat = sum_g (n_g / n) synthesize(a_g, seeds of g). With ``mean`` within
  groups, E[g_hat] = sum_g (n_g / n) mean of group g's gradients = the mean gradient of
  the n ranks used, for any group sizes and any slashed set, because each family is
  unbiased for its own seeds. Cost: G syntheses, O(G D) for the sketch, no K x D matrix.
- Recorded digest: d_t = SHA256(f32le(a)) with a the (G, K) matrix of the group
  aggregates in group order (zeros for a group left out); for G = 1 that is the K-vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch

from .aggregators import Aggregator, NotEnoughRanksError
from .directions import DirectionFamily

__all__ = [
    "DirectionGroups",
    "GroupedAggregation",
    "aggregate_groups",
    "check_direction_groups",
    "group_of",
    "group_ranks",
    "group_weights",
    "resolve_direction_groups",
    "synthesize_groups",
]

DirectionGroups = Union[int, Literal["per_rank"]]
PER_RANK = "per_rank"
# Per-direction statistics that resist one liar only with >= 3 rows in each group.
_ROBUST_PER_DIRECTION = {"median": 3, "trimmed_mean": 3}


def resolve_direction_groups(setting: DirectionGroups, world_size: int) -> int:
    """G for ``setting`` (an int >= 1, or ``"per_rank"`` = ``world_size``)."""
    if setting == PER_RANK:
        return world_size
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"direction_groups={setting!r} must be an integer >= 1 or 'per_rank'. HINT: 1 shares "
                         "the directions among all ranks; 'per_rank' gives every rank its own.")
    return setting


def group_of(rank: int, num_groups: int) -> int:
    """The group of ``rank``: rank mod G."""
    return rank % num_groups


def group_ranks(group: int, num_groups: int, world_size: int) -> list[int]:
    """The ranks of ``group``, ascending."""
    return list(range(group, world_size, num_groups))


def min_group_size(aggregator: Aggregator) -> int:
    """Fewest ranks a group needs for ``aggregator`` to mean what it says."""
    return max(aggregator.min_rows(), _ROBUST_PER_DIRECTION.get(aggregator.name, 1))


def check_direction_groups(setting: DirectionGroups, aggregator: Aggregator, world_size: int) -> int:
    """G for ``setting`` on ``world_size`` ranks, or ValueError when a group would be too small
    for ``aggregator`` (median and trimmed mean need >= 3 ranks per group, Krum 2f + 3)."""
    groups = resolve_direction_groups(setting, world_size)
    if groups == 1:
        return 1
    if groups > world_size:
        raise ValueError(f"direction_groups={setting!r} exceeds world_size={world_size}: a group would have no "
                         "rank. HINT: use at most world_size groups, or 'per_rank'.")
    smallest, needed = world_size // groups, min_group_size(aggregator)
    if smallest < needed:
        raise ValueError(
            f"direction_groups={setting!r} on world_size={world_size} gives groups of {smallest} rank(s), but "
            f"aggregation={aggregator.name!r} is aggregated within each group and needs >= {needed}. HINT: use "
            f"aggregation='mean' (optionally with clip_row_norms=True), or at most {world_size // needed} groups."
        )
    return groups


@dataclass(frozen=True)
class GroupedAggregation:
    """One step's group aggregates; the fields of ``AggregationResult`` plus the groups'."""

    scalars: torch.Tensor  # (G, K) a_g per group, zeros for a group left out
    weights: tuple[float, ...]  # (G,) n_g / n
    kept_ranks: tuple[int, ...]  # ranks whose rows were aggregated
    nonfinite_ranks: tuple[int, ...]
    slashed_ranks: tuple[int, ...]
    clipped_ranks: tuple[int, ...] = ()
    left_out_groups: tuple[int, ...] = ()  # fewer kept rows than the aggregator needs


def aggregate_groups(aggregator: Aggregator, matrix: torch.Tensor, slashed: Iterable[int],
                     num_groups: int) -> GroupedAggregation:
    """Aggregate ``matrix`` (N, K) within each of ``num_groups`` groups (module docstring)."""
    kept, nonfinite, slashed_ranks = aggregator.partition_rows(matrix, slashed)
    rows, clipped = aggregator.clipped_rows(matrix, kept)
    scalars = torch.zeros(num_groups, matrix.shape[1], dtype=torch.float32, device=matrix.device)
    weights, used, left_out = group_weights(aggregator, kept, num_groups, nonfinite, slashed_ranks)
    for group in range(num_groups):
        if group not in left_out:
            members = [pos for pos, rank in enumerate(kept) if group_of(rank, num_groups) == group]
            scalars[group] = aggregator.aggregate(rows[members])
    return GroupedAggregation(scalars=scalars, weights=weights, kept_ranks=used, nonfinite_ranks=tuple(nonfinite),
                              slashed_ranks=slashed_ranks, clipped_ranks=clipped, left_out_groups=left_out)


def group_weights(aggregator: Aggregator, kept: Sequence[int], num_groups: int, nonfinite: Sequence[int] = (),
                  slashed: Sequence[int] = ()) -> tuple[tuple[float, ...], tuple[int, ...], tuple[int, ...]]:
    """(weights n_g / n, ranks used, groups left out) for the ``kept`` ranks (module docstring):
    a group with fewer kept rows than ``aggregator`` needs is left out (n_g = 0).
    ``nonfinite`` and ``slashed`` only name the ranks in the error raised when every group is."""
    counts, used, left_out = [0] * num_groups, [], []
    for group in range(num_groups):
        members = [rank for rank in kept if group_of(rank, num_groups) == group]
        if len(members) < aggregator.min_rows():
            left_out.append(group)
            continue
        counts[group] = len(members)
        used.extend(members)
    total = sum(counts)
    if total == 0:
        raise NotEnoughRanksError(
            f"no direction group has the {aggregator.min_rows()} usable row(s) that {aggregator.name} aggregation "
            f"needs (slashed={list(slashed)}, non-finite={list(nonfinite)}). HINT: train with more ranks per group.")
    return tuple(count / total for count in counts), tuple(sorted(used)), tuple(left_out)


def synthesize_groups(family: DirectionFamily, scalars: torch.Tensor, weights: Sequence[float],
                      group_seeds: Sequence[Sequence[int]]) -> torch.Tensor:
    """g_hat = sum_g weights[g] synthesize(scalars[g], group_seeds[g]) (D,), in group order.

    The weight scales the K scalars before the (linear) synthesis, so the cost is one
    synthesis per group with a non-zero weight and one (D,) accumulator.
    """
    estimate = torch.zeros(family.dim, dtype=torch.float32, device=scalars.device)
    for group, weight in enumerate(weights):
        if weight:
            estimate += family.synthesize(scalars[group] * weight, group_seeds[group])
    return estimate

"""What one exchange step knows and the errors it raises (docs/PROTOCOL.md §1.1, §4.5):
the step context that hooks read, the aggregation-path names and their check, the
parameter digest of the audit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from ..protocol import AggregationResult, Aggregator, hash_batch
from ..protocol.groups import GroupedAggregation, group_of
from ..protocol.quantize import DecodedRows
from .sharded import ShardState

__all__ = [
    "AGGREGATION_PATHS",
    "SHARDABLE_AGGREGATIONS",
    "STOP_EXIT_CODE",
    "AggregationPath",
    "ClaimHook",
    "NonFiniteError",
    "ReplicaDivergenceError",
    "ReviewHook",
    "StepContext",
    "StopRequested",
    "check_aggregation_path",
    "parameter_digest",
]

STOP_EXIT_CODE = 128 + 15  # as a process ended by SIGTERM

AggregationPath = Literal["auto", "all_gather", "sharded", "all_reduce"]
AGGREGATION_PATHS: tuple[str, ...] = get_args(AggregationPath)
SHARDABLE_AGGREGATIONS = ("mean", "median", "trimmed_mean")  # per direction: a column block is enough


def check_aggregation_path(path: Any, aggregator: Aggregator) -> str:
    """``path`` if it can run ``aggregator``; ValueError naming the fix otherwise."""
    if path not in AGGREGATION_PATHS:
        raise ValueError(f"aggregation_path={path!r} is unknown. HINT: choose one of "
                         f"{', '.join(map(repr, AGGREGATION_PATHS))}.")
    whole_rows = aggregator.name not in SHARDABLE_AGGREGATIONS or aggregator.clip_row_norms
    if path == "sharded" and whole_rows:
        raise ValueError(f"aggregation_path='sharded' with aggregation={aggregator.name!r}, clip_row_norms="
                         f"{aggregator.clip_row_norms}: that needs whole rows, and a rank sees one column block. "
                         "HINT: use aggregation 'median' or 'trimmed_mean' without clip_row_norms, or "
                         "aggregation_path='all_gather' (or 'auto').")
    if path == "all_reduce" and (aggregator.name != "mean" or aggregator.clip_row_norms):
        raise ValueError(f"aggregation_path='all_reduce' computes a plain mean, not aggregation="
                         f"{aggregator.name!r} (clip_row_norms={aggregator.clip_row_norms}). HINT: use "
                         "aggregation_path='sharded' or 'auto'.")
    return str(path)


class ReplicaDivergenceError(RuntimeError):
    """Ranks hold different parameters although the protocol keeps them identical."""


class NonFiniteError(FloatingPointError):
    """The loss or gradient was non-finite on every rank that still counts: no step is possible."""


class StopRequested(SystemExit):
    """A rank asked the job to stop (SIGTERM); raised on every rank at the same step, before it."""

    def __init__(self, step: int, ranks: list[int]) -> None:
        super().__init__(STOP_EXIT_CODE)
        self.step, self.ranks = step, ranks

    def __str__(self) -> str:
        return f"step {self.step}: stopping, as rank(s) {self.ranks} asked (SIGTERM)"


@dataclass
class StepContext:
    """What one step of the exchange knows; hooks read it and may add fields."""

    step: int
    commitment: bytes
    seeds: list[int]  # of this rank's direction group
    batch_hashes: list[bytes]
    local_scalars: torch.Tensor | None = None  # (K,) as submitted by this rank
    matrix: torch.Tensor | None = None  # (N, K) all submitted rows
    result: AggregationResult | GroupedAggregation | None = None
    true_gradient: bool = False  # a true-gradient step (bootstrap/refresh): not verifiable
    path: str = "all_gather"  # the aggregation path of the step (docs/PROTOCOL.md §4.5)
    sharded: ShardState | None = None  # commitments and owned blocks on the sharded path (matrix is None there)
    extras: dict[str, Any] = field(default_factory=dict)
    group_seeds: list[list[int]] = field(default_factory=list)  # seeds of every direction group, in group order
    public_values: torch.Tensor | None = None  # (E,) aggregated values after the K scalars (local steps)
    quantized: DecodedRows | None = None  # levels and scales of the gathered rows (scalar_bits < 32)

    @property
    def num_groups(self) -> int:
        return max(len(self.group_seeds), 1)

    def seeds_of(self, rank: int) -> list[int]:
        """The seeds ``rank`` projected onto: those of its direction group."""
        return self.group_seeds[group_of(rank, len(self.group_seeds))] if self.group_seeds else self.seeds


ClaimHook = Callable[[StepContext, torch.Tensor], torch.Tensor]
ReviewHook = Callable[[StepContext], None]


def parameter_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA256 over dtype, shape and bytes of every tensor, in order (the batch hasher's encoding)."""
    return hash_batch([tensor.detach() for tensor in tensors])

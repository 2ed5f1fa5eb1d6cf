"""Aggregation paths whose traffic per rank does not grow with N (docs/PROTOCOL.md §4.5, §8).

Symbols: N ranks, W = K (+ public values) the row width, b = ceil(W / N) the block width.

``sharded`` (per-direction aggregators: mean, median, trimmed mean), per step after the commit:

1. every rank commits to its row: an all_gather of its 32-byte row commitment followed by a
   flag byte (bit 1: the row holds NaN/inf), N x 33 bytes. It cannot ride with the batch
   hashes: the directions, and so the row, depend on every batch hash;
2. the review hooks run (claim verification draws from the commitments);
3. an all_to_all gives the owner of each column block (``protocol.sharding``) every rank's
   values of that block; the owner aggregates them per direction, exactly as the all_gather
   path does (the kept rows are public: not slashed, not flagged non-finite);
4. an all_gather of the aggregated blocks (b float32 per rank, padded) gives every rank the
   aggregated row; then the block review hooks run (the aggregate audit).

Per rank and step: (N - 1)(33 + 33) + 2 (N - 1) x 4b bytes, about 2 x 4W + 66 N.

Without review hooks (no verification, no audit) nobody reads a commitment, so step 1 is
skipped (``open_row``) and the flag travels as one float32 (1.0: non-finite) before the
values in each all_to_all message: three collectives per step instead of four,
(N - 1)(33 + 4) + 2 (N - 1) x 4b bytes. Why a verified step cannot fold the commitment into
the all_to_all the same way: docs/PROTOCOL.md §6.12 ("Why the commitments are gathered").

``all_reduce`` (``mean`` without verification): one all_reduce of the W values of a rank's
row, or zeros, plus one count (1 for a finite row of a rank that is not slashed, else 0);
the mean is the sum divided by the count. 2 (N - 1) / N x 4 (W + 1) bytes. The sum's order
is the backend's, so the mean can differ from the all_gather path's in the last bits; every
rank gets the same value (the replica audit checks it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..protocol import AggregationResult, Aggregator, NotEnoughRanksError
from ..protocol.sharding import block_bounds, block_owners, commit_leaves, row_leaves
from .comm import Comm
from .slashing import Slashing

__all__ = ["ROW_FLAG_NONFINITE", "ShardState", "ShardedAggregation"]

log = logging.getLogger(__name__)

ROW_FLAG_NONFINITE = 2  # the bit of the flag byte after a row commitment (as in the commit's flag byte)


@dataclass
class ShardState:
    """What a sharded step knows (``StepContext.sharded``); hooks read it."""

    bounds: list[tuple[int, int]]  # the N column blocks
    commitments: list[bytes]  # every rank's row commitment, rank order (empty when unreviewed)
    nonfinite: list[int]  # ranks whose flag says their row holds NaN/inf (unreviewed: set by exchange)
    leaves: list[bytes]  # this rank's N block leaves (empty when unreviewed)
    flag: float | None = None  # unreviewed: this rank's flag, sent in each all_to_all message
    owners: list[int] = field(default_factory=list)  # owner of each block at the all_to_all
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # owned block -> (N, width) as received
    kept: list[int] = field(default_factory=list)  # rows aggregated at this step

    def owned(self, rank: int) -> list[int]:
        """The blocks ``rank`` aggregates, ascending."""
        return [block for block, owner in enumerate(self.owners) if owner == rank]

    def width_of(self, rank: int) -> int:
        return sum(self.bounds[b][1] - self.bounds[b][0] for b in self.owned(rank))


class ShardedAggregation:
    """The ``sharded`` and ``all_reduce`` paths of one exchange (see the module docstring)."""

    def __init__(self, comm: Comm, aggregator: Aggregator, slashing: Slashing) -> None:
        self.comm = comm
        self.aggregator = aggregator
        self.slashing = slashing

    # -- sharded -----------------------------------------------------------------------------
    def commit_row(self, row: torch.Tensor) -> ShardState:
        """Gather every rank's row commitment and non-finite flag (a blocking collective)."""
        bounds = block_bounds(row.numel(), self.comm.world_size)
        leaves = row_leaves(row, bounds)
        flag = 0 if bool(torch.isfinite(row).all()) else ROW_FLAG_NONFINITE
        local = torch.frombuffer(bytearray(commit_leaves(leaves) + bytes([flag])), dtype=torch.uint8)
        rows = self.comm.all_gather(local, "row_commitments").cpu().tolist()  # (N, 33)
        commitments = [bytes(r[:32]) for r in rows]
        nonfinite = [rank for rank, r in enumerate(rows) if r[32] & ROW_FLAG_NONFINITE]
        return ShardState(bounds, commitments, nonfinite, leaves)

    def open_row(self, row: torch.Tensor) -> ShardState:
        """The unreviewed step's state (no collective): the flag goes with the blocks."""
        flag = 0.0 if bool(torch.isfinite(row).all()) else 1.0
        return ShardState(block_bounds(row.numel(), self.comm.world_size), [], [], [], flag=flag)

    def exchange(self, state: ShardState, row: torch.Tensor) -> None:
        """The all_to_all: ``state.received`` gets this rank's owned blocks of every row; on an
        unreviewed step (``open_row``) ``state.nonfinite`` gets the flags that came with them."""
        state.owners = block_owners(self.comm.world_size, self.slashing.slashed)
        self._exchange_blocks(state, row)

    def aggregate(self, state: ShardState, row: torch.Tensor) -> AggregationResult:
        """Per-direction aggregation of the owned blocks (after ``exchange``), all_gather of
        the aggregates; every rank returns the same aggregated row (W,)."""
        slashed = self.slashing.slashed
        state.kept = [r for r in range(self.comm.world_size) if r not in slashed and r not in state.nonfinite]
        if len(state.kept) < self.aggregator.min_rows():
            raise NotEnoughRanksError(
                f"{self.aggregator.name} aggregation needs at least {self.aggregator.min_rows()} usable ranks, got "
                f"{len(state.kept)} (slashed={sorted(slashed)}, non-finite={state.nonfinite}).")
        mine = self._aggregate_owned(state, self._owned_matrix(state, row))
        pad = max(state.width_of(r) for r in range(self.comm.world_size))
        local = torch.zeros(pad, dtype=torch.float32, device=row.device)
        local[: mine.numel()] = mine
        gathered = self.comm.all_gather(local, "aggregates").to(row.device)  # (N, pad)
        scalars = torch.empty(row.numel(), dtype=torch.float32, device=row.device)
        for owner in range(self.comm.world_size):
            at = 0
            for block in state.owned(owner):
                start, stop = state.bounds[block]
                scalars[start:stop] = gathered[owner, at:at + stop - start]
                at += stop - start
        return AggregationResult(scalars=scalars, kept_ranks=tuple(state.kept), nonfinite_ranks=tuple(
            r for r in state.nonfinite if r not in slashed), slashed_ranks=tuple(sorted(slashed)))

    def _exchange_blocks(self, state: ShardState, row: torch.Tensor) -> None:
        """Send every owner its blocks of this row (after the flag when unreviewed); keep this
        rank's owned columns of every row in ``state.received``."""
        world, head = self.comm.world_size, int(state.flag is not None)
        flag = [row.new_full((head,), state.flag or 0.0, dtype=torch.float32)]
        parts = [part for r in range(world)
                 for part in flag + [row[state.bounds[b][0]:state.bounds[b][1]].to(torch.float32)
                                     for b in state.owned(r)]]
        send = torch.cat(parts) if parts else row.new_zeros(0, dtype=torch.float32)
        width = state.width_of(self.comm.rank)
        received = self.comm.all_to_all(send, [head + state.width_of(r) for r in range(world)],
                                        [head + width] * world, "scalars")
        matrix = received.reshape(world, head + width).to(row.device)
        if head:
            state.nonfinite = [r for r, value in enumerate(matrix[:, 0].tolist()) if value != 0.0]
        at = head
        for block in state.owned(self.comm.rank):
            size = state.bounds[block][1] - state.bounds[block][0]
            state.received[block] = matrix[:, at:at + size]
            at += size

    def _owned_matrix(self, state: ShardState, row: torch.Tensor) -> torch.Tensor:
        """The owned blocks side by side: (N, width owned)."""
        blocks = [state.received[b] for b in state.owned(self.comm.rank)]
        return torch.cat(blocks, dim=1) if blocks else row.new_zeros((self.comm.world_size, 0), dtype=torch.float32)

    def _aggregate_owned(self, state: ShardState, received: torch.Tensor) -> torch.Tensor:
        """The aggregate of this rank's owned columns over the kept rows (the all_gather path's
        rule per direction). A kept row that holds NaN/inf here although its flag said finite
        is dropped from these columns (its rank lied about its flag; docs/PROTOCOL.md §4.5)."""
        return self.aggregate_block(received, state.kept)

    def aggregate_block(self, received: torch.Tensor, kept: list[int]) -> torch.Tensor:
        """The owner's rule for columns ``received`` (N, width): the aggregator over the kept
        rows that are finite here (an auditor recomputes a block with it)."""
        if received.shape[1] == 0:
            return received.new_zeros(0, dtype=torch.float32)
        finite = torch.isfinite(received).all(dim=1).tolist()
        rows = [r for r in kept if finite[r]]
        if len(rows) < len(kept):
            log.warning("step %d: rows of ranks %s hold NaN/inf in a block although flagged finite: dropped there",
                        self.comm.step, [r for r in kept if not finite[r]])
        if len(rows) < self.aggregator.min_rows():
            return torch.zeros(received.shape[1], dtype=torch.float32, device=received.device)
        return self.aggregator.aggregate(received[rows].to(torch.float32))

    # -- all_reduce --------------------------------------------------------------------------
    def all_reduce_mean(self, row: torch.Tensor) -> AggregationResult:
        """The mean of the finite rows of ranks that are not slashed, by one all_reduce."""
        honest = self.slashing.honest_ranks()
        counts = self.comm.rank in honest and bool(torch.isfinite(row).all())
        local = torch.cat([row.to(torch.float32), row.new_ones(1, dtype=torch.float32)])
        total = self.comm.all_reduce_sum(local if counts else torch.zeros_like(local), "scalars").to(row.device)
        count = round(float(total[-1]))
        if count == 0:
            return AggregationResult(scalars=total[:-1], kept_ranks=(), nonfinite_ranks=tuple(honest),
                                     slashed_ranks=tuple(sorted(self.slashing.slashed)))
        if count < len(honest):
            log.warning("step %d: %d of %d rows were non-finite and left out", self.comm.step,
                        len(honest) - count, len(honest))
        kept = tuple(honest) if count == len(honest) else ()  # which ones dropped is not known on this path
        return AggregationResult(scalars=total[:-1] / count, kept_ranks=kept, nonfinite_ranks=(),
                                 slashed_ranks=tuple(sorted(self.slashing.slashed)))

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

With G direction groups (docs/PROTOCOL.md §9.1) each group shards its own rows among its
m_g members (``protocol.sharding``: block r is block r // G of group r mod G): step 3
sends a rank's blocks to the owners in its group only (nothing to other groups), step 4
aggregates within the group, and the one all_gather of step 5 gives every rank all G
group aggregates (G, W), which are weighted as on the all_gather path
(``protocol.groups.group_weights``). Per rank and step, with m = N / G:
(N - 1)(33 + 33) + 4W (m - 1)/m + (N - 1) 4W/m, about 4W (G + 1) + 66 N
(docs/PROTOCOL.md §8).

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
from ..protocol.groups import GroupedAggregation, group_ranks, group_weights
from ..protocol.sharding import block_owners, commit_leaves, group_block_bounds, member_block_bounds, row_leaves
from .comm import Comm
from .slashing import Slashing

__all__ = ["ROW_FLAG_NONFINITE", "ShardState", "ShardedAggregation"]

log = logging.getLogger(__name__)

ROW_FLAG_NONFINITE = 2  # the bit of the flag byte after a row commitment (as in the commit's flag byte)


@dataclass
class ShardState:
    """What a sharded step knows (``StepContext.sharded``); hooks read it."""

    bounds: list[tuple[int, int]]  # the N column blocks (each within its group's rows)
    commitments: list[bytes]  # every rank's row commitment, rank order (empty when unreviewed)
    nonfinite: list[int]  # ranks whose flag says their row holds NaN/inf (unreviewed: set by exchange)
    leaves: list[bytes]  # this rank's m_g block leaves (empty when unreviewed)
    flag: float | None = None  # unreviewed: this rank's flag, sent in each all_to_all message
    owners: list[int | None] = field(default_factory=list)  # owner of each block (None: group all slashed)
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # owned block -> (m_g, width) as received
    kept: list[int] = field(default_factory=list)  # rows aggregated at this step
    num_groups: int = 1  # G: block r and rank r belong to group r mod G

    def owned(self, rank: int) -> list[int]:
        """The blocks ``rank`` aggregates, ascending."""
        return [block for block, owner in enumerate(self.owners) if owner == rank]

    def width_of(self, rank: int) -> int:
        return sum(self.bounds[b][1] - self.bounds[b][0] for b in self.owned(rank))

    def members(self, rank_or_block: int) -> list[int]:
        """The ranks of the group of a rank or block, ascending: the rows of its block matrices."""
        return group_ranks(rank_or_block % self.num_groups, self.num_groups, len(self.bounds))

    def row_bounds(self, rank: int) -> list[tuple[int, int]]:
        """The blocks of ``rank``'s row (its group's), in member order: its row commitment's leaves."""
        return member_block_bounds(self.bounds, rank, self.num_groups)

    def leaf_index(self, block: int) -> int:
        """Which leaf of a member's row commitment covers ``block``."""
        return block // self.num_groups

    def kept_rows(self, rank_or_block: int) -> list[int]:
        """Positions in ``members(rank_or_block)`` of the kept ranks (rows of a block matrix)."""
        return [pos for pos, rank in enumerate(self.members(rank_or_block)) if rank in self.kept]


class ShardedAggregation:
    """The ``sharded`` and ``all_reduce`` paths of one exchange (see the module docstring)."""

    def __init__(self, comm: Comm, aggregator: Aggregator, slashing: Slashing, num_groups: int = 1) -> None:
        self.comm = comm
        self.aggregator = aggregator
        self.slashing = slashing
        self.num_groups = num_groups

    def _state(self, width: int) -> ShardState:
        bounds = group_block_bounds(width, self.comm.world_size, self.num_groups)
        return ShardState(bounds, [], [], [], num_groups=self.num_groups)

    # -- sharded -----------------------------------------------------------------------------
    def commit_row(self, row: torch.Tensor) -> ShardState:
        """Gather every rank's row commitment and non-finite flag (a blocking collective)."""
        state = self._state(row.numel())
        state.leaves = row_leaves(row, state.row_bounds(self.comm.rank))
        flag = 0 if bool(torch.isfinite(row).all()) else ROW_FLAG_NONFINITE
        local = torch.frombuffer(bytearray(commit_leaves(state.leaves) + bytes([flag])), dtype=torch.uint8)
        rows = self.comm.all_gather(local, "row_commitments").cpu().tolist()  # (N, 33)
        state.commitments = [bytes(r[:32]) for r in rows]
        state.nonfinite = [rank for rank, r in enumerate(rows) if r[32] & ROW_FLAG_NONFINITE]
        return state

    def open_row(self, row: torch.Tensor) -> ShardState:
        """The unreviewed step's state (no collective): the flag goes with the blocks."""
        state = self._state(row.numel())
        state.flag = 0.0 if bool(torch.isfinite(row).all()) else 1.0
        return state

    def exchange(self, state: ShardState, row: torch.Tensor) -> None:
        """The all_to_all: ``state.received`` gets this rank's owned blocks of every row; on an
        unreviewed step (``open_row``) ``state.nonfinite`` gets the flags that came with them."""
        state.owners = block_owners(self.comm.world_size, self.slashing.slashed, self.num_groups)
        self._exchange_blocks(state, row)

    def aggregate(self, state: ShardState, row: torch.Tensor) -> AggregationResult | GroupedAggregation:
        """Per-direction aggregation of the owned blocks (after ``exchange``), all_gather of
        the aggregates; every rank returns the same aggregated row (W,), or with G > 1 the
        same ``GroupedAggregation`` of the (G, W) group aggregates."""
        slashed = self.slashing.slashed
        state.kept = [r for r in range(self.comm.world_size) if r not in slashed and r not in state.nonfinite]
        nonfinite = tuple(r for r in state.nonfinite if r not in slashed)
        if self.num_groups > 1:  # raises as aggregate_groups does when every group is left out
            weights, used, left_out = group_weights(self.aggregator, state.kept, self.num_groups, nonfinite,
                                                    tuple(sorted(slashed)))
        elif len(state.kept) < self.aggregator.min_rows():
            raise NotEnoughRanksError(
                f"{self.aggregator.name} aggregation needs at least {self.aggregator.min_rows()} usable ranks, got "
                f"{len(state.kept)} (slashed={sorted(slashed)}, non-finite={state.nonfinite}).")
        mine = self._aggregate_owned(state, self._owned_matrix(state, row))
        pad = max(state.width_of(r) for r in range(self.comm.world_size))
        local = torch.zeros(pad, dtype=torch.float32, device=row.device)
        local[: mine.numel()] = mine
        gathered = self.comm.all_gather(local, "aggregates").to(row.device)  # (N, pad)
        scalars = torch.zeros(self.num_groups, row.numel(), dtype=torch.float32, device=row.device)
        for owner in range(self.comm.world_size):
            at = 0
            for block in state.owned(owner):
                start, stop = state.bounds[block]
                scalars[block % self.num_groups, start:stop] = gathered[owner, at:at + stop - start]
                at += stop - start
        if self.num_groups == 1:
            return AggregationResult(scalars=scalars[0], kept_ranks=tuple(state.kept), nonfinite_ranks=nonfinite,
                                     slashed_ranks=tuple(sorted(slashed)))
        scalars[list(left_out)] = 0.0  # as aggregate_groups: a group left out aggregates to zeros
        return GroupedAggregation(scalars=scalars, weights=weights, kept_ranks=used, nonfinite_ranks=nonfinite,
                                  slashed_ranks=tuple(sorted(slashed)), left_out_groups=left_out)

    def _exchange_blocks(self, state: ShardState, row: torch.Tensor) -> None:
        """Send every owner of this rank's group its blocks of this row (and, when unreviewed,
        every rank the flag first); keep this rank's owned columns of its group's rows in
        ``state.received``."""
        world, head, me = self.comm.world_size, int(state.flag is not None), self.comm.rank
        peers = set(state.members(me))  # other groups get no values (only the flag, when unreviewed)
        flag = [row.new_full((head,), state.flag or 0.0, dtype=torch.float32)]
        parts = [part for r in range(world)
                 for part in flag + [row[state.bounds[b][0]:state.bounds[b][1]].to(torch.float32)
                                     for b in (state.owned(r) if r in peers else [])]]
        send = torch.cat(parts) if parts else row.new_zeros(0, dtype=torch.float32)
        width = state.width_of(me)
        received = self.comm.all_to_all(send, [head + (state.width_of(r) if r in peers else 0) for r in range(world)],
                                        [head + (width if r in peers else 0) for r in range(world)],
                                        "scalars").to(row.device)
        at, flags, rows = 0, [], []
        for r in range(world):
            flags.append(received[at:at + head])
            at += head
            if r in peers:
                rows.append(received[at:at + width])
                at += width
        if head:
            state.nonfinite = [r for r, value in enumerate(torch.cat(flags).tolist()) if value != 0.0]
        matrix = torch.stack(rows)  # (m_g, width) in member order
        at = 0
        for block in state.owned(me):
            size = state.bounds[block][1] - state.bounds[block][0]
            state.received[block] = matrix[:, at:at + size]
            at += size

    def _owned_matrix(self, state: ShardState, row: torch.Tensor) -> torch.Tensor:
        """The owned blocks side by side: (m_g, width owned)."""
        blocks = [state.received[b] for b in state.owned(self.comm.rank)]
        if blocks:
            return torch.cat(blocks, dim=1)
        return row.new_zeros((len(state.members(self.comm.rank)), 0), dtype=torch.float32)

    def _aggregate_owned(self, state: ShardState, received: torch.Tensor) -> torch.Tensor:
        """The aggregate of this rank's owned columns over the kept rows of its group (the
        all_gather path's rule per direction). A kept row that holds NaN/inf here although its
        flag said finite is dropped from these columns (its rank lied about its flag;
        docs/PROTOCOL.md §4.5)."""
        return self.aggregate_block(received, state.kept_rows(self.comm.rank))

    def aggregate_block(self, received: torch.Tensor, kept: list[int]) -> torch.Tensor:
        """The owner's rule for columns ``received`` (m_g, width; the group's rows in member
        order): the aggregator over the ``kept`` rows (positions) that are finite here (an
        auditor recomputes a block with it)."""
        if received.shape[1] == 0:
            return received.new_zeros(0, dtype=torch.float32)
        finite = torch.isfinite(received).all(dim=1).tolist()
        rows = [r for r in kept if finite[r]]
        if len(rows) < len(kept):
            log.warning("step %d: rows %s of a block's group hold NaN/inf although flagged finite: dropped there",
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

"""The slashed set: ranks whose rows no longer count, and the rule that enough remain (docs/PROTOCOL.md §6).

A slashed rank stays slashed for the rest of the run (and across resumes: the set is in
the exchange's checkpoint state). It keeps taking part in every collective, so the
ranks stay in lockstep, but the aggregator leaves its rows out. Rows dropped for a single
step (non-finite scalars) are the aggregator's business, not this set's.

Call contract: ``slash`` is not a collective, but every rank must call it with the same
arguments at the same point of the same step (inside a review hook of the exchange,
from values every rank holds), so that the set stays identical everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..protocol import Aggregator, NotEnoughRanksError, Reason

__all__ = ["SlashHook", "Slashing"]

log = logging.getLogger(__name__)

# Called once per newly slashed rank: (rank, step, reason, fields given to ``slash``).
SlashHook = Callable[[int, int, Reason, dict[str, Any]], None]


class Slashing:
    """Owns the set of slashed ranks among ``world_size`` and checks that the aggregator
    still has the ``aggregator.min_rows()`` rows it needs (in at least one of
    ``num_groups`` direction groups, rank i in group i mod G; docs/PROTOCOL.md §9.1)."""

    def __init__(self, world_size: int, aggregator: Aggregator, num_groups: int = 1) -> None:
        self.world_size = world_size
        self.aggregator = aggregator
        self.num_groups = num_groups
        self.hooks: list[SlashHook] = []  # e.g. the verifier's ledger
        self._slashed: set[int] = set()

    @property
    def slashed(self) -> frozenset[int]:
        return frozenset(self._slashed)

    def is_slashed(self, rank: int) -> bool:
        return rank in self._slashed

    def honest_ranks(self) -> list[int]:
        """Ranks not slashed, ascending."""
        return [rank for rank in range(self.world_size) if rank not in self._slashed]

    def slash(self, rank: int, reason: Reason, step: int, **fields: Any) -> bool:
        """Slash ``rank`` from ``step`` on; False if it already was.

        Runs the hooks, then raises ``NotEnoughRanksError`` when fewer honest ranks
        remain than the aggregator needs: training cannot continue.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside world_size={self.world_size}.")
        if rank in self._slashed:
            return False
        self._slashed.add(rank)
        log.warning("step %d: rank %d slashed (%s)", step, rank, Reason(reason).value)
        for hook in self.hooks:
            hook(rank, step, Reason(reason), dict(fields))
        self._check_enough(step)
        return True

    def _check_enough(self, step: int) -> None:
        needed = self.aggregator.min_rows()
        per_group = [0] * self.num_groups
        for rank in self.honest_ranks():
            per_group[rank % self.num_groups] += 1
        honest = max(per_group)  # with one group: every honest rank
        if honest < needed:
            where = " in the best direction group" if self.num_groups > 1 else ""
            raise NotEnoughRanksError(
                f"step {step}: {honest} honest ranks remain{where} (slashed: {sorted(self._slashed)}), but "
                f"{self.aggregator.name} aggregation needs {needed}{where}; training cannot continue. HINT: the "
                "verifier's ledger lists every slash and its reason; train with more ranks, or with an "
                "aggregation that needs fewer rows."
            )

    # -- checkpoint state (part of the exchange's) ------------------------------------------------
    def state_dict(self) -> list[int]:
        return sorted(self._slashed)

    def load_state_dict(self, slashed: Iterable[int]) -> None:
        self._slashed = {int(rank) for rank in slashed}

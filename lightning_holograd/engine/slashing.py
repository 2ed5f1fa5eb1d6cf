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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..protocol import Aggregator, NotEnoughRanksError, Reason

__all__ = ["SlashHook", "Slashing", "TooManySlashedError", "remap_slashed"]

log = logging.getLogger(__name__)

# Called once per newly slashed rank: (rank, step, reason, fields given to ``slash``).
SlashHook = Callable[[int, int, Reason, dict[str, Any]], None]


class TooManySlashedError(NotEnoughRanksError):
    """More workers are slashed than the run allows (``ProofVerifier(max_slashed_fraction=...)``)."""


def remap_slashed(slashed: Iterable[int], saved_world: int | None, world_size: int,
                  rank_map: Mapping[int, int] | None) -> list[int]:
    """The slashed ranks of a checkpoint, as ranks of a job of ``world_size`` ranks.

    Rank numbers name processes, not workers: after a change of world size, rank i need
    not be the worker that was rank i. So a slashed set is carried over only through an
    explicit ``rank_map`` {old rank: new rank} (slashed ranks it leaves out are no longer in
    the job), or when it is empty; otherwise the resume is refused.
    """
    slashed = sorted(int(r) for r in slashed)
    resized = saved_world is not None and saved_world != world_size
    if rank_map is not None:
        new = sorted({int(rank_map[r]) for r in slashed if r in rank_map})
    elif resized and slashed:
        raise ValueError(
            f"the checkpoint comes from a {saved_world}-rank job that slashed ranks {slashed}, and this job has "
            f"{world_size} ranks: rank numbers need not name the same workers after a change of world size, so the "
            f"slashed set cannot be carried over by number. HINT: resume with {saved_world} ranks, or say which "
            "worker is which with HoloGradStrategy(resume_rank_map={old rank: new rank, ...}) (slashed ranks left "
            "out of the map are no longer in the job).")
    else:
        new = slashed
    bad = [r for r in new if not 0 <= r < world_size]
    if bad:
        raise ValueError(f"slashed ranks {bad} do not exist in a {world_size}-rank job (resume_rank_map={rank_map!r}). "
                         f"HINT: map the old ranks onto 0..{world_size - 1}.")
    return new


class Slashing:
    """Owns the set of slashed ranks among ``world_size`` and checks that the aggregator
    still has the ``aggregator.min_rows()`` rows it needs."""

    def __init__(self, world_size: int, aggregator: Aggregator) -> None:
        self.world_size = world_size
        self.aggregator = aggregator
        self.hooks: list[SlashHook] = []  # e.g. the verifier's ledger
        self.max_slashed: int | None = None  # stop once more ranks than this are slashed (None: no limit)
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
        if self.max_slashed is not None and len(self._slashed) > self.max_slashed:
            raise TooManySlashedError(
                f"step {step}: {len(self._slashed)} ranks are slashed ({sorted(self._slashed)}), more than the "
                f"{self.max_slashed} that max_slashed_fraction allows; training stops instead of going on with "
                "the verifier alone. HINT: the verifier's ledger lists every slash and its reason; if the workers "
                "are honest, see README 'Failure and recovery'.")
        honest, needed = self.world_size - len(self._slashed), self.aggregator.min_rows()
        if honest < needed:
            raise NotEnoughRanksError(
                f"step {step}: {honest} honest ranks remain (slashed: {sorted(self._slashed)}), but "
                f"{self.aggregator.name} aggregation needs {needed}; training cannot continue. HINT: the "
                "verifier's ledger lists every slash and its reason; train with more ranks, or with an "
                "aggregation that needs fewer rows."
            )

    # -- checkpoint state (part of the exchange's) ------------------------------------------------
    def state_dict(self) -> list[int]:
        return sorted(self._slashed)

    def load_state_dict(self, slashed: Iterable[int]) -> None:
        self._slashed = {int(rank) for rank in slashed}

"""Verification transport: drawn claimants' batches to their verifiers, verdicts to everyone
(docs/PROTOCOL.md §6).

The engine moves data and applies the protocol's checks; what a claim *is* (the same
``training_step``, loss scaling and projection at theta_t) comes from above as
``recompute(inputs, seeds) -> (K,) scalars``. ``inputs`` are a claimant's micro-batches
of the step, ``[(batch, batch_idx), ...]``, as the layer above handed them to the
exchange in ``StepContext.extras["inputs"]``; ``seeds`` are those of the claimant's
direction group (``StepContext.seeds_of``).

A report (one per checked claim, the fields of a ledger ``verify`` record) holds
``accepted``, ``reason`` (a ``Reason`` value), ``claim_digest``, ``recomputed_digest``,
``max_abs_error`` and ``max_rel_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..protocol import Reason, claim_digest, judge_claim, step_batch_hash
from .comm import Comm

__all__ = ["Recompute", "VerificationTransport", "check_claim", "verifier_of"]

Recompute = Callable[[Any, list[int]], torch.Tensor]


def verifier_of(claimant: int, verifier_ranks: Sequence[int]) -> int:
    """The verifier rank that checks ``claimant``'s claims."""
    return verifier_ranks[claimant % len(verifier_ranks)]


def check_claim(claimed: torch.Tensor, inputs: Any, committed_hash: bytes, seeds: list[int],
                recompute: Recompute, rtol: float, atol: float) -> dict[str, Any]:
    """The verifier's report on one claim (K,): batches present, matching the committed
    hash, and recomputing to the claimed scalars within |a - a*| <= atol + rtol |a*|."""
    report: dict[str, Any] = {"claim_digest": claim_digest(claimed), "recomputed_digest": None,
                              "max_abs_error": None, "max_rel_error": None}
    if not inputs:
        return {**report, "accepted": False, "reason": Reason.MISSING.value}
    if step_batch_hash([batch for batch, _ in inputs]) != committed_hash:
        return {**report, "accepted": False, "reason": Reason.BATCH_HASH.value}
    recomputed = recompute(list(inputs), seeds)
    verdict = judge_claim(claimed, recomputed, rtol, atol)
    return {**report, "accepted": verdict.accepted, "reason": verdict.reason.value,
            "recomputed_digest": claim_digest(recomputed), "max_abs_error": verdict.max_abs_error,
            "max_rel_error": verdict.max_rel_error}


class VerificationTransport:
    """Moves drawn claimants' inputs to their verifiers and gathers the verdicts.

    Args:
        comm: the exchange's collectives (its group and device).
        recompute: the claim an honest rank would submit for ``inputs`` at the current
            parameters; called on verifier ranks only, before the step's update.
        to_cpu: makes a claimant's inputs picklable without device tensors (default: as is).
    """

    def __init__(self, comm: Comm, recompute: Recompute | None = None,
                 to_cpu: Callable[[Any], Any] | None = None) -> None:
        self.comm = comm
        self.recompute = recompute
        self.to_cpu = to_cpu or (lambda inputs: inputs)

    def verify(self, ctx: Any, drawn: Sequence[int], verifier_ranks: Sequence[int], rtol: float,
               atol: float) -> dict[int, dict[str, Any]]:
        """Check the claims of ``drawn`` ranks of step ``ctx`` (a ``StepContext``); return the
        reports of verifier ranks only, {claimant: report}, identical on every rank.

        Call contract: a blocking collective. Every rank calls it inside the same review
        hook with the same ``drawn`` and ``verifier_ranks``. Each drawn claimant sends its
        ``ctx.extras["inputs"]`` to its verifier (point-to-point, counted as
        ``verification`` traffic), the verifier checks the claim, then all ranks
        all-gather their reports.
        """
        if self.recompute is None:
            raise RuntimeError("verification needs a recompute callable. HINT: use strategy='holograd', "
                               "which provides it.")
        me, reports = self.comm.rank, {}
        for claimant in drawn:
            verifier = verifier_of(claimant, verifier_ranks)
            if me == claimant:
                self.comm.send_object(self.to_cpu(ctx.extras.get("inputs")), verifier, "verification")
            elif me == verifier:
                inputs = self.comm.recv_object(claimant)
                reports[claimant] = check_claim(ctx.matrix[claimant], inputs, ctx.batch_hashes[claimant],
                                                ctx.seeds_of(claimant), self.recompute, rtol, atol)
        gathered = self.comm.all_gather_object(reports, "verification")
        trusted: dict[int, dict[str, Any]] = {}
        for rank in verifier_ranks:  # only verifier ranks' verdicts on their own claimants count
            trusted.update({int(c): r for c, r in (gathered[rank] or {}).items()
                            if verifier_of(int(c), verifier_ranks) == rank})
        return trusted

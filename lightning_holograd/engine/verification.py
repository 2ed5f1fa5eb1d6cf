"""Verification transport: drawn claimants' batches to their verifiers, verdicts back, every
wait bounded (docs/PROTOCOL.md §6.5 and §6.8).

The engine moves data and applies the protocol's checks; what a claim *is* (the same
``training_step``, loss scaling and projection at theta_t) comes from above as
``recompute(inputs, seeds) -> (K,) scalars``, with ``inputs`` a claimant's micro-batches
of the step paired with the verifier's own ``batch_idx`` values, ``[(batch, batch_idx), ...]``,
and ``seeds`` those of the claimant's direction group (``StepContext.seeds_of``). With local
steps (docs/PROTOCOL.md §9.2) the step is a round: its one "micro-batch" is the list of the
H inner steps' micro-batch lists, so the round's H batches travel in one bundle, within
``max_transfer_bytes``, and ``recompute`` replays the H inner steps.

Transfers never unpickle: a claimant sends a **bundle** (``engine/bundle.py``: tensors plus
a JSON description) ``{"batches": [batch, ...]}``, and verifiers send bundles of verdicts.
They run on a dedicated gloo process group (``open``), so that a pending transfer never
blocks the exchange's own group (NCCL or gloo). Every receive is posted into a buffer as
large as the limit and then *polled*: the framing of ``bundle.frame_message`` shows when
a message is complete, so no thread ever blocks inside the backend, and a receive that
misses its deadline just stays posted (its buffer is kept; a late message lands there
harmlessly). Deadlines:

- a verifier waits ``transfer_timeout`` seconds for the batches of the step's drawn
  claimants; a claimant whose bundle is not there in time, is malformed or larger than
  ``max_transfer_bytes`` gets the verdict ``missing``;
- every rank waits up to the process-group timeout for the verdicts of the verifiers with
  drawn claimants; a verifier is trusted, so a silent one ends the job with
  ``VerificationTimeoutError`` naming it and the step.

A report (one per checked claim, the fields of a ledger ``verify`` record) holds
``accepted``, ``reason`` (a ``Reason`` value), ``claim_digest``, ``recomputed_digest``,
``max_abs_error`` and ``max_rel_error``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..protocol import Reason, claim_digest, judge_claim, judge_quantized_claim, step_batch_hash
from ..protocol.quantize import QuantizedClaim
from ..protocol.sharding import row_commitment
from .bundle import HEADER_SIZE, TRAILER_SIZE, BundleError, decode_bundle, encode_bundle, frame_message, read_message
from .comm import Comm

__all__ = ["MalformedInputs", "Recompute", "VerificationTimeoutError", "VerificationTransport", "check_claim",
           "verifier_of"]

log = logging.getLogger(__name__)

Recompute = Callable[[Any, list[int]], torch.Tensor]
_KIND_BATCH, _KIND_VERDICTS = 1, 2
_VERDICT_BYTES_PER_RANK = 1024  # a verdict bundle holds at most one ~300-byte report per rank
_KEEP_SENT = 4096  # outgoing verdict buffers kept alive for peers that receive late


class VerificationTimeoutError(RuntimeError):
    """A verifier's verdicts did not arrive within the process-group timeout."""


class MalformedInputs(ValueError):
    """Raised by ``recompute`` when a claimant's batches match its commitment but cannot be the
    step's (e.g. a local-steps round with another number of inner steps): reason ``batch_hash``."""


def verifier_of(claimant: int, verifier_ranks: Sequence[int]) -> int:
    """The verifier rank that checks ``claimant``'s claims."""
    return verifier_ranks[claimant % len(verifier_ranks)]


def check_claim(claimed: torch.Tensor, batches: Any, batch_indices: Sequence[int], committed_hash: bytes,
                seeds: list[int], recompute: Recompute, rtol: float, atol: float,
                quantized: QuantizedClaim | None = None) -> dict[str, Any]:
    """The verifier's report on one claim (K,): batches present, matching the committed
    hash, and recomputing to the claimed scalars within |a - a*| <= atol + rtol |a*|
    (``quantized``: the claim as submitted with scalar_bits < 32, judged by
    ``judge_quantized_claim``, docs/PROTOCOL.md §9.5; ``claimed`` is then its decoded row).

    ``batch_indices`` are the verifier's own ``batch_idx`` values of the step (identical on
    every rank), so a claimant cannot choose them (they are not covered by the hash).
    """
    report: dict[str, Any] = {"claim_digest": claim_digest(claimed), "recomputed_digest": None,
                              "max_abs_error": None, "max_rel_error": None}
    if not isinstance(batches, list) or not batches:
        return {**report, "accepted": False, "reason": Reason.MISSING.value}
    if len(batches) != len(batch_indices) or step_batch_hash(batches) != committed_hash:
        return {**report, "accepted": False, "reason": Reason.BATCH_HASH.value}
    try:
        recomputed = recompute(list(zip(batches, batch_indices)), seeds)
    except MalformedInputs:  # committed, but not shaped as the step's batches: as a wrong count
        return {**report, "accepted": False, "reason": Reason.BATCH_HASH.value}
    if quantized is None:
        verdict = judge_claim(claimed, recomputed, rtol, atol)
    else:
        verdict = judge_quantized_claim(quantized, recomputed, rtol, atol)
    return {**report, "accepted": verdict.accepted, "reason": verdict.reason.value,
            "recomputed_digest": claim_digest(recomputed), "max_abs_error": _finite_or_none(verdict.max_abs_error),
            "max_rel_error": _finite_or_none(verdict.max_rel_error)}


def _finite_or_none(value: float) -> float | None:
    """Ledger numbers are standard JSON: a non-finite error is recorded as null."""
    return value if value == value and abs(value) != float("inf") else None


class _Posted:
    """A posted receive polled for a complete message (see the module docstring)."""

    def __init__(self, comm_group: Any, src: int, tag: int, max_body: int) -> None:
        self.max_body = max_body
        self.buffer = torch.empty(HEADER_SIZE + max_body + TRAILER_SIZE, dtype=torch.uint8)  # pages touched on write
        self.buffer[:HEADER_SIZE].zero_()
        self.work = dist.irecv(self.buffer, src=src, group=comm_group, tag=tag)

    def poll(self) -> bytes | None:
        """The message body once complete; raises ``BundleError`` for one that never will be."""
        return read_message(self.buffer, self.max_body)


class VerificationTransport:
    """Moves drawn claimants' batches to their verifiers and verdicts back, with bounded waits.

    Args:
        comm: the exchange's collectives (its group's ranks and its timeout are reused).
        recompute: the claim an honest rank would submit for ``inputs`` at the current
            parameters; called on verifier ranks only, before the step's update.
        to_cpu: moves a claimant's batches off the device before they are bundled.
    """

    def __init__(self, comm: Comm, recompute: Recompute | None = None,
                 to_cpu: Callable[[Any], Any] | None = None) -> None:
        self.comm = comm
        self.recompute = recompute
        self.to_cpu = to_cpu or (lambda inputs: inputs)
        self.transfer_timeout = 60.0
        self.max_transfer_bytes = 1 << 30
        self.group: Any = None
        self._late: list[_Posted] = []  # receives that missed their deadline, kept posted
        self._sent: collections.deque[tuple[Any, torch.Tensor]] = collections.deque(maxlen=_KEEP_SENT)

    def open(self, transfer_timeout: float, max_transfer_bytes: int) -> None:
        """Create the dedicated gloo group. Call contract: a collective on the exchange's
        group (every rank calls it once, at fit start, before the first ``verify``)."""
        self.transfer_timeout = float(transfer_timeout)
        self.max_transfer_bytes = int(max_transfer_bytes)
        if self.comm.distributed and self.comm.world_size > 1 and self.group is None:
            ranks = [self.comm._global(r) for r in range(self.comm.world_size)]
            timeout = self.comm.timeout or timedelta(minutes=30)
            self.group = self.comm.run("verification setup",
                                       lambda: dist.new_group(ranks=ranks, timeout=timeout, backend="gloo"))

    # -- one verification round ---------------------------------------------------------------
    def verify(self, ctx: Any, drawn: Sequence[int], verifier_ranks: Sequence[int], rtol: float,
               atol: float) -> dict[int, dict[str, Any]]:
        """Check the claims of ``drawn`` ranks of step ``ctx`` (a ``StepContext``); return the
        reports of verifier ranks only, {claimant: report}, identical on every rank.

        Call contract: every rank calls it inside the same review hook with the same
        ``drawn`` and ``verifier_ranks``; it returns on every rank that is on time, without
        waiting for a drawn claimant that is not (that claimant's verdict is ``missing``).
        """
        if self.recompute is None:
            raise RuntimeError("verification needs a recompute callable. HINT: use strategy='holograd', "
                               "which provides it.")
        if self.group is None and self.comm.world_size > 1:
            raise RuntimeError("VerificationTransport.open was not called. HINT: ProofVerifier calls it at fit start.")
        me, step = self.comm.rank, ctx.step
        by_verifier: dict[int, list[int]] = {}
        for claimant in drawn:
            by_verifier.setdefault(verifier_of(claimant, verifier_ranks), []).append(claimant)
        sends = [self._send_batches(ctx, by) for by, claimants in by_verifier.items() if me in claimants]
        reports: dict[int, dict[str, Any]] = {}
        if me in by_verifier:
            reports = self._receive_and_check(ctx, by_verifier[me], rtol, atol)
            self._send_verdicts(reports, step)
        trusted = dict(reports)
        for verifier in sorted(by_verifier):
            if verifier != me:
                received = self._receive_verdicts(verifier, step)
                trusted.update({c: r for c, r in received.items() if c in by_verifier[verifier]})
        for work in sends:  # the verifier has its receive posted: these complete at once
            work.wait()
        return {c: trusted[c] for c in sorted(trusted)}

    def _tag(self, step: int, kind: int) -> int:
        return (step % (1 << 26)) * 4 + kind

    def _send_batches(self, ctx: Any, verifier: int) -> Any:
        """Claimant side: send this step's batches as a bundle (never larger than the limit)."""
        batches = [batch for batch, _ in ctx.extras.get("inputs") or []]
        row = {} if ctx.sharded is None else {"row": ctx.local_scalars.detach().to("cpu", torch.float32)}
        try:
            body = encode_bundle({"batches": self.to_cpu(batches), **row})
            if len(body) > self.max_transfer_bytes:
                raise BundleError(f"the step's batches take {len(body)} bytes, more than max_transfer_bytes="
                                  f"{self.max_transfer_bytes}")
        except BundleError as error:
            log.error("step %d: cannot send the batches to verifier %d (%s); the claim will count as missing. "
                      "HINT: raise ProofVerifier(max_transfer_bytes=...) or send plainer batches.",
                      ctx.step, verifier, error)
            body = encode_bundle({"error": str(error), **row})
        message = torch.frombuffer(bytearray(frame_message(body)), dtype=torch.uint8)
        self.comm._record("verification", "p2p", message.numel())
        return dist.isend(message, dst=self.comm._global(verifier), group=self.group,
                          tag=self._tag(ctx.step, _KIND_BATCH))

    def _receive_and_check(self, ctx: Any, claimants: list[int], rtol: float, atol: float) -> dict[int, dict[str, Any]]:
        """Verifier side: poll every claimant's bundle until ``transfer_timeout``, check each on arrival."""
        posted = {c: _Posted(self.group, self.comm._global(c), self._tag(ctx.step, _KIND_BATCH),
                             self.max_transfer_bytes) for c in claimants}
        indices = [index for _, index in ctx.extras.get("inputs") or []]
        reports: dict[int, dict[str, Any]] = {}
        deadline, pause = time.monotonic() + self.transfer_timeout, 0.0002
        while posted:
            expired = time.monotonic() > deadline  # decided before polling: each bundle gets a poll after it
            for claimant in list(posted):
                payload = self._batches_from(posted[claimant], claimant, ctx.step)
                if payload is not _PENDING:
                    del posted[claimant]
                    reports[claimant] = self._check(ctx, claimant, payload, indices, rtol, atol)
            if posted and expired:
                for claimant, receive in posted.items():
                    log.warning("step %d: rank %d sent no batch within transfer_timeout=%g s: claim missing",
                                ctx.step, claimant, self.transfer_timeout)
                    reports[claimant] = self._check(ctx, claimant, None, indices, rtol, atol)
                    self._late.append(receive)  # stays posted: a late message lands in its own buffer
                break
            if posted:
                time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return reports

    def _check(self, ctx: Any, claimant: int, payload: Any, indices: list[int], rtol: float,
               atol: float) -> dict[str, Any]:
        batches = payload.get("batches") if isinstance(payload, Mapping) else None
        if ctx.sharded is None:
            claimed = ctx.matrix[claimant]
        else:  # the row travels with the batches and must be the one committed to (§4.5)
            claimed = payload.get("row") if isinstance(payload, Mapping) else None
            committed = ctx.sharded.commitments[claimant]
            if payload is None or not _is_committed_row(claimed, ctx.sharded.row_bounds(claimant), committed):
                reason = Reason.MISSING if payload is None else Reason.ROW_COMMITMENT
                return {"accepted": False, "reason": reason.value, "claim_digest": committed.hex(),
                        "recomputed_digest": None, "max_abs_error": None, "max_rel_error": None}
        decoded = getattr(ctx, "quantized", None)  # scalar_bits < 32 (docs/PROTOCOL.md §9.5)
        quantized = None if decoded is None else decoded.claim(claimant, ctx.commitment)
        try:
            return check_claim(claimed, batches, indices, ctx.batch_hashes[claimant], ctx.seeds_of(claimant),
                               self.recompute, rtol, atol, quantized)
        except Exception as error:  # the verifier's own failure: stop, never slash on it
            raise RuntimeError(
                f"step {ctx.step}: the verifier could not recompute rank {claimant}'s claim ({type(error).__name__}: "
                f"{error}). The batch matches that rank's commitment, so training_step fails on it here. HINT: "
                "make training_step run on any batch the data can produce, on the verifier's device too.") from error

    def _batches_from(self, receive: _Posted, claimant: int, step: int) -> Any:
        try:
            body = receive.poll()
            if body is None:
                return _PENDING
            receive.work.wait()  # complete already; lets the backend release the receive
            payload = decode_bundle(body)
        except BundleError as error:
            log.warning("step %d: rank %d sent a malformed batch bundle (%s): claim missing", step, claimant, error)
            return None
        return payload if isinstance(payload, Mapping) else None

    def _send_verdicts(self, reports: dict[int, dict[str, Any]], step: int) -> None:
        body = encode_bundle({str(c): r for c, r in reports.items()})
        message = torch.frombuffer(bytearray(frame_message(body)), dtype=torch.uint8)
        for rank in range(self.comm.world_size):
            if rank != self.comm.rank:
                self.comm._record("verification", "p2p", message.numel())
                work = dist.isend(message, dst=self.comm._global(rank), group=self.group,
                                  tag=self._tag(step, _KIND_VERDICTS))
                self._sent.append((work, message))  # a late rank receives it when it comes back

    def _receive_verdicts(self, verifier: int, step: int) -> dict[int, dict[str, Any]]:
        receive = _Posted(self.group, self.comm._global(verifier), self._tag(step, _KIND_VERDICTS),
                          _VERDICT_BYTES_PER_RANK * (self.comm.world_size + 4))
        limit = (self.comm.timeout or timedelta(minutes=30)).total_seconds()
        deadline, pause = time.monotonic() + limit, 0.0002
        while (body := receive.poll()) is None:
            if time.monotonic() > deadline:
                raise VerificationTimeoutError(
                    f"step {step}: verifier rank {verifier} sent no verdicts within the process-group timeout "
                    f"({limit:g} s). HINT: a verifier rank is trusted and must stay up; see its log.")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        receive.work.wait()
        reports = decode_bundle(body)
        return {int(c): dict(r) for c, r in reports.items()}


_PENDING = object()


def _is_committed_row(row: Any, bounds: list[tuple[int, int]], commitment: bytes) -> bool:
    """A float32 row of the committed width whose row commitment (§4.5) is ``commitment``."""
    if not isinstance(row, torch.Tensor) or row.dim() != 1 or row.numel() != (bounds[-1][1] if bounds else 0):
        return False
    return row_commitment(row, bounds) == commitment

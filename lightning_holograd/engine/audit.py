"""The aggregate audit of the sharded path: a drawn block's aggregate, recomputed by a verifier
(docs/PROTOCOL.md §6.12).

At a step with an audited block beta (``protocol.sharding.draw_audit_block``, drawn after
the aggregates are gathered), owned by rank o, checked by v = ``verifier_of(o)``:

1. o sends v the block matrix it received, M (m x width of beta), as a bundle: the rows of
   the m ranks of beta's direction group (all N ranks when G = 1), in rank order;
2. every other rank of that group that is not slashed sends v its m block leaves (32 bytes each);
3. v checks, in order: each rank's leaves hash to its row commitment (else that rank is
   slashed ``row_commitment``); each kept row of M hashes to its rank's leaf beta (else o
   and that rank are both slashed ``dispute``: without signed messages nobody can tell
   which of the two lied, docs/PROTOCOL.md §6.12); the aggregate of M over the kept rows
   equals the published one bitwise (else o is slashed ``aggregate``);
4. v sends every rank its findings and, when o lied, the recomputed block, which every
   rank writes into the step's aggregate before the estimate is built.

A verifier rank owning the block is trusted and not audited. Waits are bounded as in
``engine/verification.py``: a rank whose bundle is not there within ``transfer_timeout``
is slashed ``missing``; a silent verifier ends the job with ``VerificationTimeoutError``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..protocol import Reason, scalars_digest
from ..protocol.sharding import commit_leaves
from .bundle import BundleError, decode_bundle, encode_bundle, frame_message
from .verification import (
    VerificationTimeoutError,
    VerificationTransport,
    _Posted,
    verifier_of,
)

__all__ = ["audit_block"]

_KIND_AUDIT_DATA, _KIND_AUDIT_VERDICT = 3, 0  # tags: step * 4 + kind (1, 2: engine/verification.py)


def audit_block(transport: VerificationTransport, ctx: Any, block: int, verifier_ranks: Sequence[int],
                aggregate_rows: Any) -> list[tuple[int, Reason]]:
    """Run the audit of ``block`` at step ``ctx``; return [(rank, reason)] to slash, the same on
    every rank, and patch ``ctx.result.scalars`` with the verifier's block when its owner lied.

    ``aggregate_rows(received, kept) -> (width,)`` is the owner's rule (``ShardedAggregation``).
    Call contract: every rank calls it with the same arguments inside a block review hook.
    """
    state, comm = ctx.sharded, transport.comm
    owner = state.owners[block]
    verifier = verifier_of(owner, verifier_ranks)
    senders = [r for r in state.members(block) if r != verifier and r not in ctx.result.slashed_ranks]
    tag = (ctx.step % (1 << 26)) * 4
    sends = []
    if comm.rank in senders:
        payload: dict[str, Any] = {"leaves": torch.frombuffer(bytearray(b"".join(state.leaves)), dtype=torch.uint8)}
        if comm.rank == owner:
            payload["block"] = state.received[block].detach().to("cpu", torch.float32).contiguous()
        sends.append(_send(transport, payload, verifier, tag + _KIND_AUDIT_DATA))
    if comm.rank == verifier:
        data = _receive_all(transport, senders, tag + _KIND_AUDIT_DATA, ctx.step)
        findings, patch = _judge(ctx, block, owner, comm.rank, data, aggregate_rows)
        body = {"slash": [[r, reason.value] for r, reason in findings], "block": patch}
        for rank in range(comm.world_size):
            if rank != comm.rank:  # not waited for: a late rank receives it when it comes back
                _send(transport, body, rank, tag + _KIND_AUDIT_VERDICT)
    else:
        width = state.bounds[block][1] - state.bounds[block][0]
        body = _receive_verdict(transport, verifier, tag + _KIND_AUDIT_VERDICT, ctx.step,
                                4 * width + 64 * comm.world_size + 4096)
    for work in sends:
        work.wait()
    patch = body.get("block")
    if isinstance(patch, torch.Tensor):
        start, stop = state.bounds[block]
        scalars = ctx.result.scalars.view(state.num_groups, -1)  # (G, W): the block's group's aggregate
        scalars[block % state.num_groups, start:stop] = patch.to(scalars.device)
    return [(int(r), Reason(reason)) for r, reason in body.get("slash", [])]


def _send(transport: VerificationTransport, payload: dict[str, Any], dst: int, tag: int) -> Any:
    message = torch.frombuffer(bytearray(frame_message(encode_bundle(payload))), dtype=torch.uint8)
    transport.comm._record("verification", "p2p", message.numel())
    work = dist.isend(message, dst=transport.comm._global(dst), group=transport.group, tag=tag)
    # Keep the work, not only the buffer: gloo drops a pending send whose work object is
    # freed, so a receiver that posts after this rank moved on would wait forever.
    transport._sent.append((work, message))
    return work


def _receive_all(transport: VerificationTransport, senders: list[int], tag: int, step: int) -> dict[int, Any]:
    """The bundles of ``senders`` that arrive within ``transfer_timeout`` (None: missing or malformed)."""
    limit = transport.max_transfer_bytes
    posted = {r: _Posted(transport.group, transport.comm._global(r), tag, limit) for r in senders}
    out: dict[int, Any] = {}
    deadline, pause = time.monotonic() + transport.transfer_timeout, 0.0002
    while posted:
        expired = time.monotonic() > deadline
        for rank in list(posted):
            try:
                body = posted[rank].poll()
                if body is None:
                    continue
                posted[rank].work.wait()
                out[rank] = decode_bundle(body)
            except BundleError:
                out[rank] = None
            del posted[rank]
        if posted and expired:
            transport._late.extend(posted.values())
            out.update({rank: None for rank in posted})
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return out


def _receive_verdict(transport: VerificationTransport, verifier: int, tag: int, step: int,
                     max_body: int) -> dict[str, Any]:
    receive = _Posted(transport.group, transport.comm._global(verifier), tag, max_body)
    limit = (transport.comm.timeout or timedelta(minutes=30)).total_seconds()
    deadline, pause = time.monotonic() + limit, 0.0002
    while (body := receive.poll()) is None:
        if time.monotonic() > deadline:
            raise VerificationTimeoutError(f"step {step}: verifier rank {verifier} sent no audit verdict within the "
                                           f"process-group timeout ({limit:g} s). HINT: a verifier rank is trusted "
                                           "and must stay up; see its log.")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    receive.work.wait()
    return dict(decode_bundle(body))


def _judge(ctx: Any, block: int, owner: int, me: int, data: dict[int, Any],
           aggregate_rows: Any) -> tuple[list[tuple[int, Reason]], torch.Tensor | None]:
    """The verifier's findings (rank, reason), in rank order, and the block to patch in (or None)."""
    state = ctx.sharded
    members = state.members(block)
    leaves: dict[int, list[bytes]] = {me: state.leaves}
    findings: dict[int, Reason] = {}
    for rank, payload in sorted(data.items()):
        raw = payload.get("leaves") if isinstance(payload, dict) else None
        if not isinstance(raw, torch.Tensor) or raw.numel() != 32 * len(members):
            findings[rank] = Reason.MISSING
            continue
        flat = bytes(raw.to(torch.uint8).tolist())
        leaves[rank] = [flat[i:i + 32] for i in range(0, len(flat), 32)]
        if commit_leaves(leaves[rank]) != state.commitments[rank]:
            findings[rank] = Reason.ROW_COMMITMENT
    matrix = data[owner].get("block") if isinstance(data.get(owner), dict) else None
    start, stop = state.bounds[block]
    if owner not in findings and (not isinstance(matrix, torch.Tensor)
                                  or tuple(matrix.shape) != (len(members), stop - start)):
        findings[owner] = Reason.MISSING
    if owner in findings:
        return sorted(findings.items()), None
    kept = state.kept_rows(block)  # positions in members
    disputed = [members[pos] for pos in kept if members[pos] in leaves and members[pos] not in findings
                and scalars_digest(matrix[pos]) != leaves[members[pos]][state.leaf_index(block)]]
    if disputed:
        findings.update({r: Reason.DISPUTE for r in disputed + [owner]})
        return sorted(findings.items()), None
    expected = aggregate_rows(matrix, kept).cpu()
    published = ctx.result.scalars.view(state.num_groups, -1)[block % state.num_groups, start:stop]
    if not torch.equal(expected, published.detach().cpu()):
        findings[owner] = Reason.AGGREGATE
        return sorted(findings.items()), expected
    return sorted(findings.items()), None

"""Column blocks, block owners and row commitments of sharded aggregation (docs/PROTOCOL.md §4.5).

Symbols: N ranks, W the width of a row (K scalars, plus any public values after them),
b = ceil(W / N) the block width, S the slashed set of the step.

- Blocks: block r holds the columns [r b, min((r + 1) b, W)) (empty when r b >= W). The
  partition depends on N and W only, never on who is slashed, so a row commitment made
  before the review of a step stays valid after it.
- Owners: block r is aggregated by rank r, or, when r is slashed, by the first rank after
  r (cyclically) that is not slashed. A rank may own several blocks, or none.
- Row commitment: leaf_r = SHA256(f32le(row[block r])) for r = 0..N-1, and
  commit(row) = SHA256("holograd/row" || leaf_0 || ... || leaf_{N-1}). A verifier that holds
  the full row recomputes it; an auditor that holds one block and the N leaves checks it.
- With G direction groups (docs/PROTOCOL.md §9.1) group g's m_g members shard its rows among
  themselves: block r belongs to group r mod G and is block r // G of the m_g blocks of
  width ceil(W / m_g) of that group's rows; it is owned by rank r, or by the next member of
  its group (cyclically) that is not slashed, or by nobody when the whole group is slashed.
  A row commitment has m_g leaves, those of its group's blocks in member order. G = 1 is
  the scheme above.
- Draws: the claim draw of docs/PROTOCOL.md §6.4 with SHA256(f32le(A)) replaced by
  SHA256(commit_0 || ... || commit_{N-1}); the audit draw picks at most one block per step
  from c_t, the commitments and the aggregated row, which no rank knows before the
  aggregates are gathered.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

import torch

from .chain import scalars_digest
from .groups import group_ranks
from .verification import draw_claims_from_root

__all__ = [
    "block_bounds",
    "block_owners",
    "commit_leaves",
    "commitments_digest",
    "draw_audit_block",
    "draw_sharded_claims",
    "group_block_bounds",
    "member_block_bounds",
    "row_commitment",
    "row_commitments",
    "row_leaves",
    "sharded_wire_bytes",
]

_ROW_TAG = b"holograd/row"
_AUDIT_TAG = b"holograd/audit"


def block_bounds(width: int, world_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the N column blocks of a row of ``width`` values."""
    if world_size < 1 or width < 0:
        raise ValueError(f"width={width}, world_size={world_size}: need width >= 0 and world_size >= 1.")
    size = -(-width // world_size)
    return [(min(r * size, width), min((r + 1) * size, width)) for r in range(world_size)]


def group_block_bounds(width: int, world_size: int, num_groups: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of the N blocks with ``num_groups`` groups: block r is block r // G of
    its group's rows (module docstring); ``block_bounds`` for G = 1."""
    if not 1 <= num_groups <= world_size:
        raise ValueError(f"num_groups={num_groups} must lie in [1, world_size={world_size}].")
    per_group = [block_bounds(width, len(group_ranks(g, num_groups, world_size))) for g in range(num_groups)]
    return [per_group[r % num_groups][r // num_groups] for r in range(world_size)]


def member_block_bounds(bounds: Sequence[tuple[int, int]], rank: int, num_groups: int = 1) -> list[tuple[int, int]]:
    """The blocks of ``rank``'s row, its group's in member order: the leaves of its row
    commitment (``bounds`` from ``group_block_bounds``)."""
    return [bounds[b] for b in group_ranks(rank % num_groups, num_groups, len(bounds))]


def block_owners(world_size: int, slashed: Iterable[int], num_groups: int = 1) -> list[int | None]:
    """The rank that aggregates each block: r itself, or the next member of r's group that is
    not slashed; None when the whole group is slashed (never for G = 1)."""
    out = {int(r) for r in slashed}
    if len(out & set(range(world_size))) >= world_size:
        raise ValueError(f"every one of the {world_size} ranks is slashed: no rank can own a block.")
    owners: list[int | None] = []
    for block in range(world_size):
        members = group_ranks(block % num_groups, num_groups, world_size)
        at = block // num_groups
        honest = [members[(at + step) % len(members)] for step in range(len(members))
                  if members[(at + step) % len(members)] not in out]
        owners.append(honest[0] if honest else None)
    return owners


def row_leaves(row: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> list[bytes]:
    """leaf_r = SHA256(f32le(row[block r])) for every block."""
    return [scalars_digest(row[start:stop]) for start, stop in bounds]


def commit_leaves(leaves: Sequence[bytes]) -> bytes:
    """The row commitment from its N leaves."""
    return hashlib.sha256(_ROW_TAG + b"".join(leaves)).digest()


def row_commitment(row: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> bytes:
    """commit(row) (module docstring): 32 bytes."""
    return commit_leaves(row_leaves(row, bounds))


def row_commitments(matrix: torch.Tensor, num_groups: int = 1) -> list[bytes]:
    """The row commitment of every row of ``matrix`` (N, W) float32, as each rank commits
    its own on the sharded path: what a party that knows every row (a simulator, a test)
    needs to evaluate the sharded claim draw."""
    world_size, width = matrix.shape
    bounds = group_block_bounds(width, world_size, num_groups)
    return [row_commitment(matrix[r], member_block_bounds(bounds, r, num_groups)) for r in range(world_size)]


def commitments_digest(commitments: Sequence[bytes]) -> bytes:
    """SHA256 of the N row commitments in rank order (what the draws hash instead of A)."""
    return hashlib.sha256(b"".join(commitments)).digest()


def draw_sharded_claims(commitment: bytes, commitments: Sequence[bytes], p_verify: float,
                        candidates: Iterable[int]) -> list[int]:
    """docs/PROTOCOL.md §6.4 with the row commitments in place of the matrix A."""
    return draw_claims_from_root(commitment, commitments_digest(commitments), p_verify, candidates)


def draw_audit_block(commitment: bytes, commitments: Sequence[bytes], aggregate: torch.Tensor,
                     p_audit: float, num_blocks: int) -> int | None:
    """The block audited at this step, or None.

    R = SHA256("holograd/audit" || c_t || SHA256(commitments) || SHA256(f32le(aggregate)));
    u = uint64le(R[0:8]) / 2^64 decides whether a block is audited (u < p_audit, or
    p_audit >= 1), and uint64le(R[8:16]) mod N which one.
    """
    root = hashlib.sha256(_AUDIT_TAG + commitment + commitments_digest(commitments)
                          + scalars_digest(aggregate)).digest()
    u = struct.unpack("<Q", root[:8])[0] / 2.0**64
    if not (p_audit >= 1.0 or u < p_audit) or num_blocks < 1:
        return None
    return struct.unpack("<Q", root[8:16])[0] % num_blocks


def sharded_wire_bytes(width: int, world_size: int, num_groups: int = 1, reviewed: bool = True) -> int:
    """An upper bound on the wire bytes any rank sends per step on the sharded path with nobody
    slashed, the batch hashes left out (docs/PROTOCOL.md §8): (N - 1) 33 for the row commitments
    when ``reviewed`` (else 4 (N - 1), the flags in the all_to_all), 4 (W - min_r w_r) to the
    other owners of its group (w_r: the width rank r owns) and (N - 1) 4 max_r w_r for the
    aggregates. Every rank computes the same number (``current_path``'s choice)."""
    widths = [stop - start for start, stop in group_block_bounds(width, world_size, num_groups)]
    flags = (world_size - 1) * (33 if reviewed else 4)
    return flags + 4 * (width - min(widths)) + (world_size - 1) * 4 * max(widths)

"""Column blocks, owners, row commitments and the draws of the sharded path (docs/PROTOCOL.md §4.5, §6.12)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lightning_holograd.protocol import draw_claims, scalars_digest
from lightning_holograd.protocol.sharding import (
    block_bounds,
    block_owners,
    commit_leaves,
    draw_audit_block,
    draw_sharded_claims,
    row_commitment,
    row_leaves,
)


def test_blocks_cover_the_row_once_in_order():
    assert block_bounds(13, 4) == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert block_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)] + [(3, 3)] * 5  # empty blocks past the row
    for width, world in [(1, 1), (7, 3), (4096, 8), (5, 5)]:
        covered = [c for start, stop in block_bounds(width, world) for c in range(start, stop)]
        assert covered == list(range(width))


def test_owners_skip_slashed_ranks_cyclically():
    assert block_owners(4, []) == [0, 1, 2, 3]
    assert block_owners(4, [1, 2]) == [0, 3, 3, 3]
    assert block_owners(4, [3]) == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="every one"):
        block_owners(2, [0, 1])


def test_row_commitment_is_the_spec_formula_and_binds_every_block():
    row = torch.arange(10, dtype=torch.float32)
    bounds = block_bounds(10, 3)
    leaves = [hashlib.sha256(row[a:b].numpy().astype("<f4").tobytes()).digest() for a, b in bounds]
    assert row_leaves(row, bounds) == leaves
    assert row_commitment(row, bounds) == hashlib.sha256(b"holograd/row" + b"".join(leaves)).digest()
    assert commit_leaves(leaves) == row_commitment(row, bounds)
    changed = row.clone()
    changed[9] = 9.5
    assert row_commitment(changed, bounds) != row_commitment(row, bounds)


def test_draws_are_public_functions_of_the_commitments():
    c_t = bytes(range(32))
    commitments = [hashlib.sha256(bytes([i])).digest() for i in range(6)]
    drawn = draw_sharded_claims(c_t, commitments, 0.5, range(1, 6))
    assert drawn == draw_sharded_claims(c_t, commitments, 0.5, range(1, 6))
    assert draw_sharded_claims(c_t, commitments, 1.0, [3, 1]) == [1, 3]
    assert draw_sharded_claims(c_t, commitments, 0.0, range(6)) == []
    # the same rule as the all_gather draw, with the commitments' digest standing for A
    matrix = torch.zeros(2, 2)
    assert draw_claims(c_t, matrix, 1.0, [0, 1]) == [0, 1]
    aggregate = torch.ones(8)
    blocks = {draw_audit_block(c_t, commitments, aggregate * i, 1.0, 6) for i in range(40)}
    assert blocks <= set(range(6)) and len(blocks) > 1  # it varies with a
    assert draw_audit_block(c_t, commitments, aggregate, 0.0, 6) is None
    assert scalars_digest(aggregate) == hashlib.sha256(aggregate.numpy().astype("<f4").tobytes()).digest()

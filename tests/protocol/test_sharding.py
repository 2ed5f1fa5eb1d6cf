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
    group_block_bounds,
    row_commitment,
    row_leaves,
    sharded_wire_bytes,
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


def test_group_blocks_cover_each_groups_row_once_and_reduce_to_the_plain_blocks_for_one_group():
    # N = 5, G = 2: group 0 = ranks 0, 2, 4 (blocks of ceil(13 / 3) = 5), group 1 = ranks 1, 3 (of 7)
    assert group_block_bounds(13, 5, 2) == [(0, 5), (0, 7), (5, 10), (7, 13), (10, 13)]
    for width, world, groups in [(13, 5, 2), (4096, 8, 2), (7, 6, 3), (3, 8, 2)]:
        bounds = group_block_bounds(width, world, groups)
        for g in range(groups):
            covered = [c for start, stop in bounds[g::groups] for c in range(start, stop)]
            assert covered == list(range(width)), (width, world, groups, g)
        assert group_block_bounds(width, world) == block_bounds(width, world)
    with pytest.raises(ValueError, match="num_groups=3"):
        group_block_bounds(8, 2, 3)


def test_group_owners_stay_in_the_group_and_a_fully_slashed_group_has_none():
    assert block_owners(6, [2], 2) == [0, 1, 4, 3, 4, 5]  # rank 2's block goes to 4, the next of group 0
    assert block_owners(6, [4], 2) == [0, 1, 2, 3, 0, 5]  # cyclically within the group
    assert block_owners(4, [1, 3], 2) == [0, None, 2, None]
    assert block_owners(6, [1], 1) == block_owners(6, [1])  # G = 1: the plain rule


def test_sharded_wire_bytes_follow_the_formula_of_the_docs():
    # docs/PROTOCOL.md §8, N = 8, G = 2, K = 4096 without a verifier, hashes left out: 41,219 - 7 x 33
    assert sharded_wire_bytes(4096, 8, 2, reviewed=False) == 41_219 - 7 * 33
    # G = 1: 2 (N - 1)/N 4K plus a flag or a commitment per peer (N dividing K)
    assert sharded_wire_bytes(4096, 8, 1, reviewed=False) == 2 * 7 * 4 * 4096 // 8 + 7 * 4
    assert sharded_wire_bytes(4096, 8, 1, reviewed=True) == 2 * 7 * 4 * 4096 // 8 + 7 * 33
    assert sharded_wire_bytes(4096, 8, 8) == 7 * 33 + 7 * 4 * 4096  # groups of one rank: all rows, and more

"""Direction groups (docs/PROTOCOL.md §9.1): seeds, assignment, aggregation within groups,
unbiasedness of the combined estimate and its variance against shared directions."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from lightning_holograd.protocol import (
    CommitmentChain,
    NotEnoughRanksError,
    aggregate_groups,
    direction_seeds,
    genesis_commitment,
    make_aggregator,
    make_family,
    synthesize_groups,
)
from lightning_holograd.protocol.groups import check_direction_groups, group_of, group_ranks

UNBIASED = ["gaussian", "rademacher", "sketch"]


# -- seeds and assignment ----------------------------------------------------------------


def test_group_zero_keeps_the_seeds_of_a_run_without_groups():
    chain = CommitmentChain("holograd")
    chain.advance([bytes(32), bytes(range(32))])
    assert chain.seeds(5, group=0) == chain.seeds(5) == direction_seeds(chain.head, 5)


def test_group_seeds_follow_the_written_formula_and_differ():
    """s_{t,g,j} = uint64le(SHA256(c_t || u64le(g) || u64le(j))[:8]) for g >= 1."""
    commitment = genesis_commitment("groups")
    for group in (1, 2, 7):
        expected = [int.from_bytes(hashlib.sha256(commitment + struct.pack("<QQ", group, j)).digest()[:8], "little")
                    for j in range(3)]
        assert direction_seeds(commitment, 3, group=group) == expected
    every = [s for g in range(8) for s in direction_seeds(commitment, 4, group=g)]
    assert len(set(every)) == len(every)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1"])
def test_bad_group_index_is_refused(bad):
    with pytest.raises(ValueError, match="group="):
        direction_seeds(genesis_commitment("groups"), 1, group=bad)


def test_ranks_are_assigned_round_robin():
    assert [group_of(rank, 3) for rank in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [group_ranks(g, 3, 7) for g in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.mark.parametrize(
    "setting, aggregation, world_size, expected",
    [(1, "median", 2, 1), ("per_rank", "mean", 5, 5), (2, "mean", 3, 2), (2, "median", 6, 2),
     (2, "trimmed_mean", 7, 2), (2, "krum", 10, 2)],
)
def test_group_counts_that_are_accepted(setting, aggregation, world_size, expected):
    assert check_direction_groups(setting, make_aggregator(aggregation), world_size) == expected


@pytest.mark.parametrize(
    "setting, aggregation, world_size, message",
    [(2, "median", 5, r"groups of 2 rank\(s\).*needs >= 3.*HINT: use aggregation='mean'"),
     (2, "trimmed_mean", 4, r"direction_groups=2 on world_size=4.*aggregation='trimmed_mean'.*needs >= 3.*HINT"),
     (2, "krum", 9, "needs >= 5.*HINT"),
     ("per_rank", "median", 4, "direction_groups='per_rank'.*groups of 1 rank.*HINT"),
     (5, "mean", 4, "exceeds world_size=4.*HINT"),
     (0, "mean", 4, "integer >= 1 or 'per_rank'.*HINT"),
     ("all", "mean", 4, "direction_groups='all'.*integer >= 1 or 'per_rank'.*HINT")],
)
def test_group_counts_that_are_refused(setting, aggregation, world_size, message):
    with pytest.raises(ValueError, match=message):
        check_direction_groups(setting, make_aggregator(aggregation), world_size)


# -- aggregation within groups -------------------------------------------------------------


def test_one_group_aggregates_bitwise_as_without_groups():
    matrix = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    matrix[3, 2] = float("nan")
    for name in ("mean", "median", "trimmed_mean"):
        aggregator = make_aggregator(name, trim_ratio=0.25, clip_row_norms=True)
        plain, grouped = aggregator(matrix, slashed={1}), aggregate_groups(aggregator, matrix, {1}, 1)
        assert torch.equal(grouped.scalars[0], plain.scalars)
        assert grouped.weights == (1.0,)
        assert (grouped.kept_ranks, grouped.nonfinite_ranks, grouped.slashed_ranks, grouped.clipped_ranks) == (
            plain.kept_ranks, plain.nonfinite_ranks, plain.slashed_ranks, plain.clipped_ranks)


def test_groups_are_aggregated_apart_and_weighted_by_their_rows():
    """Rank i in group i mod 2; rank 2 slashed, rank 5 non-finite: group 0 keeps ranks 0 and 4,
    group 1 keeps 1 and 3, so each group weighs 2/4 and a_g is its rows' mean."""
    matrix = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    matrix[5, 0] = float("inf")
    result = aggregate_groups(make_aggregator("mean"), matrix, {2}, 2)
    assert torch.equal(result.scalars[0], (matrix[0] + matrix[4]) / 2)
    assert torch.equal(result.scalars[1], (matrix[1] + matrix[3]) / 2)
    assert result.weights == (0.5, 0.5)
    assert (result.kept_ranks, result.nonfinite_ranks, result.slashed_ranks) == ((0, 1, 3, 4), (5,), (2,))


def test_unequal_groups_weigh_by_rows_so_every_rank_counts_alike():
    matrix = torch.ones(5, 2)
    result = aggregate_groups(make_aggregator("mean"), matrix, (), 2)  # groups {0, 2, 4} and {1, 3}
    assert result.weights == (3 / 5, 2 / 5)


def test_a_group_without_enough_rows_is_left_out_and_none_left_is_an_error():
    matrix = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    result = aggregate_groups(make_aggregator("mean"), matrix, {1, 3}, 2)  # group 1 has no row left
    assert result.left_out_groups == (1,)
    assert result.weights == (1.0, 0.0)
    assert torch.equal(result.scalars[1], torch.zeros(3))
    with pytest.raises(NotEnoughRanksError, match="no direction group.*HINT"):
        aggregate_groups(make_aggregator("mean"), matrix, {0, 1, 2, 3}, 2)


def test_row_clipping_uses_the_median_norm_of_every_kept_row():
    """Per-rank groups have one row each, so clipping within a group could never act."""
    matrix = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 40.0]])
    result = aggregate_groups(make_aggregator("mean", clip_row_norms=True), matrix, (), 4)
    assert result.clipped_ranks == (2, 3)  # median norm (2 + 3) / 2 = 2.5
    assert torch.allclose(result.scalars, torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.5, 0.0], [0.0, 2.5]]))


def test_synthesis_is_the_weighted_sum_of_group_syntheses():
    family = make_family("sketch", 300, 8)
    seeds = [direction_seeds(genesis_commitment("synth"), 1, group=g) for g in range(3)]
    scalars = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    weights = (0.5, 0.0, 0.5)
    expected = 0.5 * family.synthesize(scalars[0], seeds[0]) + 0.5 * family.synthesize(scalars[2], seeds[2])
    assert torch.allclose(synthesize_groups(family, scalars, weights, seeds), expected, rtol=0, atol=1e-6)


# -- unbiasedness and variance against shared directions -------------------------------------

# One draw's error of the combined estimate. Group g's estimate is the family's synthesis of
# the mean projection of its ranks' gradients, i.e. an unbiased estimate of the group's mean
# gradient m_g with E||g_hat_g - m_g||^2 = v ||m_g||^2 (v the family's per-draw relative
# variance, tests/protocol/test_directions.py: (D + 1)/K gaussian, (D - 1)/K rademacher and
# sketch). Groups use independent seeds, so the cross terms vanish and, with w_g = n_g / n,
#     E g_hat = sum_g w_g m_g = m (the mean gradient),
#     E||g_hat - m||^2 = v sum_g w_g^2 ||m_g||^2.
# Shared directions (G = 1) give v ||m||^2. With identical gradients the ratio is exactly
# 1/G; with the spread used here (g_i = g + 0.5 e_i, e_i ~ N(0, I)) it is computed below.
PER_DRAW_VARIANCE = {"gaussian": lambda d, k: (d + 1) / k, "rademacher": lambda d, k: (d - 1) / k,
                     "sketch": lambda d, k: (d - 1) / k}
WORLD, DIM, NUM_DIRECTIONS, DRAWS = 4, 256, 16, 2000


def _rank_grads() -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    shared = torch.randn(DIM, generator=gen)
    return shared + 0.5 * torch.randn(WORLD, DIM, generator=gen)  # (N, D)


def _expected_error(name: str, grads: torch.Tensor, groups: int) -> float:
    """v sum_g w_g^2 ||m_g||^2 (absolute)."""
    total = 0.0
    for g in range(groups):
        members = grads[g::groups].double()
        weight = members.shape[0] / WORLD
        total += weight**2 * float(members.mean(dim=0).square().sum())
    return PER_DRAW_VARIANCE[name](DIM, NUM_DIRECTIONS) * total


def _draws(name: str, groups: int, grads: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean of DRAWS combined estimates and their mean squared error against the mean gradient."""
    family, aggregator = make_family(name, DIM, NUM_DIRECTIONS), make_aggregator("mean")
    target = grads.double().mean(dim=0)
    total, squared = torch.zeros(DIM, dtype=torch.float64), 0.0
    for draw in range(DRAWS):
        commitment = genesis_commitment(f"groups/{name}/{draw}")
        seeds = [direction_seeds(commitment, family.num_seeds, group=g) for g in range(groups)]
        matrix = torch.stack([family.project(grads[i], seeds[group_of(i, groups)]) for i in range(WORLD)])
        result = aggregate_groups(aggregator, matrix, (), groups)
        estimate = synthesize_groups(family, result.scalars, result.weights, seeds).double()
        total += estimate
        squared += float((estimate - target).square().sum())
    return total / DRAWS, squared / DRAWS


@pytest.mark.parametrize("name", UNBIASED)
def test_groups_are_unbiased_and_cut_the_variance(name):
    """For G = 1, 2 and 4 (= per_rank): the mean of M = 2000 draws lies within the sampling
    bound of the mean gradient (as for the families: the threshold is twice the expected
    squared error e/M of the mean, which a correct estimator crosses with probability
    < exp(-0.153 D) ~ 1e-17 at D = 256), and one draw's squared error matches
    v sum_g w_g^2 ||m_g||^2 within 10 % (the tolerance of the families' test: the mean of
    2000 draws of a scaled chi-square with ~D degrees of freedom has a relative sd < 3.4 %).

    The variance reduction: per-rank directions must give the predicted fraction of the
    shared setting's error, which for these gradients is below 0.35 (identical gradients:
    exactly 1/4). Groups that reused one seed set would give ~1.0 and fail.
    """
    grads = _rank_grads()
    target = grads.double().mean(dim=0)
    measured = {}
    for groups in (1, 2, WORLD):
        mean, per_draw = _draws(name, groups, grads)
        expected = _expected_error(name, grads, groups)
        assert float((mean - target).square().sum()) < 2 * expected / DRAWS, f"G={groups}: biased"
        assert per_draw == pytest.approx(expected, rel=0.10), f"G={groups}"
        measured[groups] = per_draw
    predicted = _expected_error(name, grads, WORLD) / _expected_error(name, grads, 1)
    assert predicted < 0.35
    assert measured[WORLD] / measured[1] == pytest.approx(predicted, rel=0.15)
    assert measured[2] < 0.7 * measured[1]  # two groups: predicted about 0.57


# -- reconstruction cost ---------------------------------------------------------------------


def test_grouped_sketch_reconstruction_is_one_synthesis_per_group_without_a_k_by_d_matrix(monkeypatch):
    """G = 4 groups at D = 10^6, K = 2 * 10^5: the reconstruction calls the family's synthesis
    once per group with a non-zero weight (O(G D) for the sketch) and never forms a K x D
    matrix, which would take 8 * 10^11 bytes in float32 (any dense K x D allocation fails)."""
    dim, k, groups = 1_000_000, 200_000, 4
    family = make_family("sketch", dim, k)
    seeds = [direction_seeds(genesis_commitment("cost"), family.num_seeds, group=g) for g in range(groups)]
    scalars = torch.randn(groups, k, generator=torch.Generator().manual_seed(3))
    calls = []
    synthesize = family.synthesize
    monkeypatch.setattr(family, "synthesize", lambda a, s: calls.append(len(a)) or synthesize(a, s))
    estimate = synthesize_groups(family, scalars, (0.25, 0.25, 0.0, 0.5), seeds)
    assert estimate.shape == (dim,) and bool(torch.isfinite(estimate).all())
    assert calls == [k, k, k]  # the group with weight 0 is skipped

"""Per-direction robust aggregation of the (ranks x directions) matrix (docs/PROTOCOL.md §4).

Notation: A (N, K) has one row per rank and one column per direction; tau is the trim
ratio, and a trimmed mean drops floor(tau n) values at each end of every column.
"""

from __future__ import annotations

import re
import statistics

import pytest
import torch

from lightning_holograd.protocol import (
    Aggregator,
    MeanAggregator,
    MedianAggregator,
    NotEnoughRanksError,
    TrimmedMeanAggregator,
    make_aggregator,
)
from lightning_holograd.protocol.aggregators import AGGREGATION_NAMES, KrumAggregator, clip_to_median_norm


def _honest(num_ranks: int, num_directions: int, seed: int = 0) -> torch.Tensor:
    """Honest rows: per direction a common value plus small rank noise; directions differ
    widely in scale, as projections on different directions do."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_directions, generator=gen) * 100  # (K,)
    return centres + torch.randn(num_ranks, num_directions, generator=gen)  # (N, K)


# -- trimmed mean ----------------------------------------------------------------------


def test_trimmed_mean_keeps_honest_range_with_outliers_in_every_direction():
    """N = 20, tau = 0.25: floor(tau N) = 5 arbitrary values per column are tolerated. The
    adversaries are different ranks in different columns (15 of 20 ranks lie somewhere),
    with huge values of both signs. Each column's 5 smallest and 5 largest are cut, so at
    most 5 outliers per column are removed from whichever side they sit on and the kept
    values are all honest (or bracketed by honest values): the result lies in the
    column's honest range."""
    num_ranks, num_directions, tau = 20, 6, 0.25
    aggregator = TrimmedMeanAggregator(tau)
    assert aggregator.num_trimmed(num_ranks) == 5
    matrix = _honest(num_ranks, num_directions)
    honest_low, honest_high = matrix.min(dim=0).values, matrix.max(dim=0).values
    attacked = matrix.clone()
    for column in range(num_directions):
        for k in range(5):
            rank = (3 * column + k) % num_ranks
            attacked[rank, column] = (1e30 if (k + column) % 2 else -1e30) * (k + 1)
    result = aggregator(attacked).scalars
    assert torch.all(result >= honest_low) and torch.all(result <= honest_high)
    # One outlier more than the budget in a single column breaks that column only.
    worse = attacked.clone()
    worse[[(3 * 0 + k) % num_ranks for k in range(5)] + [19], 0] = 1e30
    broken = aggregator(worse).scalars
    assert broken[0] > honest_high[0]
    assert torch.equal(broken[1:], result[1:])


def test_trimmed_mean_trims_each_direction_separately():
    """N = 5, tau = 0.2 trims one value at each end of every column. Columns live on very
    different scales, so any trimming that mixes the K values of a step (the reference
    code's bug) gives a different answer."""
    matrix = torch.tensor(
        [
            [1000.0, -7.0, 0.5],
            [1010.0, -5.0, 0.1],
            [990.0, -6.0, 0.3],
            [1005.0, -9.0, 0.2],
            [995.0, -1.0, 0.4],
        ]
    )
    expected = torch.tensor(
        [statistics.fmean(sorted(column)[1:-1]) for column in matrix.T.tolist()], dtype=torch.float32
    )  # [1000, -6, 0.3]
    result = TrimmedMeanAggregator(0.2)(matrix).scalars
    torch.testing.assert_close(result, expected)
    # Two ways of trimming across directions, both wrong, both distinguishable here:
    flat = torch.sort(matrix.flatten()).values[3:-3].mean()  # pooled trim of all N K values
    assert not torch.allclose(result, flat.expand(3))
    row_trimmed = torch.sort(matrix, dim=1).values[:, 1:-1]  # trim the K values of each rank
    assert row_trimmed.shape[1] == 1 and not torch.allclose(result, row_trimmed.mean(0).expand(3))


def test_trimmed_mean_with_zero_ratio_is_the_mean():
    matrix = _honest(7, 4)
    torch.testing.assert_close(TrimmedMeanAggregator(0.0)(matrix).scalars, MeanAggregator()(matrix).scalars)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_sorting_aggregators_are_bitwise_independent_of_rank_order(name):
    """Median and trimmed mean sort each column first, so any row permutation gives the
    same bits (the plain mean instead fixes rank order, see below)."""
    matrix = _honest(9, 8, seed=2) * torch.logspace(-4, 4, 8)
    aggregator = make_aggregator(name, trim_ratio=0.2)
    reference = aggregator(matrix).scalars
    for seed in range(3):
        permutation = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(aggregator(matrix[permutation]).scalars, reference)


@pytest.mark.parametrize(("num_ranks", "tau", "cut"), [(4, 0.2, 0), (5, 0.2, 1), (10, 0.49, 4), (3, 0.4, 1)])
def test_trimmed_count_is_floor_tau_n(num_ranks, tau, cut):
    assert TrimmedMeanAggregator(tau).num_trimmed(num_ranks) == cut
    # With the cut applied per column, the extreme rows never influence the result.
    matrix = torch.arange(num_ranks, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # (N, 2)
    kept = list(range(cut, num_ranks - cut))
    assert float(TrimmedMeanAggregator(tau)(matrix).scalars[0]) == pytest.approx(statistics.fmean(kept))


# -- median ----------------------------------------------------------------------------


def test_median_odd_and_even():
    odd = torch.tensor([[5.0, -1.0], [1.0, 7.0], [3.0, 2.0]])
    torch.testing.assert_close(MedianAggregator()(odd).scalars, torch.tensor([3.0, 2.0]))
    even = torch.tensor([[4.0, 10.0], [1.0, -10.0], [3.0, 0.0], [2.0, 1.0]])
    torch.testing.assert_close(MedianAggregator()(even).scalars, torch.tensor([2.5, 0.5]))


def test_median_tolerates_a_minority_of_outliers():
    """Fewer than half the values of a column arbitrary -> median within the honest range."""
    matrix = _honest(9, 5, seed=1)
    low, high = matrix.min(dim=0).values, matrix.max(dim=0).values
    attacked = matrix.clone()
    attacked[:4, :] = torch.tensor([1e30, -1e30, 1e30, -1e30, 1e30])
    result = MedianAggregator()(attacked).scalars
    assert torch.all(result >= low) and torch.all(result <= high)


# -- dropping rows ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mean", "median", "trimmed_mean", "krum"])
def test_non_finite_rows_dropped_and_reported(name):
    matrix = torch.tensor(
        [[1.0, 10.0], [float("nan"), 0.0], [2.0, 20.0], [0.0, float("inf")], [3.0, 30.0], [-float("inf"), 1.0]]
    )
    result = make_aggregator(name, trim_ratio=0.2, num_byzantine=0)(matrix)
    assert result.nonfinite_ranks == (1, 3, 5)
    assert result.kept_ranks == (0, 2, 4)
    assert result.slashed_ranks == ()
    # Kept rows 1, 2, 3 / 10, 20, 30: mean, median and trimmed mean (floor(0.2*3) = 0) agree.
    # Krum (f = 0) scores each row by its n - 2 = 1 nearest row: all three score 101, and
    # the tie goes to the lowest rank, so it returns rank 0's row.
    expected = [1.0, 10.0] if name == "krum" else [2.0, 20.0]
    torch.testing.assert_close(result.scalars, torch.tensor(expected))
    assert torch.isfinite(result.scalars).all()


@pytest.mark.parametrize("name", ["mean", "median", "trimmed_mean"])
def test_slashed_ranks_left_out(name):
    matrix = torch.tensor([[1e30, -1e30], [1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]])
    result = make_aggregator(name, trim_ratio=0.1)(matrix, slashed=[0, 2, 17])
    assert result.kept_ranks == (1, 3)
    assert result.slashed_ranks == (0, 2)  # slashed wins over non-finite; 17 is not a rank
    assert result.nonfinite_ranks == ()
    torch.testing.assert_close(result.scalars, torch.tensor([2.0, 3.0]))


def test_divisor_is_the_number_of_rows_kept():
    """Rows of 4s plus one dropped row: a divisor of N instead of n would give 4 * 3/4 = 3."""
    matrix = torch.full((4, 3), 4.0)
    matrix[2, 1] = float("nan")
    assert torch.equal(MeanAggregator()(matrix).scalars, torch.full((3,), 4.0))
    assert torch.equal(MeanAggregator()(matrix, slashed=[0]).scalars, torch.full((3,), 4.0))
    matrix[0, 0] = 8.0  # kept rows {0, 1, 3}: (8 + 4 + 4)/3
    assert float(MeanAggregator()(matrix).scalars[0]) == pytest.approx(16 / 3)


@pytest.mark.parametrize("name", ["mean", "median", "trimmed_mean"])
def test_not_enough_ranks(name):
    aggregator = make_aggregator(name)
    nan_matrix = torch.full((3, 2), float("nan"))
    with pytest.raises(NotEnoughRanksError, match=r"got 0 \(slashed=\[\], non-finite=\[0, 1, 2\]\)"):
        aggregator(nan_matrix)
    with pytest.raises(NotEnoughRanksError, match=r"got 0 \(slashed=\[0, 1\], non-finite=\[2\]\)"):
        aggregator(torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("inf"), 0.0]]), slashed=[0, 1])


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"matrix has shape \(4,\)"):
        MeanAggregator()(torch.zeros(4))


# -- bitwise reproducibility of the mean -----------------------------------------------


def test_mean_sums_in_rank_order():
    """Every rank must compute bitwise the same aggregate, so the summation order is fixed:
    rank 0 + rank 1 + ... in float32. With values 1e8, 1, -1e8, 1: 1e8 + 1 rounds back to
    1e8 (float32 spacing at 1e8 is 8), so rank order gives (0 + 1)/4 = 0.25; the order
    1, 1, 1e8, -1e8 gives ((2 + 1e8) - 1e8)/4 = 0, and the exact mean is 0.5."""
    matrix = torch.tensor([[1e8], [1.0], [-1e8], [1.0]])
    assert float(MeanAggregator()(matrix).scalars[0]) == 0.25
    reordered = matrix[[1, 3, 0, 2]]
    assert float(MeanAggregator()(reordered).scalars[0]) == 0.0  # order is part of the contract


def test_mean_is_bitwise_reproducible_and_independent_of_dropped_rows():
    """Same kept rows -> same bits, whatever the dropped rows contain, on every call."""
    matrix = _honest(8, 16, seed=3) * torch.logspace(-6, 6, 16)
    first = MeanAggregator()(matrix, slashed=[5]).scalars
    poisoned = matrix.clone()
    poisoned[5] = 1e30
    poisoned = torch.cat([poisoned, torch.full((1, 16), float("nan"))])
    again = MeanAggregator()(poisoned, slashed=[5]).scalars
    assert torch.equal(first, again)
    kept = torch.cat([matrix[:5], matrix[6:]])
    expected = kept[0].clone()
    for row in kept[1:]:
        expected = expected + row
    assert torch.equal(first, expected / kept.shape[0])
    assert torch.equal(first, MeanAggregator()(kept).scalars)


def test_result_is_float32():
    matrix = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.float64)
    for name in AGGREGATION_NAMES:
        for clip in (False, True):
            aggregator = make_aggregator(name, num_byzantine=0, clip_row_norms=clip)
            assert aggregator(matrix).scalars.dtype == torch.float32


# -- construction ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.5, 0.7, -0.1, float("nan")])
def test_trim_ratio_rejected(bad):
    with pytest.raises(ValueError, match=rf"trim_ratio={re.escape(repr(bad))} must lie in \[0, 0.5\)"):
        TrimmedMeanAggregator(bad)
    with pytest.raises(ValueError, match="trim_ratio="):
        make_aggregator("trimmed_mean", trim_ratio=bad)


def test_make_aggregator():
    assert isinstance(make_aggregator("mean"), MeanAggregator)
    assert isinstance(make_aggregator("median"), MedianAggregator)
    trimmed = make_aggregator("trimmed_mean", trim_ratio=0.3)
    assert isinstance(trimmed, TrimmedMeanAggregator) and trimmed.trim_ratio == 0.3
    krum = make_aggregator("krum", num_byzantine=2, clip_row_norms=True)
    assert isinstance(krum, KrumAggregator) and krum.num_byzantine == 2 and krum.clip_row_norms
    assert not make_aggregator("median").clip_row_norms
    with pytest.raises(ValueError, match="aggregation='trimmed' is unknown. HINT: .*'krum'"):
        make_aggregator("trimmed")


# -- krum ------------------------------------------------------------------------------


def test_krum_selects_an_honest_row_despite_f_outliers():
    """N = 7, f = 2 (N = 2f + 3): two colluding rows far from the honest cluster, close to
    each other. An honest row's n - f - 2 = 3 nearest rows are honest (distance ~ 1 per
    direction), an outlier's 3 nearest include 2 honest rows ~ 1e3 away: honest wins."""
    matrix = _honest(7, 6, seed=4)  # (7, 6)
    matrix[[2, 5]] = matrix[0] + 1e3  # colluders, identical: distance 0 to each other
    krum = KrumAggregator(num_byzantine=2)
    scores = krum.scores(matrix)
    assert scores.shape == (7,) and scores.dtype == torch.float64
    assert scores[[2, 5]].min() > 100 * scores[[0, 1, 3, 4, 6]].max()
    (chosen,) = krum.select(matrix)
    assert chosen in (0, 1, 3, 4, 6)
    result = krum(matrix)
    assert torch.equal(result.scalars, matrix[chosen])  # Krum returns one whole row
    assert result.kept_ranks == tuple(range(7))
    # The mean of the same matrix is dragged ~ 2/7 * 1e3 away: the test can fail.
    assert (MeanAggregator()(matrix).scalars - matrix[chosen]).abs().min() > 200


def test_krum_score_is_sum_of_nearest_squared_distances():
    """Rows on a line at 0, 1, 3, 10 (K = 1) plus 100; f = 1 keeps n - f - 2 = 2 nearest.
    scores: 0 -> 1 + 9 = 10, 1 -> 1 + 4 = 5, 3 -> 4 + 9 = 13, 10 -> 49 + 81 = 130,
    100 -> 8100 + 9409 = 17509; Krum picks row 1, Multi-Krum (m = 3) averages 0, 1, 3."""
    matrix = torch.tensor([[0.0], [1.0], [3.0], [10.0], [100.0]])
    krum = KrumAggregator(num_byzantine=1)
    assert krum.scores(matrix).tolist() == [10.0, 5.0, 13.0, 130.0, 17509.0]
    assert krum(matrix).scalars.tolist() == [1.0]
    multi = KrumAggregator(num_byzantine=1, multi=3)
    assert multi.select(matrix) == [0, 1, 2]
    assert float(multi(matrix).scalars[0]) == pytest.approx(4 / 3)


def test_krum_ties_break_to_the_lower_rank_and_ignore_row_order_otherwise():
    matrix = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    assert KrumAggregator(num_byzantine=1).select(matrix) == [0]
    assert KrumAggregator(num_byzantine=1, multi=2).select(matrix) == [0, 1]


@pytest.mark.parametrize(("num_byzantine", "multi", "needed"), [(0, 1, 3), (1, 1, 5), (2, 1, 7), (1, 5, 6)])
def test_krum_needs_2f_plus_3_rows(num_byzantine, multi, needed):
    krum = KrumAggregator(num_byzantine=num_byzantine, multi=multi)
    assert krum.min_rows() == needed
    krum(_honest(needed, 3))  # enough
    with pytest.raises(NotEnoughRanksError, match=rf"krum aggregation needs at least {needed} usable ranks, "
                                                  rf"got {needed - 1} .*num_byzantine={num_byzantine}"):
        krum(_honest(needed - 1, 3))
    # slashed rows do not count
    with pytest.raises(NotEnoughRanksError, match=rf"got {needed - 1} \(slashed=\[0\]"):
        krum(_honest(needed, 3), slashed=[0])


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"num_byzantine": -1}, "num_byzantine=-1 must be an integer >= 0"),
    ({"num_byzantine": 1.0}, "num_byzantine=1.0 must be an integer"),
    ({"num_byzantine": True}, "num_byzantine=True must be an integer"),
    ({"multi": 0}, "multi=0 must be an integer >= 1"),
    ({"clip_row_norms": 1}, "clip_row_norms=1 must be True or False"),
])
def test_krum_rejects_bad_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        KrumAggregator(**kwargs)


# -- clipping rows to the median norm ----------------------------------------------------


def test_clipping_scales_a_large_row_to_the_median_norm_and_leaves_the_others():
    """N = 5 rows with norms 1, 2, 3, 3, 400 (row 4 is row 1 scaled by 200, the `scale`
    attack): the median norm is 3, so row 4 becomes row 1 * 1.5 (norm 3) and the rows at
    or below the median are returned bit for bit."""
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0], [0.0, 400.0, 0.0]])
    clipped, mask = clip_to_median_norm(rows)
    assert mask.tolist() == [False, False, False, False, True]
    assert torch.equal(clipped[:4], rows[:4])
    torch.testing.assert_close(clipped[4], torch.tensor([0.0, 3.0, 0.0]))
    result = MeanAggregator(clip_row_norms=True)(rows)
    assert result.clipped_ranks == (4,)
    torch.testing.assert_close(result.scalars, torch.tensor([1.0, 8.0, 3.0]) / 5)
    assert MeanAggregator()(rows).clipped_ranks == ()
    assert float(MeanAggregator()(rows).scalars[1]) == pytest.approx(405 / 5)  # unclipped: dominated


def test_clipping_uses_the_median_of_kept_rows_only():
    """Even count: median of norms 1, 2, 4, 8 is 3; rows 2 and 3 (honest-looking but above
    the median) are shrunk too. Slashed and non-finite rows do not vote on the median, and
    clipped_ranks names matrix rows, not positions among the kept ones."""
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, 8.0]])
    matrix = torch.cat([torch.tensor([[1e6, 0.0], [float("nan"), 0.0]]), rows])  # ranks 0, 1 dropped
    result = MeanAggregator(clip_row_norms=True)(matrix, slashed=[0])
    assert result.kept_ranks == (2, 3, 4, 5) and result.clipped_ranks == (4, 5)
    torch.testing.assert_close(result.scalars, torch.tensor([1.0 + 3.0, 2.0 + 3.0]) / 4)


def test_clipping_applies_before_every_aggregator():
    """A row 1e4 times too long: after clipping to the median norm, Krum's and the
    median's choice are unchanged, and the mean is no longer dominated by it."""
    matrix = _honest(5, 4, seed=6)
    matrix[3] *= 1e4
    for name in AGGREGATION_NAMES:
        aggregator = make_aggregator(name, trim_ratio=0.2, num_byzantine=1, clip_row_norms=True)
        assert isinstance(aggregator, Aggregator)
        result = aggregator(matrix)
        assert 3 in result.clipped_ranks and len(result.clipped_ranks) == 2  # above the median of 5
        honest = matrix[[0, 1, 2, 4]]
        assert torch.all(result.scalars.abs() <= 2 * honest.abs().max(dim=0).values), name


def test_clipping_with_zero_median_norm_zeroes_larger_rows():
    rows = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    clipped, mask = clip_to_median_norm(rows)
    assert mask.tolist() == [False, False, True] and torch.equal(clipped, torch.zeros(3, 2))

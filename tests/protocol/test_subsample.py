"""The stratified coordinate-sampling family, ``subsample`` (docs/PROTOCOL.md §3.10).

Notation: D coordinates, K strata (directions), stratum j = [lo_j, lo_j + n_j) with
lo_j = floor(j D / K), p_j the picked coordinate, g a fixed gradient, M seed draws.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_holograd.protocol import SketchDirections, SubsampleDirections, direction_seeds, genesis_commitment, make_family
from lightning_holograd.protocol.defaults import subsample_variance_ratio, variance_ratio
from lightning_holograd.protocol.direction_hash import hash_words
from lightning_holograd.protocol.subsample import pick_probability, stratum_bounds


def _seed(tag: str, draw: int) -> list[int]:
    return direction_seeds(genesis_commitment(f"{tag}/{draw}"), 1)


def _grad(dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def _exact_variance(grad: torch.Tensor, num_directions: int) -> float:
    """E||g_hat - g||^2 for this g: in stratum S of n coordinates, g_hat = n g_p e_p with p
    uniform on S, so E||g_hat_S||^2 = n sum_S g^2 and E||g_hat_S - g_S||^2 = (n - 1) sum_S g^2."""
    lo, size = stratum_bounds(grad.numel(), num_directions)
    g = grad.double()
    total = 0.0
    for start, n in zip(lo.tolist(), size.tolist()):
        part = g[start:start + n]
        total += (n - 1) * float(part.square().sum())
    return total


def test_strata_tile_the_coordinates_in_order():
    for dim, k in [(10, 4), (445_952, 262_144), (7, 7), (1000, 1), (5003, 70)]:
        lo, size = stratum_bounds(dim, k)
        assert lo[0] == 0 and int(lo[-1] + size[-1]) == dim
        assert torch.equal(lo[1:], lo[:-1] + size[:-1])
        assert set(size.tolist()) <= {dim // k, -(-dim // k)}


def test_picks_match_the_python_definition():
    """p_j = floor(j D / K) + floor(word(s, j) n_j / 2^32), computed here with Python integers
    from the words (the words themselves are pinned by test_directions' reference)."""
    dim, k = 5003, 70
    for draw in range(3):
        (seed,) = _seed("subsample-ref", draw)
        words = hash_words([seed], 0, k)[0].tolist()
        expected = []
        for j, word in enumerate(words):
            lo, hi = j * dim // k, (j + 1) * dim // k
            expected.append(lo + ((word * (hi - lo)) >> 32))
        family = SubsampleDirections(dim, k)
        picked, size = family.picks(seed)
        assert picked.tolist() == expected
        for j in (0, 1, k - 1):
            direction = family.direction([seed], j)
            assert direction.nonzero().flatten().tolist() == [expected[j]] and float(direction.sum()) == 1.0


def test_documented_reference_values():
    """The picks docs/PROTOCOL.md §3.10 prints: D = 10, K = 4, seed 0x0123456789ABCDEF."""
    picked, size = SubsampleDirections(10, 4).picks(0x0123456789ABCDEF)
    assert size.tolist() == [2, 3, 2, 3]
    assert picked.tolist() == [1, 2, 5, 7]


def test_pick_probabilities_are_uniform_to_the_stated_bound():
    """Each offset of a stratum of n coordinates is drawn with probability within n / 2^32
    (relative) of 1/n, and the probabilities sum to exactly 1."""
    for n in (1, 2, 3, 7, 1000, (1 << 31) - 1):
        probs = [pick_probability(n, i) for i in ([0, n // 2, n - 1] if n > 8 else range(n))]
        assert all(abs(p * n - 1) <= n / 2**32 for p in probs)
        if n <= 8:
            assert math.fsum(probs) == 1.0


def test_project_is_the_picked_coordinates_and_synthesize_scales_by_the_stratum():
    dim, k = 1001, 300
    grad = _grad(dim)
    seeds = _seed("subsample-ps", 0)
    family = SubsampleDirections(dim, k)
    picked, size = family.picks(seeds[0])
    scalars = family.project(grad, seeds)
    assert torch.equal(scalars, grad[picked])
    estimate = family.synthesize(scalars, seeds)
    expected = torch.zeros(dim)
    expected[picked] = grad[picked] * size.float()
    assert torch.equal(estimate, expected)
    # a fresh instance (no cached picks) synthesises the same bits
    assert torch.equal(SubsampleDirections(dim, k).synthesize(scalars, seeds), estimate)


def test_k_equal_to_d_is_exact():
    grad = _grad(257)
    family = make_family("subsample", 257, 257)
    seeds = _seed("subsample-exact", 0)
    assert torch.equal(family.synthesize(family.project(grad, seeds), seeds), grad)
    assert variance_ratio("subsample", 257, 257) == 0.0


@pytest.mark.parametrize("num_directions", [100, 128, 37])
def test_unbiased_with_the_exact_variance(num_directions):
    """Mean of M = 2000 estimates within the sampling bound of g, and the per-draw squared
    error equal to the exact variance of this g, sum_j (n_j - 1) ||g_{S_j}||^2.

    Bound: mean - g is a sum of M independent zero-mean vectors, one per draw, whose strata
    are independent of one another; ||mean - g||^2 has expectation V/M (V the exact per-draw
    variance) and, by the CLT over M, is close to a weighted chi-square with about D - K
    degrees of freedom (a stratum of n coordinates contributes n - 1). Chernoff for chi^2_f:
    P(> 2 x mean) <= exp(-0.153 f), below 1e-8 for f >= 128 (D = 256 here, K <= 128), so the
    threshold 2V/M is not crossed by a correct family (the seeds are fixed anyway).
    A family that weighted every pick by D/K instead of its stratum's n_j (with 256/100 =
    2.56, n_j in {2, 3}) would tend to a g with each stratum off by 2.56/n_j - 1 (+28 % or
    -15 %): relative squared error ~0.04, 25x the threshold (2 x 1.6 / 2000 = 0.0016); the
    test at K = 100 and 37 catches it. Per-draw error: a sum of K independent stratum terms,
    relative sd < 0.3 per draw, 0.7 % over 2000 draws: 5 % tolerance."""
    dim, draws = 256, 2000
    grad = _grad(dim, 1)
    family = SubsampleDirections(dim, num_directions)
    total = torch.zeros(dim, dtype=torch.float64)
    per_draw = 0.0
    for draw in range(draws):
        seeds = _seed(f"subsample-unbiased/{num_directions}", draw)
        estimate = family.synthesize(family.project(grad, seeds), seeds).double()
        total += estimate
        per_draw += float((estimate - grad.double()).square().sum())
    exact = _exact_variance(grad, num_directions)
    norm = float(grad.double().square().sum())
    mean_error = float((total / draws - grad.double()).square().sum())
    assert mean_error < 2 * exact / draws
    assert per_draw / draws == pytest.approx(exact, rel=0.05)
    # the documented value for coordinates of equal mean square, v = sum n (n - 1) / D; this g
    # is one draw of i.i.d. N(0, 1) coordinates, so V / ||g||^2 sits within ~10 % of it at D = 256
    assert exact / norm == pytest.approx(subsample_variance_ratio(dim, num_directions), rel=0.25)


def test_less_noise_than_the_count_sketch_at_large_k_over_d():
    """At K/D = 0.59 (the tiny GPT-2's D = 445,952, K = 262,144, scaled down to D = 4096):
    exact variance 2 (1 - K/D) = 0.82 ||g||^2 for coordinates of equal mean square, against the sketch's (D - 1)/K
    = 1.70; measured on one i.i.d. gradient, and the sketch's over 200 draws (relative sd of
    the mean ~2 %)."""
    dim, k = 4096, 2410
    grad = _grad(dim, 2)
    norm = float(grad.double().square().sum())
    ratio = _exact_variance(grad, k) / norm
    assert ratio == pytest.approx(2 * (1 - k / dim), rel=0.05)
    sketch = SketchDirections(dim, k)
    errors = []
    for draw in range(200):
        seeds = _seed("subsample-vs-sketch", draw)
        errors.append(float((sketch.synthesize(sketch.project(grad, seeds), seeds) - grad).double().square().sum()))
    sketch_ratio = sum(errors) / len(errors) / norm
    assert sketch_ratio == pytest.approx((dim - 1) / k, rel=0.08)
    assert ratio < 0.55 * sketch_ratio


def test_picks_depend_on_the_seed_and_are_cached_per_seed():
    family = SubsampleDirections(4096, 1000)
    first, second = _seed("subsample-seed", 0)[0], _seed("subsample-seed", 1)[0]
    a = family.picks(first)[0].clone()
    b = family.picks(second)[0]
    assert not torch.equal(a, b)
    assert torch.equal(family.picks(first)[0], a)


def test_state_dict_round_trip_and_checks():
    family = make_family("subsample", 100, 10)
    state = family.state_dict()
    assert state["name"] == "subsample" and state["num_directions"] == 10
    make_family("subsample", 100, 10).load_state_dict(state)
    with pytest.raises(ValueError, match="num_directions=10, this run has num_directions=11"):
        make_family("subsample", 100, 11).load_state_dict(state)


@pytest.mark.parametrize(("dim", "k", "pattern"), [
    (64, 65, r"num_directions=65 exceeds dim=64.*HINT: use num_directions <= 64"),
    (64, 0, "num_directions=0 must be a positive integer"),
    (0, 4, "dim=0 must be a positive integer"),
])
def test_bad_sizes_are_refused(dim, k, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_family("subsample", dim, k)


def test_rejects_wrong_inputs():
    family = SubsampleDirections(64, 4)
    seeds = _seed("subsample-bad", 0)
    with pytest.raises(ValueError, match=r"flat_grad has shape \(63,\), expected \(64,\)"):
        family.project(torch.zeros(63), seeds)
    with pytest.raises(ValueError, match="got 2 seeds, subsample needs 1"):
        family.project(torch.zeros(64), seeds * 2)
    with pytest.raises(ValueError, match=r"scalars has shape \(5,\), expected \(4,\)"):
        family.synthesize(torch.zeros(5), seeds)
    with pytest.raises(IndexError, match=r"index=4 out of range \[0, 4\)"):
        family.direction(seeds, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_cuda_matches_cpu():
    """Picks are integers: bitwise the same on CUDA; project is a gather and synthesize a
    scatter of exact products, so both are bitwise too."""
    dim, k = 100_003, 40_000
    family = SubsampleDirections(dim, k)
    seeds = _seed("subsample-cuda", 0)
    grad = _grad(dim)
    assert torch.equal(family.picks(seeds[0], "cuda")[0].cpu(), SubsampleDirections(dim, k).picks(seeds[0])[0])
    scalars = family.project(grad, seeds)
    assert torch.equal(family.project(grad.cuda(), seeds).cpu(), scalars)
    assert torch.equal(family.synthesize(scalars.cuda(), seeds).cpu(), family.synthesize(scalars, seeds))

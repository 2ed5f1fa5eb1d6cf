"""Seed-generated direction families (docs/PROTOCOL.md §3).

Notation: D coordinates, K directions per step, M independent steps (seed draws),
g a fixed gradient, g_hat = synthesize(project(g, seeds), seeds).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import struct

import pytest
import torch

from lightning_holograd.protocol import (
    DIRECTION_VERSION,
    GaussianDirections,
    IdentityDirections,
    RademacherDirections,
    SketchDirections,
    direction_seeds,
    genesis_commitment,
    make_family,
)
from lightning_holograd.protocol.direction_hash import GAUSSIAN_TABLE_SHA256, gaussian_table, hash_words

UNBIASED = ["gaussian", "rademacher", "sketch"]
DENSE = ["gaussian", "rademacher"]
# Families whose directions share seeds (sketch: one per step; rademacher: one per 32
# directions): their "all K directions identical" collapse is the K = 1 family itself.
SHARED_SEEDS = ["sketch", "rademacher"]


def _seeds(tag: str, draw: int, count: int) -> list[int]:
    """Direction seeds of one step, from a distinct commitment per draw (as in a run)."""
    return direction_seeds(genesis_commitment(f"{tag}/{draw}"), count)


def _grad(dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def _family(name: str, dim: int, num_directions: int):
    return make_family(name, dim, num_directions)


def _rel_sq_err(estimate: torch.Tensor, grad: torch.Tensor) -> float:
    return float((estimate.double() - grad.double()).square().sum() / grad.double().square().sum())


# -- unbiasedness ----------------------------------------------------------------------

# Per-draw variance, v = E||g_hat - g||^2 / ||g||^2 (exact for these families):
#   gaussian:   g_hat = (1/K) sum_j z_j z_j^T g. E[z z^T g] = g and
#               E||z z^T g||^2 = E[(z^T g)^2 ||z||^2] = (D + 2)||g||^2, so each term has
#               variance (D + 1)||g||^2 and v = (D + 1)/K.
#   rademacher: ||z||^2 = D exactly, so E||z z^T g||^2 = D ||g||^2 and v = (D - 1)/K.
#   sketch:     g_hat_d - g_d = sum_{d' != d, h(d') = h(d)} s(d) s(d') g_d'. Independent signs
#               kill every cross term, and P(h(d') = h(d)) = 1/K, so
#               E(g_hat_d - g_d)^2 = (||g||^2 - g_d^2)/K; summed over d, v = (D - 1)/K.
# The mean of M independent draws then has E||mean - g||^2 / ||g||^2 = v / M.
PER_DRAW_VARIANCE = {
    "gaussian": lambda d, k: (d + 1) / k,
    "rademacher": lambda d, k: (d - 1) / k,
    "sketch": lambda d, k: (d - 1) / k,
}


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_and_catches_both_known_bugs(name):
    """Mean of M = 2000 estimates lies within the sampling bound of g; the two bugs of the
    reference code, computed from the very same draws, do not.

    Bound: mean - g is a sum of M K independent zero-mean vectors, so by the CLT
    ||mean - g||^2 is close to a weighted chi-square with about D degrees of freedom and
    expectation e = v/M (v as above). Chernoff for chi-square_D gives
    P(chi^2_D > 2D) <= exp(-D (1 - ln 2)/2) = exp(-0.153 D), i.e. < 1e-17 at D = 256; so
    the threshold 2e is essentially never crossed by a correct family (even at D = 64 the
    bound is 6e-5), and the seeds are fixed anyway.

    Bug (a), unit-norm directions scaled by sqrt(K/D) instead of D/K: the mean tends to
    sqrt(K/D) g, relative squared error (1 - sqrt(K/D))^2 = 0.5625 for K = 16, D = 256,
    35x the threshold 2e = 0.016.
    Bug (b), all K directions identical (K = 1 collapse): still unbiased but the per-draw
    variance is K v (one direction of weight 1 instead of K of weight 1/K), so the mean's
    squared error is K e = 8 (2e) for K = 16; it sits below 2e only if the chi-square
    falls below 1/8 of its mean, probability < exp(-0.6 D) (lower-tail Chernoff).
    K copies of one direction z, each of weight 1/K, give exactly z z^T g, the K = 1
    estimate: for the families that share seeds (SHARED_SEEDS) that is how it is built.
    """
    dim, num_directions, draws = 256, 16, 2000
    family = _family(name, dim, num_directions)
    # Collapsed bug: K copies of one direction (the gaussian: one seed repeated K times).
    collapsed = _family(name, dim, 1) if name in SHARED_SEEDS else family
    grad = _grad(dim)
    total = torch.zeros(dim, dtype=torch.float64)
    total_collapsed = torch.zeros(dim, dtype=torch.float64)
    per_draw = 0.0
    for draw in range(draws):
        seeds = _seeds(f"unbiased/{name}", draw, family.num_seeds)
        estimate = family.synthesize(family.project(grad, seeds), seeds)
        total += estimate
        per_draw += _rel_sq_err(estimate, grad)
        same = seeds[:1] * collapsed.num_seeds
        total_collapsed += collapsed.synthesize(collapsed.project(grad, same), same)
    mean = total / draws
    expected = PER_DRAW_VARIANCE[name](dim, num_directions) / draws
    threshold = 2 * expected

    assert _rel_sq_err(mean, grad) < threshold
    scaled = math.sqrt(num_directions / dim) * mean  # bug (a)
    assert _rel_sq_err(scaled, grad) > threshold
    assert _rel_sq_err(total_collapsed / draws, grad) > threshold  # bug (b)

    # Per-draw variance against the formula. One draw's relative squared error has a
    # relative standard deviation below ~1.5 even at K = 1 (it is about D chi^2_1, whose
    # relative sd is sqrt(2)); averaging M = 2000 draws brings the mean's relative sd below
    # 1.5/sqrt(2000) = 3.4%, and at K = 16 it is far smaller, so 10% is a safe tolerance.
    # A wrong 1/K factor (or any bias) moves this by more than 10%.
    variance = per_draw / draws
    assert variance == pytest.approx(PER_DRAW_VARIANCE[name](dim, num_directions), rel=0.10)


def test_repeated_seed_collapse_is_a_single_direction():
    """The repeated-seed collapse of a dense family is exactly one direction of weight 1:
    g_hat = z z^T g with z the direction of the repeated seed."""
    dim, num_directions = 64, 8
    family = _family("gaussian", dim, num_directions)
    grad = _grad(dim)
    seed = _seeds("collapse", 0, 1)
    repeated = seed * num_directions
    z = family.direction(repeated, 0)
    estimate = family.synthesize(family.project(grad, repeated), repeated)
    torch.testing.assert_close(estimate, z * z.dot(grad), rtol=1e-5, atol=1e-5)


# -- cosine with the true gradient -----------------------------------------------------


def _expected_cos_gaussian(dim: int, num_directions: int) -> float:
    """E[cos(g_hat, g)] for the Gaussian family, exactly.

    Rotate so g = ||g|| e_1 and write x_j = z_j1. Then g_hat is proportional to
    sum_j x_j z_j, whose e_1 part is Q = sum_j x_j^2 ~ chi^2_K and whose orthogonal part,
    given x, is N(0, Q I_{D-1}), of squared norm Q W with W ~ chi^2_{D-1} independent.
    So cos^2 = Q / (Q + W) ~ Beta(K/2, (D-1)/2) and
    E[cos] = E[sqrt(Beta(a, b))] = B(a + 1/2, b) / B(a, b), about sqrt(K/(D + K - 1)),
    i.e. about sqrt(K/D) when K << D.
    """
    a, b = num_directions / 2, (dim - 1) / 2
    return math.exp(math.lgamma(a + 0.5) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(a + b + 0.5))


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize(("num_directions", "dim", "draws"), [(8, 256, 700), (16, 1024, 400), (64, 2048, 100)])
def test_cosine_is_about_sqrt_k_over_d(name, num_directions, dim, draws):
    """Mean cos over draws matches E[cos] (above) within 5% and sqrt(K/D) within 10%.

    Sampling error: by the delta method the per-draw sd of cos relative to its mean is
    about (1/2) sd(Beta)/mean(Beta) = (1/2) sqrt(2/K) (for K << D), i.e. 0.25, 0.18, 0.09
    for K = 8, 16, 64; with the draws used here the mean's relative sd is <= 1%, so 5% is
    a 5-sigma tolerance. Rademacher directions match the Gaussian law up to O(1/D) terms
    (||z||^2 = D exactly instead of chi^2_D; z^T g is close to normal for a dense g).
    The K = 1 collapse would give about sqrt(1/D), off by a factor sqrt(K) >= 2.8.
    """
    family = _family(name, dim, num_directions)
    collapsed_family = _family(name, dim, 1) if name in SHARED_SEEDS else family
    grad = _grad(dim, seed=num_directions)
    cosines, collapsed = [], []
    for draw in range(draws):
        seeds = _seeds(f"cos/{name}/{dim}", draw, family.num_seeds)
        estimate = family.synthesize(family.project(grad, seeds), seeds)
        cosines.append(float(torch.nn.functional.cosine_similarity(estimate, grad, dim=0)))
        if draw < 50:  # K copies of one direction (see test_unbiased_and_catches_both_known_bugs)
            same = seeds[:1] * collapsed_family.num_seeds
            one = collapsed_family.synthesize(collapsed_family.project(grad, same), same)
            collapsed.append(float(torch.nn.functional.cosine_similarity(one, grad, dim=0)))
    mean_cos = sum(cosines) / draws
    assert mean_cos == pytest.approx(_expected_cos_gaussian(dim, num_directions), rel=0.05)
    assert mean_cos == pytest.approx(math.sqrt(num_directions / dim), rel=0.10)
    assert sum(collapsed) / len(collapsed) < 0.5 * mean_cos


# -- distinct, reproducible directions -------------------------------------------------


@pytest.mark.parametrize("name", DENSE)
def test_directions_of_a_step_are_distinct_and_nearly_orthogonal(name):
    """For independent z, z' with i.i.d. unit-variance entries, cos(z, z') has sd 1/sqrt(D)
    and (Hoeffding for Rademacher, the Gaussian analogue for Gaussian)
    P(|cos| > t) <= 2 exp(-D t^2 / 2) roughly. With t = 6/sqrt(D) that is 3e-8 per pair,
    so over the K(K-1)/2 = 496 pairs a failure means the directions are not independent
    (e.g. seeds derived from prefixes of one string, which made them all identical).
    K = 48 spans two rademacher seeds: 32 directions from the bits of one word, 16 more."""
    dim, num_directions = 4096, 48
    family = _family(name, dim, num_directions)
    seeds = _seeds(f"distinct/{name}", 0, family.num_seeds)
    matrix = torch.stack([family.direction(seeds, j) for j in range(num_directions)])  # (K, D)
    unit = matrix / matrix.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    off_diagonal = cos[~torch.eye(num_directions, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 6 / math.sqrt(dim)
    assert len({tuple(row.tolist()[:16]) for row in matrix}) == num_directions
    # Each direction has i.i.d. unit-variance entries: ||z||^2 / D = 1 +- O(sqrt(2/D)).
    norms_sq = matrix.square().sum(dim=1) / dim
    assert torch.all((norms_sq - 1).abs() < 6 * math.sqrt(2 / dim))


def test_sketch_directions_partition_the_coordinates():
    """Bucket indicators: disjoint supports (exactly orthogonal), +-1 entries, and every
    coordinate in exactly one bucket; roughly D/K coordinates per bucket."""
    dim, num_directions = 4096, 16
    family = _family("sketch", dim, num_directions)
    seeds = _seeds("sketch-partition", 0, 1)
    matrix = torch.stack([family.direction(seeds, j) for j in range(num_directions)])  # (K, D)
    assert torch.equal(matrix.abs().sum(dim=0), torch.ones(dim))
    gram = matrix @ matrix.T
    assert torch.equal(gram - torch.diag(torch.diagonal(gram)), torch.zeros(num_directions, num_directions))
    # Bucket sizes are Binomial(D, 1/K): mean 256, sd 15.5; 6 sd either side.
    sizes = torch.diagonal(gram)
    assert torch.all((sizes - dim / num_directions).abs() < 6 * math.sqrt(dim / num_directions))
    # Signs are balanced: sum of D independent signs has sd sqrt(D) = 64.
    assert abs(float(matrix.sum())) < 6 * math.sqrt(dim)


@pytest.mark.parametrize("name", UNBIASED)
@pytest.mark.parametrize("num_directions", [3, 40])
def test_directions_reproducible_across_calls_and_chunk_sizes(name, num_directions):
    """Same seeds -> bitwise the same directions, whatever the chunk size (D = 70001 is odd and
    not a multiple of any chunk, so a short, odd last chunk is exercised; 1000 is not a
    multiple of the 64-coordinate granule; None and 100000 > D leave only the working-set cap;
    chunk_size = 1 is in test_families_match_the_python_reference). K = 40 spans two
    rademacher seeds."""
    dim = 70001
    seeds = _seeds(f"chunks/{name}", 0, num_directions)
    grad = _grad(dim)
    results = []
    for chunk in (None, 1000, 8192, 65536, 100_000):
        family = make_family(name, dim, num_directions, chunk_size=chunk)
        used = seeds[: family.num_seeds]
        directions = torch.stack([family.direction(used, j) for j in range(num_directions)])
        if not results:
            again = torch.stack([family.direction(used, j) for j in range(num_directions)])
            assert torch.equal(directions, again)
        scalars = family.project(grad, used)
        assert torch.equal(scalars, family.project(grad, used))
        # project is V g and synthesize is the family's synthesis of V^T a.
        torch.testing.assert_close(scalars, directions @ grad, rtol=1e-4, atol=1e-3)
        weights = scalars if name == "sketch" else scalars / num_directions
        torch.testing.assert_close(family.synthesize(scalars, used), directions.T @ weights, rtol=1e-5, atol=1e-4)
        results.append((directions, scalars))
    for directions, scalars in results[1:]:
        assert torch.equal(directions, results[0][0])
        torch.testing.assert_close(scalars, results[0][1], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # only computes ranges: no CUDA needed
@pytest.mark.parametrize("chunk_size", [None, 1, 1000, 10**9])
def test_chunks_tile_the_coordinates(device, chunk_size):
    """Chunks are contiguous, cover [0, D) once, start on multiples of 64 (Gaussian pairs never
    split), respect chunk_size (rounded up to 64) and the device's working-set cap."""
    from lightning_holograd.protocol import directions

    dim, num_directions = 1_000_003, 4096
    family = GaussianDirections(dim, num_directions, chunk_size=chunk_size)
    device = torch.device(device)
    cap = directions._WORK_ELEMENTS.get(device.type, directions._WORK_ELEMENTS_ACCELERATOR) // num_directions
    ranges = list(family._chunks(num_directions, device))
    assert ranges[0][0] == 0 and ranges[-1][1] == dim
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    assert all(start % 64 == 0 for start, _ in ranges)
    limit = max(64, min(cap, chunk_size or cap))
    assert max(stop - start for start, stop in ranges) == -(-limit // 64) * 64


@pytest.mark.parametrize("name", UNBIASED)
def test_directions_depend_on_the_seed(name):
    family = _family(name, 512, 4)
    first = family.direction(_seeds("seed-dep", 0, family.num_seeds), 0)
    second = family.direction(_seeds("seed-dep", 1, family.num_seeds), 0)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("name", UNBIASED)
def test_segments_of_a_direction_are_independent(name):
    """Values depend on the coordinate index through the hash; if they ignored part of it,
    a direction would repeat with some period (e.g. per chunk). Entries of two independent
    segments have |cos| < 6/sqrt(segment) except with probability ~ 2 exp(-18) (Hoeffding)."""
    block, blocks = 512, 6
    family = make_family(name, block * blocks, 4, chunk_size=2 * block)
    seeds = _seeds(f"blocks/{name}", 0, family.num_seeds)
    parts = family.direction(seeds, 1).reshape(blocks, block)
    if name == "sketch":  # bucket indicator: compare which coordinates are in bucket 1
        parts = torch.cat([family.direction(seeds, j).reshape(blocks, block) for j in range(4)], dim=1)
    unit = parts / parts.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    off_diagonal = cos[~torch.eye(blocks, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 6 / math.sqrt(parts.shape[1])


@pytest.mark.parametrize("name", UNBIASED)
def test_direction_prefix_does_not_depend_on_dim(name):
    """A coordinate's value is a function of (seed, index) only, so a direction's first D
    entries do not depend on the total dimension. (The sketch's bucket also depends on K.)"""
    small = make_family(name, 1000, 2, chunk_size=512)
    large = make_family(name, 3001, 2, chunk_size=1024)
    seeds = _seeds(f"prefix/{name}", 0, small.num_seeds)
    assert torch.equal(small.direction(seeds, 1), large.direction(seeds, 1)[:1000])


@pytest.mark.parametrize("cls", [GaussianDirections, RademacherDirections, SketchDirections])
def test_version_2_families_have_no_block_size(cls):
    """DIRECTION_VERSION 1 drew each block of block_size coordinates from its own generator
    (lightning-holograd 0.1.x); version 2 has no blocks, so its families take no block_size."""
    with pytest.raises(TypeError, match="block_size"):
        cls(1000, 2, block_size=256)


def test_rademacher_entries_are_signs():
    family = _family("rademacher", 1024, 2)
    direction = family.direction(_seeds("signs", 0, family.num_seeds), 1)
    assert torch.equal(direction.abs(), torch.ones(1024))
    assert abs(float(direction.sum())) < 6 * math.sqrt(1024)  # sd sqrt(D)


def test_identity_family_is_exact():
    grad = _grad(32)
    family = IdentityDirections(32)
    assert family.num_seeds == 0
    assert torch.equal(family.synthesize(family.project(grad, []), []), grad)
    assert torch.equal(family.direction([], 5), torch.eye(32)[5])


def test_family_state_dict_checks_settings():
    """chunk_size does not change the directions (see above), so a checkpoint written with
    another value loads; K and the family name do."""
    family = GaussianDirections(64, 4, chunk_size=64)
    family.load_state_dict(GaussianDirections(64, 4, chunk_size=128).state_dict())
    with pytest.raises(ValueError, match="num_directions=8"):
        family.load_state_dict(GaussianDirections(64, 8, chunk_size=64).state_dict())
    with pytest.raises(ValueError, match="name='rademacher'"):
        family.load_state_dict(RademacherDirections(64, 4, chunk_size=64).state_dict())


@pytest.mark.parametrize("name", [*UNBIASED, "identity", "codebook"])
def test_family_state_names_the_direction_version_and_refuses_others(name):
    """A 0.1.x checkpoint (no direction_version: generator blocks) or another version cannot
    be continued with these directions: refused with what to do, before any state changes
    (a version-1 family resumes it where one exists: test_directions_v1.py)."""
    family = make_family(name, 64, 64 if name == "identity" else 4)
    state = family.state_dict()
    assert state["direction_version"] == DIRECTION_VERSION == 2
    family.load_state_dict(state)
    old = {key: value for key, value in state.items() if key != "direction_version"}
    if name == "codebook":
        hint = "HINT: start a new run or finish it with lightning-holograd 0.1.x"
    else:
        hint = r"HINT: build the family with make_family\(\.\.\., direction_version=1\)"
    with pytest.raises(ValueError, match=f"direction_version=None \\(written by lightning-holograd 0.1.x\\).*{hint}"):
        family.load_state_dict(old)
    with pytest.raises(ValueError, match=f"direction_version=1 .*{hint}"):
        family.load_state_dict({**state, "direction_version": 1})


# -- the definition, pinned by a pure-Python reference (docs/PROTOCOL.md section 3) ------

_M32 = 0xFFFFFFFF


def _ref_word(seed: int, index: int) -> int:
    """word(s, e), written from the docs with Python integers (no torch, no overflow)."""
    k0, k1 = seed & _M32, seed >> 32
    lo, hi = index & _M32, index >> 32
    b = (lo * 0x9E3779B9) & _M32
    b ^= b >> 16
    x = ((b ^ k0) * 0x7FEB352D) & _M32
    x ^= (x >> 15) ^ k1 ^ ((hi * 0x85EBCA6B) & _M32)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _ref_gaussian_table() -> list[float]:
    """The 2^16 atoms: Phi^-1((2i + 1) / 2^17) (antisymmetric), over their RMS, as float32."""
    size = 1 << 16
    half = [statistics.NormalDist().inv_cdf((2 * i + 1) / (2 * size)) for i in range(size // 2)]
    atoms = half + [-q for q in reversed(half)]
    rms = math.sqrt(math.fsum(q * q for q in atoms) / size)
    return [struct.unpack("<f", struct.pack("<f", q / rms))[0] for q in atoms]


def _ref_value(name: str, seeds: list[int], num_directions: int, j: int, d: int) -> float:
    """Coordinate d of direction j of a step with these seeds, from the definition."""
    if name == "sketch":
        word = _ref_word(seeds[0], d)
        bucket = ((word >> 1) * num_directions) >> 31
        return float(1 - 2 * (word & 1)) if bucket == j else 0.0
    if name == "rademacher":
        word = _ref_word(seeds[j // 32], d)
        return float(1 - 2 * ((word >> (j % 32)) & 1))
    word = _ref_word(seeds[j], d // 2)
    return _REF_TABLE[(word >> (16 * (d % 2))) & 0xFFFF]


_REF_TABLE = _ref_gaussian_table()
# Extreme seeds and indices: every multiplication operand at its largest, an index on each
# side of 2^32 (where the high word enters) and the largest index an int64 range holds.
_EDGE_SEEDS = [0, 1, (1 << 64) - 1, 0xFFFFFFFF, 0xFFFFFFFF << 32, 0x0123456789ABCDEF]
_EDGE_INDICES = [0, 1, 2, 0x7FFFFFFF, 0x80000000, _M32, 1 << 32, (1 << 32) + 1, 1 << 40, (1 << 63) - 2]


def test_hash_words_match_the_python_reference_at_the_edges():
    """No int64 product overflows (or, if one did, wraps differently) anywhere in range."""
    for index in _EDGE_INDICES:
        words = hash_words(_EDGE_SEEDS, index, index + 1)[:, 0].tolist()
        assert words == [_ref_word(seed, index) for seed in _EDGE_SEEDS], f"index {index}"
    words = hash_words(_EDGE_SEEDS[:2], (1 << 32) - 3, (1 << 32) + 3)  # a range across 2^32
    assert words.tolist() == [[_ref_word(s, e) for e in range((1 << 32) - 3, (1 << 32) + 3)] for s in _EDGE_SEEDS[:2]]


# The reference values printed in docs/PROTOCOL.md §3.2 (seed, index, word).
_DOCUMENTED_WORDS = [
    (0x0000000000000000, 1, 0x01FCE552),
    (0x0000000000000000, 1 << 32, 0x2D6C6775),
    (0x0123456789ABCDEF, 0, 0xF9C391F8),
    (0x0123456789ABCDEF, 1, 0x22643025),
    (0x0123456789ABCDEF, 2, 0x24FAAB35),
    (0x0123456789ABCDEF, 1 << 32, 0xD58D5CB3),
    (0x0123456789ABCDEF, (1 << 40) + 5, 0xFFB53F7B),
    (0xFFFFFFFFFFFFFFFF, 0, 0x44A8431F),
    (0xFFFFFFFFFFFFFFFF, (1 << 40) + 5, 0xCA03FECA),
]


def test_documented_reference_values():
    """The words and family values docs/PROTOCOL.md §3.2 prints for outside verifiers."""
    for seed, index, word in _DOCUMENTED_WORDS:
        assert _ref_word(seed, index) == word
        assert int(hash_words([seed], index, index + 1)[0, 0]) == word
    seed = 0x0123456789ABCDEF
    sketch = SketchDirections(4, 64)
    buckets = {j: sketch.direction([seed], j) for j in (62, 8, 9, 5)}
    assert [float(buckets[j][d]) for d, j in enumerate((62, 8, 9, 5))] == [1.0, -1.0, -1.0, 1.0]
    rademacher = RademacherDirections(4, 64)
    assert rademacher.direction([seed, 0], 0).tolist() == [1.0, -1.0, -1.0, 1.0]
    assert rademacher.direction([seed, 0], 3).tolist() == [-1.0, 1.0, 1.0, 1.0]
    table = gaussian_table("cpu")
    assert torch.equal(GaussianDirections(4, 1).direction([seed], 0), table[[37368, 63939, 12325, 8804]])


@pytest.mark.parametrize("name", UNBIASED)
def test_families_match_the_python_reference(name):
    """Every direction of a step (K = 70: three rademacher seeds, the last one partial) at
    coordinates spread over D, both parities of d, at chunk boundaries of both chunkings
    (chunk_size = 1 means the smallest chunk, 64 coordinates; the odd D leaves a short,
    odd last chunk)."""
    dim, num_directions = 5003, 70
    coords = [0, 1, 2, 63, 64, 65, 999, 1000, 1001, 1023, 1024, 2048, 4095, dim - 2, dim - 1]
    seeds = _seeds(f"reference/{name}", 0, make_family(name, dim, num_directions).num_seeds)
    fine, coarse = (make_family(name, dim, num_directions, chunk_size=chunk) for chunk in (1, 1000))
    for j in range(num_directions):
        direction = coarse.direction(seeds, j)
        assert direction[coords].tolist() == [_ref_value(name, seeds, num_directions, j, d) for d in coords]
        assert torch.equal(fine.direction(seeds, j), direction)


def test_gaussian_table_is_the_documented_distribution():
    """The library's table equals the reference construction bit for bit and its pinned
    digest; mean exactly 0 (antisymmetric), variance 1 to float32 rounding, fourth moment
    2.99925 (truncated at +-4.325), so the family stays unbiased with per-draw variance
    (D + m4 - 2)/K."""
    table = gaussian_table("cpu")
    assert table.dtype == torch.float32 and table.shape == (1 << 16,)
    assert table.tolist() == _REF_TABLE
    assert hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest() == GAUSSIAN_TABLE_SHA256
    assert torch.equal(table, -table.flip(0))
    atoms = table.double()
    assert float(atoms.mean()) == 0.0
    assert abs(float(atoms.square().mean()) - 1) < 1e-7
    assert float(atoms.pow(4).mean()) == pytest.approx(2.99925, abs=1e-5)
    assert float(atoms.max()) == pytest.approx(4.325, abs=1e-3)
    assert torch.all(table[1:] > table[:-1])  # strictly increasing: 2^16 distinct atoms


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("name", UNBIASED)
def test_cuda_matches_cpu(name):
    """Directions are integer hashes and table lookups: bitwise the same on CUDA. Projection
    and synthesis sum in another order there (scatter/index adds, BLAS), so they agree to
    float32 rounding of sums of D terms: rtol 1e-4 with atol 1e-4 * the scale of a term."""
    dim, num_directions = 100_003, 40
    family = make_family(name, dim, num_directions)
    seeds = _seeds(f"cuda/{name}", 0, family.num_seeds)
    for j in (0, 1, num_directions - 1):
        assert torch.equal(family.direction(seeds, j, "cuda").cpu(), family.direction(seeds, j))
    grad = _grad(dim)
    scalars = family.project(grad, seeds)
    on_cuda = family.project(grad.cuda(), seeds)
    torch.testing.assert_close(on_cuda.cpu(), scalars, rtol=1e-4, atol=1e-4 * math.sqrt(dim))
    estimate = family.synthesize(scalars, seeds)
    torch.testing.assert_close(family.synthesize(scalars.cuda(), seeds).cpu(), estimate, rtol=1e-4, atol=1e-4)


# -- argument checks -------------------------------------------------------------------

ALL_RANDOM = [GaussianDirections, RademacherDirections, SketchDirections]


@pytest.mark.parametrize("cls", ALL_RANDOM)
@pytest.mark.parametrize("bad", [0, -1])
def test_rejects_non_positive_num_directions(cls, bad):
    with pytest.raises(ValueError, match=f"num_directions={bad} must be a positive integer"):
        cls(64, bad)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gaussian", "num_directions=0 must be a positive integer"),
        ("rademacher", "num_directions=0 must be a positive integer"),
        ("sketch", "num_directions=0 must be a positive integer"),
        ("codebook", r"codebook_rank=0 must lie in \[1, num_directions=0\]"),
        ("momentum", "num_exploration=-1 must be >= 1"),  # one momentum + (K - 1) exploration
    ],
)
def test_make_family_rejects_zero_directions(name, message):
    with pytest.raises(ValueError, match=message):
        make_family(name, 64, 0)


@pytest.mark.parametrize("cls", ALL_RANDOM)
def test_rejects_bad_dim(cls):
    with pytest.raises(ValueError, match="dim=0 must be a positive integer"):
        cls(0, 4)


@pytest.mark.parametrize("cls", ALL_RANDOM)
def test_rejects_non_positive_chunk_size(cls):
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive integer"):
        cls(64, 4, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size=-8 must be a positive integer"):
        cls(64, 4, chunk_size=-8)


@pytest.mark.parametrize("name", UNBIASED)
def test_rejects_wrong_gradient_length(name):
    family = _family(name, 64, 4)
    seeds = _seeds("bad-grad", 0, family.num_seeds)
    with pytest.raises(ValueError, match=r"flat_grad has shape \(63,\), expected \(64,\)"):
        family.project(torch.zeros(63), seeds)
    with pytest.raises(ValueError, match=r"flat_grad has shape \(8, 8\), expected \(64,\)"):
        family.project(torch.zeros(8, 8), seeds)


@pytest.mark.parametrize("name", UNBIASED)
def test_rejects_wrong_number_of_seeds(name):
    family = _family(name, 64, 4)
    needed = family.num_seeds
    seeds = _seeds("bad-seeds", 0, needed + 1)
    with pytest.raises(ValueError, match=f"got {needed + 1} seeds, {name} needs {needed}"):
        family.project(torch.zeros(64), seeds)
    with pytest.raises(ValueError, match=f"got {needed + 1} seeds, {name} needs {needed}"):
        family.synthesize(torch.zeros(4), seeds)


@pytest.mark.parametrize("name", UNBIASED)
def test_rejects_wrong_scalars_and_index(name):
    family = _family(name, 64, 4)
    seeds = _seeds("bad-scalars", 0, family.num_seeds)
    with pytest.raises(ValueError, match=r"scalars has shape \(5,\), expected \(4,\)"):
        family.synthesize(torch.zeros(5), seeds)
    with pytest.raises(IndexError, match=r"index=4 out of range \[0, 4\)"):
        family.direction(seeds, 4)


def test_make_family_rejects_unknown_name():
    with pytest.raises(ValueError, match="directions='gausian' is unknown"):
        make_family("gausian", 64, 4)


def test_identity_rejects_other_num_directions():
    with pytest.raises(ValueError, match="num_directions=8 must equal dim=64"):
        IdentityDirections(64, 8)

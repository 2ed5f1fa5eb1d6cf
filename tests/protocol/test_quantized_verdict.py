"""The verdict on quantized claims (docs/PROTOCOL.md §9.5 "Verification")."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from lightning_holograd.protocol import Reason, judge_quantized_claim
from lightning_holograd.protocol.quantize import (
    QuantizedClaim,
    dither,
    levels_of,
    quantize,
)

COMMITMENT = hashlib.sha256(b"verdict step").digest()
K, RTOL, ATOL = 32, 1e-5, 1e-6


def _claim(row: torch.Tensor, bits: int, rank: int = 1, public: torch.Tensor | None = None) -> QuantizedClaim:
    """What an honest rank submits for ``row`` (its own float computation)."""
    u = dither(COMMITMENT, rank, row.numel())
    levels, scale = quantize(row, bits, u)
    return QuantizedClaim(levels, scale, u, bits, torch.zeros(0) if public is None else public)


def _recomputed() -> torch.Tensor:
    return torch.randn(K, generator=torch.Generator().manual_seed(7), dtype=torch.float32)


def _positions(row: torch.Tensor, claim: QuantizedClaim) -> torch.Tensor:
    """x_j = a_j / Delta + u_j in float64, Delta from the claim's M."""
    delta = claim.scale / levels_of(claim.bits)
    return row.to(torch.float64) / delta + claim.dither


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_an_honest_claim_is_accepted_even_with_zero_tolerance(bits):
    row = _recomputed()
    verdict = judge_quantized_claim(_claim(row, bits), row, 0.0, 0.0)
    assert verdict.accepted and verdict.reason is Reason.OK
    assert 0 < verdict.max_abs_error <= float(row.abs().max()) / levels_of(bits)  # at most one quantum


@pytest.mark.parametrize("bits", [8, 4])
def test_honest_float_differences_across_rounding_boundaries_are_accepted(bits):
    """The verifier's a*_j is the largest float32 below the value where x_j = a_j / Delta + u_j
    reaches the next integer; the claimant's float row is 4 float32 steps above it (a relative
    difference ~5e-7, within rtol = 1e-5): x_j crosses the boundary, so its level is one above
    floor(x*_j) at every such j, and the claim is still accepted. With zero tolerance the same
    claim is rejected: the tolerance is what accepts it."""
    base = _recomputed()
    base[0] = 2 * base.abs().max()  # M = M*: the largest entry, the same on both sides
    probe = _claim(base, bits)
    delta = probe.scale / levels_of(bits)
    upper = _positions(base, probe).floor() + 1
    boundary = (upper - probe.dither) * delta  # float64 value where x reaches ``upper``
    movable = (upper <= levels_of(bits)) & (torch.arange(K) > 0)
    target = boundary.to(torch.float32)
    target = torch.where(target.to(torch.float64) >= boundary, torch.nextafter(target, torch.tensor(-math.inf)),
                         target)
    claimant = target.clone()
    for _ in range(4):
        claimant = torch.nextafter(claimant, torch.tensor(math.inf))
    target, claimant = torch.where(movable, target, base), torch.where(movable, claimant, base)
    assert bool((claimant.to(torch.float64)[movable] > boundary[movable]).all())
    levels, scale = quantize(claimant, bits, probe.dither)
    assert scale == probe.scale == float(target.abs().max())
    claim = QuantizedClaim(levels, scale, probe.dither, bits, torch.zeros(0))
    below = _positions(target, claim).floor().clamp(-levels_of(bits), levels_of(bits)).to(torch.int64)
    crossed = int((claim.levels != below).sum())
    assert crossed == int(movable.sum()) >= K // 2  # every moved scalar sits one level above floor(x*)
    assert judge_quantized_claim(claim, target, RTOL, ATOL).accepted
    assert not judge_quantized_claim(claim, target, 0.0, 0.0).accepted


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_one_level_off_far_from_a_boundary_is_rejected(bits):
    row = _recomputed()
    claim = _claim(row, bits)
    frac = _positions(row, claim) - _positions(row, claim).floor()
    top = levels_of(bits)
    far = [j for j in range(K) if 0.2 < frac[j] < 0.8 and -top < int(claim.levels[j]) < top]
    assert far
    for j in far[:3]:
        for shift in (1, -1):
            levels = claim.levels.clone()
            levels[j] += shift
            lie = QuantizedClaim(levels, claim.scale, claim.dither, bits, claim.public)
            verdict = judge_quantized_claim(lie, row, RTOL, ATOL)
            assert not verdict.accepted and verdict.reason is Reason.MISMATCH


@pytest.mark.parametrize("factor", [1.001, 0.999, 2.0])
def test_a_wrong_scale_is_rejected(factor):
    row = _recomputed()
    claim = _claim(row, 4)
    lie = QuantizedClaim(claim.levels, claim.scale * factor, claim.dither, 4, claim.public)
    assert not judge_quantized_claim(lie, row, RTOL, ATOL).accepted


def test_public_values_are_judged_as_float_claims():
    row, public = _recomputed(), torch.tensor([0.5, 2.0])
    recomputed = torch.cat([row, public])
    assert judge_quantized_claim(_claim(row, 4, public=public), recomputed, RTOL, ATOL).accepted
    lie = _claim(row, 4, public=torch.tensor([0.5, 2.01]))
    assert not judge_quantized_claim(lie, recomputed, RTOL, ATOL).accepted


def test_nonfinite_and_zero_claims():
    row = _recomputed()
    nan_claim = QuantizedClaim(torch.zeros(K, dtype=torch.int64), float("nan"), dither(COMMITMENT, 1, K), 4,
                               torch.zeros(0))
    lie = judge_quantized_claim(nan_claim, row, RTOL, ATOL)
    assert not lie.accepted and lie.reason is Reason.NONFINITE
    nan_row = row.clone()
    nan_row[3] = math.nan
    fault = judge_quantized_claim(nan_claim, nan_row, RTOL, ATOL)
    assert fault.accepted and fault.reason is Reason.NONFINITE
    zero = _claim(torch.zeros(K), 4)
    assert zero.scale == 0.0 and judge_quantized_claim(zero, torch.zeros(K), 0.0, 0.0).accepted
    assert not judge_quantized_claim(zero, row, RTOL, ATOL).accepted  # M = 0 claimed, M* far from 0
    finite_claim = _claim(row, 4)
    assert not judge_quantized_claim(finite_claim, nan_row, RTOL, ATOL).accepted  # a* non-finite
    assert not judge_quantized_claim(finite_claim, row[:-1], RTOL, ATOL).accepted  # shape


# -- one scale per block of scalars (scalar_block > 0) -----------------------------------

def _block_claim(row: torch.Tensor, bits: int, block: int, rank: int = 1) -> QuantizedClaim:
    u = dither(COMMITMENT, rank, row.numel())
    levels, scales = quantize(row, bits, u, block)
    return QuantizedClaim(levels, scales, u, bits, torch.zeros(0), block)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_block_claims_accept_the_honest_and_reject_a_moved_level_or_a_scaled_block(bits):
    """Blocks of 10 over K = 32 (the last block has 2 scalars, and one block is all zeros):
    the honest claim is accepted against its own recomputation; a level moved by one in
    block 2, or block 1's scale times 1.01, is rejected."""
    row = _recomputed().clone()
    row[10:20] = 0.0
    claim = _block_claim(row, bits, 10)
    assert claim.scale.shape == (4,) and float(claim.scale[1]) == 0.0
    assert judge_quantized_claim(claim, row, RTOL, ATOL).accepted
    moved = claim.levels.clone()
    moved[25] += 1 if moved[25] < levels_of(bits) else -1
    lie = QuantizedClaim(moved, claim.scale, claim.dither, bits, claim.public, 10)
    assert judge_quantized_claim(lie, row, RTOL, ATOL).reason is Reason.MISMATCH
    scaled = claim.scale.clone()
    scaled[0] *= 1.01
    lie = QuantizedClaim(claim.levels, scaled, claim.dither, bits, claim.public, 10)
    assert not judge_quantized_claim(lie, row, RTOL, ATOL).accepted
    nonzero = claim.levels.clone()
    nonzero[12] = 1  # a level in the all-zero block
    lie = QuantizedClaim(nonzero, claim.scale, claim.dither, bits, claim.public, 10)
    assert not judge_quantized_claim(lie, row, RTOL, ATOL).accepted


def test_a_nonfinite_block_row_is_honest_only_against_a_nonfinite_recomputation():
    row = _recomputed().clone()
    row[3] = float("nan")
    claim = _block_claim(row, 4, 8)
    assert bool(torch.isnan(claim.scale).all()) and bool((claim.levels == 0).all())
    verdict = judge_quantized_claim(claim, row, RTOL, ATOL)
    assert verdict.accepted and verdict.reason is Reason.NONFINITE
    assert not judge_quantized_claim(claim, _recomputed(), RTOL, ATOL).accepted

"""Quantized scalars (docs/PROTOCOL.md §9.5): levels, packing, dither, unbiasedness, wire bytes."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from lightning_holograd.protocol.quantize import (
    check_quantized_path,
    check_scalar_bits,
    decode_rows,
    dequantize,
    dither,
    dither_seed,
    encode_row,
    levels_of,
    pack_levels,
    quantize,
    requantize_rows,
    row_bytes,
    unpack_levels,
)

BITS = (8, 4, 2)
COMMITMENT = hashlib.sha256(b"test step").digest()


def _row(k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# -- pure-Python reference (ints and floats only) ------------------------------------------------

def _ref_word(seed: int, index: int) -> int:
    """word(s, e) of docs/PROTOCOL.md §3.2, on Python ints."""
    m = 0xFFFFFFFF
    k0, k1 = seed & m, seed >> 32
    lo, hi = index & m, index >> 32
    b = (lo * 0x9E3779B9) & m
    b ^= b >> 16
    x = ((b ^ k0) * 0x7FEB352D) & m
    x = x ^ (x >> 15) ^ k1 ^ ((hi * 0x85EBCA6B) & m)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _ref_levels(values: list[float], bits: int, commitment: bytes, rank: int) -> tuple[list[int], float]:
    seed = int.from_bytes(hashlib.sha256(commitment + b"holograd/dither" + rank.to_bytes(4, "little")).digest()[:8],
                          "little")
    top = 2 ** (bits - 1) - 1
    scale = max(abs(v) for v in values)
    delta = scale / top
    levels = [min(top, max(-top, math.floor(v / delta + _ref_word(seed, j) / 2**32))) for j, v in enumerate(values)]
    return levels, scale


def _ref_pack(levels: list[int], bits: int) -> bytes:
    per, top = 8 // bits, 2 ** (bits - 1) - 1
    out = bytearray(math.ceil(len(levels) * bits / 8))
    for j, q in enumerate(levels):
        out[j // per] |= (q + top) << (bits * (j % per))
    return bytes(out)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rank", [0, 3])
def test_vectorised_levels_and_bytes_match_the_python_reference(bits, rank):
    row = _row(11, seed=rank)
    values = [float(v) for v in row]  # float32 values, exact as Python floats
    u = dither(COMMITMENT, rank, 11)
    assert dither_seed(COMMITMENT, rank) == int.from_bytes(
        hashlib.sha256(COMMITMENT + b"holograd/dither" + rank.to_bytes(4, "little")).digest()[:8], "little")
    assert u.tolist() == [_ref_word(dither_seed(COMMITMENT, rank), j) / 2**32 for j in range(11)]
    levels, scale = quantize(row, bits, u)
    ref_levels, ref_scale = _ref_levels(values, bits, COMMITMENT, rank)
    assert levels.tolist() == ref_levels and scale == ref_scale
    wire = encode_row(row, 11, bits, u)
    assert bytes(wire.tolist()) == _ref_pack(ref_levels, bits) + torch.tensor([ref_scale]).numpy().astype("<f4").tobytes()


def test_dither_is_uniform_enough_and_differs_by_rank_and_step():
    """64k dither values: mean within 5 sd of 1/2 (sd of a uniform mean: sqrt(1/12/n))."""
    n = 1 << 16
    u = dither(COMMITMENT, 0, n)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert not torch.equal(u[:32], dither(COMMITMENT, 1, 32))
    assert not torch.equal(u[:32], dither(hashlib.sha256(b"other").digest(), 0, 32))


# -- packing and round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 3, 8, 13, 1001])
def test_pack_round_trip_with_extremes(bits, k):
    top = levels_of(bits)
    levels = torch.randint(-top, top + 1, (k,), generator=torch.Generator().manual_seed(k))
    levels[0] = top
    levels[-1] = -top
    packed = pack_levels(levels, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(k * bits / 8)
    assert torch.equal(unpack_levels(packed, k, bits), levels)
    assert torch.equal(unpack_levels(torch.stack([packed, packed]), k, bits), torch.stack([levels, levels]))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k, e", [(13, 0), (7, 3), (64, 4)])
def test_encode_decode_row(bits, k, e):
    row = _row(k + e, seed=k)
    row[1] = row[:k].abs().max() * 2  # the largest magnitude: q = +L exactly
    row[2] = -row[1]  # q = -L
    wire = encode_row(row, k, bits, dither(COMMITMENT, 0, k))
    assert wire.numel() == row_bytes(k, e, bits) == math.ceil(k * bits / 8) + 4 + 4 * e
    decoded = decode_rows(torch.stack([wire, wire]), k, e, bits)
    top = levels_of(bits)
    assert decoded.levels[0, 1] == top and decoded.levels[0, 2] == -top
    assert float(decoded.scales[0]) == float(row[1])
    assert decoded.matrix.dtype == torch.float32 and decoded.matrix.shape == (2, k + e)
    assert torch.equal(decoded.matrix[0, k:], row[k:])  # public values travel as float32
    assert float(decoded.matrix[0, 1]) == float(row[1]) and float(decoded.matrix[0, 2]) == float(row[2])
    # every decoded scalar lies within one quantum of the float value
    delta = float(row[1]) / top
    assert float((decoded.matrix[0, :k] - row[:k]).abs().max()) <= delta * (1 + 1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_zero_row_and_nonfinite_rows(bits):
    """M = 0 sends level 0 everywhere; a NaN or inf scalar sends M = NaN, so the K scalars
    decode to NaN (the aggregator drops the row), while public values stay as sent."""
    nan, inf = _row(9), _row(9)
    nan[4], inf[0] = float("nan"), float("inf")
    rows = torch.stack([encode_row(r, 9, bits, dither(COMMITMENT, i, 9)) for i, r in enumerate([torch.zeros(9), nan, inf])])
    decoded = decode_rows(rows, 9, 0, bits)
    assert torch.equal(decoded.matrix[0], torch.zeros(9)) and float(decoded.scales[0]) == 0.0
    assert torch.equal(decoded.levels, torch.zeros(3, 9, dtype=torch.int64))
    for r in (1, 2):
        assert bool(decoded.matrix[r].isnan().all()) and math.isnan(float(decoded.scales[r]))
    with_public = encode_row(torch.cat([nan, torch.tensor([1.5])]), 9, bits, dither(COMMITMENT, 1, 9))
    matrix = decode_rows(with_public.unsqueeze(0), 9, 1, bits).matrix
    assert bool(matrix[0, :9].isnan().all()) and float(matrix[0, 9]) == 1.5


def test_decode_refuses_rows_of_another_width():
    with pytest.raises(ValueError, match=r"not \(N, 12\) for K=7, E=1, scalar_bits=4.*HINT"):
        decode_rows(torch.zeros(2, 11, dtype=torch.uint8), 7, 1, 4)


def test_requantize_rows_uses_each_ranks_dither():
    rows = torch.stack([_row(16, 1), _row(16, 1)])  # the same values on two ranks
    matrix = requantize_rows(rows, COMMITMENT, 16, 4)
    assert not torch.equal(matrix[0], matrix[1])  # different dithers
    wire = encode_row(rows[1], 16, 4, dither(COMMITMENT, 1, 16))
    assert torch.equal(matrix[1], decode_rows(wire.unsqueeze(0), 16, 0, 4).matrix[0])


# -- unbiasedness ---------------------------------------------------------------------------------

N_DITHERS = 4000


def _within_unbiased_bound(mean: torch.Tensor, target: torch.Tensor, delta: float, n: int) -> bool:
    """One dequantized value is a_j + e with e in {-f Delta, (1 - f) Delta}, f = frac(a_j / Delta),
    P(e = (1 - f) Delta) = f: E[e] = 0 and Var(e) = Delta^2 f (1 - f) <= Delta^2 / 4. The mean of n
    independent draws has sd <= Delta / (2 sqrt(n)); allow 5 sd (a Gaussian exceeds it with
    probability 5.7e-7, times K = 64 coordinates: < 4e-5)."""
    return bool(((mean - target).abs() <= 5 * delta / (2 * math.sqrt(n))).all())


def _fixed_row(bits: int) -> tuple[torch.Tensor, float]:
    """a_j = (m_j + 0.3) Delta, one entry M = L Delta: round-to-nearest is off by 0.3 Delta."""
    top, delta = levels_of(bits), 0.25
    m = torch.arange(64) % (2 * top) - top  # integers in [-L, L - 1]
    row = ((m.to(torch.float64) + 0.3) * delta).to(torch.float32)
    row[0] = top * delta
    return row, delta


@pytest.mark.parametrize("bits", BITS)
def test_dequantized_values_are_unbiased(bits):
    row, delta = _fixed_row(bits)
    total = torch.zeros(64, dtype=torch.float64)
    for i in range(N_DITHERS):  # independent dithers: one per step commitment
        commitment = hashlib.sha256(i.to_bytes(4, "little")).digest()
        levels, scale = quantize(row, bits, dither(commitment, 0, 64))
        assert scale == float(row[0])
        total += dequantize(levels, torch.tensor(scale), bits).to(torch.float64)
    assert _within_unbiased_bound(total / N_DITHERS, row.to(torch.float64), delta, N_DITHERS)


@pytest.mark.parametrize("bits", BITS)
def test_the_bound_catches_round_to_nearest(bits):
    """A constant dither of 1/2 is deterministic round-to-nearest: biased by 0.3 Delta here,
    far above the bound 5 Delta / (2 sqrt(4000)) = 0.04 Delta."""
    row, delta = _fixed_row(bits)
    levels, scale = quantize(row, bits, torch.full((64,), 0.5, dtype=torch.float64))
    nearest = dequantize(levels, torch.tensor(scale), bits).to(torch.float64)
    assert not _within_unbiased_bound(nearest, row.to(torch.float64), delta, N_DITHERS)


# -- settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 1, 3, 16, 64, 4.0, "4", True, None])
def test_bad_scalar_bits_are_refused(bad):
    with pytest.raises(ValueError, match=r"scalar_bits=.* is not supported. HINT: choose one of 32, 8, 4, 2"):
        check_scalar_bits(bad)


@pytest.mark.parametrize("path", ["sharded", "all_reduce"])
def test_quantized_rows_need_the_all_gather_path(path):
    with pytest.raises(ValueError, match=rf"aggregation_path='{path}' with scalar_bits=4.*HINT: use "
                                         r"aggregation_path='all_gather'"):
        check_quantized_path(path, 4)
    assert check_quantized_path(path, 32) == 32
    assert check_quantized_path("auto", 2) == check_quantized_path("all_gather", 2) == 2


# -- one scale per block (scalar_block > 0) ----------------------------------------------

def test_block_scales_are_unbiased_and_keep_an_outlier_from_flattening_the_row():
    """K = 1024 Gaussian scalars with one outlier of 100 at 4 bits. Over 400 dithers the mean
    of the decoded row is a_j within 4 sigma of its standard error, and its per-coordinate
    mean squared error is at most Delta_j^2 / 4 (the bound of the module docstring) with
    a 15 % sampling margin. With one scale per row Delta = 100 / 7 everywhere; with blocks of
    256 the three blocks without the outlier get Delta ~ 3.5 / 7, so their error bound, and
    the measured error, fall by more than 100x."""
    from lightning_holograd.protocol.quantize import block_deltas, dequantize, num_blocks, quantize, row_bytes

    gen = torch.Generator().manual_seed(11)
    a = torch.randn(1024, generator=gen)
    a[700] = 100.0
    assert num_blocks(1024, 256) == 4 and row_bytes(1024, 0, 4, 256) == 512 + 16
    trials = 400
    for block in (0, 256):
        total = torch.zeros(1024, dtype=torch.float64)
        squared = torch.zeros(1024, dtype=torch.float64)
        for t in range(trials):
            u = torch.rand(1024, generator=gen, dtype=torch.float64)
            levels, scale = quantize(a, 4, u, block)
            scales = scale if block else torch.tensor(scale)
            value = dequantize(levels, scales, 4, block).to(torch.float64)
            total += value
            squared += (value - a.double()) ** 2
        delta = block_deltas(scales, 1024, 4, block) if block else torch.full((1024,), float(scale) / 7)
        mse = squared / trials
        bound = delta**2 / 4
        assert float(mse.mean()) <= 1.15 * float(bound.mean())
        stderr = torch.sqrt(bound / trials).clamp_min(1e-12)
        assert float(((total / trials - a.double()).abs() / stderr).max()) < 4.5
        if block == 0:
            row_mse = float(mse[:512].mean())
        else:
            assert float(mse[:512].mean()) < row_mse / 100  # blocks 0 and 1 hold no outlier


def test_scalar_block_argument_errors_name_the_value_and_the_fix():
    from lightning_holograd import HoloGradStrategy

    with pytest.raises(ValueError, match=r"scalar_block=-1 must be an integer >= 0.*HINT"):
        HoloGradStrategy(scalar_bits=4, scalar_block=-1)
    with pytest.raises(ValueError, match=r"scalar_block=256 needs quantized scalars, but scalar_bits=32.*HINT"):
        HoloGradStrategy(scalar_block=256)
    assert HoloGradStrategy(scalar_bits=4, scalar_block=256).config.scalar_block == 256

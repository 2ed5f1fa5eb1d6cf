"""Quantized scalars: b-bit levels with a public dither (docs/PROTOCOL.md §9.5).

Symbols: K direction scalars a (float32) and E public values per row, b = ``scalar_bits``
in {8, 4, 2} (32: no quantization), L = 2^(b-1) - 1 levels on each side of zero.

- Scale: M = max_j |a_j| (float32, exact). A row with a NaN or inf sends M = NaN.
  With ``scalar_block`` B > 0 the K scalars are cut into ceil(K / B) blocks of B (the
  last one shorter), each with its own M_b = max |a_j| over its block; a row with a NaN
  or inf sends M_b = NaN for every block. B = 0 (the default) is one block of K.
- Quantum: Delta = M / L in float64 (M = 0: every level is 0); with blocks, coordinate j
  uses its block's M_b.
- Dither: u_j = word(s, j) / 2^32 in [0, 1) (``direction_hash.hash_words``), with the seed
  s = uint64le(SHA256(c_t || "holograd/dither" || u32le(rank))[:8]): public, the same on
  every device, unknown before the step commitment c_t.
- Level: q_j = clamp(floor(a_j / Delta + u_j), -L, L) in float64; value q_j * Delta in float64,
  rounded to float32. Over u, E[q_j Delta] = a_j and Var <= Delta^2 / 4.
- Wire row (uint8): the K offsets q_j + L packed b bits each (8 // b per byte, the first
  in the lowest bits), the scales M_b as float32 little-endian bytes, in block order, then
  the E public values as float32 little-endian bytes: ceil(K b / 8) + 4 nb + 4E bytes,
  nb = ceil(K / B) blocks (1 when B = 0).
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass

import torch

from .direction_hash import hash_words

__all__ = [
    "SCALAR_BITS", "DecodedRows", "QuantizedClaim", "check_quantized_path", "check_scalar_bits",
    "block_deltas", "block_max", "check_scalar_block", "decode_rows", "num_blocks", "dequantize", "dither",
    "dither_seed",
    "encode_row", "levels_of", "pack_levels", "quantize", "requantize_row", "requantize_rows", "row_bytes",
    "unpack_levels"
]

SCALAR_BITS = (32, 8, 4, 2)  # 32: float32 scalars, no quantization
DITHER_TAG = b"holograd/dither"


def check_scalar_bits(bits: object) -> int:
    """``bits`` if it is one of ``SCALAR_BITS``; ValueError naming the fix otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SCALAR_BITS:
        raise ValueError(f"scalar_bits={bits!r} is not supported. HINT: choose one of "
                         f"{', '.join(map(str, SCALAR_BITS))} (32 sends float32 scalars; 4 sends 8x fewer bytes "
                         "per direction).")
    return bits


def check_scalar_block(block: object, bits: object = 4) -> int:
    """``block`` (coordinates per scale, 0: one scale per row) if it is an int >= 0 that
    ``bits`` can use; ValueError naming the fix otherwise."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"scalar_block={block!r} must be an integer >= 0 (scalars per scale; 0: one scale per row). "
                         "HINT: 256 sends one float32 scale per 256 scalars (+1.6 % bytes at 8 bits, +3 % at 4).")
    if block and bits == 32:
        raise ValueError(f"scalar_block={block} needs quantized scalars, but scalar_bits=32. HINT: set scalar_bits to "
                         "8, 4 or 2, or leave scalar_block at 0.")
    return block


def num_blocks(k: int, block: int) -> int:
    """nb = ceil(K / B) scales per row (1 when B = 0)."""
    return max(1, math.ceil(k / block)) if block else 1


def check_quantized_path(path: object, bits: object) -> int:
    """``bits`` if valid and ``path`` (an aggregation path) can carry rows of ``bits`` bits."""
    check_scalar_bits(bits)
    if bits != 32 and path in ("sharded", "all_reduce"):
        raise ValueError(f"aggregation_path={path!r} with scalar_bits={bits}: quantized rows each carry their own "
                         "scale, so an all_reduce cannot add them, and the sharded path does not quantize (future "
                         "work). HINT: use aggregation_path='all_gather' (or 'auto', which takes it with "
                         "scalar_bits < 32), or scalar_bits=32.")
    return int(bits)  # type: ignore[call-overload]


def levels_of(bits: int) -> int:
    """L = 2^(b-1) - 1: levels q lie in [-L, L]."""
    return (1 << (bits - 1)) - 1


def row_bytes(k: int, e: int, bits: int, block: int = 0) -> int:
    """Bytes of one rank's wire row: 4(K + E) at 32 bits, else ceil(K b / 8) + 4 nb + 4E."""
    return 4 * (k + e) if bits == 32 else math.ceil(k * bits / 8) + 4 * num_blocks(k, block) + 4 * e


def dither_seed(commitment: bytes, rank: int) -> int:
    """s = uint64le(SHA256(c_t || "holograd/dither" || u32le(rank))[:8])."""
    return int.from_bytes(hashlib.sha256(commitment + DITHER_TAG + rank.to_bytes(4, "little")).digest()[:8], "little")


def dither(commitment: bytes, rank: int, k: int) -> torch.Tensor:
    """u (K,) float64 in [0, 1): word(s, j) / 2^32 for j < K (exact in float64), on the CPU."""
    return hash_words([dither_seed(commitment, rank)], 0, k)[0].to(torch.float64) / float(1 << 32)


def quantize(a: torch.Tensor, bits: int, u: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(levels q (K,) int64, scale M) of the float32 row ``a`` (K,) with dither ``u`` (K,);
    with ``block`` B > 0 the scale is a float32 tensor (nb,) of the blocks' M_b. One scale
    per row is the case of one block of K."""
    a = a.detach().to("cpu", torch.float32)
    k = a.numel()
    scales = block_max(a.abs(), block or max(k, 1))  # float32, exact; NaN or inf where the block holds one
    levels = torch.zeros(a.shape, dtype=torch.int64)
    if not bool(torch.isfinite(scales).all()):  # a non-finite row: every scale NaN, every level 0
        scales.fill_(float("nan"))
    elif bool(scales.any()):
        # one scale: a (1,) quantum broadcast over the row, no per-coordinate copy
        delta = block_deltas(scales, k, bits, block) if block else scales.to(torch.float64) / levels_of(bits)
        zero = delta == 0  # a block of zeros sends level 0 everywhere
        top = levels_of(bits)
        x = a.to(torch.float64).div_(delta.masked_fill(zero, 1.0)).add_(u.to(torch.float64)).floor_().clamp_(-top, top)
        levels = x.masked_fill_(zero, 0.0).to(torch.int64)
    return (levels, scales) if block else (levels, float(scales[0]))


def block_max(x: torch.Tensor, block: int) -> torch.Tensor:
    """max over each block of ``block`` values of ``x`` (K,) >= 0: (ceil(K / B),), in x's dtype."""
    k = x.numel()
    nb = num_blocks(k, block)
    if nb * block != k:  # the last block is shorter: pad it with zeros
        x = torch.cat([x, x.new_zeros(nb * block - k)])
    return x.reshape(nb, block).amax(dim=1)


def block_deltas(scales: torch.Tensor, k: int, bits: int, block: int) -> torch.Tensor:
    """Delta_j = M_{b(j)} / L in float64 for each of the K coordinates (``scales`` (..., nb), B > 0)."""
    return (scales.to(torch.float64) / levels_of(bits)).repeat_interleave(block, dim=-1)[..., :k]


def dequantize(levels: torch.Tensor, scales: torch.Tensor, bits: int, block: int = 0) -> torch.Tensor:
    """q Delta as float32, Delta = M / L in float64; ``levels`` (..., K), ``scales`` (...,),
    or (..., nb) with ``block`` B > 0."""
    if block:
        return (levels.to(torch.float64) * block_deltas(scales, levels.shape[-1], bits, block)).to(torch.float32)
    delta = scales.to(torch.float64).unsqueeze(-1) / levels_of(bits)
    return (levels.to(torch.float64) * delta).to(torch.float32)


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (ceil(K b / 8),): offsets q + L, 8 // b per byte, the first in the lowest bits."""
    per = 8 // bits
    offsets = levels.to(torch.int64) + levels_of(bits)
    if per == 1:  # 8 bits: one offset per byte
        return offsets.to(torch.uint8)
    padded = torch.zeros(math.ceil(offsets.numel() / per) * per, dtype=torch.int64)
    padded[: offsets.numel()] = offsets
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (padded.reshape(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack_levels(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Levels (..., K) int64 from packed bytes (..., ceil(K b / 8)) (inverse of ``pack_levels``)."""
    per = 8 // bits
    if per == 1:  # 8 bits: one offset per byte
        return packed[..., :k].to(torch.int64) - levels_of(bits)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    fields = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :k] - levels_of(bits)


def _f32_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 little-endian bytes of ``values`` (uint8, 4 per value), on any host byte order."""
    raw = values.detach().to("cpu", torch.float32).reshape(-1).clone().view(torch.uint8)
    return raw if sys.byteorder == "little" else raw.reshape(-1, 4).flip(1).reshape(-1)


def _f32_values(columns: torch.Tensor) -> torch.Tensor:
    """(N, 4m) uint8 of float32 little-endian values -> (N, m) float32 (a fresh copy)."""
    raw = columns.reshape(-1).clone()
    if sys.byteorder != "little":
        raw = raw.reshape(-1, 4).flip(1).reshape(-1).clone()
    return raw.view(torch.float32).reshape(columns.shape[0], columns.shape[1] // 4)


def encode_row(row: torch.Tensor, k: int, bits: int, u: torch.Tensor, block: int = 0) -> torch.Tensor:
    """The uint8 wire row of ``row`` (K + E,): packed levels, the scales, the E public values."""
    levels, scale = quantize(row[:k], bits, u, block)
    scales = scale if isinstance(scale, torch.Tensor) else torch.tensor([scale], dtype=torch.float32)
    return torch.cat([pack_levels(levels, bits), _f32_bytes(scales), _f32_bytes(row[k:])])


@dataclass(frozen=True)
class QuantizedClaim:
    """What one rank submitted: levels (K,), scale M (a float; with ``block`` B > 0 a float32
    tensor (nb,) of the blocks' scales), its dither (K,), b, public values (E,)."""

    levels: torch.Tensor
    scale: float | torch.Tensor
    dither: torch.Tensor
    bits: int
    public: torch.Tensor
    block: int = 0


@dataclass(frozen=True)
class DecodedRows:
    """Every rank's decoded wire row: ``matrix`` (N, K + E) float32 (dequantized scalars, then
    the public values), ``levels`` (N, K) int64, ``scales`` (N,) float32, or (N, nb) with
    ``block`` B > 0."""

    matrix: torch.Tensor
    levels: torch.Tensor
    scales: torch.Tensor
    bits: int
    block: int = 0

    def claim(self, rank: int, commitment: bytes) -> QuantizedClaim:
        k = self.levels.shape[1]
        scale = self.scales[rank].clone() if self.block else float(self.scales[rank])
        return QuantizedClaim(self.levels[rank], scale, dither(commitment, rank, k), self.bits, self.matrix[rank, k:],
                              self.block)


def decode_rows(rows: torch.Tensor, k: int, e: int, bits: int, block: int = 0) -> DecodedRows:
    """Decode gathered wire rows (N, ``row_bytes(k, e, bits, block)``) uint8, on the CPU."""
    rows = rows.to("cpu", torch.uint8)
    size = row_bytes(k, e, bits, block)
    if rows.dim() != 2 or rows.shape[1] != size:
        raise ValueError(f"rows of shape {tuple(rows.shape)} are not (N, {size}) for K={k}, E={e}, "
                         f"scalar_bits={bits}, scalar_block={block}. HINT: every rank must run with the same "
                         "num_directions, scalar_bits and scalar_block.")
    packed, nb = math.ceil(k * bits / 8), num_blocks(k, block)
    levels = unpack_levels(rows[:, :packed], k, bits)
    scales = _f32_values(rows[:, packed: packed + 4 * nb])
    scales = scales if block else scales.reshape(-1)
    public = _f32_values(rows[:, packed + 4 * nb:]).reshape(rows.shape[0], e)
    return DecodedRows(torch.cat([dequantize(levels, scales, bits, block), public], dim=1), levels, scales, bits, block)


def requantize_row(row: torch.Tensor, commitment: bytes, rank: int, k: int, bits: int, block: int = 0) -> torch.Tensor:
    """The float (K + E,) row every rank decodes when ``rank`` submits ``row`` at step commitment ``commitment``."""
    wire = encode_row(row, k, bits, dither(commitment, rank, k), block)
    return decode_rows(wire.unsqueeze(0), k, row.numel() - k, bits, block).matrix[0]


def requantize_rows(rows: torch.Tensor, commitment: bytes, k: int, bits: int, block: int = 0) -> torch.Tensor:
    """The float (N, K + E) matrix every rank decodes when rank r submits ``rows[r]``."""
    return torch.stack([requantize_row(row, commitment, r, k, bits, block) for r, row in enumerate(rows)])

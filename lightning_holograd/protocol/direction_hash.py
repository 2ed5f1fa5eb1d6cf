"""Counter-based hash that defines every direction value (docs/PROTOCOL.md §3.2).

A direction's coordinate is a pure integer function of a 64-bit seed and an index, so
any device computes the same bits: a CPU verifier can check a GPU worker. This module
holds that function, vectorised with plain torch int64 ops, and the fixed Gaussian
table; ``directions.py`` builds the families on it.

Definition (DIRECTION_VERSION 2). All arithmetic is on unsigned 32-bit words, modulo
2^32; ``^`` is xor, ``>>`` a logical right shift. For a seed s (64-bit) and an index e
(0 <= e < 2^63 - 1, what an int64 arange can hold):

    k0 = s mod 2^32                 k1 = s >> 32
    lo = e mod 2^32                 hi = e >> 32
    b  = lo * 0x9E3779B9            b  = b ^ (b >> 16)        # base: key-independent
    x  = b ^ k0                     x  = x * 0x7FEB352D
    x  = x ^ (x >> 15) ^ k1 ^ (hi * 0x85EBCA6B)
    x  = x * 0x846CA68B             x  = x ^ (x >> 16)
    word(s, e) = x

No product overflows int64: every operand of a multiplication is a value in [0, 2^32)
and a constant stored as its signed 32-bit representative c' = c - 2^32 when c >= 2^31
(|c'| <= 2^31), so |product| < 2^63; (x * c') & 0xFFFFFFFF == (x * c) mod 2^32 because
torch int64 tensors are two's complement on every backend. Right shifts are applied only
to values in [0, 2^32), where torch's arithmetic shift equals the logical one.
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
from collections.abc import Sequence

import torch

__all__ = [
    "DIRECTION_VERSION",
    "ChunkBuffers",
    "GAUSSIAN_TABLE_BITS",
    "GAUSSIAN_TABLE_SHA256",
    "gaussian_table",
    "hash_words",
    "index_base",
    "keyed_words",
    "seed_keys",
    "sign_table",
]

DIRECTION_VERSION = 2  # 1: torch.Generator per coordinate block (0.1.x; directions_v1, resume only)

MASK32 = 0xFFFFFFFF
WEYL = 0x9E3779B9  # floor(2^32 / golden ratio): spreads consecutive indices
MUL1 = 0x7FEB352D  # the two multipliers of a well-tested 32-bit finaliser (xor-shift 16/15/16)
MUL2 = 0x846CA68B
MUL_HI = 0x85EBCA6B  # folds index bits >= 32 into the second key word
GAUSSIAN_TABLE_BITS = 16
# SHA-256 of the table as little-endian float32 bytes: pins it independently of the platform.
GAUSSIAN_TABLE_SHA256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"


def _signed(constant: int) -> int:
    """The signed 32-bit representative of a 32-bit constant (same residue mod 2^32)."""
    return constant - (1 << 32) if constant >= 1 << 31 else constant


_WEYL_S, _MUL1_S, _MUL2_S, _MUL_HI_S = (_signed(c) for c in (WEYL, MUL1, MUL2, MUL_HI))


def seed_keys(seeds: Sequence[int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k0, k1), each (len(seeds), 1) int64: the low and high 32-bit words of each seed."""
    for seed in seeds:
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed={seed!r} must be an unsigned 64-bit integer. HINT: use chain.direction_seeds.")
    k0 = torch.tensor([s & MASK32 for s in seeds], dtype=torch.int64, device=device).unsqueeze(1)
    k1 = torch.tensor([s >> 32 for s in seeds], dtype=torch.int64, device=device).unsqueeze(1)
    return k0, k1


def index_base(
    start: int,
    stop: int,
    device: torch.device | str,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Key-independent part for indices [start, stop): (b (n,), hi term (n,) or None).

    The hi term is (hi * MUL_HI) mod 2^32, needed only where an index is >= 2^32. ``out``
    and ``scratch`` ((n,) int64, optional) are reused instead of allocating: fresh memory
    chunk after chunk costs page faults on a CPU.
    """
    index = torch.arange(start, stop, dtype=torch.int64, device=device, out=out)
    hi_term = None
    if stop > 1 << 32:
        hi_term = (index >> 32).mul_(_MUL_HI_S).bitwise_and_(MASK32)
        index.bitwise_and_(MASK32)
    base = index.mul_(_WEYL_S).bitwise_and_(MASK32)
    return base.bitwise_xor_(torch.bitwise_right_shift(base, 16, out=scratch)), hi_term


def keyed_words(
    base: torch.Tensor,
    hi_term: torch.Tensor | None,
    k0: torch.Tensor,
    k1: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """word(s, e) for every key (rows) and index (columns): (len(k0), n) int64 in [0, 2^32).

    ``out`` and ``scratch`` ((len(k0), n) int64, optional) are reused instead of allocating.
    """
    x = torch.bitwise_xor(base, k0, out=out)  # (G, n)
    tmp = torch.empty_like(x) if scratch is None else scratch
    x.mul_(_MUL1_S).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp)).bitwise_xor_(k1)
    if hi_term is not None:
        x.bitwise_xor_(hi_term)
    x.mul_(_MUL2_S).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def hash_words(seeds: Sequence[int], start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """word(s, e) for each seed and e in [start, stop): (len(seeds), stop - start) int64."""
    if not 0 <= start <= stop < 1 << 63:
        raise ValueError(f"index range [{start}, {stop}) must lie in [0, 2^63 - 1).")
    base, hi_term = index_base(start, stop, device)
    k0, k1 = seed_keys(seeds, device)
    return keyed_words(base, hi_term, k0, k1)


class ChunkBuffers:
    """Flat buffers reused chunk after chunk: views of the requested shape.

    Fresh CPU memory for every chunk would cost page faults (a third of the sketch's time).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        size = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < size:
            flat = self._flat[name] = torch.empty(size, dtype=dtype, device=self.device)
        return flat[:size].view(shape)

    def words(self, keys: tuple[torch.Tensor, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """word(s, e) for each key (``seed_keys``) and e in [start, stop): (G, n) int64."""
        rows, n = keys[0].shape[0], stop - start
        base, hi_term = index_base(start, stop, self.device, self.get("base", n), self.get("scratch", n))
        return keyed_words(base, hi_term, *keys, out=self.get("words", rows, n), scratch=self.get("scratch", rows, n))


@functools.cache
def _sign_table_cpu(bits: int) -> torch.Tensor:
    values = torch.arange(1 << bits).unsqueeze(1)
    return (1 - 2 * ((values >> torch.arange(bits)) & 1)).to(torch.float64)  # (2^bits, bits)


def sign_table(bits: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2^bits, bits) table: entry [v, i] = 1 - 2 * (bit i of v), i.e. +1 for a 0 bit."""
    return _sign_table_cpu(bits).to(device=device, dtype=dtype)


@functools.cache
def _gaussian_table_cpu() -> torch.Tensor:
    """The 2^16 equiprobable atoms of the Gaussian family (see ``gaussian_table``)."""
    size = 1 << GAUSSIAN_TABLE_BITS
    half = [statistics.NormalDist().inv_cdf((2 * i + 1) / (2 * size)) for i in range(size // 2)]
    atoms = half + [-q for q in reversed(half)]  # exactly antisymmetric: mean 0
    scale = math.sqrt(math.fsum(q * q for q in atoms) / size)
    table = torch.tensor([q / scale for q in atoms], dtype=torch.float64).to(torch.float32)
    digest = hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest()
    if digest != GAUSSIAN_TABLE_SHA256:
        raise RuntimeError(
            f"the Gaussian direction table built on this platform has SHA-256 {digest}, expected "
            f"{GAUSSIAN_TABLE_SHA256}: its directions would differ from every other rank's. HINT: this "
            "Python's statistics.NormalDist.inv_cdf rounds differently; report the platform and Python version."
        )
    return table


def gaussian_table(device: torch.device | str) -> torch.Tensor:
    """(2^16,) float32: atom i is Phi^-1((2i + 1) / 2^17) divided by the atoms' RMS.

    Phi^-1 is the standard normal quantile (Python's statistics.NormalDist.inv_cdf, in
    float64; atoms i >= 2^15 are the exact negatives of atoms 2^16 - 1 - i), the division
    by sqrt(sum(q_i^2) / 2^16) makes the variance 1, and each atom is rounded to float32.
    So a coordinate drawn from it has mean exactly 0 and variance 1 to float32 rounding.
    """
    return _gaussian_table_cpu().to(device)

"""Direction definition 1 (lightning-holograd 0.1.x), only to resume its checkpoints.

docs/PROTOCOL.md §3.8 defines it. New runs always use version 2 (``directions``); a
checkpoint written by 0.1.x (family state without ``direction_version``) resumes with
these families, which give bitwise the values 0.1.x gave on the same device type and
torch version, so the run continues as 0.1.x would have continued it.

Coordinates are split into blocks of ``block_size`` (part of the definition, recorded in
the checkpoint); block b of the direction with seed s is drawn by a ``torch.Generator`` on
the computing device seeded with ``block_seed(s, b)``. ``chunk_size`` (a multiple of
``block_size``; 0.1.x's default 32768) sets how many coordinates are drawn at once. It
does not change a value, but the dense families' ``project`` sums chunk by chunk, so a
bitwise-exact continuation needs the chunk size the run used, as in 0.1.x.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .directions import DirectionFamily, IdentityDirections, _check_positive, synthesized_direction
from .direction_versions import VERSION_1_FAMILIES, check_resumable

__all__ = ["V1_BLOCK_SIZE", "V1_CHUNK_SIZE", "block_seed", "make_family_v1"]

V1_BLOCK_SIZE = 8192  # 0.1.x's default block_size
V1_CHUNK_SIZE = 32768  # 0.1.x's default chunk_size
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def block_seed(seed: int, block: int) -> int:
    """Seed of block ``block`` of the direction whose seed is ``seed``."""
    return _splitmix64((seed + (block + 1) * _GOLDEN) & _MASK64)


class _BlockGenerated(DirectionFamily):
    """Block and chunk machinery shared by the version-1 families drawn from generators."""

    direction_version: ClassVar[int] = 1

    def __init__(self, dim: int, num_directions: int, block_size: int = V1_BLOCK_SIZE,
                 chunk_size: int | None = None) -> None:
        super().__init__(dim, num_directions)
        _check_positive("block_size", block_size)
        if block_size % 8:
            raise ValueError(f"block_size={block_size} must be a multiple of 8.")
        if chunk_size is None:  # 0.1.x's default, rounded up to whole blocks
            chunk_size = -(-V1_CHUNK_SIZE // block_size) * block_size
        _check_positive("chunk_size", chunk_size)
        if chunk_size % block_size:
            raise ValueError(
                f"chunk_size={chunk_size} must be a multiple of block_size={block_size} for a version-1 "
                f"(lightning-holograd 0.1.x) run. HINT: use the chunk_size the run used (0.1.x's default: "
                f"{V1_CHUNK_SIZE}), or chunk_size={max(1, chunk_size // block_size) * block_size}."
            )
        self.block_size = block_size
        self.chunk_size = chunk_size
        self._generators: dict[str, torch.Generator] = {}
        self._sign_tables: dict[str, torch.Tensor] = {}

    def _chunks(self) -> range:
        return range(0, self.dim, self.chunk_size)

    def _drawn_width(self, start: int) -> int:
        """Coordinates drawn for the chunk at ``start``: whole blocks covering [start, dim)."""
        needed = min(self.chunk_size, self.dim - start)
        return -(-needed // self.block_size) * self.block_size

    def _seeded(self, seed: int, block: int, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        gen = self._generators[key]
        gen.manual_seed(block_seed(seed, block))
        return gen

    def _random_signs(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Fill ``out`` (length a multiple of 8) with +-1, 8 signs per random byte: bit i
        of byte k gives sign 8k + i, +1 for a 1 bit and -1 for a 0 bit."""
        key = str(out.device)
        if key not in self._sign_tables:
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
            self._sign_tables[key] = (bits * 2 - 1).to(device=out.device, dtype=torch.float32)
        raw = torch.empty(out.numel() // 8, dtype=torch.uint8, device=out.device)
        raw.random_(0, 256, generator=gen)
        torch.index_select(self._sign_tables[key], 0, raw.long(), out=out.view(-1, 8))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "block_size": self.block_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state["block_size"] != self.block_size:
            raise ValueError(
                f"checkpoint block_size={state['block_size']} differs from block_size={self.block_size}: "
                "the directions would change. HINT: build the family with the checkpoint's block_size."
            )


class _DenseFamily(_BlockGenerated):
    """v_j = z_j with i.i.d. unit-variance entries; g_hat = (1/K) sum_j a_j z_j (unbiased)."""

    unbiased = True

    @abc.abstractmethod
    def _fill_block(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Fill ``out`` (block_size,) with one block of i.i.d. unit-variance entries."""

    def _fill_rows(self, buf: torch.Tensor, seeds: Sequence[int], start: int) -> None:
        """buf (len(seeds), chunk_size) <- coordinates [start, start + chunk) of each direction."""
        first_block = start // self.block_size
        for row, seed in enumerate(seeds):
            for offset in range(0, self._drawn_width(start), self.block_size):
                gen = self._seeded(seed, first_block + offset // self.block_size, buf.device)
                self._fill_block(buf[row, offset : offset + self.block_size], gen)

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        seeds = self._check_seeds(seeds)
        scalars = torch.zeros(len(seeds), dtype=torch.float32, device=grad.device)
        buf = torch.empty(len(seeds), self.chunk_size, dtype=torch.float32, device=grad.device)  # (K, chunk)
        for start in self._chunks():
            part = grad[start : start + self.chunk_size]
            self._fill_rows(buf, seeds, start)
            scalars += buf[:, : part.numel()] @ part
        return scalars

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        scalars = self._check_scalars(scalars)
        seeds = self._check_seeds(seeds)
        weights = scalars / self.num_directions
        out = torch.empty(self.dim, dtype=torch.float32, device=scalars.device)
        buf = torch.empty(len(seeds), self.chunk_size, dtype=torch.float32, device=scalars.device)
        for start in self._chunks():
            part = out[start : start + self.chunk_size]
            self._fill_rows(buf, seeds, start)
            torch.mv(buf[:, : part.numel()].t(), weights, out=part)
        return out

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        seeds = self._check_seeds(seeds)
        self._check_index(index)
        out = torch.empty(self.dim, dtype=torch.float32, device=device)
        buf = torch.empty(1, self.chunk_size, dtype=torch.float32, device=device)
        for start in self._chunks():
            part = out[start : start + self.chunk_size]
            self._fill_rows(buf, seeds[index : index + 1], start)
            part.copy_(buf[0, : part.numel()])
        return out


class GaussianDirectionsV1(_DenseFamily):
    """Version 1: block b of z_j is ``normal_`` from a generator seeded with block_seed(s_j, b)."""

    name = "gaussian"

    def _fill_block(self, out: torch.Tensor, gen: torch.Generator) -> None:
        out.normal_(generator=gen)


class RademacherDirectionsV1(_DenseFamily):
    """Version 1: block b of z_j is block_size / 8 random bytes, 8 signs per byte."""

    name = "rademacher"

    def _fill_block(self, out: torch.Tensor, gen: torch.Generator) -> None:
        self._random_signs(out, gen)


class SketchDirectionsV1(_BlockGenerated):
    """Version 1 count sketch: per block, buckets ``random_(0, K)`` then signs from the same generator."""

    name = "sketch"
    unbiased = True

    @property
    def num_seeds(self) -> int:
        return 1

    def _hash_chunk(self, seed: int, start: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (int64) and signs (float32) for coordinates [start, start + chunk)."""
        buckets = torch.empty(self.chunk_size, dtype=torch.int64, device=device)
        signs = torch.empty(self.chunk_size, dtype=torch.float32, device=device)
        first_block = start // self.block_size
        for offset in range(0, self._drawn_width(start), self.block_size):
            gen = self._seeded(seed, first_block + offset // self.block_size, device)
            buckets[offset : offset + self.block_size].random_(0, self.num_directions, generator=gen)
            self._random_signs(signs[offset : offset + self.block_size], gen)
        return buckets, signs

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        (seed,) = self._check_seeds(seeds)
        scalars = torch.zeros(self.num_directions, dtype=torch.float32, device=grad.device)
        for start in self._chunks():
            part = grad[start : start + self.chunk_size]
            buckets, signs = self._hash_chunk(seed, start, grad.device)
            n = part.numel()
            scalars.index_add_(0, buckets[:n], signs[:n] * part)
        return scalars

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        scalars = self._check_scalars(scalars)
        (seed,) = self._check_seeds(seeds)
        out = torch.empty(self.dim, dtype=torch.float32, device=scalars.device)
        for start in self._chunks():
            part = out[start : start + self.chunk_size]
            buckets, signs = self._hash_chunk(seed, start, scalars.device)
            n = part.numel()
            torch.mul(signs[:n], scalars[buckets[:n]], out=part)
        return out

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return synthesized_direction(self, seeds, index, device)


class IdentityDirectionsV1(IdentityDirections):
    """The identity family uses no seeds, so its values are the same in both versions; this
    class only keeps a resumed 0.1.x run (and its chain) on version 1."""

    direction_version: ClassVar[int] = 1


_V1_CLASSES: dict[str, type[_BlockGenerated]] = {
    cls.name: cls for cls in (GaussianDirectionsV1, RademacherDirectionsV1, SketchDirectionsV1)
}


def make_family_v1(name: str, dim: int, num_directions: int, *, block_size: int | None = None,
                   chunk_size: int | None = None) -> DirectionFamily:
    """Version-1 family ``name`` (one of ``VERSION_1_FAMILIES``), as lightning-holograd 0.1.x built it.

    ``block_size`` defaults to 0.1.x's 8192 and ``chunk_size`` to 0.1.x's 32768 (rounded up
    to whole blocks); the identity family takes neither.
    """
    check_resumable(name, 1)
    if name == "identity":
        return IdentityDirectionsV1(dim, num_directions)
    assert name in VERSION_1_FAMILIES
    return _V1_CLASSES[name](dim, num_directions, V1_BLOCK_SIZE if block_size is None else block_size, chunk_size)

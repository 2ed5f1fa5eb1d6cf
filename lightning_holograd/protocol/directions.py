"""Seed-generated direction families (PROTOCOL.md section 3).

Symbols: D is the number of gradient coordinates (``dim``), K the number of
directions per step (``num_directions``), a (K,) the scalars a_j = <g, v_j>.

Every family maps a flat float32 gradient g (D,) to scalars with ``project`` and
scalars back to an estimate g_hat (D,) with ``synthesize``. Random directions are
never stored as a K x D matrix: they are regenerated, ``chunk_size`` coordinates at a
time, on the gradient's device, from dedicated ``torch.Generator`` objects.

How a direction is defined (so that any chunk size gives bitwise the same values):
coordinates are split into blocks of ``block_size``; block b of direction j is drawn
by a generator seeded with ``splitmix64(s_j + (b + 1) * 0x9E3779B97F4A7C15)``, where
s_j is the direction's 64-bit seed (chain.direction_seeds). ``block_size`` is part of
the definition: all ranks and verifiers must use the same value. ``chunk_size`` (a
multiple of it) only sets how much is materialised at once.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

__all__ = [
    "DirectionFamily",
    "GaussianDirections",
    "RademacherDirections",
    "SketchDirections",
    "IdentityDirections",
    "block_seed",
]

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
DEFAULT_BLOCK_SIZE = 8192
DEFAULT_CHUNK_SIZE = 32768


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def block_seed(seed: int, block: int) -> int:
    """Seed of block ``block`` of the direction whose seed is ``seed``."""
    return _splitmix64((seed + (block + 1) * _GOLDEN) & _MASK64)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


class DirectionFamily(abc.ABC):
    """A rule turning K seeds into K directions in R^D, with projection and synthesis.

    Call contract: pure functions of (gradient, seeds) except ``update`` and
    ``observe_gradient``, which advance the family's shared state; every rank must call
    those with the same arguments in the same order so the state stays identical.
    """

    name: ClassVar[str]
    unbiased: ClassVar[bool]  # E[synthesize(project(g))] == g over the seeds

    def __init__(self, dim: int, num_directions: int) -> None:
        _check_positive("dim", dim)
        _check_positive("num_directions", num_directions)
        self.dim = dim
        self.num_directions = num_directions

    @property
    def num_seeds(self) -> int:
        """How many 64-bit seeds one step consumes."""
        return self.num_directions

    @abc.abstractmethod
    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Scalars a_j = <g, v_j>; returns (K,) float32 on the gradient's device."""

    @abc.abstractmethod
    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Estimate g_hat (D,) float32 from the (K,) scalars."""

    @abc.abstractmethod
    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Materialise direction ``index`` as a (D,) tensor (for tests and verifiers)."""

    def update(self, scalars: torch.Tensor, seeds: Sequence[int]) -> None:
        """Advance shared state with this step's aggregated scalars (stateless: no-op)."""

    def observe_gradient(self, true_grad: torch.Tensor) -> None:
        """Feed a true (all-reduced) gradient, e.g. on bootstrap steps (stateless: no-op)."""

    def reconstruct(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """g_hat for this step, then ``update``: what every rank calls once per step."""
        estimate = self.synthesize(scalars, seeds)
        self.update(scalars, seeds)
        return estimate

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "num_directions": self.num_directions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("name", "dim", "num_directions"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint direction family has {key}={state[key]!r}, this run has "
                    f"{key}={getattr(self, key)!r}. HINT: resume with the same strategy settings and model."
                )

    # -- argument checks shared by every family ---------------------------------------
    def _check_grad(self, flat_grad: torch.Tensor) -> torch.Tensor:
        if flat_grad.dim() != 1 or flat_grad.numel() != self.dim:
            raise ValueError(
                f"flat_grad has shape {tuple(flat_grad.shape)}, expected ({self.dim},). "
                "HINT: the family's dim must equal the number of trainable parameters."
            )
        return flat_grad.to(torch.float32)

    def _check_seeds(self, seeds: Sequence[int]) -> list[int]:
        seeds = [int(s) for s in seeds]
        if len(seeds) != self.num_seeds:
            raise ValueError(f"got {len(seeds)} seeds, {self.name} needs {self.num_seeds}.")
        return seeds

    def _check_scalars(self, scalars: torch.Tensor) -> torch.Tensor:
        if scalars.shape != (self.num_directions,):
            raise ValueError(f"scalars has shape {tuple(scalars.shape)}, expected ({self.num_directions},).")
        return scalars.to(torch.float32)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_directions:
            raise IndexError(f"index={index} out of range [0, {self.num_directions}).")


class _BlockGenerated(DirectionFamily):
    """Shared block/chunk machinery for families drawn from seeded generators."""

    def __init__(
        self,
        dim: int,
        num_directions: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(dim, num_directions)
        _check_positive("block_size", block_size)
        _check_positive("chunk_size", chunk_size)
        if block_size % 8:
            raise ValueError(f"block_size={block_size} must be a multiple of 8.")
        if chunk_size % block_size:
            raise ValueError(
                f"chunk_size={chunk_size} must be a multiple of block_size={block_size}. "
                f"HINT: use chunk_size={max(1, chunk_size // block_size) * block_size}."
            )
        self.block_size = block_size
        self.chunk_size = chunk_size
        self._generators: dict[str, torch.Generator] = {}
        self._sign_tables: dict[str, torch.Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    def _chunks(self) -> range:
        return range(0, self.dim, self.chunk_size)

    def _drawn_width(self, start: int) -> int:
        """Coordinates drawn for the chunk at ``start``: whole blocks covering [start, dim)."""
        needed = min(self.chunk_size, self.dim - start)
        return -(-needed // self.block_size) * self.block_size

    def _seeded(self, seed: int, block: int, device: torch.device) -> torch.Generator:
        gen = self._generator(device)
        gen.manual_seed(block_seed(seed, block))
        return gen

    def _random_signs(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Fill ``out`` (length multiple of 8) with +-1 from random bytes, 8 signs per byte.

        Bit i of byte k gives sign k*8 + i (1 -> +1, 0 -> -1), read from a 256 x 8 table.
        """
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
                "the directions would change. HINT: resume with the same block_size."
            )


class _DenseFamily(_BlockGenerated):
    """v_j = z_j with i.i.d. unit-variance entries; g_hat = (1/K) sum_j a_j z_j (unbiased)."""

    unbiased = True

    @abc.abstractmethod
    def _fill_block(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Fill ``out`` (block_size,) with one block of i.i.d. unit-variance entries."""

    def _fill_rows(self, buf: torch.Tensor, seeds: Sequence[int], start: int) -> None:
        """buf (len(seeds), chunk_size) <- coordinates [start, start + chunk) of each direction.

        Only the blocks that overlap [start, dim) are drawn (a short last chunk is cheap).
        """
        first_block = start // self.block_size
        width = self._drawn_width(start)
        for row, seed in enumerate(seeds):
            for offset in range(0, width, self.block_size):
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


class GaussianDirections(_DenseFamily):
    """z_j ~ N(0, I_D). E||g_hat - g||^2 = ((D + 1) / K) ||g||^2 (paper-faithful)."""

    name = "gaussian"

    def _fill_block(self, out: torch.Tensor, gen: torch.Generator) -> None:
        out.normal_(generator=gen)


class RademacherDirections(_DenseFamily):
    """z_j uniform on {-1, +1}^D. E||g_hat - g||^2 = ((D - 1) / K) ||g||^2; cheaper to draw."""

    name = "rademacher"

    def _fill_block(self, out: torch.Tensor, gen: torch.Generator) -> None:
        self._random_signs(out, gen)


class SketchDirections(_BlockGenerated):
    """Count sketch: coordinate d goes to bucket h(d) in [0, K) with sign s(d).

    Direction j is the signed indicator of bucket j; a_j = sum_{h(d)=j} s(d) g_d and
    g_hat_d = s(d) a_{h(d)}. Unbiased (signs are independent across coordinates),
    E||g_hat - g||^2 = ~(D - 1)/K ||g||^2 for a uniform hash, at O(D) cost for any K.
    One seed per step (the first direction seed) defines h and s.
    """

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
        (seed,) = self._check_seeds(seeds)
        self._check_index(index)
        onehot = torch.zeros(self.num_directions, dtype=torch.float32, device=device)
        onehot[index] = 1.0
        return self.synthesize(onehot, [seed])


class IdentityDirections(DirectionFamily):
    """Debug family: v_j = e_j, K = D. Exact (g_hat = g); proves the wiring end to end."""

    name = "identity"
    unbiased = True

    def __init__(self, dim: int, num_directions: int | None = None) -> None:
        if num_directions is not None and num_directions != dim:
            raise ValueError(
                f"num_directions={num_directions} must equal dim={dim} for the identity family. "
                "HINT: leave num_directions unset."
            )
        super().__init__(dim, dim)

    @property
    def num_seeds(self) -> int:
        return 0

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        self._check_seeds(seeds)
        return self._check_grad(flat_grad).clone()

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        self._check_seeds(seeds)
        return self._check_scalars(scalars).clone()

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        self._check_index(index)
        out = torch.zeros(self.dim, dtype=torch.float32, device=device)
        out[index] = 1.0
        return out

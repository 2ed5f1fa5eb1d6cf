"""Seed-generated direction families (docs/PROTOCOL.md §3).

Symbols: D is the number of gradient coordinates (``dim``), K the number of
directions per step (``num_directions``), a (K,) the scalars a_j = <g, v_j>.

Every family maps a flat float32 gradient g (D,) to scalars with ``project`` and
scalars back to an estimate g_hat (D,) with ``synthesize``. Random directions are
never stored as a K x D matrix: they are regenerated chunk by chunk, on the gradient's
device, with no Python loop per coordinate block.

How a direction is defined (DIRECTION_VERSION 2; docs/PROTOCOL.md §3 has every
constant): each value is a pure integer function of a 64-bit seed and an index,
``word(s, e)`` in ``direction_hash``, so the bits are the same on every device and for
every chunk size.
- sketch (one seed s; ``sketch.py``): coordinate d has bucket ((word(s, d) >> 1) * K) >> 31
  and sign +1 if bit 0 of word(s, d) is 0, else -1.
- rademacher (one seed per 32 directions): direction j is +1 at coordinate d if bit
  (j mod 32) of word(s_{floor(j/32)}, d) is 0, else -1.
- gaussian (one seed per direction): coordinate d of direction j is the Gaussian table's
  atom at the 16-bit half (low for even d, high for odd d) of word(s_j, floor(d/2)).
``chunk_size`` (optional) caps how many coordinates are materialised at once; it never
changes a value. ``kernel`` ("auto", "eager", "compiled"; None: the environment's choice)
picks plain torch ops or fused compiled kernels (``direction_kernels``): the same bits.
There are no blocks (version 1's generator blocks live in
``directions_v1``, used only to resume lightning-holograd 0.1.x checkpoints).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from .direction_hash import DIRECTION_VERSION, ChunkBuffers, gaussian_table, seed_keys, sign_table
from .direction_kernels import CompiledKernels, check_kernel, compiled_kernels, resolve_kernel
from .direction_versions import stored_direction_version, version_mismatch

__all__ = [
    "DIRECTION_VERSION",
    "DirectionFamily",
    "GaussianDirections",
    "RademacherDirections",
    "IdentityDirections",
]

DEFAULT_CHUNK_SIZE = None  # no cap beyond the device's working set
_GRANULE = 64  # chunk boundaries are multiples of this (even: Gaussian pairs never split)
# Cap on a chunk's largest temporary, in elements, by device type: a few L2 caches on a
# CPU (measured fastest), large on an accelerator so that kernel launches stay few
# (2^23 int64 elements = 64 MiB per temporary, a few alive at once).
_WORK_ELEMENTS = {"cpu": 1 << 18}
_WORK_ELEMENTS_ACCELERATOR = 1 << 23
_WORK_ELEMENTS_FUSED = 1 << 20  # fused kernels keep no temporaries but their outputs (measured faster on a CPU)
_Keys = tuple[torch.Tensor, torch.Tensor]  # (k0, k1) from seed_keys


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


class DirectionFamily(abc.ABC):
    """A rule turning seeds into K directions in R^D, with projection and synthesis.

    Call contract: pure functions of (gradient, seeds) except ``update`` and
    ``observe_gradient``, which advance the family's shared state; every rank must call
    those with the same arguments in the same order so the state stays identical.
    """

    name: ClassVar[str]
    unbiased: ClassVar[bool]  # E[synthesize(project(g))] == g over the seeds
    direction_version: ClassVar[int] = DIRECTION_VERSION  # 1 only for directions_v1's families

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
        return {
            "name": self.name,
            "dim": self.dim,
            "num_directions": self.num_directions,
            "direction_version": self.direction_version,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if stored_direction_version(state) != self.direction_version:
            raise ValueError(version_mismatch(state, self.direction_version))
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


def synthesized_direction(family: DirectionFamily, seeds: Sequence[int], index: int,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """v_index of a one-seed family, as the synthesis of the one-hot scalar vector e_index
    (for families whose directions exist only through ``synthesize``, e.g. the sketch)."""
    (seed,) = family._check_seeds(seeds)
    family._check_index(index)
    onehot = torch.zeros(family.num_directions, dtype=torch.float32, device=device)
    onehot[index] = 1.0
    return family.synthesize(onehot, [seed])


class _HashedFamily(DirectionFamily):
    """Shared chunking for families whose values come from ``direction_hash``."""

    def __init__(
        self,
        dim: int,
        num_directions: int,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel: str | None = None,
    ) -> None:
        super().__init__(dim, num_directions)
        if chunk_size is not None:
            _check_positive("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.kernel = check_kernel(kernel)
        self._compiled_on: dict[str, bool] = {}  # device type -> kernel resolved to "compiled"
        self._tables: dict[tuple[str, str], torch.Tensor] = {}
        self._cpu_buffers: ChunkBuffers | None = None

    def _chunks(self, per_coordinate: int, device: torch.device, fused: object = None) -> Iterator[tuple[int, int]]:
        """[start, stop) ranges covering [0, D): as many coordinates as keep ``per_coordinate``
        temporaries per coordinate within the device's working set (the larger fused one when
        ``fused`` kernels are given), at most ``chunk_size`` (None: no cap), rounded up to a
        multiple of 64."""
        work = _WORK_ELEMENTS.get(device.type, _WORK_ELEMENTS_ACCELERATOR)
        work = max(work, _WORK_ELEMENTS_FUSED) if fused is not None else work
        size = max(_GRANULE, work // max(1, per_coordinate))
        if self.chunk_size is not None:
            size = min(size, self.chunk_size)
        size = -(-size // _GRANULE) * _GRANULE
        for start in range(0, self.dim, size):
            yield start, min(start + size, self.dim)

    def _buffers(self, device: torch.device) -> ChunkBuffers:
        """Chunk buffers: kept across calls on a CPU (fresh pages cost page faults there, a
        few MiB at most), new per call elsewhere (a caching allocator reuses the memory).
        So one family instance must not run two calls at once from two threads."""
        if device.type != "cpu":
            return ChunkBuffers(device)
        if self._cpu_buffers is None:
            self._cpu_buffers = ChunkBuffers(device)
        return self._cpu_buffers

    def _fused(self, device: torch.device) -> CompiledKernels | None:
        """The compiled kernels if ``kernel`` resolves to "compiled" on ``device`` (decided
        once per device type), else None: the eager path."""
        if device.type not in self._compiled_on:
            self._compiled_on[device.type] = resolve_kernel(self.kernel, device, self.dim) == "compiled"
        return compiled_kernels(device.type) if self._compiled_on[device.type] else None

    def _table(self, kind: str, device: torch.device) -> torch.Tensor:
        """A constant table on ``device``, moved there once."""
        key = (kind, str(device))
        if key not in self._tables:
            self._tables[key] = gaussian_table(device) if kind == "gaussian" else sign_table(8, device)
        return self._tables[key]


class GaussianDirections(_HashedFamily):
    """v_j = z_j, i.i.d. entries from the 2^16-atom Gaussian table (mean 0, variance 1).

    g_hat = (1/K) sum_j a_j z_j, unbiased; E||g_hat - g||^2 = ((D + m4 - 2)/K) ||g||^2 with
    m4 = 2.99925 the table's fourth moment (a true Gaussian has m4 = 3: (D + 1)/K).
    """

    name = "gaussian"
    unbiased = True

    def _values(self, keys: _Keys, start: int, stop: int, buf: ChunkBuffers) -> torch.Tensor:
        """(2, R, w) float32: [0] at even coordinates start, start + 2, ..., [1] at odd ones."""
        words = buf.words(keys, start // 2, (stop + 1) // 2)  # (R, w)
        halves = buf.get("halves", 2, *words.shape)
        torch.bitwise_and(words, 0xFFFF, out=halves[0])
        torch.bitwise_right_shift(words, 16, out=halves[1])
        values = buf.get("values", *halves.shape, dtype=torch.float32)
        torch.index_select(self._table("gaussian", buf.device), 0, halves.view(-1), out=values.view(-1))
        return values

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        keys = seed_keys(self._check_seeds(seeds), grad.device)
        buf = self._buffers(grad.device)
        scalars = torch.zeros(self.num_directions, dtype=torch.float32, device=grad.device)
        for start, stop in self._chunks(self.num_directions, grad.device):
            values = self._values(keys, start, stop, buf)
            odd = grad[start + 1 : stop : 2]
            scalars += values[0] @ grad[start:stop:2]
            scalars += values[1, :, : odd.numel()] @ odd
        return scalars

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        scalars = self._check_scalars(scalars)
        keys = seed_keys(self._check_seeds(seeds), scalars.device)
        buf = self._buffers(scalars.device)
        weights = scalars / self.num_directions
        out = torch.empty(self.dim, dtype=torch.float32, device=scalars.device)
        for start, stop in self._chunks(self.num_directions, scalars.device):
            values = self._values(keys, start, stop, buf)
            odd = out[start + 1 : stop : 2]
            out[start:stop:2] = weights @ values[0]
            odd.copy_(weights @ values[1, :, : odd.numel()])
        return out

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        seeds = self._check_seeds(seeds)
        self._check_index(index)
        device = torch.device(device)
        keys, buf = seed_keys(seeds[index : index + 1], device), self._buffers(device)
        out = torch.empty(self.dim, dtype=torch.float32, device=device)
        for start, stop in self._chunks(2, device):
            values = self._values(keys, start, stop, buf)  # (2, 1, w)
            out[start:stop] = values[:, 0].T.reshape(-1)[: stop - start]  # interleave even/odd
        return out


class RademacherDirections(_HashedFamily):
    """z_j uniform on {-1, +1}^D, 32 directions per seed (one bit each of a 32-bit word).

    g_hat = (1/K) sum_j a_j z_j, unbiased; E||g_hat - g||^2 = ((D - 1)/K) ||g||^2.
    Projection is a weighted histogram of g per byte of the words (4 per 32 directions)
    times a 256 x 8 sign table; synthesis is one lookup per byte in a table of the 256
    signed sums of 8 scalars: O(D K / 8) work instead of O(D K).
    """

    name = "rademacher"
    unbiased = True
    SIGNS_PER_SEED: ClassVar[int] = 32

    @property
    def num_seeds(self) -> int:
        return -(-self.num_directions // self.SIGNS_PER_SEED)

    def _bytes(self, keys: _Keys, start: int, stop: int, buf: ChunkBuffers) -> torch.Tensor:
        """(4 G, n) int64: row 4g + q holds byte q of word(s_g, d) for d in [start, stop)."""
        fused = self._fused(buf.device)
        if fused is not None:
            return fused.rademacher_bytes(keys, start, stop, buf)
        words = buf.words(keys, start, stop)  # (G, n)
        out = buf.get("bytes", words.shape[0], 4, words.shape[1])
        for q in range(4):
            torch.bitwise_right_shift(words, 8 * q, out=out[:, q])
        out[:, :3].bitwise_and_(0xFF)  # byte 3 is already < 256 (words < 2^32)
        return out.view(-1, words.shape[1])

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        keys = seed_keys(self._check_seeds(seeds), grad.device)
        buf = self._buffers(grad.device)
        rows = 4 * self.num_seeds
        # hist[4g + q, v] = sum of g_d over coordinates whose byte q of word(s_g, d) is v.
        hist = torch.zeros(rows, 256, dtype=torch.float64, device=grad.device)
        for start, stop in self._chunks(rows, grad.device):
            part = buf.get("part", stop - start, dtype=torch.float64).copy_(grad[start:stop])
            hist.scatter_add_(1, self._bytes(keys, start, stop, buf), part.expand(rows, -1))
        signs = self._table("signs", grad.device).to(torch.float64)  # (256, 8)
        return (hist @ signs).reshape(-1)[: self.num_directions].to(torch.float32)

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        scalars = self._check_scalars(scalars)
        keys = seed_keys(self._check_seeds(seeds), scalars.device)
        buf = self._buffers(scalars.device)
        rows = 4 * self.num_seeds
        weights = torch.zeros(rows * 8, dtype=torch.float32, device=scalars.device)
        weights[: self.num_directions] = scalars / self.num_directions
        # table[4g + q, v] = sum_i weights[32g + 8q + i] * sign(bit i of v).
        table = weights.view(rows, 8) @ self._table("signs", scalars.device).T  # (4 G, 256)
        out = torch.empty(self.dim, dtype=torch.float32, device=scalars.device)
        for start, stop in self._chunks(rows, scalars.device):
            codes = self._bytes(keys, start, stop, buf)
            values = torch.gather(table, 1, codes, out=buf.get("values", *codes.shape, dtype=torch.float32))
            torch.sum(values, dim=0, out=out[start:stop])
        return out

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        seeds = self._check_seeds(seeds)
        self._check_index(index)
        group, bit = divmod(index, self.SIGNS_PER_SEED)
        device = torch.device(device)
        keys, buf = seed_keys(seeds[group : group + 1], device), self._buffers(device)
        out = torch.empty(self.dim, dtype=torch.float32, device=device)
        for start, stop in self._chunks(1, device):
            words = buf.words(keys, start, stop)[0]
            out[start:stop] = 1 - 2 * ((words >> bit) & 1)
        return out


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

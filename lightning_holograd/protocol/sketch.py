"""The count-sketch direction family (docs/PROTOCOL.md §3.5), and its slot cache.

Coordinate d goes to bucket((word(s, d) >> 1) * K >> 31) with sign bit 0 of word(s, d)
(``direction_hash``). ``project`` and ``synthesize`` evaluate those slots chunk by chunk
with the eager or the fused kernels (``direction_kernels``); ``SlotCache`` keeps the slots
of the last seed ``project`` saw, within a memory bound, so that the step's
``synthesize`` (same seed) gathers from them instead of hashing D coordinates again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .direction_hash import ChunkBuffers, seed_keys
from .directions import DEFAULT_CHUNK_SIZE, _HashedFamily, _Keys, synthesized_direction

__all__ = ["SLOT_CACHE_BYTES", "SketchDirections", "SlotCache"]

SLOT_CACHE_BYTES = 64 << 20  # int32 slots for D <= 2^24; larger D recomputes (auto compiles there)


class SlotCache:
    """The (D,) int32 slots of one seed on one device, complete or absent.

    Every rank projects its claim and then synthesises g_hat with the same step seed
    (docs/PROTOCOL.md §1.1), so the second hash of D coordinates is a repeat. Kept only
    while D * 4 bytes <= SLOT_CACHE_BYTES (and 2K < 2^31, so that a slot fits int32); the
    slots are the same integers either way, so a hit is bitwise the recomputation.
    """

    def __init__(self, dim: int, num_directions: int) -> None:
        self.enabled = dim * 4 <= SLOT_CACHE_BYTES and 2 * num_directions < 1 << 31
        self.dim = dim
        self._slots: torch.Tensor | None = None
        self._key: tuple[int, torch.device] | None = None  # whose slots _slots holds, once complete

    def writer(self, device: torch.device) -> torch.Tensor | None:
        """The (D,) buffer for ``project`` to fill chunk by chunk (None: disabled); whatever
        it held is invalid until ``complete``."""
        if not self.enabled:
            return None
        self._key = None
        if self._slots is None or self._slots.device != device:
            self._slots = torch.empty(self.dim, dtype=torch.int32, device=device)
        return self._slots

    def complete(self, seed: int, device: torch.device) -> None:
        if self.enabled:
            self._key = (seed, device)

    def get(self, seed: int, device: torch.device) -> torch.Tensor | None:
        """The slots of ``seed`` on ``device`` if the last complete ``project`` had them."""
        return self._slots if self._key == (seed, device) else None


class SketchDirections(_HashedFamily):
    """Count sketch: coordinate d goes to bucket h(d) in [0, K) with sign s(d).

    Direction j is the signed indicator of bucket j; a_j = sum_{h(d)=j} s(d) g_d and
    g_hat_d = s(d) a_{h(d)}. Unbiased (the sign bit is independent of the bucket bits),
    E||g_hat - g||^2 = ~(D - 1)/K ||g||^2, at O(D) cost for any K.
    One seed per step (the first direction seed) defines h and s.
    """

    name = "sketch"
    unbiased = True

    def __init__(
        self,
        dim: int,
        num_directions: int,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel: str | None = None,
    ) -> None:
        super().__init__(dim, num_directions, chunk_size, kernel)
        if num_directions > 1 << 32:
            raise ValueError(f"num_directions={num_directions} must be <= 2^32 for the sketch.")
        self.slot_cache = SlotCache(dim, num_directions)

    @property
    def num_seeds(self) -> int:
        return 1

    def _slots(self, keys: _Keys, start: int, stop: int, buf: ChunkBuffers) -> torch.Tensor:
        """(n,) int64 slot 2 h(d) + (1 if s(d) = -1 else 0) for d in [start, stop)."""
        words = buf.words(keys, start, stop)[0]
        # (word >> 1) < 2^31 and K <= 2^32: the product stays below 2^63.
        slots = torch.bitwise_right_shift(words, 1, out=buf.get("slots", stop - start))
        slots.mul_(self.num_directions).bitwise_right_shift_(31).bitwise_left_shift_(1)
        return slots.bitwise_or_(words.bitwise_and_(1))

    def project(self, flat_grad: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        grad = self._check_grad(flat_grad)
        (seed,) = self._check_seeds(seeds)
        keys = seed_keys([seed], grad.device)
        buf, fused = self._buffers(grad.device), self._fused(grad.device)
        cache = self.slot_cache.writer(grad.device)
        narrow = 2 * self.num_directions <= 1 << 31  # int32 slots: half the bytes written and read
        sums = torch.zeros(2 * self.num_directions, dtype=torch.float64, device=grad.device)  # (2K,)
        for start, stop in self._chunks(1, grad.device, fused):
            if fused is None:
                slots = self._slots(keys, start, stop, buf)
                part = buf.get("part", stop - start, dtype=torch.float64).copy_(grad[start:stop])
                if cache is not None:
                    cache[start:stop] = slots
            else:  # slots and part in one pass, the slots straight into the cache (docs/PROTOCOL.md §3.7)
                out = cache[start:stop] if cache is not None else (
                    buf.get("slots32", stop - start, dtype=torch.int32) if narrow else None)
                slots, part = fused.sketch_slots_part(keys, start, grad[start:stop], buf, self.num_directions, out)
            sums.index_add_(0, slots, part)  # the same additions in the same order, int32 or int64 slots
        self.slot_cache.complete(seed, grad.device)
        return (sums[0::2] - sums[1::2]).to(torch.float32)

    def synthesize(self, scalars: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        scalars = self._check_scalars(scalars)
        (seed,) = self._check_seeds(seeds)
        signed = torch.stack((scalars, -scalars), dim=1).reshape(-1)  # (2K,): slot -> s(d) a_h(d)
        cached = self.slot_cache.get(seed, scalars.device)
        if cached is not None:  # this step's project computed them (docs/PROTOCOL.md §3.7)
            return torch.index_select(signed, 0, cached)
        keys = seed_keys([seed], scalars.device)
        buf, fused = self._buffers(scalars.device), self._fused(scalars.device)
        out = torch.empty(self.dim, dtype=torch.float32, device=scalars.device)
        for start, stop in self._chunks(1, scalars.device, fused):
            if fused is None:
                torch.index_select(signed, 0, self._slots(keys, start, stop, buf), out=out[start:stop])
            else:
                fused.sketch_gather(out[start:stop], signed, keys, start, self.num_directions)
        return out

    def direction(self, seeds: Sequence[int], index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return synthesized_direction(self, seeds, index, device)

"""Fused (``torch.compile``) kernels for the direction hash, and when to use them.

The definition of every value is ``direction_hash``'s (docs/PROTOCOL.md §3.2); this module
only evaluates the same integer expression in one compiled kernel per chunk instead of a
dozen eager int64 passes. Integer arithmetic is exact (no product overflows int64, see
``direction_hash``), so a compiled kernel returns bitwise the eager path's integers; the
floating-point sums after it (``index_add_``, ``scatter_add_``) stay eager, in the eager
path's order, so the families' outputs are bitwise the same too (docs/PROTOCOL.md §3.7).

Which path a family takes is its ``kernel`` setting, or the environment variable
``HOLOGRAD_DIRECTION_KERNEL`` when that is None:
- ``"eager"``: plain torch ops (the reference implementation);
- ``"compiled"``: the fused kernels, falling back to eager with one warning if
  ``torch.compile`` fails on this machine;
- ``"auto"`` (default): compiled where it is known to pay off, otherwise eager. Compiling
  costs tens of seconds once per process (seconds with a warm inductor cache), so auto
  compiles only on a CPU and only for D >= ``AUTO_MIN_DIM`` coordinates, where the
  per-step saving repays it within a few hundred steps. Other devices stay eager under
  auto until measured (``python -m benchmarks.bench_directions --device cuda``).
A compiled kernel is checked bitwise against the eager one on a probe range (indices
around 0 and 2^32) before first use; a mismatch or an error falls back to eager.
Fused: the sketch (project and synthesize) and rademacher's byte codes. The gaussian
family stays eager: its cost is the table lookup and matrix product per value, not the
hash. Shapes are dynamic (one compile per kernel; rademacher compiles for one seed and
for several); a chunk of a single coordinate compiles once more (dynamo specialises 1).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from .direction_hash import (
    _MUL1_S,
    _MUL2_S,
    _MUL_HI_S,
    _WEYL_S,
    MASK32,
    ChunkBuffers,
    index_base,
    keyed_words,
    seed_keys,
)

__all__ = ["AUTO_MIN_DIM", "ENV_VAR", "KERNELS", "KernelMismatch", "check_kernel", "compiled_kernels", "resolve_kernel"]

log = logging.getLogger(__name__)
_Keys = tuple[torch.Tensor, torch.Tensor]  # (k0, k1) from seed_keys, each (G, 1)

KERNELS = ("auto", "eager", "compiled")
ENV_VAR = "HOLOGRAD_DIRECTION_KERNEL"
# auto compiles on a CPU from this D on: there a step's project + synthesize is ~0.25 s
# cheaper compiled, repaying a cold ~40 s compile in ~160 steps (`python -m
# benchmarks.bench_directions --families sketch,sketch-compiled --ks 4096 --dims ...`).
AUTO_MIN_DIM = 1 << 24
_PROBES = ((0, 256), ((1 << 32) - 128, (1 << 32) + 128))  # low indices and the hi-word boundary
_failed: set[str] = set()  # device types whose compilation failed in this process (warned once)


class KernelMismatch(RuntimeError):
    """A compiled kernel returned other bits than the eager path (a compiler bug)."""


def check_kernel(kernel: str | None) -> str | None:
    """``kernel`` if it is one of KERNELS, or None with a valid (or unset) environment
    variable; else a ValueError naming the choices. Families call it at construction, so a
    typo fails before the first step."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"direction kernel={kernel!r} is unknown. HINT: choose one of {', '.join(KERNELS)} "
                         f"(or None: the {ENV_VAR} environment variable, default auto).")
    if kernel is None:
        _env_kernel()
    return kernel


def _env_kernel() -> str:
    kernel = os.environ.get(ENV_VAR) or "auto"
    if kernel not in KERNELS:
        raise ValueError(f"{ENV_VAR}={kernel!r} is unknown. HINT: set it to one of {', '.join(KERNELS)}, "
                         "or unset it (auto).")
    return kernel


def resolve_kernel(kernel: str | None, device: torch.device, dim: int) -> str:
    """"eager" or "compiled" for a family over ``dim`` coordinates on ``device``."""
    kernel = _env_kernel() if kernel is None else kernel
    if kernel == "auto":
        kernel = "compiled" if device.type == "cpu" and dim >= AUTO_MIN_DIM else "eager"
    if kernel == "compiled" and compiled_kernels(device.type) is None:
        return "eager"
    return kernel


def _scalars(device: torch.device, start: int, num_directions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0-d tensors, not Python ints: a new value then never triggers a recompile."""
    return torch.tensor(start, device=device), torch.tensor(num_directions, device=device)


def _plain(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as non-views (same storage): a chunk that is a view of a larger buffer in
    one call and the whole buffer in the next would otherwise trigger a recompile."""
    return tuple(t.detach() for t in tensors)


# -- the fused expressions (docs/PROTOCOL.md §3.2), on int64 tensors ---------------------
def _words(start: torch.Tensor, n: int, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """word(s, e) for e in [start, start + n): (rows of k0, n) int64 (k0, k1: (G, 1))."""
    index = torch.arange(n, dtype=torch.int64, device=start.device) + start
    base = (index & MASK32) * _WEYL_S & MASK32
    base = base ^ (base >> 16)
    x = (base ^ k0) * _MUL1_S & MASK32
    x = x ^ (x >> 15) ^ k1 ^ ((index >> 32) * _MUL_HI_S & MASK32)
    x = x * _MUL2_S & MASK32
    return x ^ (x >> 16)


def _sketch_slots(words: torch.Tensor, num_directions: torch.Tensor) -> torch.Tensor:
    """Slot 2 bucket + (1 if the sign is -1): docs/PROTOCOL.md §3.5."""
    return (((words >> 1) * num_directions) >> 31) << 1 | (words & 1)


def _sketch_project_chunk(slots: torch.Tensor, part: torch.Tensor, grad: torch.Tensor, start: torch.Tensor,
                          num_directions: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> None:
    """Fills ``slots`` (n,) int32 or int64 and ``part`` (n,) float64 = grad, for index_add_."""
    slots.copy_(_sketch_slots(_words(start, slots.shape[0], k0, k1)[0], num_directions))
    part.copy_(grad)


def _sketch_synthesize_chunk(out: torch.Tensor, signed: torch.Tensor, start: torch.Tensor,
                             num_directions: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> None:
    """out[i] = signed[slot(start + i)]: sign(d) a_bucket(d) (gather, exact)."""
    out.copy_(signed[_sketch_slots(_words(start, out.shape[0], k0, k1)[0], num_directions)])


def _rademacher_bytes(out: torch.Tensor, start: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> None:
    """out (G, 4, n) int64: out[g, q] is byte q of word(s_g, d) for d in [start, start + n)."""
    words = _words(start, out.shape[2], k0, k1).unsqueeze(1)  # (G, 1, n)
    shifts = torch.arange(4, dtype=torch.int64, device=out.device).view(1, 4, 1) * 8
    out.copy_((words >> shifts) & 0xFF)


class CompiledKernels:
    """The compiled functions for one device type (one dynamic-shape compile each), called
    chunk by chunk with the families' ``ChunkBuffers`` and (k0, k1) keys."""

    def __init__(self) -> None:
        def build(fn: Callable) -> Callable:
            return torch.compile(fn, dynamic=True, fullgraph=True)

        self._sketch_project_chunk = build(_sketch_project_chunk)
        self._sketch_synthesize_chunk = build(_sketch_synthesize_chunk)
        self._rademacher_bytes = build(_rademacher_bytes)

    def sketch_slots_part(self, keys: _Keys, start: int, grad: torch.Tensor, buf: ChunkBuffers,
                          num_directions: int, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots of [start, start + n), the (n,) chunk ``grad`` in float64): the slots in
        ``slots`` when given ((n,) int32 or int64, e.g. the slot cache's slice: written once,
        no copy after), else in the int64 buffer "slots"; the float64 copy in "part"."""
        slots = buf.get("slots", grad.numel()) if slots is None else slots
        part = buf.get("part", grad.numel(), dtype=torch.float64)
        self._sketch_project_chunk(*_plain(slots, part, grad, *_scalars(buf.device, start, num_directions), *keys))
        return slots, part

    def sketch_gather(self, out: torch.Tensor, signed: torch.Tensor, keys: _Keys, start: int,
                      num_directions: int) -> None:
        """out[i] = signed[slot(start + i)] for the (n,) chunk ``out`` of g_hat."""
        self._sketch_synthesize_chunk(*_plain(out, signed, *_scalars(out.device, start, num_directions), *keys))

    def rademacher_bytes(self, keys: _Keys, start: int, stop: int, buf: ChunkBuffers) -> torch.Tensor:
        """(4 G, n) int64 in the buffer "bytes": row 4g + q is byte q of word(s_g, d)."""
        out = buf.get("bytes", keys[0].shape[0], 4, stop - start)
        self._rademacher_bytes(*_plain(out, torch.tensor(start, device=buf.device), *keys))
        return out.view(-1, stop - start)

    def check(self, device: torch.device) -> None:
        """Runs every kernel on the probe ranges against the eager path; raises KernelMismatch
        on a difference. Keys are built as the families build them (``seed_keys``), for one
        and for two seeds, so that the kernels compiled here are the ones the families reuse
        (sizes 1 and >= 2 are compiled separately)."""
        one, two = seed_keys([0x0123456789ABCDEF], device), seed_keys([0xFFFFFFFF00000000, 7], device)
        buf, k = ChunkBuffers(device), 12345
        signed = torch.arange(2 * k, dtype=torch.float32, device=device)
        shifts = torch.tensor([0, 8, 16, 24], device=device).view(1, 4, 1)
        for lo, hi in _PROBES:
            words = keyed_words(*index_base(lo, hi, device), *one)[0]  # the eager reference
            expected = ((words >> 1) * k >> 31) * 2 + (words & 1)
            grad = torch.arange(hi - lo, dtype=torch.float32, device=device)
            slots, part = self.sketch_slots_part(one, lo, grad, buf, k)
            same = torch.equal(slots, expected) and torch.equal(part, grad.double())
            narrow = torch.empty(hi - lo, dtype=torch.int32, device=device)  # the int32 path the sketch takes
            same = same and torch.equal(self.sketch_slots_part(one, lo, grad, buf, k, narrow)[0], expected.int())
            out = torch.empty(hi - lo, dtype=torch.float32, device=device)
            self.sketch_gather(out, signed, one, lo, k)
            same = same and torch.equal(out, signed[expected])
            for keys in (one, two):
                codes = self.rademacher_bytes(keys, lo, hi, buf).view(len(keys[0]), 4, -1)
                words = keyed_words(*index_base(lo, hi, device), *keys)
                same = same and torch.equal(codes, (words.unsqueeze(1) >> shifts) & 0xFF)
            if not same:
                raise KernelMismatch(f"compiled direction kernels differ from the eager path on indices [{lo}, {hi})")


@functools.cache
def _compiled(device_type: str) -> CompiledKernels:
    kernels = CompiledKernels()
    kernels.check(torch.device(device_type))
    return kernels


def compiled_kernels(device_type: str) -> CompiledKernels | None:
    """The checked compiled kernels for ``device_type``, or None (with one warning per
    process and device type) if torch.compile fails there or disagrees with eager."""
    if device_type in _failed:
        return None
    try:
        return _compiled(device_type)
    except Exception as exc:  # any compiler failure: the eager path is always correct
        _failed.add(device_type)
        log.warning("direction kernels: the compiled kernels are unusable on %s (%s: %s); using the eager path. "
                    "HINT: set %s=eager to skip the attempt.", device_type, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "", ENV_VAR)
        return None

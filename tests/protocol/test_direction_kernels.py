"""Fused (torch.compile) direction kernels and their selection (docs/PROTOCOL.md §3.7).

The compiled path must return bitwise the eager path's values: the integer hash is exact
and the floating-point sums stay eager, in the eager order. One compile per test session
(the ``kernels`` fixture, ~15-40 s on a 2-core machine, less with a warm inductor cache);
every compiled test is skipped with the compiler's error if torch.compile does not work here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_holograd.protocol import (
    direction_kernels,
    direction_seeds,
    genesis_commitment,
    make_family,
)
from lightning_holograd.protocol.direction_hash import ChunkBuffers
from lightning_holograd.protocol.direction_kernels import (
    AUTO_MIN_DIM,
    ENV_VAR,
    resolve_kernel,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernels():
    try:
        compiled = direction_kernels._compiled("cpu")
    except direction_kernels.KernelMismatch:
        raise  # compiled, but with other bits than eager: a failure, not a skip
    except Exception as exc:  # no compiler toolchain here: nothing to compare
        pytest.skip(f"torch.compile is unavailable on this machine: {type(exc).__name__}: {exc}")
    return compiled


def _seeds(tag: str, count: int) -> list[int]:
    return direction_seeds(genesis_commitment(tag), count)


def _pair(name: str, dim: int, k: int, chunk_size: int | None = None):
    """(eager, compiled) families; the sketch's slot cache off, so that synthesize runs the kernels."""
    pair = (make_family(name, dim, k, chunk_size=chunk_size, direction_kernel="eager"),
            make_family(name, dim, k, chunk_size=chunk_size, direction_kernel="compiled"))
    for family in pair:
        if hasattr(family, "slot_cache"):
            family.slot_cache.enabled = False
    return pair


# (D, K, chunk_size): one chunk; several fused chunks with a short last one; K not a power
# of 2 and a chunk cap that is not a multiple of the fused chunk.
CASES = [(1000, 16, None), ((1 << 20) + 777, 4096, None), (5000, 7, 192)]


@pytest.mark.parametrize("dim,k,chunk_size", CASES)
def test_sketch_compiled_is_bitwise_eager(kernels, dim, k, chunk_size):
    eager, compiled = _pair("sketch", dim, k, chunk_size)
    assert compiled._fused(CPU) is kernels and eager._fused(CPU) is None
    seeds = _seeds(f"sketch/{dim}", 1) if dim != 1000 else [0xFFFFFFFFFFFFFFFF]
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(dim))
    scalars = eager.project(grad, seeds)
    assert torch.equal(compiled.project(grad, seeds), scalars)
    assert torch.equal(compiled.synthesize(scalars, seeds), eager.synthesize(scalars, seeds))
    assert torch.equal(compiled.direction(seeds, k - 1), eager.direction(seeds, k - 1))
    compiled.slot_cache.enabled = True  # slots the compiled project stored: the same integers
    assert torch.equal(compiled.project(grad, seeds), scalars)
    assert compiled.slot_cache.get(seeds[0], CPU) is not None
    assert torch.equal(compiled.synthesize(scalars, seeds), eager.synthesize(scalars, seeds))


@pytest.mark.parametrize("dim,k,chunk_size", [(1000, 40, None), (3001, 64, 128)])
def test_rademacher_compiled_is_bitwise_eager(kernels, dim, k, chunk_size):
    eager, compiled = _pair("rademacher", dim, k, chunk_size)
    assert compiled._fused(CPU) is kernels and eager._fused(CPU) is None
    seeds = _seeds(f"rademacher/{dim}", eager.num_seeds)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(dim))
    scalars = eager.project(grad, seeds)
    assert torch.equal(compiled.project(grad, seeds), scalars)
    assert torch.equal(compiled.synthesize(scalars, seeds), eager.synthesize(scalars, seeds))
    assert torch.equal(compiled.direction(seeds, 33), eager.direction(seeds, 33))


def test_compiled_kernels_pass_their_probe_and_fail_a_wrong_one(kernels):
    """``check`` compares indices around 0 and 2^32 (the hi-word term) with eager; a kernel
    off by one bit must be caught."""
    kernels.check(CPU)
    wrong = direction_kernels.CompiledKernels.__new__(direction_kernels.CompiledKernels)
    wrong.__dict__.update(kernels.__dict__)
    right = kernels._rademacher_bytes
    wrong._rademacher_bytes = lambda out, start, k0, k1: (right(out, start, k0, k1), out[-1, -1, -1].add_(1))
    with pytest.raises(direction_kernels.KernelMismatch, match="differ from the eager path"):
        wrong.check(CPU)
    buf = ChunkBuffers(CPU)
    keys = (torch.tensor([[7]]), torch.tensor([[9]]))
    assert kernels.rademacher_bytes(keys, 0, 64, buf).shape == (4, 64)


# -- selection policy (no compilation: compiled_kernels is replaced) ----------------------

@pytest.fixture
def fake_compiled(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(direction_kernels, "compiled_kernels", lambda device_type: sentinel)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return sentinel


def test_auto_compiles_only_on_a_cpu_from_the_measured_dim(fake_compiled):
    assert resolve_kernel("auto", CPU, AUTO_MIN_DIM - 1) == "eager"
    assert resolve_kernel("auto", CPU, AUTO_MIN_DIM) == "compiled"
    assert resolve_kernel("auto", torch.device("cuda"), 1 << 30) == "eager"  # not measured there
    assert resolve_kernel(None, CPU, AUTO_MIN_DIM) == "compiled"  # None: env unset -> auto
    assert resolve_kernel("eager", CPU, 1 << 30) == "eager"
    assert resolve_kernel("compiled", CPU, 10) == "compiled"


def test_environment_variable_chooses_when_the_setting_is_none(fake_compiled, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "compiled")
    assert resolve_kernel(None, CPU, 10) == "compiled"
    assert resolve_kernel("eager", CPU, 10) == "eager"  # an explicit setting wins
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='fast'.*HINT"):
        resolve_kernel(None, CPU, 10)
    with pytest.raises(ValueError, match=f"{ENV_VAR}='fast'.*HINT"):  # at construction, not at the first step
        make_family("sketch", 100, 4)
    make_family("sketch", 100, 4, direction_kernel="eager")  # an explicit setting does not read it


def test_unknown_kernel_setting_is_refused():
    with pytest.raises(ValueError, match="kernel='triton'.*HINT: choose one of auto, eager, compiled"):
        make_family("sketch", 100, 4, direction_kernel="triton")


def test_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(device_type):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(direction_kernels, "_compiled", broken)
    monkeypatch.setattr(direction_kernels, "_failed", set())
    eager, compiled = _pair("sketch", 500, 8)
    seeds = [12345]
    grad = torch.randn(500, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger=direction_kernels.__name__):
        assert torch.equal(compiled.project(grad, seeds), eager.project(grad, seeds))
        assert resolve_kernel("compiled", CPU, 500) == "eager"
        _, other = _pair("rademacher", 500, 32)
        other.project(grad, [1])
    warnings = [r for r in caplog.records if "compiled kernels are unusable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert compiled._fused(CPU) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("name", ["sketch", "rademacher"])
def test_compiled_kernels_are_bitwise_eager_on_cuda(name):
    """The fused kernels on CUDA (inductor emits Triton there) against the eager path on
    the same device: the same integers, so the same sums in the same order. Auto keeps CUDA
    eager until this and ``bench_directions --families *-compiled --device cuda`` have run."""
    cuda = torch.device("cuda", 0)
    try:
        direction_kernels._compiled("cuda")
    except direction_kernels.KernelMismatch:
        raise
    except Exception as exc:  # noqa: BLE001 - no Triton for this card: nothing to compare
        pytest.skip(f"torch.compile is unavailable on CUDA here: {type(exc).__name__}: {exc}")
    dim, k = (1 << 20) + 777, 4096 if name == "sketch" else 64
    eager, compiled = _pair(name, dim, k)
    seeds = _seeds(f"{name}/cuda", eager.num_seeds)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(5)).to(cuda)
    scalars = eager.project(grad, seeds)
    assert torch.equal(compiled.project(grad, seeds), scalars)
    assert torch.equal(compiled.synthesize(scalars, seeds), eager.synthesize(scalars, seeds))

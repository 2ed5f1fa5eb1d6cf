"""HoloGradStrategy and the direction hash on a CUDA device (``pytest -m cuda``).

Every ``cuda``-marked test is skipped, with the reason, where ``torch.cuda.is_available()``
is False; ``benchmarks/gpu_check.py`` runs them on a lent GPU. Fits use the spawn launcher:
the fork launcher refuses once CUDA is initialised in the pytest process. The one CPU test
here runs the two-ranks-on-one-device path (``parallel_devices`` repeated) on CPU, so the
mechanism the GPU test relies on is checked on every machine.
"""

from __future__ import annotations

import math

import pytest
import torch
from replicas import assert_identical_replicas, max_param_diff

from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import direction_seeds, genesis_commitment, make_family
from lightning_holograd.protocol.direction_hash import gaussian_table, hash_words

pytestmark = [pytest.mark.timeout(300)]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")
STEPS = 48


def _falls(losses: list[float]) -> bool:
    """The bound of test_strategy.py: last-8 mean < 60 % of the first-8 mean."""
    return sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8


def _seeds(tag: str, count: int) -> list[int]:
    return direction_seeds(genesis_commitment(tag), count)


# -- directions: integer hash, bitwise the same on every device --------------------------
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("start", [0, (1 << 31) - 500, (1 << 32) - 500, (1 << 40) + 7])
def test_hash_words_are_bitwise_equal_on_cuda(start):
    """Ranges straddle 2^31 and 2^32 (the carry into the high word) and a 2^40 offset."""
    seeds = [0, 1, (1 << 63) + 12345, (1 << 64) - 1]
    on_cuda = hash_words(seeds, start, start + 1000, "cuda")
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), hash_words(seeds, start, start + 1000))


@pytest.mark.cuda
@needs_cuda
def test_gaussian_table_is_bitwise_equal_on_cuda():
    assert torch.equal(gaussian_table("cuda").cpu(), gaussian_table("cpu"))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["gaussian", "rademacher", "sketch"])
def test_directions_cross_chunk_boundaries_identically_on_cuda(name):
    """A small chunk_size forces many chunks (ragged last one) on both devices: the values
    of every coordinate are the same bits, whatever the chunking and the device."""
    dim, k = 70_001, 33
    cpu_family = make_family(name, dim, k, chunk_size=4096)
    cuda_family = make_family(name, dim, k, chunk_size=10_000)
    seeds = _seeds(f"cuda-chunks/{name}", cpu_family.num_seeds)
    for j in (0, 17, k - 1):
        assert torch.equal(cuda_family.direction(seeds, j, "cuda").cpu(), cpu_family.direction(seeds, j))


@pytest.mark.cuda
@needs_cuda
def test_cpu_verifier_accepts_a_cuda_worker_claim():
    """A worker projects on CUDA, a verifier on CPU: the same directions, sums in another
    order, so the claims agree to float32 rounding of a sum of D terms of size |g_i|:
    |a - a*| <= 1e-4 * sqrt(D) (the bound of tests/protocol/test_directions.py)."""
    dim, k = 200_003, 64
    family = make_family("sketch", dim, k)
    seeds = _seeds("cuda-claim", family.num_seeds)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    on_cuda = family.project(grad.cuda(), seeds).cpu()
    torch.testing.assert_close(on_cuda, family.project(grad, seeds), rtol=1e-4, atol=1e-4 * math.sqrt(dim))


# -- the strategy on one GPU --------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
def test_one_gpu_fit_trains_and_its_first_step_matches_the_cpu_step(tmp_path):
    """accelerator='cuda', devices=1 (a process group of one): the loss falls over 48 steps,
    and the first step's update equals the CPU's to float32 rounding (< 1e-5; a different
    direction draw moves parameters by ~1e-2 or more at lr 0.05).

    Only the first step is compared: step t's direction seeds come from the commitment
    chain, which hashes the exact bytes of the earlier steps' scalars, and the GPU sums
    them in another order (last bits differ). From step 2 on the two devices draw other
    directions and the runs part by design (seen on an H200: 0.29 after 48 steps)."""
    kwargs = dict(start_method="spawn", num_directions=64, directions="sketch")
    on_gpu = fit(ToyModule(), HoloGradStrategy(**kwargs), tmp_path / "gpu", devices=1, accelerator="cuda",
                 max_steps=STEPS)
    assert on_gpu[0]["exchange"]["chain"]["step"] == STEPS
    assert _falls(on_gpu[0]["losses"]), on_gpu[0]["losses"]
    first_gpu = fit(ToyModule(), HoloGradStrategy(**kwargs), tmp_path / "gpu1", devices=1, accelerator="cuda",
                    max_steps=1)
    first_cpu = fit(ToyModule(), HoloGradStrategy(**kwargs), tmp_path / "cpu1", devices=1, max_steps=1)
    assert max_param_diff(first_gpu[0], first_cpu[0]) < 1e-5


@pytest.mark.cuda
@needs_cuda
def test_bf16_mixed_on_cuda_trains(tmp_path):
    """precision='bf16-mixed': autocast forward, float32 parameters and float32 gradient
    exchange (no GradScaler, which the strategy refuses). Loss falls by the same bound."""
    states = fit(ToyModule(), HoloGradStrategy(start_method="spawn", num_directions=64), tmp_path, devices=1,
                 accelerator="cuda", precision="bf16-mixed", max_steps=STEPS)
    losses = states[0]["losses"]
    assert all(math.isfinite(x) for x in losses) and _falls(losses), losses
    assert all(t.dtype == torch.float32 for name, t in states[0]["params"].items() if name.startswith("net."))


@pytest.mark.cuda
@needs_cuda
def test_two_ranks_share_one_gpu_over_gloo(tmp_path):
    """Two ranks on cuda:0 (``parallel_devices`` repeated), gloo: the exchange moves its
    scalars through CPU tensors, the replicas stay bitwise identical and the loss falls."""
    strategy = HoloGradStrategy(start_method="spawn", num_directions=64, process_group_backend="gloo",
                                parallel_devices=[torch.device("cuda", 0)] * 2)
    states = fit(ToyModule(), strategy, tmp_path, devices=1, accelerator="cuda", max_steps=STEPS)
    assert len(states) == 2
    assert_identical_replicas(states)
    assert _falls(states[0]["losses"]), states[0]["losses"]


@pytest.mark.multiprocess
def test_two_ranks_from_repeated_parallel_devices_on_cpu(tmp_path):
    """The CPU twin of the test above: the strategy's parallel_devices, not ``devices``,
    sets the number of ranks, and ``fit`` returns one state per rank."""
    strategy = HoloGradStrategy(start_method="fork", num_directions=64, parallel_devices=[torch.device("cpu")] * 2)
    states = fit(ToyModule(), strategy, tmp_path, devices=1, max_steps=16)
    assert len(states) == 2
    assert_identical_replicas(states)

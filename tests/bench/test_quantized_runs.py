"""The quantized settings of ``benchmarks.frontier_runs.QUANTIZED`` build valid strategies and
send the bytes of the float32 run they are paired with (README "Quantized scalars")."""

from __future__ import annotations

import pytest

from benchmarks import baselines, frontier_runs
from lightning_holograd import HoloGradStrategy
from lightning_holograd.protocol.quantize import row_bytes

E_GPT2 = 28  # public_v statistics of the tiny GPT-2 with local steps (README "Local steps")
PAIRS = {"sketch-32768-q4": "sketch-4096", "sketch-32768-perrank-q4": "sketch-4096-perrank",
         "sketch-32768-perrank-h16-q4": "sketch-4096-perrank-h16",
         "sketch-131072-perrank-h64-q4": "sketch-16384-perrank-h64"}


SAME_BYTES = [name for name in frontier_runs.QUANTIZED if name not in PAIRS]  # variants of sketch-32768-perrank-h16-q4


def per_step_payload(init_args: dict) -> float:
    """Row bytes per optimizer step of a per-rank local-steps run (E_GPT2 public values)."""
    return row_bytes(init_args["num_directions"], E_GPT2, init_args["scalar_bits"]) / init_args["local_steps"]


@pytest.mark.parametrize("name", SAME_BYTES)
def test_quantized_variants_build_and_send_the_bytes_of_the_h16_setting(name):
    """H = 32 or 128 at 2x or 8x K, 2 bits at 2x K, or outer momentum: each builds, and its
    row bytes per optimizer step are those of sketch-32768-perrank-h16-q4 within 1 %."""
    spec = frontier_runs.QUANTIZED[name]
    assert frontier_runs.missing_features(spec) == []
    strategy, _ = baselines.build_strategy(spec)
    init = spec["init_args"]
    assert isinstance(strategy, HoloGradStrategy) and strategy.config.scalar_bits == init["scalar_bits"]
    assert strategy.config.local_steps == init["local_steps"] and strategy.config.direction_groups == "per_rank"
    assert f"-q{init['scalar_bits']}" in spec["family"]
    reference = per_step_payload(frontier_runs.QUANTIZED["sketch-32768-perrank-h16-q4"]["init_args"])
    assert per_step_payload(init) == pytest.approx(reference, rel=0.01)


@pytest.mark.parametrize("name", list(PAIRS))
def test_quantized_runs_build_and_match_their_float_pair_in_bytes(name):
    spec = frontier_runs.QUANTIZED[name]
    assert frontier_runs.missing_features(spec) == []
    strategy, _ = baselines.build_strategy(spec)
    assert isinstance(strategy, HoloGradStrategy) and strategy.config.scalar_bits == 4
    assert spec["family"].endswith("-q4") and frontier_runs.label({"spec": spec}).endswith("4 bits")
    pair = frontier_runs.RUNS[PAIRS[name]]["init_args"]
    e = E_GPT2 if pair.get("local_steps") else 0
    assert strategy.config.local_steps == pair.get("local_steps", 1)
    assert strategy.config.direction_groups == pair.get("direction_groups", 1)
    quantized = row_bytes(spec["K"], e, 4)
    float32 = row_bytes(pair["num_directions"], e, 32)
    assert quantized - float32 == 4  # the scale: the same bytes up to 4 per row


@pytest.mark.parametrize("name", list(frontier_runs.LARGE_K))
def test_large_k_runs_build_and_stay_above_1000x_in_payload(name):
    """K of the order of D at 4 bits: each builds for the tiny GPT-2's D, and its row bytes per
    optimizer step (K/2 + 4 + 4E per round of H) keep the payload's compression against the
    ring all-reduce (4D bytes per step at 2 ranks) above 1,000x."""
    spec = frontier_runs.LARGE_K[name]
    assert frontier_runs.missing_features(spec) == []
    strategy, _ = baselines.build_strategy(spec)
    init = spec["init_args"]
    assert strategy.config.scalar_bits == 4 and strategy.config.local_steps == init["local_steps"]
    resolved = strategy.config.resolve(frontier_runs.GPT2_TINY_DIM)
    assert resolved.num_directions == init["num_directions"] <= frontier_runs.GPT2_TINY_DIM
    assert 4 * frontier_runs.GPT2_TINY_DIM / per_step_payload(init) > 1000


@pytest.mark.parametrize("name", list(frontier_runs.SHORT_PERIOD))
def test_short_period_runs_build_and_send_less_than_local_sgd_at_the_same_period(name):
    """The race's H = 1/4/16/32/64/128 settings: each builds for the tiny GPT-2, and a round's row
    (K b / 8 + 4 + 4E bytes, per rank) is at most 26 % of the 4D bytes a rank of local SGD at
    the same H sends per round (at 2 ranks its ring all-reduce sends 2 (N - 1) / N x 4D = 4D):
    identity at 8 bits sends D + 4 + 4E, a quarter plus its scale and public values."""
    spec = frontier_runs.SHORT_PERIOD[name]
    assert frontier_runs.missing_features(spec) == []
    strategy, _ = baselines.build_strategy(spec)
    init = spec["init_args"]
    assert strategy.config.local_steps == init.get("local_steps", 1) in (1, 4, 16, 32, 64, 128)
    assert strategy.config.scalar_bits == init["scalar_bits"]
    local_sgd_round = 4 * frontier_runs.GPT2_TINY_DIM
    assert row_bytes(init["num_directions"], E_GPT2, init["scalar_bits"]) <= 0.26 * local_sgd_round


@pytest.mark.parametrize("name", list(frontier_runs.OUTER_MOMENTUM))
def test_outer_momentum_runs_move_as_plain_averaging_on_a_steady_pseudo_gradient(name):
    """Nesterov outer momentum mu at outer lr 1 - mu: each builds, its steady-state step
    eta / (1 - mu) is 1 (plain averaging's), its family is its own on the frontier, and its
    row bytes per optimizer step (E = 28 public values counted, an upper bound for the private
    inner state) keep the payload above 1,000x against the ring all-reduce's 4D per step."""
    spec = frontier_runs.OUTER_MOMENTUM[name]
    assert frontier_runs.missing_features(spec) == []
    strategy, _ = baselines.build_strategy(spec)
    config = strategy.config
    assert 0 < config.outer_momentum < 1 and config.outer_lr / (1 - config.outer_momentum) == pytest.approx(1.0)
    assert spec["family"].endswith("-nesterov") and "momentum" in frontier_runs.label({"spec": spec})
    assert 4 * frontier_runs.GPT2_TINY_DIM / per_step_payload(spec["init_args"]) > 1000

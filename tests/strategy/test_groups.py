"""Direction groups end to end (docs/PROTOCOL.md §9.1): real ranks (fork launcher, gloo, CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from replicas import assert_identical_replicas
from test_verifier import ScalarCheater, run_verified

from lightning_holograd import ByzantineSimulator, HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.engine import Comm, HoloGradExchange, TrafficMeter
from lightning_holograd.protocol import CommitmentChain, Ledger, make_aggregator, make_family

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "main_cfb4f8c"


def _main_cases():
    spec = importlib.util.spec_from_file_location("main_cfb4f8c_generate", FIXTURES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAIN = _main_cases()


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(start_method="fork", **kwargs)


def assert_same_as_main(state: dict, expected: dict) -> None:
    """Parameters, chain and traffic (every kind, verification bundles included) bitwise as
    main at commit cfb4f8c, before groups and local steps were merged."""
    assert state["params"].keys() == expected["params"].keys()
    for name, tensor in expected["params"].items():
        assert torch.equal(state["params"][name], tensor), name
    assert state["exchange"]["chain"] == expected["exchange"]["chain"]
    assert state["exchange"]["slashed"] == expected["exchange"]["slashed"]
    assert state["exchange"]["traffic"] == expected["exchange"]["traffic"]


@pytest.mark.parametrize("case", list(MAIN.CASES))
def test_one_group_is_bitwise_main_before_groups(tmp_path, case):
    """direction_groups=1 (the default, here passed explicitly) computes exactly what main
    computed before groups existed: same parameters, chain head (so every step's seeds
    and aggregate) and traffic, with verification and with accumulation and clipping."""
    state = MAIN.run_case(case, tmp_path, direction_groups=1)
    assert_same_as_main(state, torch.load(FIXTURES / f"{case}.pt", weights_only=True))


@pytest.mark.parametrize(
    "devices, kwargs",
    [(2, {"direction_groups": "per_rank"}),
     (4, {"direction_groups": 2, "directions": "gaussian", "num_directions": 16}),
     (3, {"direction_groups": "per_rank", "directions": "rademacher", "clip_row_norms": True})],
    ids=["2-per_rank-sketch", "4-two-groups-gaussian", "3-per_rank-rademacher-clip"],
)
def test_groups_train_with_identical_replicas(tmp_path, devices, kwargs):
    kwargs = {"directions": "sketch", "num_directions": 16, **kwargs}
    states = fit(ToyModule(), holograd(**kwargs), tmp_path / "groups", devices=devices)
    assert_identical_replicas(states)
    assert states[0]["exchange"]["direction_groups"] == (devices if kwargs["direction_groups"] == "per_rank" else 2)
    losses = states[0]["losses"]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])  # it learns
    shared = fit(ToyModule(), holograd(**{**kwargs, "direction_groups": 1}), tmp_path / "shared", devices=devices)
    assert shared[0]["exchange"]["chain"]["head"] != states[0]["exchange"]["chain"]["head"]  # groups did act


def test_per_rank_verification_slashes_the_cheater_and_never_an_honest_rank(tmp_path, monkeypatch):
    """4 ranks, every rank its own directions, every worker claim checked (p_verify = 1):
    the verifier must recompute each claim with the claimant's own seeds, or honest ranks 1
    and 2 would be rejected; rank 3 lies from chain step 6 and is slashed exactly there."""
    import test_verifier

    monkeypatch.setattr(test_verifier, "holograd", lambda **kw: holograd(directions="sketch", num_directions=16,
                                                                         direction_groups="per_rank", **kw))
    states, reports = run_verified(tmp_path, ScalarCheater(3, 6), steps=12, rtol=0.0, atol=0.0)
    assert_identical_replicas(states)
    assert all(report["slashed_set"] == [3] for report in reports)
    ledger = Ledger.load(tmp_path / "ledger.jsonl")
    rejected = [(r.step, r.rank, r.data["reason"]) for r in ledger if r.data.get("verdict") == "reject"]
    assert rejected == [(6, 3, "mismatch")]
    accepted = [(r.step, r.rank) for r in ledger if r.data.get("verdict") == "accept"]
    assert sorted(accepted) == sorted([(s, r) for s in range(1, 13) for r in (1, 2)] + [(s, 3) for s in range(1, 6)])


class _Rows(L.Callback):
    """Rank 0 keeps every submitted matrix."""

    def __init__(self) -> None:
        self.matrices: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.exchange.review_hooks.append(lambda ctx: self.matrices.append(ctx.matrix.clone()))

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save(self.matrices, Path(trainer.default_root_dir) / "matrices.pt")


def test_omniscient_attack_acts_within_the_liars_group(tmp_path):
    """4 ranks in 2 groups ({0, 2}, {1, 3}); rank 3 runs ALIE. Its group's only honest row is
    rank 1's, so mu = row 1 and sigma = 0: the lie is exactly rank 1's row, which measures
    the same directions. (Taken over every honest rank, it would mix rows of both groups.)"""
    attack = ByzantineSimulator(ranks=[3], attack="alie", start_step=2)
    strategy = holograd(directions="sketch", num_directions=16, direction_groups=2)
    fit(ToyModule(), strategy, tmp_path / "ranks", devices=4, max_steps=6, callbacks=[attack, _Rows()],
        default_root_dir=str(tmp_path))
    matrices = torch.load(tmp_path / "matrices.pt", weights_only=True)
    assert len(matrices) == 6
    for step, matrix in enumerate(matrices):
        if step >= 2:
            assert torch.equal(matrix[3], matrix[1])
        else:
            assert not torch.equal(matrix[3], matrix[1])


def test_omniscient_attack_without_an_honest_group_peer_is_refused(tmp_path):
    attack = ByzantineSimulator(ranks=[1], attack="ipm")
    with pytest.raises(Exception, match=r"ranks \[1\] have no honest rank in their group.*HINT"):
        fit(ToyModule(), holograd(direction_groups="per_rank"), tmp_path, devices=2, max_steps=2, callbacks=[attack])


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"direction_groups": 0}, "direction_groups=0 must be an integer >= 1 or 'per_rank'.*HINT"),
        ({"direction_groups": "all"}, "direction_groups='all'.*HINT"),
        ({"direction_groups": 2, "directions": "codebook", "num_directions": 8}, "directions='codebook'.*HINT"),
        ({"direction_groups": 2, "directions": "momentum"}, "directions='momentum'.*HINT"),
        ({"direction_groups": "per_rank", "directions": "identity"}, "directions='identity'.*HINT"),
        ({"direction_groups": "per_rank", "aggregation": "median"},
         "direction_groups='per_rank' with aggregation='median'.*HINT: use aggregation='mean'"),
        ({"direction_groups": "per_rank", "aggregation": "krum"}, "direction_groups='per_rank' with aggregation='krum'.*HINT"),
    ],
)
def test_bad_group_settings_fail_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HoloGradStrategy(**kwargs)


@pytest.mark.parametrize("aggregation", ["trimmed_mean", "median"])
def test_groups_too_small_for_the_aggregation_fail_at_setup(tmp_path, aggregation):
    """Median and trimmed mean run within each group and need >= 3 ranks there."""
    strategy = holograd(direction_groups=2, aggregation=aggregation)
    with pytest.raises(Exception, match=rf"direction_groups=2 on world_size=2 gives groups of 1 rank.*"
                                        rf"aggregation='{aggregation}'.*needs >= 3.*HINT"):
        fit(ToyModule(), strategy, tmp_path, devices=2, max_steps=1)


def test_resume_with_other_groups_is_refused():
    family, aggregator = make_family("sketch", 10, 4), make_aggregator("mean")
    saved = HoloGradExchange(family, aggregator, CommitmentChain("s"), Comm(TrafficMeter(1, 10))).state_dict()
    grouped = HoloGradExchange(family, aggregator, CommitmentChain("s"), Comm(TrafficMeter(1, 10)), num_groups=2)
    with pytest.raises(ValueError, match="1 direction group.*this run has 2.*HINT"):
        grouped.load_state_dict(saved)
    del saved["direction_groups"]  # a checkpoint from before groups: one group
    with pytest.raises(ValueError, match="1 direction group"):
        grouped.load_state_dict(saved)


def test_resume_on_another_world_size_takes_the_groups_from_the_setting():
    """A per_rank checkpoint of 2 ranks (G = 2) resumes on 1 rank (G = 1): the groups follow
    the world size (elastic resume, docs/PROTOCOL.md §9.1 "Checkpoint"); on the same world
    size a different G stays refused."""
    family, aggregator = make_family("sketch", 10, 4), make_aggregator("mean")
    saved = HoloGradExchange(family, aggregator, CommitmentChain("s"), Comm(TrafficMeter(1, 10))).state_dict()
    saved.update(world_size=2, direction_groups=2)
    resumed = HoloGradExchange(family, aggregator, CommitmentChain("s"), Comm(TrafficMeter(1, 10)))
    resumed.load_state_dict(saved)
    assert resumed.resized_from == 2 and resumed.num_groups == 1
    saved.update(world_size=1)
    with pytest.raises(ValueError, match="2 direction group.*this run has 1 on the same world size.*HINT"):
        resumed.load_state_dict(saved)

"""aggregation_path='sharded' with direction groups end to end, real gloo ranks (docs/PROTOCOL.md
§4.5, §6.12, §9.1): the toy task fitted with 2 groups gives bitwise the parameters of the grouped
all_gather path, also with a ProofVerifier that slashes a claim cheater inside a group (the
verifier recomputes each claim with the claimant's group's seeds, so no honest rank of either
group is slashed); an owner that publishes a wrong aggregate for its group's block is caught
by the aggregate audit, which a verifier outside that group runs from the group's rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from replicas import assert_identical_replicas
from test_sharded_verify import LyingOwner
from test_verifier import SaveVerifier, ScalarCheater

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


def _fit(tmp_path, path, world, aggregation, steps, cheater=None):
    callbacks = []
    if cheater is not None:
        verifier = ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / path / "ledger.jsonl"))
        callbacks = [verifier, SaveVerifier(verifier, tmp_path / path), cheater]
    # A 60 s group timeout: a lost message ends the fit with an error naming the wait, well
    # inside the test's own timeout, instead of the 30-minute default (see test_audit_delivery.py).
    strategy = HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16, aggregation=aggregation,
                                trim_ratio=0.2, direction_groups=2, aggregation_path=path,
                                timeout=timedelta(seconds=60))
    (tmp_path / path).mkdir(parents=True, exist_ok=True)
    states = fit(ToyModule(), strategy, tmp_path / path / "ranks", devices=world, max_steps=steps, callbacks=callbacks)
    assert_identical_replicas(states)
    return states


def _assert_same_parameters(states):
    for name, tensor in states["all_gather"][0]["params"].items():
        assert torch.equal(states["sharded"][0]["params"][name], tensor), name
    before = ToyModule().state_dict()
    assert any(not torch.equal(before[k], v) for k, v in states["sharded"][0]["params"].items())  # it trained


@pytest.mark.parametrize("world, aggregation", [(6, "trimmed_mean")])
def test_grouped_sharded_fit_is_bitwise_the_grouped_all_gather_fit(tmp_path, world, aggregation):
    _assert_same_parameters({path: _fit(tmp_path, path, world, aggregation, steps=3)
                             for path in ("all_gather", "sharded")})


def test_grouped_sharded_slashes_a_claim_cheater_and_no_honest_rank(tmp_path):
    """Rank 3 (group 1) cheats from step 3; verifier rank 0 is in group 0. Both paths slash it at
    step 3 and then aggregate without it: the same parameters, bitwise."""
    steps = 4
    states = {path: _fit(tmp_path, path, 4, "mean", steps, cheater=ScalarCheater(3, 3))
              for path in ("all_gather", "sharded")}
    _assert_same_parameters(states)
    reports = [torch.load(tmp_path / "sharded" / f"verifier{r}.pt", weights_only=False) for r in range(4)]
    assert all(r["slashed_set"] == [3] for r in reports)
    ledger = Ledger.load(tmp_path / "sharded" / "ledger.jsonl")
    assert [(r.step, r.rank, r.data["reason"]) for r in ledger if r.event == "slash"] == [(3, 3, "mismatch")]
    accepted = sorted((r.step, r.rank) for r in ledger if r.event == "verify" and r.data["verdict"] == "accept")
    assert accepted == sorted([(s, w) for s in range(1, steps + 1) for w in (1, 2)] + [(1, 3), (2, 3)])


def test_grouped_sharded_lying_aggregator_is_caught_by_an_audit_from_its_group_rows(tmp_path):
    """Rank 3 owns block 3, the second half of group 1's columns, and adds 1.0 to its aggregate
    from step 3 on; verifier rank 0 (group 0) audits it from group 1's rows and leaves."""
    liar, first, steps = 3, 3, 12
    states = _fit(tmp_path, "sharded", 4, "mean", steps, cheater=LyingOwner(liar, first))
    reports = [torch.load(tmp_path / "sharded" / f"verifier{r}.pt", weights_only=False) for r in range(4)]
    assert all(r["slashed_set"] == [liar] for r in reports)
    ledger = Ledger.load(tmp_path / "sharded" / "ledger.jsonl")
    (slash,) = [r for r in ledger if r.event == "slash"]
    assert (slash.rank, slash.data["reason"], slash.data["block"]) == (liar, "aggregate", liar)
    assert slash.step >= first
    assert all(r.data["verdict"] == "accept" for r in ledger if r.event == "verify")  # its claims are honest
    assert states  # replicas identical (checked in _fit): the lie was patched out on every rank alike

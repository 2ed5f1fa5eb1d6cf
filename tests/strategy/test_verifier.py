"""ProofVerifier end to end: real ranks, real recomputation (fork launcher, gloo, CPU)."""

from __future__ import annotations

import csv
import json
import math

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from replicas import assert_identical_replicas, max_param_diff

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger, LedgerTamperError, Reason

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

CHEATER, FIRST_CHEAT_STEP = 3, 6  # chain steps count from 1: optimizer step index 5


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=32, **kwargs)


class ScalarCheater(L.Callback):
    """``rank`` multiplies its submitted scalars by ``factor`` from chain step ``first`` on."""

    def __init__(self, rank: int, first: int, factor: float = -3.0) -> None:
        self.rank, self.first, self.factor = rank, first, factor

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            trainer.strategy.exchange.claim_hooks.append(
                lambda ctx, scalars: scalars * self.factor if ctx.step >= self.first else scalars)


class GradientHookCheater(L.Callback):
    """``rank``'s own module doubles its local gradient through tensor hooks from optimizer
    step ``first - 1`` on; its scalars are honest projections of a dishonest gradient."""

    def __init__(self, rank: int, first: int) -> None:
        self.rank, self.first = rank, first

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            for param in pl_module.parameters():
                param.register_hook(lambda g: g * 2.0 if trainer.global_step >= self.first - 1 else g)


class SlashFrom(L.Callback):
    """Reference run: rank ``rank`` is slashed from chain step ``first`` on, unverified."""

    def __init__(self, rank: int, first: int) -> None:
        self.rank, self.first = rank, first

    def on_train_start(self, trainer, pl_module):
        exchange = trainer.strategy.exchange

        def review(ctx):
            if ctx.step >= self.first:
                exchange.slashing.slash(self.rank, Reason.MISMATCH, ctx.step)

        exchange.review_hooks.append(review)


class SaveVerifier(L.Callback):
    def __init__(self, verifier: ProofVerifier, path) -> None:
        self.verifier, self.path = verifier, path

    def on_train_end(self, trainer, pl_module):
        v = self.verifier
        torch.save({"slashed": v.slashed, "verified": v.verified, "ledger": v.ledger.state_dict(),
                    "credit": v.credit(), "slashed_set": sorted(trainer.strategy.exchange.slashing.slashed)},
                   self.path / f"verifier{trainer.global_rank}.pt")


def run_verified(tmp_path, cheater: L.Callback | None, steps: int = 16, devices: int = 4, **verifier_kwargs):
    verifier = ProofVerifier(**{"p_verify": 1.0, "ledger_path": str(tmp_path / "ledger.jsonl"), **verifier_kwargs})
    callbacks = [verifier, SaveVerifier(verifier, tmp_path)] + ([cheater] if cheater else [])
    states = fit(ToyModule(), holograd(), tmp_path / "ranks", devices=devices, max_steps=steps, callbacks=callbacks)
    reports = [torch.load(tmp_path / f"verifier{r}.pt", weights_only=False) for r in range(devices)]
    return states, reports


@pytest.mark.parametrize("cheater_cls", [ScalarCheater, GradientHookCheater], ids=["scalars", "gradient-hook"])
def test_cheater_is_slashed_at_its_first_cheating_step(tmp_path, cheater_cls):
    states, reports = run_verified(tmp_path / "verified", cheater_cls(CHEATER, FIRST_CHEAT_STEP))
    assert_identical_replicas(states)
    for report in reports:  # every rank agrees on who was slashed
        assert report["slashed"] == [CHEATER]
        assert report["slashed_set"] == [CHEATER]
    ledger = Ledger.load(tmp_path / "verified" / "ledger.jsonl")
    slashes = [r for r in ledger if r.event == "slash"]
    assert [(r.step, r.rank, r.data["reason"]) for r in slashes] == [(FIRST_CHEAT_STEP, CHEATER, "mismatch")]
    rejected = [r for r in ledger if r.event == "verify" and r.data["verdict"] == "reject"]
    assert [(r.step, r.rank) for r in rejected] == [(FIRST_CHEAT_STEP, CHEATER)]
    # honest workers were checked at every step (p_verify = 1) and never rejected
    accepted = [(r.step, r.rank) for r in ledger if r.event == "verify" and r.data["verdict"] == "accept"]
    honest_checks = [(s, r) for s in range(1, 17) for r in (1, 2)]
    cheater_checks = [(s, CHEATER) for s in range(1, FIRST_CHEAT_STEP)]
    assert sorted(accepted) == sorted(honest_checks + cheater_checks)
    credit = reports[0]["credit"]
    assert credit[CHEATER]["steps_served"] == FIRST_CHEAT_STEP - 1
    assert credit[1]["steps_served"] == credit[0]["steps_served"] == 16
    assert credit[CHEATER]["claims_accepted"] == FIRST_CHEAT_STEP - 1

    # the same run with the cheater removed from that step on, and nobody verifying
    reference = fit(ToyModule(), holograd(), tmp_path / "reference", devices=4, max_steps=16,
                    callbacks=[SlashFrom(CHEATER, FIRST_CHEAT_STEP)])
    assert max_param_diff(states[0], reference[0]) == 0.0


def test_zero_false_positives_with_exact_tolerance(tmp_path):
    """600 honest verifications with rtol = atol = 0 (4 ranks, 3 workers checked at every
    one of 200 steps): on CPU an honest recomputation is bitwise exact, so not a single
    claim may be rejected. Bound: if each check were rejected with probability q, all 600
    pass with probability (1 - q)^600 <= exp(-600 q), below 5 % for q > 3.0 / 600 = 0.5 %;
    so a false-positive rate above 0.5 % fails this test at least 95 % of the time.
    ``python -m benchmarks.verifier_false_positives`` runs 10,002 checks (bound 3.0e-4)."""
    steps = 200
    states, reports = run_verified(tmp_path, None, steps=steps, rtol=0.0, atol=0.0, ledger_path=None)
    assert reports[0]["verified"] == 3 * steps == 600
    assert reports[0]["slashed"] == []
    assert_identical_replicas(states)


def test_detection_rate_matches_p_verify(tmp_path):
    """Rank 1 inflates its scalars by 1% on every step (a lie small enough not to derail
    training, far above the tolerance); p_verify = 0.1; slashing off so every draw is recorded.
    Caught steps ~ Binomial(n = 600, p = 0.1): mean 60, sd = sqrt(600 * 0.1 * 0.9) = 7.35.
    Bound: within 4 sd (a correct draw fails this with probability < 1e-4)."""
    n, p = 600, 0.1
    _, reports = run_verified(tmp_path, ScalarCheater(1, 1, factor=1.01), steps=n, devices=2, p_verify=p,
                              slash=False)
    records = Ledger.load(tmp_path / "ledger.jsonl").records
    caught = [r for r in records if r.event == "verify" and r.rank == 1]
    assert all(r.data["verdict"] == "reject" and r.data["reason"] == "mismatch" for r in caught)
    assert len({r.step for r in caught}) == len(caught) == reports[0]["verified"]
    sd = math.sqrt(n * p * (1 - p))
    assert abs(len(caught) - n * p) <= 4 * sd, len(caught)
    assert reports[0]["slashed"] == []


def test_ledger_tampering_is_detected(tmp_path):
    run_verified(tmp_path, ScalarCheater(CHEATER, 3), steps=4)
    path = tmp_path / "ledger.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["data"]["verdict"] = "reject" if record["data"].get("verdict") == "accept" else "accept"
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerTamperError, match="record 2"):
        Ledger.load(path)


def test_resume_keeps_slashed_ranks_and_the_ledger_chain(tmp_path):
    """Slash rank 3 in epoch 1 (4 steps: 256 samples / 4 ranks / batch 16), checkpoint at the
    epoch end, resume for epoch 2 (steps 5-8)."""
    ledger_path = tmp_path / "ledger.jsonl"
    first = ProofVerifier(p_verify=1.0, ledger_path=str(ledger_path))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(ToyModule(), holograd(), tmp_path / "first", devices=4, max_epochs=1, max_steps=-1,
        enable_checkpointing=True, callbacks=[first, ckpt, ScalarCheater(CHEATER, 3)])
    first_records = Ledger.load(ledger_path).records
    second = ProofVerifier(p_verify=1.0, ledger_path=str(ledger_path))
    states = fit(ToyModule(), holograd(), tmp_path / "second", devices=4, max_epochs=2, max_steps=-1,
                 ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                 callbacks=[second, SaveVerifier(second, tmp_path), ScalarCheater(CHEATER, 3)])
    assert_identical_replicas(states)
    assert states[0]["exchange"]["slashed"] == [CHEATER]
    report = torch.load(tmp_path / "verifier0.pt", weights_only=False)
    assert report["slashed"] == [CHEATER]
    resumed = Ledger.load(ledger_path)  # verifies the whole chain
    assert resumed.records[: len(first_records)] == first_records
    later = resumed.records[len(first_records):]
    assert [r.step for r in first_records][-1] == 4
    assert later and {r.step for r in later} == {5, 6, 7, 8}
    assert all(r.rank != CHEATER for r in later)  # a slashed rank is never drawn again


def test_bad_arguments_are_named():
    for kwargs, pattern in [({"p_verify": 1.5}, "p_verify=1.5"), ({"rtol": -1}, "rtol=-1"),
                            ({"atol": -0.5}, "atol=-0.5"), ({"verifier_ranks": ()}, r"verifier_ranks=\(\)"),
                            ({"verifier_ranks": (0, 0)}, r"verifier_ranks=\(0, 0\)")]:
        with pytest.raises(ValueError, match=pattern):
            ProofVerifier(**kwargs)


class BatchSwapper(L.Callback):
    """``rank`` submits honest scalars but hands the verifier another batch (``swap``) or
    none at all (``withhold``), from chain step ``first`` on."""

    def __init__(self, rank: int, first: int, mode: str) -> None:
        self.rank, self.first, self.mode = rank, first, mode

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank != self.rank:
            return

        def hook(ctx, scalars):
            if ctx.step >= self.first:
                if self.mode == "withhold":
                    ctx.extras["inputs"] = None
                else:
                    ctx.extras["inputs"] = [((x + 1.0, y), idx) for (x, y), idx in ctx.extras["inputs"]]
            return scalars

        trainer.strategy.exchange.claim_hooks.append(hook)


@pytest.mark.parametrize(("mode", "reason"), [("swap", "batch_hash"), ("withhold", "missing")])
def test_wrong_or_missing_batch_slashes(tmp_path, mode, reason):
    logger = CSVLogger(tmp_path, name="logs")
    verifier = ProofVerifier(p_verify=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))
    states = fit(ToyModule(), holograd(), tmp_path / "ranks", devices=4, max_steps=8, logger=logger,
                 log_every_n_steps=1, callbacks=[verifier, BatchSwapper(2, 4, mode)])
    assert_identical_replicas(states)
    assert states[0]["exchange"]["slashed"] == [2]
    slashes = [r for r in Ledger.load(tmp_path / "ledger.jsonl") if r.event == "slash"]
    assert [(r.step, r.rank, r.data["reason"]) for r in slashes] == [(4, 2, reason)]
    # the counters are logged every step under their documented names
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    with open(metrics) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("holograd/verified")]
    assert len(rows) == 8
    assert [float(r["holograd/honest_ranks"]) for r in rows] == [4.0] * 3 + [3.0] * 5
    assert [float(r["holograd/slashed"]) for r in rows] == [0.0] * 3 + [1.0] * 5
    assert float(rows[-1]["holograd/verified"]) == 3 * 3 + 3 + 2 * 4  # 3 workers, then 2 after step 4


def test_training_stops_when_too_few_honest_ranks_remain(tmp_path):
    """Krum with f = 0 needs 3 rows; slashing one of 3 ranks leaves 2: a clear error."""
    strategy = HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16,
                                aggregation="krum", krum_byzantine=0)
    with pytest.raises(Exception, match="training cannot continue"):
        fit(ToyModule(), strategy, tmp_path, devices=3, max_steps=8,
            callbacks=[ProofVerifier(p_verify=1.0), ScalarCheater(2, 3)])

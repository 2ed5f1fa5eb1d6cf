"""Honest faults are not slashes; runs that lose workers say so (real gloo ranks, fork launcher).

A non-finite claim is dropped for its step and checked: the rank is slashed only when
the verifier's recomputation is finite (it lied). NaN in every row stops training with
an error that names the step, on HoloGrad and on true-gradient steps. Dropout, which a
verifier cannot reproduce, is refused at setup; aggregations that cannot be robust at the
world size fail or warn at setup.
"""

from __future__ import annotations

import csv
import math

import lightning.pytorch as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from replicas import assert_identical_replicas
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_holograd import ADCBootstrap, HoloGradStrategy, ProofVerifier
from lightning_holograd.callbacks.verifier import ledger_anchor_metrics
from lightning_holograd.demos import ToyModule, fit, make_dataset
from lightning_holograd.protocol import Ledger, NotEnoughRanksError, make_aggregator
from lightning_holograd.strategies.config import check_world_size

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

WORLD, BATCH = 3, 16


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16, **kwargs)


def fit_nan(module: NaNInputs, tmp_path, **kwargs):
    return fit(module, holograd(), tmp_path / "ranks", devices=WORLD, use_distributed_sampler=False, **kwargs)


class NaNInputs(ToyModule):
    """The toy task with NaN inputs in the batch that each rank of ``ranks`` sees at chain
    step ``step``: an unshuffled distributed sampler (``use_distributed_sampler=False``)
    gives rank r the samples r, r + N, r + 2N, ..., so batch b of rank r starts at sample
    r + N * BATCH * b."""

    def __init__(self, ranks: tuple[int, ...], step: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_ranks, self.bad_step = ranks, step

    def train_dataloader(self) -> DataLoader:
        dataset = make_dataset(self.hparams.num_samples)
        for rank in self.bad_ranks:
            dataset.tensors[0][rank + WORLD * BATCH * (self.bad_step - 1)] = float("nan")
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler)


class NaNClaim(L.Callback):
    """``rank`` submits an all-NaN row at ``step`` although its batch is fine: a lie."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            trainer.strategy.exchange.claim_hooks.append(
                lambda ctx, scalars: torch.full_like(scalars, float("nan")) if ctx.step == self.step else scalars)


class Scale(L.Callback):
    def __init__(self, ranks: tuple[int, ...], first: int) -> None:
        self.ranks, self.first = ranks, first

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank in self.ranks:
            trainer.strategy.exchange.claim_hooks.append(
                lambda ctx, scalars: scalars * -3.0 if ctx.step >= self.first else scalars)


def verified(tmp_path, **kwargs) -> ProofVerifier:
    return ProofVerifier(p_verify=kwargs.pop("p_verify", 0.0), ledger_path=str(tmp_path / "ledger.jsonl"), **kwargs)


def records(tmp_path, event: str) -> list[tuple]:
    return [(r.step, r.rank, r.data.get("verdict"), r.data["reason"])
            for r in Ledger.load(tmp_path / "ledger.jsonl") if r.event == event]


def test_an_honest_nan_is_dropped_checked_and_not_slashed(tmp_path):
    """p_verify = 0, so only the non-finite claim is checked: the recomputation is NaN too."""
    states = fit_nan(NaNInputs((1,), 3), tmp_path, max_steps=6, callbacks=[verified(tmp_path)])
    assert_identical_replicas(states)
    assert [s["exchange"]["slashed"] for s in states] == [[]] * WORLD
    assert records(tmp_path, "verify") == [(3, 1, "accept", "nonfinite")]
    assert records(tmp_path, "slash") == []
    assert all(torch.isfinite(p).all() for p in states[0]["params"].values())


def test_a_nan_lie_is_slashed(tmp_path):
    states = fit(ToyModule(), holograd(), tmp_path / "ranks", devices=WORLD, max_steps=6,
                 callbacks=[verified(tmp_path), NaNClaim(2, 3)])
    assert [s["exchange"]["slashed"] for s in states] == [[2]] * WORLD
    assert records(tmp_path, "verify") == [(3, 2, "reject", "nonfinite")]
    assert records(tmp_path, "slash") == [(3, 2, None, "nonfinite")]


@pytest.mark.parametrize("bootstrap", [False, True], ids=["holograd-step", "true-gradient-step"])
def test_nan_on_every_rank_stops_naming_the_step(tmp_path, bootstrap):
    callbacks = [ADCBootstrap(bootstrap_steps=5)] if bootstrap else [verified(tmp_path)]
    with pytest.raises(Exception, match=r"NonFiniteError: step 3: the loss or gradient was non-finite"):
        fit_nan(NaNInputs((0, 1, 2), 3), tmp_path, max_steps=6, callbacks=callbacks)


def test_one_nan_gradient_on_a_true_gradient_step_is_left_out(tmp_path):
    """Without the flag byte of the commit, rank 1's NaN would reach every replica."""
    states = fit_nan(NaNInputs((1,), 2), tmp_path, max_steps=4, callbacks=[ADCBootstrap(bootstrap_steps=4)])
    assert_identical_replicas(states)
    assert all(torch.isfinite(p).all() for p in states[0]["params"].values())


def test_too_many_slashed_workers_stop_training(tmp_path):
    """2 workers, max_slashed_fraction = 0.5: one slash is allowed (1 <= 0.5 x 2), two are not."""
    with pytest.raises(Exception, match=r"TooManySlashedError: step 2: 2 ranks are slashed \(\[1, 2\]\)"):
        fit(ToyModule(), holograd(), tmp_path / "ranks", devices=WORLD, max_steps=6,
            callbacks=[verified(tmp_path, p_verify=1.0), Scale((1, 2), 2)])
    assert [(s, r) for s, r, _, _ in records(tmp_path, "slash")] == [(2, 1), (2, 2)]


def test_a_run_with_slashed_workers_says_so_to_the_loggers(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    fit(ToyModule(), holograd(), tmp_path / "ranks", devices=WORLD, max_steps=5, logger=logger,
        log_every_n_steps=1, callbacks=[verified(tmp_path, p_verify=1.0), Scale((2,), 3)])
    (hparams,) = (tmp_path / "logs").rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["holograd/slashed_ranks"] == [2]
    assert logged["holograd/slash_reasons"] == {2: "mismatch at step 3"}
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    with open(metrics) as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["holograd/slashed_total"]) for r in rows if r.get("holograd/slashed_total")] == [1.0]
    anchors = [{k: float(v) for k, v in r.items() if k.startswith("holograd/ledger_")}
               for r in rows if r.get("holograd/ledger_records")]
    assert len(anchors) == 5  # every step
    ledger = Ledger.load(tmp_path / "ledger.jsonl")
    assert anchors[-1] == ledger_anchor_metrics(ledger)  # exact: the last anchor is the file's end


class Dropout(ToyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net.insert(1, nn.Dropout(0.1))


def test_dropout_is_refused_at_setup_when_slashing(tmp_path):
    with pytest.raises(Exception, match=r"active dropout layers \(net.1\).*HINT: set the dropout probabilities to 0"):
        fit(Dropout(), holograd(), tmp_path / "ranks", devices=2, max_steps=2, callbacks=[verified(tmp_path)])


def test_dropout_with_slash_false_only_warns(tmp_path):
    states = fit(Dropout(), holograd(), tmp_path / "ranks", devices=2, max_steps=2,
                 callbacks=[verified(tmp_path, slash=False, p_verify=1.0)])
    assert states[0]["global_step"] == 2


def test_krum_below_its_world_size_fails_at_setup(tmp_path):
    """Krum with f = 1 needs 5 ranks: refused before any step, not at the first one."""
    module = ToyModule()
    with pytest.raises(Exception, match=r"krum aggregation needs at least 5 ranks, and the job has world_size=3"):
        fit(module, holograd(aggregation="krum", krum_byzantine=1), tmp_path / "ranks", devices=WORLD, max_steps=2)


@pytest.mark.parametrize(("name", "ranks", "warns"), [("trimmed_mean", 2, True), ("trimmed_mean", 10, False),
                                                       ("median", 2, True), ("median", 3, False)])
def test_aggregations_that_cannot_be_robust_warn_at_setup(name, ranks, warns):
    aggregator = make_aggregator(name, trim_ratio=0.1)
    if warns:
        with pytest.warns(UserWarning, match="HINT"):
            check_world_size(aggregator, ranks)
    else:
        check_world_size(aggregator, ranks)  # the suite turns no warning into an error; none expected here
    with pytest.raises(NotEnoughRanksError, match="HINT"):
        check_world_size(make_aggregator("krum", num_byzantine=2), 6)
    assert make_aggregator("trimmed_mean", trim_ratio=0.29).num_trimmed(100) == 29 == math.floor(29.0)

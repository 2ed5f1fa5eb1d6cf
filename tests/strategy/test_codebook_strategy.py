"""The fitted codebook through the strategy (issue 13): real ranks (fork launcher, gloo, CPU).

Covers what the protocol tests cannot: that every rank of a Lightning fit holds bitwise the
same codebook (basis and sketch) after the bootstrap and after tracking, that a checkpoint
carries it exactly, that the diagnostic gamma measurement is logged on its schedule and
counted as its own traffic, and that true-gradient steps reach the verifier's ledger.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from replicas import assert_identical_replicas, max_param_diff

from lightning_holograd import ADCBootstrap, HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

D_TOY = 8 * 16 + 16 + 16 * 2 + 2  # trainable parameters of ToyModule: 178
TOY_SHAPES = [(16, 8), (16,), (2, 16), (2,)]  # in flat-gradient (module) order
# 16 basis scalars + 8 exploration directions, tracking on: the basis changes at every step
TRACKING = {"directions": "codebook", "num_directions": 24, "codebook_rank": 16, "exploration_weight": 0.5,
            "tracking_lr": 0.05, "audit_every": 0}


def holograd(**kwargs: Any) -> HoloGradStrategy:
    return HoloGradStrategy(start_method="fork", **kwargs)


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    (path,) = log_dir.rglob("metrics.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and plain values, equal bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, (where, a, b)


def layout_tensors(family_state: dict[str, Any]) -> list[torch.Tensor]:
    return [t for block in family_state["layout"]["tensors"] for t in block]


class SnapshotFamily(L.Callback):
    """Each rank saves the codebook state at the start of optimizer step ``step`` (refitted first)."""

    def __init__(self, out_dir: Path, step: int) -> None:
        self.out_dir, self.step = out_dir, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            family = trainer.strategy.exchange.family
            _ = family.layout  # the refit from the sketch happens at the basis' next use: now
            torch.save(family.state_dict(), self.out_dir / f"family{trainer.global_rank}.pt")


# -- identical codebooks on every rank ----------------------------------------------------


@pytest.mark.parametrize("structure", ["factor", "block"])
def test_both_ranks_hold_the_same_codebook_after_bootstrap_and_tracking(tmp_path, structure):
    """Bootstrap of 4 true gradients, then 12 tracked steps: basis, sketch and counters
    equal bitwise on the two ranks at both points; the bootstrap moved the basis away from
    its seeded start and tracking moved it again (so the comparisons are not vacuous)."""
    strategy = holograd(**TRACKING, codebook_structure=structure)
    states = fit(ToyModule(), strategy, tmp_path / "run", callbacks=[ADCBootstrap(bootstrap_steps=4),
                                                                     SnapshotFamily(tmp_path, step=4)])
    boot = [torch.load(tmp_path / f"family{r}.pt", weights_only=True) for r in range(2)]
    assert_same(boot[0], boot[1], "after bootstrap")
    end = [s["exchange"]["family"] for s in states]
    assert_same(end[0], end[1], "after tracking")
    assert_identical_replicas(states)

    start = strategy.config.build_family(D_TOY, param_shapes=TOY_SHAPES).state_dict()
    assert boot[0]["sketch"]["count"] == 4 and start["sketch"]["count"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(layout_tensors(start), layout_tensors(boot[0])))
    assert end[0]["num_updates"] > boot[0]["num_updates"]  # tracking steps were taken ...
    assert any(not torch.equal(a, b) for a, b in zip(layout_tensors(boot[0]), layout_tensors(end[0])))


# -- checkpoint / resume -------------------------------------------------------------------


def test_codebook_resume_is_bitwise_exact(tmp_path):
    """1 epoch (8 steps) + checkpoint + resume + 1 epoch equals 2 epochs uninterrupted,
    bitwise, for the codebook state (basis, sketch, pending refit) and the parameters.
    Bootstrap 3, refresh every 5: true-gradient steps 0-2, 7 and 12, so the checkpoint is
    taken with a refit pending (step 7's gradient is in the sketch, not yet in the basis)
    and a refresh follows the resume."""
    kwargs = {**TRACKING, "codebook_structure": "factor"}
    epochs = {"max_steps": -1}

    def boot() -> list[L.Callback]:
        return [ADCBootstrap(bootstrap_steps=3, refresh_every=5)]

    straight = fit(ToyModule(adam=True), holograd(**kwargs), tmp_path / "straight", max_epochs=2,
                   callbacks=boot(), **epochs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(ToyModule(adam=True), holograd(**kwargs), tmp_path / "first", max_epochs=1, enable_checkpointing=True,
        callbacks=[ckpt, *boot()], **epochs)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (key,) = [k for k in saved if str(k).startswith("HoloGradStrategy")]
    assert saved[key]["exchange"]["family"]["refit_due"] is True
    resumed = fit(ToyModule(adam=True), holograd(**kwargs), tmp_path / "resumed", max_epochs=2,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), callbacks=boot(), **epochs)
    assert_identical_replicas(resumed)
    assert straight[0]["exchange"]["chain"]["step"] == 16
    assert_same(resumed[0]["exchange"]["family"], straight[0]["exchange"]["family"], "codebook")
    assert max_param_diff(resumed[0], straight[0]) == 0.0
    assert resumed[0]["exchange"]["traffic"] == straight[0]["exchange"]["traffic"]


# -- the diagnostic measurement ------------------------------------------------------------


def test_diagnostic_schedule_logs_gamma_and_counts_its_bytes_apart(tmp_path):
    """diagnostic_every=3 with a 2-step bootstrap over 16 steps: gamma is logged on the
    true-gradient steps {0, 1} and on the diagnostic steps {3, 6, 9, 12, 15} (0-based s with
    s % 3 == 0; s = 0 is a true-gradient step, measured anyway). Each diagnostic is one
    all-reduce of 4D bytes, counted as ``diagnostic``; with N = 2 the wire bytes of an
    all_gather of n (N - 1) n and of an all-reduce of n 2 (N - 1)/N n both equal n; the
    commit sends 33 bytes per rank (hash and flag byte). The
    diagnostic leaves the per-step bytes, the total and the compression alone, and does
    not change training (same parameters bitwise as without it)."""
    k, logger = 8, CSVLogger(tmp_path, name="logs")
    kwargs = {"directions": "codebook", "num_directions": k, "audit_every": 0}
    states = fit(ToyModule(), holograd(**kwargs, diagnostic_every=3), tmp_path / "out", logger=logger,
                 log_every_n_steps=1, callbacks=[ADCBootstrap(bootstrap_steps=2)])
    plain = fit(ToyModule(), holograd(**kwargs), tmp_path / "plain", callbacks=[ADCBootstrap(bootstrap_steps=2)])
    assert max_param_diff(states[0], plain[0]) == 0.0

    diagnostic_steps, true_steps = [3, 6, 9, 12, 15], [0, 1]
    totals = states[0]["exchange"]["traffic"]["total_payload"]
    assert totals["diagnostic"] == len(diagnostic_steps) * 4 * D_TOY
    assert totals["true_gradient"] == len(true_steps) * 4 * D_TOY
    assert totals["scalars"] == (16 - len(true_steps)) * 4 * k

    rows = read_metrics(tmp_path / "logs")
    energies = {int(r["step"]): float(r["holograd/captured_energy"]) for r in rows if r.get("holograd/captured_energy")}
    assert sorted(energies) == sorted(true_steps + diagnostic_steps)
    assert all(0.0 <= e <= 1.0 + 1e-6 for e in energies.values())
    per_step = {int(r["step"]): r for r in rows if r.get("holograd/bytes_per_step")}
    for step in diagnostic_steps:
        assert float(per_step[step]["holograd/bytes_diagnostic"]) == 4 * D_TOY
        assert float(per_step[step]["holograd/bytes_per_step"]) == 33 + 4 * k  # hash + flag byte
    # 0 on every other step, not the last value repeated (the column exists from step 3 on)
    quiet = [s for s in per_step if s > 3 and s not in diagnostic_steps]
    assert quiet and all(float(per_step[s]["holograd/bytes_diagnostic"]) == 0.0 for s in quiet)
    assert all(float(per_step[s]["holograd/bytes_true_gradient"]) == 0.0 for s in per_step if s >= 2)
    sent = 16 * 33 + (16 - len(true_steps)) * 4 * k + len(true_steps) * 4 * D_TOY
    assert float(per_step[15]["holograd/bytes_total"]) == sent
    assert float(per_step[15]["holograd/compression"]) == pytest.approx(16 * 4 * D_TOY / sent)


# -- ledger ------------------------------------------------------------------------------------


class SaveLedgerHead(L.Callback):
    def __init__(self, verifier: ProofVerifier, out_dir: Path) -> None:
        self.verifier, self.out_dir = verifier, out_dir

    def on_train_end(self, trainer, pl_module):
        (self.out_dir / f"head{trainer.global_rank}.txt").write_text(self.verifier.ledger.head)


def test_true_gradient_steps_are_recorded_in_the_ledger(tmp_path):
    """ADCBootstrap(2, refresh_every=4) over 16 steps: true-gradient optimizer steps
    0, 1, 5, 9, 13, i.e. chain steps t = 2, 3, 6, 10, 14 when counted from 1. Each gets one
    ``true_gradient`` record (rank -1, both ranks, the digest d_t of the mean gradient),
    the same on both ranks (equal ledger heads), and the chain verifies."""
    path = tmp_path / "ledger.jsonl"
    verifier = ProofVerifier(p_verify=0.5, ledger_path=str(path))
    boot = ADCBootstrap(bootstrap_steps=2, refresh_every=4)
    states = fit(ToyModule(), holograd(directions="codebook", num_directions=8), tmp_path / "out",
                 callbacks=[verifier, boot, SaveLedgerHead(verifier, tmp_path)])
    records = Ledger.load(path).records
    marked = [r for r in records if r.event == "true_gradient"]
    assert [r.step for r in marked] == [s + 1 for s in range(16) if boot.is_true_gradient_step(s)] == [1, 2, 6, 10, 14]
    assert all(r.rank == -1 and r.data["ranks"] == [0, 1] and len(r.data["gradient_digest"]) == 64 for r in marked)
    assert len({r.data["gradient_digest"] for r in marked}) == len(marked)
    assert any(r.event == "verify" for r in records)  # the other steps were still verified
    heads = [(tmp_path / f"head{r}.txt").read_text() for r in range(2)]
    assert heads[0] == heads[1] == records[-1].hash
    assert_identical_replicas(states)


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"codebook_structure": "diagonal"}, "codebook_structure='diagonal'"),
        ({"codebook_fit": "svd"}, "codebook_fit='svd'"),
        ({"codebook_fit": "oja"}, "codebook_fit='oja' works on codebook_structure='dense' only"),
        ({"sketch_size": 0}, "sketch_size=0"),
        ({"sketch_decay": 0.0}, "sketch_decay=0.0"),
        ({"tracking_lr": -0.1}, "tracking_lr=-0.1"),
        ({"diagnostic_every": -1}, "diagnostic_every=-1"),
        ({"diagnostic_every": 5}, "diagnostic_every=5 .*directions='sketch'"),
        ({"directions": "codebook", "diagnostic_every": 5, "projection": "jvp"}, "projection='jvp'"),
    ],
)
def test_bad_codebook_settings_fail_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HoloGradStrategy(**kwargs)


def test_the_strategy_builds_the_codebook_from_the_parameter_shapes(tmp_path):
    """The family the strategy builds has one block per trainable parameter, in module order
    (factor: the two weight matrices factored, the biases as columns)."""
    states = fit(ToyModule(), holograd(directions="codebook", num_directions=16, codebook_structure="factor"),
                 tmp_path, devices=1, max_steps=1)
    layout = states[0]["exchange"]["family"]["layout"]
    assert layout["kinds"] == ["factor", "vector", "factor", "vector"]

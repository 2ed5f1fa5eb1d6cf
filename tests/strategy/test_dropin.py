"""Issue 15 for the Trainer strategy: model-dependent defaults, setup-time checks, a
changing trainable set, refused DDP arguments (fork launcher, gloo, CPU).

The toy task has D = 178 trainable parameters (``ToyModule``); with its first layer
frozen D = 34.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint
from replicas import assert_identical_replicas, max_param_diff

from lightning_holograd import HoloGradConfig, HoloGradSetupWarning, HoloGradStrategy
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol.defaults import default_num_directions, estimate_scale_factor
from lightning_holograd.strategies.advice import advise
from lightning_holograd.strategies.checkpoint import STATE_KEY, config_changes
from lightning_holograd.strategies.runtime import TrainableSet

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

D_TOY, D_HEAD = 178, 16 * 2 + 2


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(start_method="fork", **kwargs)


class RecordSetupWarnings(L.Callback):
    """Each rank saves the HoloGrad setup warnings it issued (``setup`` runs before the strategy's)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage):
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_fit_start(self, trainer, pl_module):
        self._catcher.__exit__(None, None, None)
        messages = [str(w.message) for w in self._records if issubclass(w.category, HoloGradSetupWarning)]
        torch.save(messages, self.out_dir / f"warnings{trainer.global_rank}.pt")


def setup_warnings(tmp_path: Path, module: L.LightningModule, **strategy_kwargs) -> list[list[str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    fit(module, holograd(**strategy_kwargs), tmp_path / "run", max_steps=1, callbacks=[RecordSetupWarnings(tmp_path)])
    return [torch.load(tmp_path / f"warnings{rank}.pt") for rank in range(2)]


# -- 1. defaults that depend on the model ---------------------------------------------------


@pytest.mark.parametrize(("dim", "expected"), [(445_952, 4_460), (1_393_856, 13_939), (178, 64), (66, 33), (3, 1),
                                               (1, 1)])
def test_default_num_directions_follows_d(dim, expected):
    """ceil(D / 100), at least min(64, D // 2), at least 1: never K >= D for D >= 2."""
    assert default_num_directions(dim) == expected
    assert dim < 2 or expected < dim


def test_default_k_is_resolved_at_setup_and_recorded_in_the_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    states = fit(ToyModule(), holograd(), tmp_path / "run", max_steps=4, enable_checkpointing=True, callbacks=[ckpt])
    assert_identical_replicas(states)
    assert states[0]["exchange"]["family"]["num_directions"] == default_num_directions(D_TOY) == 64
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)[STATE_KEY]
    assert saved["config"]["num_directions"] == 64 and saved["config"]["target_compression"] == 100.0
    assert saved["trainable"]["dim"] == D_TOY


def test_num_directions_none_resumes_with_the_checkpoints_k(tmp_path):
    """A checkpoint of an explicit K (or of 0.1.x's default 1024) resumed with
    num_directions=None keeps that K and continues bitwise (mid-epoch: a resumable loader); the None is no "changed setting"."""
    straight = fit(ToyModule(resumable=True), holograd(num_directions=8), tmp_path / "straight", max_steps=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(ToyModule(resumable=True), holograd(num_directions=8), tmp_path / "first", max_steps=4, enable_checkpointing=True,
        callbacks=[ckpt])
    resumed = fit(ToyModule(resumable=True), holograd(), tmp_path / "resumed", max_steps=8,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed[0]["exchange"]["family"]["num_directions"] == 8 != default_num_directions(D_TOY)
    assert resumed[0]["exchange"]["chain"] == straight[0]["exchange"]["chain"]
    assert max_param_diff(resumed[0], straight[0]) == 0.0
    saved = {STATE_KEY: {"config": HoloGradConfig(num_directions=8).as_dict()}}
    assert config_changes(saved, HoloGradConfig().as_dict()) == []
    assert config_changes(saved, HoloGradConfig(num_directions=16).as_dict()) == ["num_directions: 8 -> 16"]


def test_advice_compression_below_one_names_the_fix():
    """BoringModel's D = 66 with the old default K = 1024: 16x DDP's bytes."""
    config = HoloGradConfig(num_directions=1024).resolve(66)
    (message,) = [m for m in advise(config, 66, 2, [torch.optim.Adam([torch.zeros(1)])]) if "compression" in m]
    assert "num_directions=1024" in message and "D=66" in message and "compression 0.064 " in message and "num_directions <= 57" in message
    assert "strategy='ddp'" in message and "directions='identity'" in message
    assert not advise(HoloGradConfig().resolve(66), 66, 2, [torch.optim.Adam([torch.zeros(1)])])  # K = 33


def test_advice_threshold_is_noise_as_large_as_the_gradient():
    """v = (D-1)/K > 1 warns with SGD: BoringModel's D = 66 at K = 33 (v = 1.97) diverges."""
    sgd = [torch.optim.SGD([torch.zeros(1)], lr=0.1)]

    def inflation_warnings(dim, k):
        return [m for m in advise(HoloGradConfig(num_directions=k).resolve(dim), dim, 2, sgd) if "longer" in m]

    assert inflation_warnings(66, 33) and not inflation_warnings(67, 66)  # v = 1.97; v = 1 exactly


def test_advice_sgd_with_an_inflated_estimate_states_the_factor():
    """D = 1.39M (LightningTransformer, vocab 256), default K: the estimate is ~10x the gradient."""
    dim, sgd = 1_393_856, torch.optim.SGD([torch.zeros(1)], lr=0.1)
    config = HoloGradConfig().resolve(dim)
    (message,) = advise(config, dim, 2, [sgd])
    factor = math.sqrt(1 + (dim - 1) / config.num_directions)
    assert f"about {factor:.1f}x longer" in message and "SGD" in message and factor == pytest.approx(10.05, abs=0.01)
    assert "divide the learning rate by 10.0 (estimate_scale='norm'" in message
    assert "by up to 101 = 1 + (D-1)/K" in message and "estimate_scale='min_variance'" in message
    assert "Adam" in message
    assert not advise(config, dim, 2, [torch.optim.AdamW([torch.zeros(1)])])  # scale-invariant
    assert not advise(HoloGradConfig(estimate_scale="norm").resolve(dim), dim, 2, [sgd])  # already scaled


def test_setup_warns_once_on_rank_zero(tmp_path):
    """K = 8 on D = 178 with SGD: inflation sqrt(1 + 177/8) = 4.8 (warned above sqrt 2). Adam: no warning."""
    sgd = setup_warnings(tmp_path / "sgd", ToyModule(), num_directions=8)
    assert len(sgd[0]) == 1 and "about 4.8x longer" in sgd[0][0]
    assert sgd[1] == []  # rank 1 stays silent
    adam = setup_warnings(tmp_path / "adam", ToyModule(adam=True), num_directions=8)
    assert adam == [[], []]


class _SaveFirstGradient(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 0 and trainer.global_step == 0:
            torch.save([p.grad.clone() for p in pl_module.parameters()], self.path)


@pytest.mark.parametrize("scale", ["min_variance", "norm"])
def test_estimate_scale_multiplies_the_estimate(tmp_path, scale):
    """Same step, same seeds: g_hat with ``scale`` equals c x the unbiased g_hat, c from
    docs/PROTOCOL.md §3.9 (float32 rounding of one product: rtol 1e-6)."""
    for name in ("unbiased", scale):
        fit(ToyModule(), holograd(num_directions=8, estimate_scale=name), tmp_path / name, max_steps=1,
            callbacks=[_SaveFirstGradient(tmp_path / f"{name}.pt")])
    plain, scaled = torch.load(tmp_path / "unbiased.pt"), torch.load(tmp_path / f"{scale}.pt")
    c = estimate_scale_factor(scale, "sketch", D_TOY, 8)
    assert c == pytest.approx(1 / (1 + 177 / 8) if scale == "min_variance" else (1 + 177 / 8) ** -0.5)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, a * c, rtol=1e-6, atol=0)
    assert any(float(a.abs().max()) > 0 for a in plain)


def test_estimate_scale_needs_an_unbiased_family():
    with pytest.raises(ValueError, match="estimate_scale='min_variance' needs an unbiased family.*HINT"):
        HoloGradStrategy(directions="codebook", estimate_scale="min_variance")


# -- 3. promises kept: checks at setup, a changing trainable set, DDP arguments ---------------


class TwoOptimizers(ToyModule):
    """A GAN-shaped module: two optimizers, manual optimization."""

    def __init__(self, marker: Path) -> None:
        super().__init__(manual=True)
        self.marker = str(marker)

    def training_step(self, batch, batch_idx):
        Path(self.marker).touch()
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.Adam(self.net[2].parameters())]


def test_two_optimizers_fail_at_setup_before_any_step(tmp_path):
    with pytest.raises(Exception) as info:
        fit(TwoOptimizers(tmp_path / "stepped"), holograd(), tmp_path / "run", max_steps=2)
    message = str(info.value)
    assert "2 optimizers were set up (SGD, Adam)" in message and "HINT" in message
    assert "found no training batch" not in message
    assert not (tmp_path / "stepped").exists(), "training_step ran: the check did not fire at setup"


class UnfreezeAtEpochOne(BaseFinetuning):
    """Freezes the first layer before training; unfreezes it (own param group) at epoch 1."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.05, initial_denom_lr=1.0)


class HeadOnlyOptimizer(ToyModule):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def test_unfreezing_at_an_epoch_boundary_rebuilds_the_family_and_resumes_exactly(tmp_path):
    """BaseFinetuning: D = 34 in epoch 0, D = 178 from epoch 1 (8 steps per epoch). The family
    follows (K = 17, then 64), replicas stay identical, the change is in the chain and the
    checkpoint, and epoch 0 + resume + epoch 1 equals two epochs straight, bitwise."""
    epochs = {"max_steps": -1}
    straight = fit(HeadOnlyOptimizer(), holograd(), tmp_path / "straight", max_epochs=2,
                   callbacks=[UnfreezeAtEpochOne()], **epochs)
    assert_identical_replicas(straight)
    family = straight[0]["exchange"]["family"]
    assert (family["dim"], family["num_directions"]) == (D_TOY, default_num_directions(D_TOY))
    assert straight[0]["exchange"]["chain"]["step"] == 16
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = fit(HeadOnlyOptimizer(), holograd(), tmp_path / "first", max_epochs=1, enable_checkpointing=True,
                callbacks=[UnfreezeAtEpochOne(), ckpt], **epochs)
    assert first[0]["exchange"]["family"]["dim"] == D_HEAD
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)[STATE_KEY]["trainable"]["dim"] == D_HEAD
    resumed = fit(HeadOnlyOptimizer(), holograd(), tmp_path / "resumed", max_epochs=2,
                  callbacks=[UnfreezeAtEpochOne()], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **epochs)
    assert resumed[0]["exchange"]["chain"] == straight[0]["exchange"]["chain"]
    assert max_param_diff(resumed[0], straight[0]) == 0.0
    # the first layer trained in epoch 1 only
    untouched = ToyModule().state_dict()["net.0.weight"]
    assert torch.equal(first[0]["params"]["net.0.weight"], untouched)
    assert not torch.equal(straight[0]["params"]["net.0.weight"], untouched)


def test_the_change_is_recorded_in_the_chain():
    """The digest that the next commitment uses depends on the new D, K and mask."""
    from lightning_holograd.protocol import CommitmentChain

    module = ToyModule()
    before = TrainableSet(module)
    module.net[0].requires_grad_(False)
    dim, digest = TrainableSet.describe(module)
    assert (before.dim, dim) == (D_TOY, D_HEAD) and digest != before.digest
    a, b = CommitmentChain("s"), CommitmentChain("s")
    b.record_trainable_change(dim, 17, digest)
    assert a.advance([bytes(32)]) != b.advance([bytes(32)])


def test_unfreezing_with_a_stateful_family_stops_naming_step_counts_and_fix(tmp_path):
    with pytest.raises(Exception) as info:
        fit(HeadOnlyOptimizer(), holograd(directions="momentum", num_directions=8), tmp_path, max_epochs=2,
            max_steps=-1, callbacks=[UnfreezeAtEpochOne()])
    message = str(info.value)
    assert f"step 9: the trainable parameters changed from {D_HEAD} to {D_TOY}" in message
    assert "HINT" in message and "directions='sketch'" in message


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"find_unused_parameters": True}, "find_unused_parameters=True is not supported: HoloGrad handles unused"),
        ({"static_graph": True}, "static_graph=True is not supported: .*HINT: remove it"),
        ({"gradient_as_bucket_view": True}, "gradient_as_bucket_view=True is not supported"),
        ({"ddp_comm_hook": print}, "ddp_comm_hook=<built-in function print> is not supported: .*comm hook"),
        ({"block_size": 8192}, "block_size=8192 is not supported: removed: directions no longer depend on it"),
        ({"broadcast_buffers": False}, "broadcast_buffers=False is not supported: .*sync_buffers"),
        ({"num_directoins": 8}, "num_directoins=8 is not supported: it is not an argument"),
    ],
)
def test_ddp_only_arguments_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HoloGradStrategy(**kwargs)


# -- 5. setup cost and discoverability ------------------------------------------------------


def test_codebook_validation_allocates_nothing():
    """K = 20000: a throwaway K x K codebook would be 1.6 GB; validation is arithmetic only."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    HoloGradStrategy(directions="codebook", num_directions=20_000, codebook_rank=16_000)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_default_codebook_rank_error_names_the_users_argument(tmp_path):
    with pytest.raises(Exception, match=f"num_directions=200 \\(codebook_rank=None uses all of them as columns\\) "
                                        f"exceeds the model's {D_TOY} trainable parameters"):
        fit(ToyModule(), holograd(directions="codebook", num_directions=200), tmp_path, devices=1, max_steps=1)


def test_a_bad_ledger_path_fails_at_construction(tmp_path):
    """A file where a folder should be: before, rank 0 raised a bare FileExistsError at fit
    start and the other ranks saw only a closed connection."""
    from lightning_holograd import ProofVerifier

    (tmp_path / "runs").write_text("a file")
    with pytest.raises(ValueError, match=r"ledger_path='.*runs/ledger.jsonl' cannot be created: '.*runs' is a file, "
                                         r"not a directory\. HINT"):
        ProofVerifier(ledger_path=str(tmp_path / "runs" / "ledger.jsonl"))
    with pytest.raises(ValueError, match=r"ledger_path='.*' is a directory\. HINT: name a file in it"):
        ProofVerifier(ledger_path=str(tmp_path))
    ProofVerifier(ledger_path=str(tmp_path / "new" / "folders" / "ledger.jsonl"))  # created later by rank 0

"""Models this package did not write, trained with the strategy's defaults on 2 processes.

Lightning's own demos (``BoringModel``, ``DemoModel``, ``LightningTransformer``) and two
Hugging Face ``transformers`` models built from small configs (BERT for masked LM, Llama
for causal LM), each with its own optimizer and ``HoloGradStrategy``'s defaults (fork,
gloo, CPU); where the model's own SGD recipe needs it, the fix that the setup warning
names (``estimate_scale``). Each test checks that the replicas end bitwise
identical and that the loss went down: the mean of the last 4 training losses of rank 0
is below ``ratio`` x the mean of the first 4 (the bound and what was measured are given
per model). Synthetic data is drawn from fixed generators, so every run is the same.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from replicas import assert_identical_replicas
from torch.utils.data import DataLoader, TensorDataset

from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import fit

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


class RecordLosses(L.Callback):
    """Appends each training loss to ``pl_module.losses`` (what ``demos.fit`` returns per rank)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        pl_module.losses.append(float(loss.detach()))


def seeded(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, **kwargs)`` initialised from a fixed seed, the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = cls(*args, **kwargs)
    module.losses = []
    return module


def train(tmp_path, module: L.LightningModule, max_steps: int, **strategy_kwargs: Any) -> list[float]:
    states = fit(module, HoloGradStrategy(start_method="fork", **strategy_kwargs), tmp_path, max_steps=max_steps,
                 callbacks=[RecordLosses()])
    assert_identical_replicas(states)
    assert states[0]["exchange"]["chain"]["step"] == max_steps
    return states[0]["losses"]


def assert_loss_fell(losses: list[float], ratio: float) -> None:
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < ratio * first, (first, last, losses)


def token_stream(count: int, length: int, used: int = 8, seed: int = 0) -> torch.Tensor:
    """(count, length) sequences x_{i+1} = (5 x_i + 3) mod ``used`` from random starts: only
    ``used`` of the model's 64 tokens occur (a loss of ln 64 = 4.16 falls toward ln 8 = 2.08
    by learning which), and each token determines the next."""
    start = torch.randint(0, used, (count, 1), generator=torch.Generator().manual_seed(seed))
    steps = [start]
    for _ in range(length - 1):
        steps.append((5 * steps[-1] + 3) % used)
    return torch.cat(steps, dim=1)


# -- Lightning's demos -----------------------------------------------------------------------


class Boring(BoringModel):
    """BoringModel with its own SGD + StepLR, and fixed random data (D = 66)."""

    def train_dataloader(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return DataLoader(RandomDataset(32, 64))


def test_boring_model_with_its_sgd_and_the_conservative_fix(tmp_path):
    """D = 66, default K = 33. Its recipe (SGD lr 0.1 at batch size 1) is at the edge of
    stability even under DDP (ratio 0.69 after 32 steps); the unbiased estimate (1.7x the
    gradient's length) diverges, and the setup warning says so. With
    ``estimate_scale="min_variance"`` (expected step as stable as DDP's, docs/PROTOCOL.md
    §3.9) it learns: bound 0.6, measured 0.34."""
    losses = train(tmp_path, seeded(Boring), max_steps=32, estimate_scale="min_variance")
    assert_loss_fell(losses, ratio=0.6)


class Demo(DemoModel):
    """DemoModel (its Adam, loss = sum of ReLU outputs) on fixed random data (D = 330)."""

    def train_dataloader(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return DataLoader(RandomDataset(32, 64), batch_size=4)


def test_demo_model(tmp_path):
    """Default K = 64, its Adam (scale-invariant). Bound 0.5; measured 0.22 (DDP: 0.01)."""
    assert_loss_fell(train(tmp_path, seeded(Demo), max_steps=32), ratio=0.5)


class Transformer(LightningTransformer):
    """The demo's model and SGD(lr=0.1), vocab 64, on windows of a learnable token stream
    (the demo reads WikiText-2, which needs a download). D = 1,316,864."""

    def prepare_data(self):
        pass

    def train_dataloader(self):
        tokens = token_stream(64, 36)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def test_lightning_transformer_with_its_sgd_and_the_documented_fix(tmp_path):
    """Its SGD at lr 0.1 with the unbiased estimate (~11x the gradient's length at K = D / 100)
    makes the setup warning fire (on real text it diverges: benchmarks/results/sgd_recipe_cpu.md);
    with the warning's faster fix, ``estimate_scale="norm"``, it learns. Bound 0.6; measured 0.40."""
    losses = train(tmp_path, seeded(Transformer, vocab_size=64), max_steps=24, estimate_scale="norm")
    assert_loss_fell(losses, ratio=0.6)


# -- Hugging Face transformers from small configs ------------------------------------------


class HFModule(L.LightningModule):
    """A ``transformers`` model as a LightningModule with its usual AdamW."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, masked: bool, lr: float = 1e-2) -> None:
        super().__init__()
        self.model, self.tokens, self.masked, self.lr = model, tokens, masked, lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        if not self.masked:  # causal LM: labels are the inputs (shifted inside the model)
            return self.model(input_ids=ids, labels=ids).loss
        mask = (torch.arange(ids.numel()).view_as(ids) % 4) == batch_idx % 4  # every 4th token, moving
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        return self.model(input_ids=torch.where(mask, torch.zeros_like(ids), ids), labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.tokens), batch_size=8)


def test_bert_masked_lm(tmp_path):
    """BertForMaskedLM, 2 layers of width 32, vocab 64 (D = 23,584, K = 236). Bound 0.75;
    measured 0.58 (DDP: 0.58)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    module = seeded(HFModule, seeded(BertForMaskedLM, config), token_stream(128, 16), masked=True)
    assert_loss_fell(train(tmp_path, module, max_steps=24), ratio=0.75)


def test_llama_causal_lm(tmp_path):
    """LlamaForCausalLM, 2 layers of width 32, vocab 64 (D = 22,688, K = 227). Bound 0.5;
    measured 0.26."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    module = seeded(HFModule, seeded(LlamaForCausalLM, config), token_stream(128, 16), masked=False)
    assert_loss_fell(train(tmp_path, module, max_steps=24), ratio=0.5)

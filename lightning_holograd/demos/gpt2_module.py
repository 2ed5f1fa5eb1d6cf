"""GPT-2 language model as a LightningModule (the model of ``examples/train_gpt2.py``).

The network is ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` (random
init, nothing downloaded). Only ``pretrained="gpt2"`` (or another hub name / local
directory) loads weights with ``from_pretrained``; the shape arguments are then ignored.

Logged: ``train_loss`` (progress bar, this rank's micro-batch), ``val_loss`` (mean
cross-entropy per token, nats) and ``val_ppl`` = exp(val_loss), both torchmetrics
accumulated over the validation run and synchronised across ranks.
"""

from __future__ import annotations

import math

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import GPT2Config, GPT2LMHeadModel
from typing_extensions import override

__all__ = ["GPT2Module", "TokenPerplexity", "build_gpt2"]


class TokenPerplexity(MeanMetric):
    """exp of the token-weighted mean cross-entropy: update with (loss, weight=tokens)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def build_gpt2(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float,
               pretrained: str | None) -> GPT2LMHeadModel:
    if pretrained is not None:
        model = GPT2LMHeadModel.from_pretrained(pretrained)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"pretrained={pretrained!r} has vocab_size={model.config.vocab_size} < the data's "
                             f"{vocab_size}. HINT: use the model's tokenizer (data.tokenizer={pretrained!r}).")
        return model
    end_of_text = 50256 if vocab_size > 50256 else None  # GPT-2's <|endoftext|>; no such id at byte level
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=end_of_text, eos_token_id=end_of_text)
    return GPT2LMHeadModel(config)


class GPT2Module(L.LightningModule):
    """Next-token prediction with GPT-2 and AdamW (linear warmup, cosine decay to ``min_lr``)."""

    def __init__(
        self,
        vocab_size: int = 256,        # linked from data.vocab_size by the CLI (256 = bytes)
        block_size: int = 128,        # context length T (GPT2Config.n_positions); linked to data.block_size
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 128,
        dropout: float = 0.0,
        pretrained: str | None = None,  # e.g. "gpt2": load weights (network) instead of random init
        lr: float = 3e-3,             # peak learning rate
        min_lr: float = 3e-4,         # reached at the last step (cosine)
        warmup_steps: int = 20,
        weight_decay: float = 0.1,    # on matrices only, not on biases / LayerNorm
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_gpt2(vocab_size, block_size, n_layer, n_head, n_embd, dropout, pretrained)
        self.val_loss = MeanMetric()
        self.val_ppl = TokenPerplexity()

    @override
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits  # (B, T) -> (B, T, vocab)

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) over the B x (T - 1) predicted positions."""
        logits = self(input_ids)[:, :-1]  # (B, T-1, vocab): position t predicts token t + 1
        targets = input_ids[:, 1:]  # (B, T-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)  # batch: (B, T) token ids
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self.loss(batch)
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        self.val_loss.update(loss, weight=tokens)
        self.val_ppl.update(loss, weight=tokens)
        self.log_dict({"val_loss": self.val_loss, "val_ppl": self.val_ppl}, prog_bar=True)

    @override
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of ``lr``: linear warmup, then cosine from 1 to min_lr / lr at ``total``."""
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        progress = min((step - hp.warmup_steps) / max(total - hp.warmup_steps, 1), 1.0)
        floor = hp.min_lr / hp.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

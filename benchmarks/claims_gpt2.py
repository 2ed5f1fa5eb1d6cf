"""The GPT-2 harness of claims C2-C5: the tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml``
(D = 445,952) trained in one process with the example's AdamW and learning-rate schedule,
drawing 16 x 128-token batches from the embedded stdlib corpus with a seeded generator, so
every trajectory sees the same init and the same batches. A trajectory differs only in the
gradient handed to AdamW: the exact minibatch gradient g, or a direction family's
g_hat = reconstruct(project(g)) (one rank: the protocol's maths without the wire).
Validation loss: the first 8 x 16 windows of the validation split.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector

from benchmarks.claims_estimators import cos
from benchmarks.harness import DATA_KW, MODEL_KW, SEED
from lightning_holograd.protocol import direction_seeds, genesis_commitment, make_family

BATCH = 16
VAL_BATCHES = 8


def random_abs_cos(dim: int) -> float:
    """E|cos(z, g)| for a uniformly random direction z in R^D: Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2))."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


@lru_cache(maxsize=1)
def _corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_holograd.demos.gpt2_data import stdlib_corpus

    return stdlib_corpus(DATA_KW["max_bytes"], DATA_KW["val_every"])


@lru_cache(maxsize=1)
def tiny_gpt2_dim() -> int:
    """D of the tiny GPT-2 (trainable parameters), for families built before a harness."""
    from lightning_holograd.demos.gpt2_module import GPT2Module

    return sum(p.numel() for p in GPT2Module(**MODEL_KW).parameters() if p.requires_grad)


class GPT2Harness:
    """Model at the example's init (seed), seeded batches, flat gradients, validation loss."""

    def __init__(self, seed: int = SEED) -> None:
        from lightning_holograd.demos.gpt2_data import TokenBlocks
        from lightning_holograd.demos.gpt2_module import GPT2Module

        torch.manual_seed(seed)
        self.module = GPT2Module(**MODEL_KW)
        train, val = _corpus()
        self.train = TokenBlocks(train, MODEL_KW["block_size"])
        self.val = TokenBlocks(val, MODEL_KW["block_size"])
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        self.gen = torch.Generator().manual_seed(seed)
        self.val_batches = [torch.stack([self.val[b * BATCH + i] for i in range(BATCH)]) for b in range(VAL_BATCHES)]

    def batch(self, gen: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(len(self.train), (BATCH,), generator=gen or self.gen)
        return torch.stack([self.train[int(i)] for i in idx])  # (B, T)

    def grad(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.module.loss(batch)
        return parameters_to_vector(torch.autograd.grad(loss, self.params)).detach()

    @torch.no_grad()
    def val_loss(self) -> float:
        self.module.eval()
        loss = statistics.fmean(float(self.module.loss(b)) for b in self.val_batches)
        self.module.train()
        return loss

    def optimizer(self, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        hp = self.module.hparams
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.module.lr_factor(s, steps))
        return opt, sched

    def apply(self, flat: torch.Tensor) -> None:
        for p, g in zip(self.params, flat.split([p.numel() for p in self.params])):
            p.grad = g.view_as(p).clone()

    def pairwise(self, count: int, seed: int) -> dict[str, Any]:
        """C2 statistics over ``count`` minibatch gradients at the current parameters."""
        gen = torch.Generator().manual_seed(seed)
        grads = torch.stack([self.grad(self.batch(gen)) for _ in range(count)]).double()  # (M, D)
        unit = grads / grads.norm(dim=1, keepdim=True)
        gram = unit @ unit.T
        pairs = [float(gram[i, j]) for i in range(count) for j in range(i + 1, count)]
        mean = grads.mean(dim=0)
        loo = [cos(grads[i], (mean * count - grads[i]) / (count - 1)) for i in range(count)]
        sv = torch.linalg.svdvals(grads)
        energy = (sv**2) / (sv**2).sum()
        return {"pairs": len(pairs), "mean": statistics.fmean(pairs), "median": statistics.median(pairs),
                "min": min(pairs), "max": max(pairs), "cos_to_mean_of_others": statistics.fmean(loo),
                "top_singular_energy": float(energy[0]),
                "participation_ratio": float(1.0 / (energy**2).sum()), "grad_norm_mean": float(grads.norm(dim=1).mean())}


Estimator = Callable[[int, torch.Tensor], torch.Tensor]


def is_true_step(step: int, bootstrap: int, refresh: int) -> bool:
    """ADCBootstrap's schedule (callbacks/bootstrap.py): true gradients on the first
    ``bootstrap`` steps, then on every ``refresh``-th step (0: never)."""
    if step < bootstrap:
        return True
    return bool(refresh) and (step - bootstrap) % refresh == refresh - 1


def family_estimator(name: str, dim: int, k: int, tag: str, bootstrap: int = 0, refresh: int = 0,
                     **family_kw: Any) -> tuple[Estimator, Any]:
    """g_hat of one rank under family ``name`` (seeds from a per-step commitment), with the
    ADCBootstrap schedule (true-gradient steps feed ``observe_gradient``)."""
    family = make_family(name, dim, k, **family_kw)

    def estimate(step: int, grad: torch.Tensor) -> torch.Tensor:
        if is_true_step(step, bootstrap, refresh):
            family.observe_gradient(grad)
            return grad
        seeds = direction_seeds(genesis_commitment(f"claims/{tag}/{step}"), family.num_seeds)
        return family.reconstruct(family.project(grad, seeds), seeds)

    return estimate, family


def trajectory(steps: int, estimator: Estimator | None = None, probe: Callable[..., None] | None = None,
               val_every: int = 50, seed: int = SEED) -> dict[str, Any]:
    """Train ``steps`` AdamW steps from the example's init; returns the validation curve.
    ``probe(step, grad, g_hat, harness)`` runs before each optimizer step."""
    h = GPT2Harness(seed)
    opt, sched = h.optimizer(steps)
    curve = [(0, h.val_loss())]
    for step in range(steps):
        grad = h.grad(h.batch())
        g_hat = grad if estimator is None else estimator(step, grad)
        if probe is not None:
            probe(step, grad, g_hat, h)
        h.apply(g_hat)
        opt.step()
        sched.step()
        if (step + 1) % val_every == 0 or step + 1 == steps:
            curve.append((step + 1, h.val_loss()))
    return {"curve": curve, "initial_val": curve[0][1], "final_val": curve[-1][1], "harness": h}


@lru_cache(maxsize=2)
def exact_run(steps: int) -> dict[str, Any]:
    """The exact-gradient trajectory with the C2 and C3 measurements on it."""
    beta = 0.9
    state: dict[str, Any] = {"m": None, "rows": []}
    gen = torch.Generator().manual_seed(4242)

    def probe(step: int, grad: torch.Tensor, g_hat: torch.Tensor, h: GPT2Harness) -> None:
        z = torch.randn(grad.shape, generator=gen)
        row = {"step": step, "cos_random": cos(z, grad), "grad_norm": float(grad.norm())}
        if state["m"] is not None:
            row["cos_momentum"] = cos(state["m"], grad)
            row["cos_last"] = cos(state["last"], grad)
        state["rows"].append(row)
        state["m"] = grad.clone() if state["m"] is None else state["m"].mul_(beta).add_(grad, alpha=1 - beta)
        state["last"] = grad.clone()

    init = GPT2Harness(SEED).pairwise(16, seed=99)
    run = trajectory(steps, None, probe)
    after = run["harness"].pairwise(16, seed=99)
    return {"curve": run["curve"], "init_pairs": init, "after_pairs": after, "alignment": state["rows"],
            "dim": run["harness"].dim, "beta": beta}

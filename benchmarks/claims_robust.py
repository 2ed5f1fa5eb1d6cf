"""Claim C7 for ``claims``: the per-direction trimmed mean (and mean, median) against 0-30 %
Byzantine ranks per attack. N simulated ranks of the toy regression task of
``lightning_holograd.demos`` in one process (each rank its own batches), f of them Byzantine
with the attacks of ``lightning_holograd.protocol.attack_row``, aggregated per direction by
the protocol's own aggregators. The multi-process path is covered by ``bench_byzantine`` and
the tests; this sweep needs N = 10 to express 0-30 %."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector

from lightning_holograd.protocol import attack_row, direction_seeds, genesis_commitment, make_family
from lightning_holograd.protocol.aggregators import make_aggregator

ATTACKS = ("random", "scale", "sign_flip", "alie", "ipm")
AGGREGATIONS = ("mean", "trimmed_mean", "median")
BATCH = 16


def _toy_problem(ranks: int) -> tuple[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
    from lightning_holograd.demos import ToyModule, make_dataset

    x, y = make_dataset(num_samples=ranks * BATCH * 8, seed=0).tensors

    def fresh() -> torch.nn.Module:
        return ToyModule().net  # the toy's MLP 8-16-2 at its fixed init (seed 1234)

    def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (step * ranks + rank) % (len(x) // BATCH)
        return x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]

    return fresh, batch, (x, y)


def simulate(ranks: int, byzantine: int, attack: str | None, aggregation: str, steps: int, k: int = 64,
             lr: float = 0.05, trim_ratio: float = 0.3) -> float:
    """Final full-data MSE of N simulated HoloGrad ranks (Gaussian directions, K = k, SGD)."""
    fresh, batch, (x, y) = _toy_problem(ranks)
    model = fresh()
    params = list(model.parameters())
    family = make_family("gaussian", sum(p.numel() for p in params), k)
    aggregator = make_aggregator(aggregation, trim_ratio=trim_ratio)
    liars = set(range(ranks - byzantine, ranks))
    for step in range(steps):
        commitment = genesis_commitment(f"claims/c7/{step}")
        seeds = direction_seeds(commitment, family.num_seeds)
        rows = []
        for rank in range(ranks):
            bx, by = batch(step, rank)
            loss = torch.nn.functional.mse_loss(model(bx), by)
            rows.append(family.project(parameters_to_vector(torch.autograd.grad(loss, params)), seeds))
        honest = torch.stack([rows[r] for r in range(ranks) if r not in liars])
        if attack is not None:
            gen = torch.Generator().manual_seed(int.from_bytes(commitment[:8], "little"))
            for r in liars:
                rows[r] = attack_row(attack, rows[r], honest, generator=gen)
        g_hat = family.reconstruct(aggregator.aggregate(torch.stack(rows)), seeds)
        with torch.no_grad():
            for p, g in zip(params, g_hat.split([p.numel() for p in params])):
                p.add_(g.view_as(p), alpha=-lr)
    with torch.no_grad():
        loss = float(torch.nn.functional.mse_loss(model(x), y))
    return loss if math.isfinite(loss) else float("inf")


def compute_c7(args: argparse.Namespace) -> dict[str, Any]:
    ranks, steps = args.c7_ranks, args.c7_steps
    fractions = list(range(0, int(0.3 * ranks) + 1))
    clean = {agg: simulate(ranks, 0, None, agg, steps) for agg in AGGREGATIONS}
    table = {agg: {attack: [clean[agg] if f == 0 else simulate(ranks, f, attack, agg, steps) for f in fractions]
                   for attack in ATTACKS} for agg in AGGREGATIONS}
    return {"ranks": ranks, "steps": steps, "fractions": fractions, "clean": clean, "table": table,
            "tolerance": args.c7_tolerance}


def _tolerated_up_to(vals: list[float], fractions: list[int], clean: float, tol: float) -> int:
    """The largest f such that every fraction up to f is tolerated."""
    upto = 0
    for f, v in zip(fractions, vals):
        if v > tol * clean:
            break
        upto = f
    return upto


def render_c7(p: dict[str, Any]) -> tuple[str, list[str]]:
    ranks, steps, fractions, clean, tol = p["ranks"], p["steps"], p["fractions"], p["clean"], p["tolerance"]
    ref = clean["mean"]
    head = " | ".join(f"{100 * f // ranks}% ({f})" for f in fractions)
    lines = [
        f"Claim C7: the per-direction trimmed mean tolerates 0-30 % Byzantine ranks. N = {ranks} simulated ranks of "
        f"the toy regression (MLP 8-16-2, D = 178), Gaussian directions K = 64, SGD lr 0.05, {steps} steps, "
        f"f Byzantine ranks submitting `attack_row` lies (default strengths: scale c = -4, ALIE z = 1.5, IPM "
        f"epsilon = 0.5; ALIE and IPM see the honest rows). trimmed_mean trims floor(0.3 N) = {int(0.3 * ranks)} "
        f"values at each end of every direction. Cells: final full-data MSE / the clean mean run's "
        f"({ref:.4g}); 'tolerates' = within {tol:.2f}x of the clean run of the same aggregator.",
        "",
    ]
    tolerated: dict[str, dict[str, int]] = {}
    for agg in AGGREGATIONS:
        lines += [f"**{agg}** (clean: {clean[agg] / ref:.3f})", "", f"| attack | {head} | tolerated up to |",
                  "|---|" + "---:|" * (len(fractions) + 1)]
        tolerated[agg] = {a: _tolerated_up_to(p["table"][agg][a], fractions, clean[agg], tol) for a in ATTACKS}
        lines += [f"| {a} | " + " | ".join(f"{v / ref:.3g}" for v in p["table"][agg][a])
                  + f" | {100 * tolerated[agg][a] // ranks}% |" for a in ATTACKS]
        lines.append("")
    full = [a for a in ATTACKS if tolerated["trimmed_mean"][a] == fractions[-1]]
    p["tolerated"], p["holds"] = tolerated, len(full) == len(ATTACKS)
    partial = [f"{a} up to {100 * tolerated['trimmed_mean'][a] // ranks}%" for a in ATTACKS if a not in full]
    verdict = (f"C7 {'holds' if p['holds'] else 'holds only in part'}: trimmed mean tolerates 30 % for "
               f"{', '.join(full) or 'no attack'}" + (f"; {', '.join(partial)}" if partial else ""))
    return verdict, [*lines, f"Verdict: {verdict}."]

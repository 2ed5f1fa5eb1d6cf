"""Claim C5 for ``claims``: the codebook (ADC) basis's captured energy against the true
gradient over training, on the GPT-2 harness of ``claims_gpt2`` (bootstrap 10, with and
without refresh, with exploration)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks.claims_gpt2 import exact_run, family_estimator, tiny_gpt2_dim, trajectory
from benchmarks.harness import TINY_GPT2_DIM

C5_RUNS = {
    "r64, bootstrap 10": {"codebook_rank": 64, "k": 64, "bootstrap": 10, "refresh": 0},
    "r64, bootstrap 10, refresh 50": {"codebook_rank": 64, "k": 64, "bootstrap": 10, "refresh": 50},
    "r32 + 32 exploration, bootstrap 10": {"codebook_rank": 32, "k": 64, "bootstrap": 10, "refresh": 0},
}


def _gamma_run(label: str, cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    est, fam = family_estimator("codebook", tiny_gpt2_dim(), cfg["k"], tag=f"c5/{label}", bootstrap=cfg["bootstrap"],
                                refresh=cfg["refresh"], codebook_rank=cfg["codebook_rank"])
    gamma: list[float] = []

    # gamma must be measured with the basis *used* at the step, before its update: wrap the estimator.
    def measured(step: int, grad: torch.Tensor) -> torch.Tensor:
        gamma.append(fam.captured_energy(grad))
        return est(step, grad)

    run = trajectory(steps, measured)
    return {"gamma": gamma, "final_val": run["final_val"], "curve": run["curve"], **cfg}


def compute_c5(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.train_steps
    return {"runs": {label: _gamma_run(label, cfg, steps) for label, cfg in C5_RUNS.items()}, "steps": steps,
            "dim": tiny_gpt2_dim(), "exact_final_val": exact_run(steps)["curve"][-1][1]}


def _verdict(p: dict[str, Any], steps: int, dim: int) -> str:
    main, refresh = p["runs"]["r64, bootstrap 10"], p["runs"]["r64, bootstrap 10, refresh 50"]
    p["holds"] = holds = main["mean_after_bootstrap"] > 100 * 64 / dim
    return (f"C5 {'holds' if holds else 'does not hold'} against a random subspace (criterion: > 100 r/D): "
            f"gamma after bootstrap {main['gamma'][10]:.2e} at step 10, mean {main['mean_after_bootstrap']:.2e} "
            f"(with refresh every 50: {refresh['mean_after_bootstrap']:.2e}), vs r/D = {64 / dim:.1e}; "
            + ("without refresh it decays to " if main["gamma"][-1] < 0.5 * main["gamma"][10] else
               "without refresh it stays at ") + f"{main['gamma'][-1]:.2e} by step {steps - 1}")


def render_c5(p: dict[str, Any]) -> tuple[str, list[str]]:
    steps = p.get("steps", len(next(iter(p["runs"].values()))["gamma"]))  # older JSON: no "steps"
    dim = p.get("dim", TINY_GPT2_DIM)
    checkpoints = [s for s in (0, 9, 10, 20, 50, 100, 200, steps - 1) if s < steps]
    lines = [
        f"Claim C5: the codebook (ADC) basis captures a large share of the true gradient's energy, "
        f"gamma_t = ||U^T g_t||^2 / ||g_t||^2, measured against the exact minibatch gradient g_t with the basis "
        f"used at step t (before its update). {steps} AdamW steps of the GPT-2 example; bootstrap steps use the "
        f"true gradient and feed Oja (lr 0.1); a random r-dimensional subspace captures r/D = {64 / dim:.1e} (r = 64).",
        "",
        "| run | " + " | ".join(f"gamma at step {s}" for s in checkpoints) + " | mean after bootstrap | final val loss |",
        "|---|" + "---:|" * (len(checkpoints) + 2),
    ]
    for label, r in p["runs"].items():
        r["mean_after_bootstrap"] = after = statistics.fmean(r["gamma"][r["bootstrap"]:])
        lines.append(f"| {label} | " + " | ".join(f"{r['gamma'][s]:.2e}" for s in checkpoints)
                     + f" | {after:.2e} | {r['final_val']:.4f} |")
    exact = p.get("exact_final_val")
    lines.append("| exact gradient (reference) | " + " | ".join("-" for _ in checkpoints)
                 + f" | - | {'-' if exact is None else f'{exact:.4f}'} |")
    verdict = _verdict(p, steps, dim)
    return verdict, [*lines, "", f"Verdict: {verdict}."]

"""Claim C5 (issue 13) for ``claims``: the fitted codebook's captured energy on the tiny GPT-2.

Harness of ``claims_gpt2`` (one process, the example's init, seeded batches and AdamW
schedule). Every codebook run sends K = r = 64 scalars per step and follows the
``ADCBootstrap`` schedule: true gradients on the first ``BOOTSTRAP`` steps (and every
``refresh`` steps after, where a run says so), its own estimate g_hat otherwise, so gamma
is measured on the trajectory the codebook itself produces. The family is the strategy's:
``make_family("codebook", ...)`` with the parameter shapes in flat-gradient order.

gamma_t = ||U^T g_t||^2 / ||g_t||^2 against the exact minibatch gradient g_t, with the
basis used at step t (before that step's update or observation). A random r-dimensional
subspace captures r/D. The issue's criterion, per run: gamma at the first step after the
bootstrap >= 0.5, and gamma at every one of the next ``--train-steps`` steps >= 10 r/D.

Bytes: what one rank puts into collectives under the protocol (docs/PROTOCOL.md §8): 33
(hash and flag byte) per step, 4K per estimated step, 4D per true-gradient step; with N = 2
ranks the ring wire bytes equal these. DDP would send 4D per step.

Run it through ``claims`` (``python -m benchmarks.claims c5``) or on its own
(``python -m benchmarks.claims_codebook``, the same run and files; ``--help``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from benchmarks.claims_estimators import cos
from benchmarks.claims_gpt2 import family_estimator, is_true_step, tiny_gpt2_dim, trajectory
from benchmarks.harness import MODEL_KW

K = 64
COMMIT_BYTES = 33  # per rank and step: the batch hash and the flag byte (docs/PROTOCOL.md §1.1, §8)
BOOTSTRAP = 10
# label: (what, make_family settings, refresh_every)
C5_RUNS: dict[str, tuple[str, dict[str, Any], int]] = {
    "factor": ("per-matrix factors + 1-D columns (the default structure)", {"codebook_structure": "factor"}, 0),
    "block": ("per-parameter column blocks", {"codebook_structure": "block"}, 0),
    "dense": ("one dense D x 64 basis", {"codebook_structure": "dense"}, 0),
    "factor, decay 0.7": ("factor, sketch_decay 0.7", {"codebook_structure": "factor", "sketch_decay": 0.7}, 0),
    "factor, refresh 50": ("factor, a true gradient every 50 steps", {"codebook_structure": "factor"}, 50),
    "factor, refresh 50, decay 0.7": ("factor, refresh every 50, sketch_decay 0.7",
                                      {"codebook_structure": "factor", "sketch_decay": 0.7}, 50),
}
PLOT = "claims_c5_gamma.png"


@lru_cache(maxsize=1)
def tiny_gpt2_shapes() -> list[tuple[int, ...]]:
    """Trainable parameter shapes of the tiny GPT-2, in flat-gradient order."""
    from lightning_holograd.demos.gpt2_module import GPT2Module

    return [tuple(p.shape) for p in GPT2Module(**MODEL_KW).parameters() if p.requires_grad]


def _run(label: str, total: int, dim: int) -> dict[str, Any]:
    what, settings, refresh = C5_RUNS[label]
    est, family = family_estimator("codebook", dim, K, tag=f"c5/{label}", bootstrap=BOOTSTRAP, refresh=refresh,
                                   param_shapes=tiny_gpt2_shapes(), **settings)
    gamma: list[float] = []
    cosines: list[float] = []

    def measured(step: int, grad: torch.Tensor) -> torch.Tensor:
        gamma.append(family.captured_energy(grad))  # the basis in use at this step, before its update
        g_hat = est(step, grad)
        cosines.append(cos(g_hat, grad))
        return g_hat

    start = time.perf_counter()
    run = trajectory(total, measured)
    true_steps = sum(1 for s in range(total) if is_true_step(s, BOOTSTRAP, refresh))
    return {"what": what, "settings": settings, "refresh_every": refresh, "gamma": gamma,
            "cos_after_bootstrap": statistics.fmean(cosines[BOOTSTRAP:]), "final_val": run["final_val"],
            "curve": run["curve"], "true_gradient_steps": true_steps,
            "bytes_per_rank": COMMIT_BYTES * total + 4 * K * (total - true_steps) + 4 * dim * true_steps,
            "seconds": time.perf_counter() - start}


def _reference(label: str, total: int, dim: int) -> dict[str, Any]:
    start = time.perf_counter()
    if label == "exact gradient (DDP)":
        run, sent = trajectory(total), 4 * dim * total
    else:  # the count sketch at the same K
        est, _ = family_estimator("sketch", dim, K, tag="c5/sketch")
        run, sent = trajectory(total, est), (COMMIT_BYTES + 4 * K) * total
    return {"final_val": run["final_val"], "curve": run["curve"], "bytes_per_rank": sent,
            "seconds": time.perf_counter() - start}


def _judge(r: dict[str, Any], floor: float) -> None:
    after = r["gamma"][BOOTSTRAP:]
    r["gamma_after_bootstrap"] = after[0]
    r["gamma_min_after"], r["gamma_mean_after"] = min(after), statistics.fmean(after)
    r["steps_below_floor"] = sum(g < floor for g in after)
    r["passes"] = after[0] >= 0.5 and r["gamma_min_after"] >= floor


def _plot(results: dict[str, Any], dim: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, r in results.items():
        style = "--" if r["refresh_every"] else "-"
        ax.plot(range(len(r["gamma"])), r["gamma"], style, label=label, linewidth=1.0)
    for value, text in ((0.5, "0.5 (after bootstrap)"), (10 * K / dim, "10 r/D"), (K / dim, "r/D (random)")):
        ax.axhline(value, color="grey", linestyle="--", linewidth=0.8)
        ax.text(len(next(iter(results.values()))["gamma"]) - 1, value, text, ha="right", va="bottom", fontsize=8)
    ax.axvline(BOOTSTRAP - 0.5, color="black", linewidth=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (true gradients before the vertical line)")
    ax.set_ylabel("gamma = ||U^T g||^2 / ||g||^2")
    ax.set_title(f"C5: codebook captured energy, tiny GPT-2 (D = {dim:,}), r = {K}")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute_c5(args: argparse.Namespace) -> dict[str, Any]:
    """The runs, the references and the plot; ``--train-steps`` counts the steps after the bootstrap."""
    dim, total = tiny_gpt2_dim(), BOOTSTRAP + args.train_steps
    results = {label: _run(label, total, dim) for label in C5_RUNS}
    references = {label: _reference(label, total, dim) for label in ("exact gradient (DDP)", f"sketch K = {K}")}
    _plot(results, dim, Path(args.out_dir) / PLOT)
    return {"runs": results, "references": references, "dim": dim, "K": K, "bootstrap": BOOTSTRAP,
            "train_steps": args.train_steps, "floor_10_r_over_D": 10 * K / dim, "plot": PLOT}


def render_c5(p: dict[str, Any]) -> tuple[str, list[str]]:
    floor, after = p["floor_10_r_over_D"], p["train_steps"]
    for r in p["runs"].values():
        _judge(r, floor)
    lines = _report(p["runs"], p["references"], p["dim"], p["bootstrap"] + after, after)
    p["holds"], verdict = _verdict(p["runs"], floor, after)
    return verdict, [*lines, "", f"Verdict: {verdict}."]


def _verdict(results: dict[str, Any], floor: float, after: int) -> tuple[bool, str]:
    """The claim is judged on the default structure (factor); every other run is named."""
    head = results["factor"]
    passing = [f"'{label}'" for label, r in results.items() if r["passes"] and label != "factor"]
    failing = [f"'{label}' ({r['steps_below_floor']} of {after} steps below the floor, min {r['gamma_min_after']:.2e}; "
               f"{r['gamma_after_bootstrap']:.3f} after bootstrap)" for label, r in results.items() if not r["passes"]]
    text = (f"C5 {'holds' if head['passes'] else 'does not hold'} for the default factor codebook (criterion: gamma "
            f">= 0.5 right after a {BOOTSTRAP}-step bootstrap and >= 10 r/D = {floor:.2e} at each of the next "
            f"{after} steps, r = {K}): gamma {head['gamma_after_bootstrap']:.3f} after the bootstrap, min "
            f"{head['gamma_min_after']:.2e} and mean {head['gamma_mean_after']:.3f} over the {after} steps. "
            f"Also passing: {'; '.join(passing) or 'none'}. Failing: {'; '.join(failing) or 'none'}")
    return head["passes"], text


def _report(results: dict[str, Any], references: dict[str, Any], dim: int, total: int, after: int) -> list[str]:
    marks = [s for s in (0, BOOTSTRAP - 1, BOOTSTRAP, BOOTSTRAP + 1, 20, 50, 100, 200, total - 1) if s < total]
    ddp_bytes = 4 * dim * total
    lines = [
        f"Claim C5 (issue 13): after a {BOOTSTRAP}-step bootstrap the fitted codebook captures gamma >= 0.5 of the "
        f"next true gradient, and stays >= 10 r/D over the next {after} steps. gamma_t = ||U^T g_t||^2 / ||g_t||^2 "
        f"against the exact minibatch gradient, with the basis in use at step t; each run trains with its own "
        f"estimate (K = r = {K} scalars per estimated step). D = {dim:,}; a random subspace captures r/D = "
        f"{K / dim:.2e}, the floor 10 r/D = {10 * K / dim:.2e}. Harness: `benchmarks/claims_codebook.py`; curves in "
        f"the JSON and in [{PLOT}]({PLOT}). Times are approximate (shared 2-core machine, `nice -n 10`).",
        "",
        "| run | what | " + " | ".join(f"gamma@{s}" for s in marks) + " | min after bootstrap | mean after "
        "| steps < 10 r/D | mean cos(g_hat, g) | true-gradient steps | bytes/rank (x DDP) | final val loss | "
        "passes |",
        "|---|---|" + "---:|" * (len(marks) + 8) + "---|",
    ]
    for label, r in results.items():
        cells = " | ".join(f"{r['gamma'][s]:.3g}" for s in marks)
        lines.append(f"| {label} | {r['what']} | {cells} | {r['gamma_min_after']:.2e} | {r['gamma_mean_after']:.3f} "
                     f"| {r['steps_below_floor']} | {r['cos_after_bootstrap']:.3f} | {r['true_gradient_steps']} "
                     f"| {r['bytes_per_rank'] / 1e6:.2f} MB ({r['bytes_per_rank'] / ddp_bytes:.3f}) "
                     f"| {r['final_val']:.4f} | {'yes' if r['passes'] else 'no'} |")
    blank = " | ".join("-" for _ in marks)
    for label, r in references.items():
        lines.append(f"| {label} | reference | {blank} | - | - | - | - | - | {r['bytes_per_rank'] / 1e6:.2f} MB "
                     f"({r['bytes_per_rank'] / ddp_bytes:.3f}) | {r['final_val']:.4f} | - |")
    seconds = {label: round(r["seconds"]) for label, r in {**results, **references}.items()}
    lines += ["", "Seconds per run (approximate, shared machine): "
              + ", ".join(f"{label} {s}" for label, s in seconds.items()) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.claims_codebook``: claim C5 alone, as ``claims c5`` runs it."""
    from benchmarks import claims

    p = argparse.ArgumentParser(prog="python -m benchmarks.claims_codebook", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=300, help="steps after the 10-step bootstrap (>= 20)")
    p.add_argument("--out-dir", default=str(claims.RESULTS), help="where claims_c5.md/.json and the plot go")
    p.add_argument("--report-only", action="store_true", help="redraw claims_c5.md from claims_c5.json")
    args = p.parse_args(argv)
    forwarded = ["c5", "--train-steps", str(args.train_steps), "--out-dir", args.out_dir]
    return claims.main(forwarded + (["--report-only"] if args.report_only else []))


if __name__ == "__main__":
    raise SystemExit(main())

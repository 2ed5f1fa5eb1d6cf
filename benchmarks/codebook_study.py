#!/usr/bin/env python3
"""STUDY, not a benchmark of record: does the ADC codebook learn the gradient subspace? (issue 13)

Single process, CPU, the tiny GPT-2 of configs/gpt2-tiny-cpu.yaml (byte level, n_layer 2,
n_head 2, n_embd 128, block 128, D = 445,952), the stdlib corpus, AdamW lr 3e-3 with the
example's schedule, 16 x 128-token batches drawn with a seeded generator (the harness of
``claims_gpt2.py``). Every variant sends K = 64 scalars per step and takes the
``ADCBootstrap`` schedule: true gradients on the first ``--bootstrap`` steps (and every
``refresh`` steps after, where a variant says so), the codebook's estimate otherwise.

gamma_t = ||U^T g_t||^2 / ||g_t||^2 against the exact minibatch gradient g_t, with the
basis used at step t (before that step's update). A random r-dimensional subspace
captures r/D (1.4e-4 at r = 64). The issue's targets: gamma at the first step after the
bootstrap >= 0.5, and >= 10 r/D over the next ``--steps`` steps.

Two modes:
- ``exact``: one trajectory trained with the exact gradient; every variant sees the same
  gradients and is fed exactly what a one-rank run would feed it (true gradients on
  bootstrap/refresh steps, its own scalars otherwise), so the variants are compared on the
  same gradients.
- ``own``: each variant trains with its own estimate g_hat (as ``claims.py c5`` does), so
  gamma is measured on the trajectory the codebook itself produces.

Times are the family's own calls in exact mode, measured on a shared 2-core machine:
indicative only.

Usage (one CPU-heavy process at a time on a shared machine; from the repository root):
  nice -n 10 python -m benchmarks.codebook_study                       # both modes, ~30 min
  nice -n 10 python -m benchmarks.codebook_study --mode exact --variants dense,factor
  python -m benchmarks.codebook_study --report-only                     # redraw the tables from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.claims_estimators import cos  # noqa: E402
from benchmarks.claims_gpt2 import GPT2Harness, is_true_step  # noqa: E402
from benchmarks.harness import RESULTS, loadavg, make_parser, read_report, run_metadata, write_report  # noqa: E402
from lightning_holograd.protocol import direction_seeds, genesis_commitment, make_family  # noqa: E402

torch.set_num_threads(1)

K = 64
# name: (description, make_family settings, refresh_every)
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "dense-oja": ("dense r64, normalised Oja lr 0.1 (before issue 13)", {"codebook_fit": "oja"}, 0),
    "dense": ("dense r64, sketch fit", {}, 0),
    "block": ("per-parameter blocks, 64 columns", {"codebook_structure": "block"}, 0),
    "factor": ("per-matrix factors + 1-D columns, 64 scalars", {"codebook_structure": "factor"}, 0),
    "factor-track": ("factor, 32 scalars + 32 exploration, tracking_lr 0.03",
                     {"codebook_structure": "factor", "codebook_rank": 32, "tracking_lr": 0.03}, 0),
    "factor-explore": ("factor, 32 scalars + 32 exploration, no tracking",
                       {"codebook_structure": "factor", "codebook_rank": 32}, 0),
    "factor-track-0.01": ("factor-track with tracking_lr 0.01",
                          {"codebook_structure": "factor", "codebook_rank": 32, "tracking_lr": 0.01}, 0),
    "factor-track-0.1": ("factor-track with tracking_lr 0.1",
                         {"codebook_structure": "factor", "codebook_rank": 32, "tracking_lr": 0.1}, 0),
    "dense-refresh50": ("dense r64, sketch fit, refresh every 50", {}, 50),
    "factor-refresh50": ("factor, refresh every 50", {"codebook_structure": "factor"}, 50),
    "factor-refresh50-decay": ("factor, refresh every 50, sketch_decay 0.7",
                               {"codebook_structure": "factor", "sketch_decay": 0.7}, 50),
}
OWN_DEFAULT = ("dense-oja", "dense", "block", "factor", "factor-track", "dense-refresh50", "factor-refresh50-decay")
CHECKPOINTS = (0, 9, 10, 11, 20, 50, 100, 200)


class Arm:
    """One variant's family and its measurements along a trajectory."""

    def __init__(self, name: str, dim: int, shapes: list[tuple[int, ...]], bootstrap: int) -> None:
        self.name = name
        self.description, settings, self.refresh = VARIANTS[name]
        self.family = make_family("codebook", dim, K, param_shapes=shapes, **settings)
        self.bootstrap = bootstrap
        self.gamma: list[float] = []
        self.cos_estimate: list[float] = []
        self.true_steps = 0
        self.seconds = 0.0

    def step(self, step: int, grad: torch.Tensor) -> torch.Tensor:
        """Measure gamma with the basis in use, then feed the family; returns what a run applies."""
        start = time.perf_counter()
        self.gamma.append(self.family.captured_energy(grad))
        if is_true_step(step, self.bootstrap, self.refresh):
            self.family.observe_gradient(grad)
            self.true_steps += 1
            estimate = grad
        else:
            seeds = direction_seeds(genesis_commitment(f"study/{self.name}/{step}"), self.family.num_seeds)
            estimate = self.family.reconstruct(self.family.project(grad, seeds), seeds)
        self.seconds += time.perf_counter() - start
        self.cos_estimate.append(cos(estimate, grad))
        return estimate

    def stored_floats(self) -> int:
        layout = sum(t.numel() for block in self.family.layout.blocks for t in block.tensors())
        sketch = self.family.sketch.columns
        return layout + (0 if sketch is None else sketch.numel())

    def summary(self, dim: int, steps: int) -> dict[str, Any]:
        after = self.gamma[self.bootstrap :]
        floor = 10 * K / dim  # the floor at r = K = 64 (stricter for variants with r < K)
        scalar_bytes = 4 * K * (len(self.gamma) - self.true_steps)
        return {
            "description": self.description,
            "rank": self.family.rank,
            "exploration": self.family.num_exploration,
            "refresh_every": self.refresh,
            "gamma_at": {s: self.gamma[s] for s in CHECKPOINTS + (len(self.gamma) - 1,) if s < len(self.gamma)},
            "gamma_first_after_bootstrap": after[0],
            "gamma_mean_after": statistics.fmean(after),
            "gamma_mean_last_200": statistics.fmean(self.gamma[-200:]),
            "gamma_min_after": min(after),
            "fraction_after_above_10_r_over_D": sum(g >= floor for g in after) / len(after),
            "ten_r_over_D": floor,
            "dim": dim,
            "mean_cos_estimate_after": statistics.fmean(self.cos_estimate[self.bootstrap :]),
            "true_gradient_steps": self.true_steps,
            "bytes_per_step_after_bootstrap": (scalar_bytes + 4 * dim * (self.true_steps - self.bootstrap))
            / max(steps, 1),
            "stored_floats": self.stored_floats(),
            "family_seconds": self.seconds,
            "gamma": self.gamma,
        }


def run_exact(names: list[str], total: int, bootstrap: int) -> tuple[dict[str, Any], float]:
    """One exact-gradient trajectory; every arm is fed along it."""
    h = GPT2Harness()
    shapes = [tuple(p.shape) for p in h.params]
    arms = [Arm(n, h.dim, shapes, bootstrap) for n in names]
    opt, sched = h.optimizer(total)
    for step in range(total):
        grad = h.grad(h.batch())
        for arm in arms:
            arm.step(step, grad)
        h.apply(grad)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"exact step {step}: " + ", ".join(f"{a.name} {a.gamma[-1]:.3g}" for a in arms), flush=True)
    return {a.name: a.summary(h.dim, total - bootstrap) for a in arms}, h.val_loss()


def run_own(name: str, total: int, bootstrap: int) -> dict[str, Any]:
    """A trajectory trained with the variant's own estimate."""
    h = GPT2Harness()
    arm = Arm(name, h.dim, [tuple(p.shape) for p in h.params], bootstrap)
    opt, sched = h.optimizer(total)
    for step in range(total):
        grad = h.grad(h.batch())
        h.apply(arm.step(step, grad))
        opt.step()
        sched.step()
    result = arm.summary(h.dim, total - bootstrap)
    result["final_val_loss"] = h.val_loss()
    print(f"own {name}: gamma after bootstrap {result['gamma_first_after_bootstrap']:.3f}, mean "
          f"{result['gamma_mean_after']:.3g}, val {result['final_val_loss']:.4f}", flush=True)
    return result


def _row(name: str, r: dict[str, Any], extra: str = "") -> str:
    at = {int(step): g for step, g in r["gamma_at"].items()}  # str keys after a JSON round trip
    cells = " | ".join(f"{at[s]:.3f}" if s in at else "-" for s in CHECKPOINTS[2:])
    return (f"| {name} | {r['description']} | {cells} | {at[max(at)]:.3f} | {r['gamma_mean_after']:.4f} "
            f"| {r['gamma_min_after']:.2e} | {r['fraction_after_above_10_r_over_D']:.2f} "
            f"| {r['mean_cos_estimate_after']:.3f} | {r['bytes_per_step_after_bootstrap']:,.0f} "
            f"| {r['stored_floats'] / 1e6:.2f} |{extra}")


def render(meta: dict[str, Any], exact: dict[str, Any] | None, own: dict[str, Any] | None) -> str:
    head_cells = " | ".join(f"gamma@{s}" for s in CHECKPOINTS[2:])
    head = (f"| variant | what | {head_cells} | gamma@last | mean gamma after bootstrap | min after | "
            "share of steps >= 10 r/D | mean cos(g_hat, g) | bytes/step after bootstrap | stored Mfloats |")
    rule = "|---|---|" + "---:|" * (len(CHECKPOINTS) - 2 + 8)
    lines = [
        "# Codebook study (issue 13): captured energy of the ADC codebook on the tiny GPT-2",
        "",
        "STUDY, not a benchmark of record (`python -m benchmarks.codebook_study`, single process, see its docstring).",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; host: {meta['host']}; torch {meta['torch']}, 1 thread, CPU shared with other jobs "
        f"(load average {meta['load_start']} -> {meta['load_end']}); {meta['seconds']:.0f} s.",
        "",
        f"D = {meta['dim']:,}, K = {K} scalars per step for every variant, bootstrap {meta['bootstrap']} steps, then "
        f"{meta['steps']} steps. gamma@t is measured against the exact gradient of step t with the basis used at "
        f"step t; step {meta['bootstrap']} is the first after the bootstrap. Random subspace: r/D = "
        f"{64 / meta['dim']:.2e}; the issue's floor 10 r/D = {640 / meta['dim']:.2e} (r = 64). bytes/step counts "
        "4 K per estimated step plus 4 D per refresh step, averaged over the steps after the bootstrap (the "
        "bootstrap itself costs 4 D per step for every variant).",
        "",
    ]
    if exact is not None:
        lines += [f"## Exact-gradient trajectory (all variants on the same gradients; final val loss "
                  f"{meta['exact_val_loss']:.4f})", "", head, rule]
        lines += [_row(n, r) for n, r in exact.items()]
        lines.append("")
    if own is not None:
        lines += ["## Each variant trained with its own estimate", "", head + " final val loss |",
                  rule + "---:|"]
        lines += [_row(n, r, f" {r['final_val_loss']:.4f} |") for n, r in own.items()]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--mode", choices=("exact", "own", "both"), default="both")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"exact mode, comma-separated from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--own-variants", default=",".join(OWN_DEFAULT),
                   help=f"own mode, comma-separated (default: {','.join(OWN_DEFAULT)})")
    p.add_argument("--steps", type=int, default=300, help="steps after the bootstrap (default 300)")
    p.add_argument("--bootstrap", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "codebook_study", help="path stem of the .md and .json")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the tables from the JSON (rewrites the .md: notes added by hand below them go)")
    args = p.parse_args(argv)
    args.names = [n for n in args.variants.split(",") if n]
    args.own_names = [n for n in args.own_variants.split(",") if n]
    unknown = [n for n in args.names + args.own_names if n not in VARIANTS]
    if unknown or args.steps < 1 or args.bootstrap < 1:
        p.error(f"bad --variants {unknown} / --steps {args.steps} / --bootstrap {args.bootstrap}: variants from "
                f"{', '.join(VARIANTS)}, steps and bootstrap >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_md = args.out.with_suffix(".md")
    if args.report_only:
        payload = read_report(out_md)
        write_report(out_md, render(payload["meta"], payload["exact"], payload["own"]) + "\n", payload)
        return 0
    total, start, load_start = args.bootstrap + args.steps, time.perf_counter(), (loadavg() or [None])[0]
    exact = own = None
    meta = run_metadata("codebook_study", argv, host=platform.node(), bootstrap=args.bootstrap, steps=args.steps,
                        load_start=load_start)
    if args.mode in ("exact", "both"):
        exact, meta["exact_val_loss"] = run_exact(args.names, total, args.bootstrap)
    if args.mode in ("own", "both"):
        own = {n: run_own(n, total, args.bootstrap) for n in args.own_names}
    meta["dim"] = next(iter((exact or own).values()))["dim"]
    meta.update(seconds=time.perf_counter() - start, load_end=(loadavg() or [None])[0])
    write_report(out_md, render(meta, exact, own) + "\n", {"meta": meta, "exact": exact, "own": own})
    print(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

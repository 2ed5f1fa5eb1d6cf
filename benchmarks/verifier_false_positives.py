#!/usr/bin/env python3
"""Honest verifications with zero tolerance: how many, and how many were rejected.

On CPU in float32 an honest recomputation is bitwise the claim, so ``ProofVerifier(rtol=0,
atol=0)`` must reject none. This runs the toy task of ``lightning_holograd.demos`` on 4
CPU ranks (fork launcher, gloo; Gaussian directions, K = 32), rank 0 verifying every
claim of ranks 1-3 at every step (``p_verify = 1``), for ``--steps`` steps: 3 x steps
verifications. The results file records the count, the rejections and the bound they
give: with 0 rejections in n independent checks, a per-check false-positive rate q is
excluded at 95 % confidence when q > -ln(0.05) / n ~ 3.0 / n ("rule of three").

The suite keeps a smaller sample of the same check (tests/strategy/test_verifier.py,
``test_zero_false_positives_with_exact_tolerance``); this is the 10,000-check version:

    python -m benchmarks.verifier_false_positives                 # 3,334 steps: 10,002 checks, ~4 min on 2 cores
    python -m benchmarks.verifier_false_positives --steps 100     # a quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked ranks must not inherit an OpenMP pool

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402

from lightning_holograd import HoloGradStrategy, ProofVerifier  # noqa: E402
from lightning_holograd.demos import ToyModule, fit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 4


class _Report(L.Callback):
    def __init__(self, verifier: ProofVerifier, path: Path) -> None:
        self.verifier, self.path = verifier, path

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            rejected = [r for r in self.verifier.ledger if r.event == "verify" and r.data["verdict"] == "reject"]
            self.path.write_text(json.dumps({"verified": self.verifier.verified, "rejected": len(rejected),
                                             "slashed": sorted(self.verifier.slashed)}))


def run(steps: int) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        verifier = ProofVerifier(p_verify=1.0, rtol=0.0, atol=0.0)
        report = Path(scratch) / "report.json"
        start = time.monotonic()
        fit(ToyModule(), HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=32),
            Path(scratch) / "ranks", devices=WORLD, max_steps=steps, max_epochs=-1,
            callbacks=[verifier, _Report(verifier, report)])
        result = json.loads(report.read_text())
        result["wall_s"] = round(time.monotonic() - start, 1)
    n = result["verified"]
    result.update(steps=steps, ranks=WORLD, rtol=0.0, atol=0.0,
                  q_bound_95=(-math.log(0.05) / n) if n and not result["rejected"] else None,
                  torch=torch.__version__, machine=platform.machine(), load_average=os.getloadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3334)
    parser.add_argument("--out", type=Path, default=RESULTS / "verifier_false_positives_cpu.json")
    args = parser.parse_args()
    result = run(args.steps)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    bound = f"{result['q_bound_95']:.2e}" if result["q_bound_95"] is not None else "n/a (rejections seen)"
    args.out.with_suffix(".md").write_text(
        "# Honest verifications at rtol = atol = 0 (CPU, float32)\n\n"
        f"`python -m benchmarks.verifier_false_positives --steps {args.steps}`\n\n"
        "| ranks | steps | verifications | rejected | slashed | 95 % bound on the false-positive rate | wall |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {result['ranks']} | {result['steps']} | {result['verified']} | {result['rejected']} | "
        f"{result['slashed']} | {bound} | {result['wall_s']} s |\n\n"
        f"torch {result['torch']}, {result['machine']}, load average at the end {result['load_average']}.\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure the claims of the HoloGrad work, one command per claim.

Each command writes ``benchmarks/results/claims_<claim>.md`` and ``.json`` and prints a
one-line verdict ("holds" / "does not hold", with the numbers).

  c1   cos(g_hat, g) ~ sqrt(K/D) for the dense families and the sketch: K/D sweep over
       D in {1e3, 1e4, 1e5}, mean over >= 20 seed draws, a random g (fixed seed) and the
       real flat gradient of the toy module of lightning_holograd.demos (D = 178). For the
       gaussian family the exact expectation is known: cos^2 ~ Beta(K/2, (D-1)/2), so
       E[cos] = B(K/2 + 1/2, (D-1)/2) / B(K/2, (D-1)/2) (tests/protocol/test_directions.py).
  c6   unbiasedness: ||mean of M estimates - g|| / ||g|| versus its expectation
       sqrt(v/M), v = (D+1)/K (gaussian) or (D-1)/K (rademacher, sketch), and the two known
       bugs of the reference code (sqrt(K/D) scaling; collapsed directions from repeated
       seeds) computed from the very same draws, for contrast.
  c8   PoGP reproducibility on CPU: an honest N-rank toy run with ProofVerifier(p_verify=1,
       slash=False, rtol=0, atol=0); distribution of max_abs_error / max_rel_error of the
       ledger's verify records and the number of rejections (0 expected: bitwise equal).
  c2   pairwise cosine of 16 minibatch gradients of the GPT-2 example, at init and after
       --train-steps exact-gradient AdamW steps (one process; see claims_gpt2.py).
  c3   cos(momentum, next gradient) along that trajectory against a random direction, and
       the protocol momentum family's shared direction against the true gradient.
  c4   loss reduction of the momentum family (K = 4, 64) and the sketch (K = 64) as a
       fraction of the exact gradient's, same init, batches and AdamW schedule.
  c5   codebook captured energy gamma_t against the exact gradient over training
       (bootstrap 10, with and without refresh, with exploration).
  c7   per-direction trimmed mean (and mean, median) against 0-30 % Byzantine ranks per
       attack: N = 10 simulated ranks of the toy task.
  all  every claim above (~12-15 min on 2 CPU cores; c2-c5 share one exact trajectory).

Modules: ``claims_estimators`` (c1, c6), ``claims_pogp`` (c8), ``claims_gpt2`` (the GPT-2
harness of c2-c5), ``claims_momentum`` (c2-c4), ``claims_codebook`` (c5), ``claims_robust`` (c7).
``--report-only`` redraws the Markdown of the named claims from their JSON.

Examples:
  python -m benchmarks.claims all
  python -m benchmarks.claims c1 --seeds 20 --max-values 2e9
  python -m benchmarks.claims c8 --ranks 4 --steps 200
  python -m benchmarks.claims all --report-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks import claims_codebook, claims_estimators, claims_momentum, claims_pogp, claims_robust  # noqa: E402
from benchmarks.harness import (RESULTS, csv_floats, csv_ints, loadavg, make_parser, read_report,  # noqa: E402
                                run_metadata, write_report)

torch.set_num_threads(1)


@dataclass(frozen=True)
class Claim:
    title: str
    compute: Callable[[argparse.Namespace], dict[str, Any]]  # the measurements (the JSON payload)
    render: Callable[[dict[str, Any]], tuple[str, list[str]]]  # verdict and Markdown body from the payload


CLAIMS = {
    "c1": Claim("Claim C1: cos(g_hat, g) ~ sqrt(K/D)", claims_estimators.compute_c1, claims_estimators.render_c1),
    "c2": Claim("C2: pairwise cosine of minibatch gradients (GPT-2 example)", claims_momentum.compute_c2,
                claims_momentum.render_c2),
    "c3": Claim("C3: momentum-direction alignment vs random (GPT-2 example)", claims_momentum.compute_c3,
                claims_momentum.render_c3),
    "c4": Claim("C4: momentum-centric loss reduction as a fraction of the exact gradient's (GPT-2 example)",
                claims_momentum.compute_c4, claims_momentum.render_c4),
    "c5": Claim("C5: codebook captured energy over training, against the true gradient (GPT-2 example)",
                claims_codebook.compute_c5, claims_codebook.render_c5),
    "c6": Claim("Claim C6: unbiasedness of the direction families", claims_estimators.compute_c6,
                claims_estimators.render_c6),
    "c7": Claim("C7: trimmed-mean tolerance of 0-30 % Byzantine ranks, per attack", claims_robust.compute_c7,
                claims_robust.render_c7),
    "c8": Claim("Claim C8: PoGP reproducibility (CPU)", claims_pogp.compute_c8, claims_pogp.render_c8),
}
ORDER = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]


def header(title: str, meta: dict[str, Any]) -> list[str]:
    commit = f"commit `{meta['commit']}`; " if meta.get("commit") else ""
    return [
        f"# {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; host: {meta['host']}; {commit}torch {meta['torch']}, 1 thread, CPU; "
        f"load average {meta['load_start']} -> {meta['load_end']}; {meta['seconds']:.1f} s.",
        "",
    ]


def write_claim(name: str, payload: dict[str, Any], meta: dict[str, Any], out_dir: Path) -> str:
    """Render claim ``name`` from its payload, write ``claims_<name>.md`` and ``.json``; the verdict."""
    verdict, body = CLAIMS[name].render(payload)
    payload["verdict"] = verdict
    write_report(out_dir / f"claims_{name}.md", "\n".join(header(CLAIMS[name].title, meta) + body) + "\n",
                 {"meta": meta, **payload})
    return verdict


def run_claim(name: str, args: argparse.Namespace, argv: list[str] | None) -> str:
    start, load0 = time.perf_counter(), (loadavg() or [None])[0]
    payload = CLAIMS[name].compute(args)
    meta = run_metadata("claims", argv, host=platform.node() or "?", load_start=load0,
                        load_end=(loadavg() or [None])[0], seconds=time.perf_counter() - start)
    return write_claim(name, payload, meta, Path(args.out_dir))


def _configs(text: str) -> list[tuple[int, int, int]]:
    try:
        return [tuple(int(float(v)) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DxKxM items such as 256x16x2000, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("claim", choices=[*ORDER, "all"])
    p.add_argument("--dims", type=csv_ints, default=[1000, 10000, 100000], help="c1: D of the random inputs")
    p.add_argument("--ratios", type=csv_floats, default=[0.001, 0.01, 0.05, 0.1, 0.5], help="c1: K/D values")
    p.add_argument("--seeds", type=int, default=20, help="c1: seed draws per cell (>= 2)")
    p.add_argument("--cheap-seeds", type=int, default=400, help="c1: draws for cells that stay under --cheap-values")
    p.add_argument("--cheap-values", type=float, default=1e8,
                   help="c1: a cell drawing at most this many random values with --cheap-seeds draws uses them")
    p.add_argument("--max-values", type=float, default=2e9,
                   help="c1: skip dense cells drawing more random values than this (2 K D seeds)")
    p.add_argument("--configs", type=_configs, default=_configs("256x16x2000,1000x32x1000,4096x64x1000"),
                   help="c6: DxKxM items, comma separated")
    p.add_argument("--ranks", type=int, default=2, help="c8: number of CPU ranks")
    p.add_argument("--steps", type=int, default=200, help="c8: optimizer steps")
    p.add_argument("--family", default="gaussian", choices=list(claims_estimators.FAMILIES),
                   help="c8: direction family")
    p.add_argument("--k", type=int, default=64, help="c8: directions per step")
    p.add_argument("--train-steps", type=int, default=300, help="c2-c5: AdamW steps of the GPT-2 example")
    p.add_argument("--c7-ranks", type=int, default=10, help="c7: simulated ranks")
    p.add_argument("--c7-steps", type=int, default=100, help="c7: SGD steps")
    p.add_argument("--c7-tolerance", type=float, default=1.25,
                   help="c7: a cell 'tolerates' when its loss is within this factor of the clean run")
    p.add_argument("--out-dir", default=str(RESULTS), help="where claims_<claim>.md/.json go (default results/)")
    p.add_argument("--report-only", action="store_true", help="redraw the Markdown from the JSON")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error(f"--seeds={args.seeds} must be >= 2 (a standard error needs two draws)")
    if args.train_steps < 20:
        p.error(f"--train-steps={args.train_steps} must be >= 20: c5 reads the codebook after its 10 "
                "bootstrap steps")
    if args.c7_ranks < 4:
        p.error(f"--c7-ranks={args.c7_ranks} must be >= 4, so that 30 % of the ranks is at least one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    todo = ORDER if args.claim == "all" else [args.claim]
    start = time.perf_counter()
    for name in todo:
        t0 = time.perf_counter()
        if args.report_only:
            payload = read_report(Path(args.out_dir) / f"claims_{name}.md")
            verdict = write_claim(name, payload, payload.pop("meta"), Path(args.out_dir))
        else:
            verdict = run_claim(name, args, argv)
        print(f"{verdict} [{time.perf_counter() - t0:.1f} s; results/claims_{name}.md]", flush=True)
    if len(todo) > 1:
        print(f"all claims: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

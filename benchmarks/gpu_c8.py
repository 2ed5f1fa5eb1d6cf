"""C8 on a GPU: honest claims recomputed on the GPU, with default kernels or with
``torch.use_deterministic_algorithms(True)``; the error distribution and a tolerance.

Two ranks share the GPU (``parallel_devices=[cuda:0, cuda:0]``, gloo, spawn launcher), both
honest; ``ProofVerifier(p_verify=1, slash=False, rtol=0, atol=0)`` makes rank 0 recompute
rank 1's claim on every step, so ``--steps`` steps give ``--steps`` recomputations. The
model is the tiny GPT-2 (D = 445,952; matrix products, embedding backward, the sketch's
index adds) on random tokens, float32. The verifier's ledger gives max_abs_error and
max_rel_error per claim (``judge_claim``, docs/PROTOCOL.md §6); rtol = atol = 0 rejects any
claim that is not bitwise equal (recorded only: slash=False).

Recommended tolerance: the smallest power of ten at or above 10x the largest error seen
(atol from max_abs_error, rtol from max_rel_error); either one alone accepts every honest
claim of the run with a x10 margin. Bitwise runs recommend 0.

  python -m benchmarks.gpu_c8 --out benchmarks/results/gpu --mode default
  python -m benchmarks.gpu_c8 --out benchmarks/results/gpu --mode deterministic
  python -m benchmarks.gpu_c8 --out /tmp/c8 --mode default --dry-run     # CPU, seconds
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.claims_pogp import _dist
from benchmarks.gpu_common import (GPT2_DRY, GPT2_TINY, DeterministicAlgorithms, RandomTokenGPT2, device_name,
                                   results_path, stage_device, stage_parser)
from benchmarks.harness import finish_metadata, run_metadata, write_report


def parse_args(argv: list[str] | None) -> Any:
    p = stage_parser(__doc__)
    p.add_argument("--mode", choices=["default", "deterministic"], default="default")
    p.add_argument("--steps", type=int, default=None, help="steps = recomputed claims (default 200; dry-run 3)")
    p.add_argument("--k", type=int, default=1024, help="num_directions")
    p.add_argument("--family", default="sketch", help="direction family")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--start-method", choices=["spawn", "fork"], default=None,
                   help="launcher of the two ranks (default: spawn on CUDA, which refuses fork; fork on CPU)")
    return p.parse_args(argv)


def recommended(max_error: float) -> float:
    """0 for a bitwise run, else the power of ten at or above 10 x ``max_error`` (inf stays inf)."""
    if max_error == 0.0 or not math.isfinite(max_error):
        return max_error
    return 10.0 ** math.ceil(math.log10(10.0 * max_error))


def _fit(args: Any, device: torch.device, tmp: Path) -> tuple[list[dict[str, Any]], int]:
    import lightning_holograd
    from lightning_holograd.demos import fit

    ledger = tmp / "ledger.jsonl"
    verifier = lightning_holograd.ProofVerifier(p_verify=1.0, slash=False, rtol=0.0, atol=0.0, ledger_path=str(ledger))
    callbacks = [verifier] + ([DeterministicAlgorithms()] if args.mode == "deterministic" else [])
    strategy = lightning_holograd.HoloGradStrategy(
        start_method=args.start_method or ("spawn" if device.type == "cuda" else "fork"), directions=args.family,
        num_directions=args.k,
        audit_every=0, process_group_backend="gloo", parallel_devices=[device] * 2)
    shape = GPT2_DRY if args.dry_run else GPT2_TINY
    module = RandomTokenGPT2(shape, args.batch_size, num_batches=2 * args.steps)  # 2 ranks share the windows
    states = fit(module, strategy, tmp / "ranks", devices=1, accelerator=device.type, callbacks=callbacks,
                 max_steps=args.steps, precision="32-true")
    records = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    return records, states[0]["global_step"]


def measure(args: Any, device: torch.device) -> dict[str, Any]:
    if args.mode == "deterministic":
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # inherited by the spawned ranks
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-c8-") as tmp:
        records, steps_done = _fit(args, device, Path(tmp))
    verify = [r["data"] for r in records if r["event"] == "verify"]
    abs_err = [float(d["max_abs_error"]) for d in verify if d.get("max_abs_error") is not None]
    rel_err = [float(d["max_rel_error"]) for d in verify if d.get("max_rel_error") is not None]
    abs_d, rel_d = _dist(abs_err), _dist(rel_err)
    return {"mode": args.mode, "recomputations": len(verify), "expected": steps_done, "steps_done": steps_done,
            "bitwise_equal": sum(1 for a in abs_err if a == 0.0), "rejected_at_zero_tolerance":
            sum(1 for d in verify if d.get("verdict") != "accept"), "max_abs_error": abs_d, "max_rel_error": rel_d,
            "recommended": {"atol": recommended(abs_d["max"]) if abs_err else None,
                            "rtol": recommended(rel_d["max"]) if rel_err else None},
            "abs_errors": abs_err, "rel_errors": rel_err, "fit_seconds": time.perf_counter() - t0}


def render(meta: dict[str, Any], r: dict[str, Any]) -> str:
    a, rel, rec = r["max_abs_error"], r["max_rel_error"], r["recommended"]
    bitwise = r["bitwise_equal"] == r["recomputations"] > 0
    headline = (f"C8 on {meta['device_name']} ({r['mode']} kernels): {r['recomputations']} honest claims recomputed, "
                f"{r['bitwise_equal']} bitwise equal; max_abs_error max {a['max']:.3g}, max_rel_error max "
                f"{rel['max']:.3g}; recommended atol {rec['atol']}, rtol {rec['rtol']}"
                + (" (bitwise: zero tolerance holds)" if bitwise else ""))
    r["headline"] = headline
    return "\n".join([
        f"# C8 on {meta['device']}: {r['mode']} kernels", "", f"**{headline}.**", "",
        f"- model: GPT-2 {meta['shape']} on random tokens, float32, batch {meta['batch_size']}; "
        f"HoloGradStrategy(directions={meta['family']!r}, num_directions={meta['K']}), 2 ranks on one device, gloo",
        "- ProofVerifier(p_verify=1, slash=False, rtol=0, atol=0): rank 0 recomputes rank 1's claim every step",
        f"- steps done {r['steps_done']}, recomputations {r['recomputations']} (expected {r['expected']}), "
        f"rejected at zero tolerance {r['rejected_at_zero_tolerance']}, fit {r['fit_seconds']:.1f} s",
        f"- torch {meta['torch']}; date {meta['date']}; command `{meta['command']}`", "",
        "| quantity | count | max | p99 | mean |", "|---|---:|---:|---:|---:|",
        f"| max_abs_error | {a['count']} | {a['max']:.3g} | {a['p99']:.3g} | {a['mean']:.3g} |",
        f"| max_rel_error | {rel['count']} | {rel['max']:.3g} | {rel['p99']:.3g} | {rel['mean']:.3g} |", "",
        "Recommended tolerance: the power of ten at or above 10x the largest error seen (either alone "
        "accepts every honest claim here with a x10 margin); 0 where every recomputation was bitwise equal.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = stage_device(args)
    args.steps = args.steps or (3 if args.dry_run else 200)
    if args.steps < 1 or args.k < 1 or args.batch_size < 1:
        raise SystemExit(f"--steps={args.steps}, --k={args.k}, --batch-size={args.batch_size} must be >= 1. "
                         "HINT: the defaults are 200, 1024 and 8.")
    if args.dry_run:
        args.k, args.batch_size = min(args.k, 16), min(args.batch_size, 2)
    meta = run_metadata("gpu_c8", argv, device=str(device), device_name=device_name(device),
                        shape=GPT2_DRY if args.dry_run else GPT2_TINY, family=args.family, K=args.k,
                        batch_size=args.batch_size, dry_run=args.dry_run)
    wall0 = time.perf_counter()
    result = measure(args, device)
    finish_metadata(meta, wall0)
    out = results_path(args.out, f"c8_{args.mode}")
    write_report(out, render(meta, result), {"meta": meta, "result": result})
    print(f"[gpu_c8] {result['headline']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Strategy benchmark: step time and peak memory of HoloGradStrategy versus DDP.

One invocation trains the tiny GPT-2 of ``examples/`` (byte-level, 2 layers, n_embd 128,
D = 445,952; ``configs/gpt2-tiny-cpu.yaml``) for the same number of optimizer steps,
with the same model init, data, data order and seeds, under DDP and under several
HoloGrad settings, each on 2 CPU processes (gloo, fork, 1 thread per process):

  ddp             DDPStrategy(start_method="fork"); run first AND last (noise level);
                  the mean of both runs is the reference of every ratio
  sketch-1024     count sketch, K = 1024       (O(D) per step for any K)
  sketch-4096     count sketch, K = 4096       (the README's main job)
  sketch-16384    count sketch, K = 16384
  gaussian-64     dense Gaussian, K = 64       (O(K D) generation per step)
  rademacher-64   dense Rademacher, K = 64     (O(K D))
  codebook-64     codebook rank 64 (no exploration) + ADCBootstrap(bootstrap_steps=5)
  identity        K = D: the exact debug family (g_hat = g), the exactness check

Each setting runs in a fresh Python process (so every run starts from the same
process state), which loads the data, builds the model and calls ``Trainer.fit``; the
two ranks are fork children of that process. A callback in every rank measures:

- step time: ``time.perf_counter`` from ``on_train_batch_start`` to
  ``on_train_batch_end`` (forward, backward, exchange, optimizer step), mean and
  median over the steps after the first ``--warmup``;
- memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at train end (peak RSS).
  Fork children inherit the parent's resident pages, so the peak includes the parent
  process (torch, lightning, transformers, the corpus); the RSS increase over the
  current RSS (VmRSS) at ``on_train_start`` isolates what training added;
- traffic: ``trainer.strategy.exchange.traffic`` (wire bytes this rank sent, ring
  model, the one-time initial broadcast excluded). DDP's gradient all-reduce is
  issued from C++ and is not metered: it is *computed* with the ring all-reduce model
  2 (N - 1) / N x 4 D bytes per rank and step;
- the train loss of every step and, on rank 0, the final parameters (compared with the
  first DDP run: max |theta - theta_DDP|).

Ranks write JSON files; this script aggregates them (max over ranks) into a Markdown
table and a JSON file with every step time.

Examples:
  python -m benchmarks.bench_strategy                           # all runs, 60 steps, ~4-5 min on 2 cores
  python -m benchmarks.bench_strategy --steps 30 --runs sketch-4096,identity
  python -m benchmarks.bench_strategy --out /tmp/strategy.md    # JSON written next to it
"""

from __future__ import annotations

import os

# One intra-op thread per rank process (2 ranks on 2 cores), set before torch is imported
# here or in the worker processes (which inherit the environment).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import (DATA_KW, MODEL_KW, RESULTS, SEED, choose, finish_metadata, loadavg,  # noqa: E402
                                make_parser, read_rank_files, read_report, remove_stale, ring_allreduce_bytes,
                                run_metadata, start_process, wait_all, write_report)
from benchmarks.strategy_report import add_reference, param_diff, render_markdown  # noqa: E402

WORLD_SIZE = 2
# HoloGrad settings (init_args of HoloGradStrategy); "bootstrap" adds ADCBootstrap.
RUNS: dict[str, dict[str, Any]] = {
    "ddp": {},
    "sketch-1024": {"directions": "sketch", "num_directions": 1024},
    "sketch-4096": {"directions": "sketch", "num_directions": 4096},
    "sketch-16384": {"directions": "sketch", "num_directions": 16384},
    "gaussian-64": {"directions": "gaussian", "num_directions": 64},
    "rademacher-64": {"directions": "rademacher", "num_directions": 64},
    "codebook-64": {"directions": "codebook", "num_directions": 64, "codebook_rank": 64, "bootstrap": 5},
    "identity": {"directions": "identity"},
}
HOLOGRAD_RUNS = [name for name in RUNS if name != "ddp"]


# =========================================================================== worker side
def worker(run: str, steps: int, warmup: int, max_bytes: int, result_dir: Path) -> None:
    """One setting: data, model, Trainer(devices=2, fork) and fit; ranks write JSON files."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as L
    from lightning.pytorch.strategies import DDPStrategy

    from benchmarks.probes import StepProbe
    from lightning_holograd import ADCBootstrap, HoloGradStrategy
    from lightning_holograd.demos.gpt2_data import GPT2DataModule
    from lightning_holograd.demos.gpt2_module import GPT2Module

    spec = dict(RUNS[run])
    bootstrap = spec.pop("bootstrap", 0)
    L.seed_everything(SEED, verbose=False)
    data = GPT2DataModule(**{**DATA_KW, "max_bytes": max_bytes})
    data.setup("fit")  # load the corpus once, before the fork (the ranks inherit it)
    model = GPT2Module(**MODEL_KW)
    strategy = DDPStrategy(start_method="fork") if run == "ddp" else HoloGradStrategy(start_method="fork", **spec)
    callbacks: list[Any] = [StepProbe(result_dir, run, warmup)]
    if bootstrap:
        callbacks.append(ADCBootstrap(bootstrap_steps=bootstrap))
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(result_dir),
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    (result_dir / f"{run}_worker.json").write_text(json.dumps({"fit_wall_s": time.perf_counter() - t0}))


# =========================================================================== parent side
def launch(run: str, args: argparse.Namespace, result_dir: Path) -> tuple[Any, str, float]:
    """Run one setting in a fresh process (its own session: a timed-out run's fork children
    go with it); returns the return code, the output and the wall seconds."""
    remove_stale(result_dir, f"{run}_*")
    cmd = [sys.executable, "-m", "benchmarks.bench_strategy", "--_worker", run, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--max-bytes", str(args.max_bytes), "--_result-dir", str(result_dir)]
    t0 = time.perf_counter()
    outputs, codes = wait_all([start_process(cmd)], t0 + args.timeout)
    return codes[0], outputs[0], time.perf_counter() - t0


def _step_stats(row: dict[str, Any], ranks: list[dict[str, Any]], warmup: int) -> None:
    """Step times, RSS, replica agreement and final loss (max over ranks where it is a cost)."""
    timed = [r["step_times_s"][warmup:] for r in ranks]
    row["timed_steps"] = min(len(t) for t in timed)
    row["step_median_s"] = max(statistics.median(t) for t in timed)
    row["step_mean_s"] = max(statistics.fmean(t) for t in timed)
    row["step_median_s_per_rank"] = [statistics.median(t) for t in timed]
    row["peak_rss_mb"] = max(r["maxrss_end_kb"] for r in ranks) / 1024
    row["rss_start_mb"] = max(r["rss_start_kb"] or 0 for r in ranks) / 1024
    row["rss_increase_mb"] = max(r["maxrss_end_kb"] - (r["rss_start_kb"] or 0) for r in ranks) / 1024
    row["replicas_identical"] = len({r["param_sha256"] for r in ranks}) == 1
    last = min(10, len(ranks[0]["losses"]))
    row["final_loss"] = statistics.fmean(x for r in ranks for x in r["losses"][-last:])
    row["final_loss_window"] = last


def _traffic_stats(row: dict[str, Any], ranks: list[dict[str, Any]], run: str) -> None:
    """Bytes per step: DDP's computed with the ring model, HoloGrad's from its meter."""
    allreduce = ring_allreduce_bytes(row["D"], WORLD_SIZE)
    row["ddp_allreduce_bytes_per_step"] = allreduce
    if run == "ddp":
        row["traffic_source"] = "computed: ring all-reduce 2(N-1)/N x 4D"
        row["K"] = None
        row["bytes_per_step"] = row["bytes_per_step_timed"] = allreduce
    else:
        row["traffic_source"] = "measured: strategy.exchange.traffic (ring model)"
        traffic = [r["traffic"] for r in ranks]
        row["K"] = traffic[0]["num_directions"]
        row["bytes_per_step"] = max(t["run_wire"] / max(t["steps"], 1) for t in traffic)
        timed = [(t["run_wire"] - t["at_warmup"][0]) / (t["steps"] - t["at_warmup"][1]) for t in traffic
                 if t["at_warmup"] is not None and t["steps"] > t["at_warmup"][1]]
        row["bytes_per_step_timed"] = max(timed) if timed else None
        row["traffic_by_kind"] = traffic[0]["total_wire"]
    row["compression"] = allreduce / row["bytes_per_step"] if row["bytes_per_step"] else None


def run_one(run: str, label: str, args: argparse.Namespace, result_dir: Path) -> dict[str, Any]:
    """Run one setting and aggregate its ranks' files."""
    row: dict[str, Any] = {"run": label, "setting": run, "strategy": "ddp" if run == "ddp" else "holograd",
                           "config": dict(RUNS[run]), "loadavg_start": loadavg()}
    rc, output, row["wall_s"] = launch(run, args, result_dir)
    ranks = read_rank_files(result_dir, run, WORLD_SIZE)
    if rc != 0 or len(ranks) != WORLD_SIZE:
        row["status"] = f"error (rc={rc}, {len(ranks)}/{WORLD_SIZE} rank files)"
        row["stderr_tail"] = output[-3000:]
        print(f"[bench] {label}: {row['status']}\n{output[-3000:]}", flush=True)
        return row
    row["status"] = "ok"
    worker_file = result_dir / f"{run}_worker.json"
    if worker_file.exists():
        row["fit_wall_s"] = json.loads(worker_file.read_text())["fit_wall_s"]
    row.update(ranks=ranks, D=ranks[0]["num_params"], threads_per_rank=max(r["threads"] for r in ranks))
    _step_stats(row, ranks, args.warmup)
    _traffic_stats(row, ranks, run)
    print(f"[bench] {label:14s} step {row['step_median_s'] * 1e3:7.1f} ms (median)  peak RSS "
          f"{row['peak_rss_mb']:6.0f} MB (+{row['rss_increase_mb']:.0f})  {row['bytes_per_step']:>12,.0f} B/step  "
          f"loss {row['final_loss']:.3f}  ({row['wall_s']:.0f} s)", flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the step times (default 10)")
    p.add_argument("--runs", default=",".join(HOLOGRAD_RUNS),
                   help="comma-separated HoloGrad settings, from " + ", ".join(HOLOGRAD_RUNS)
                        + " (DDP always runs first and last as the reference)")
    p.add_argument("--max-bytes", type=int, default=DATA_KW["max_bytes"], help="corpus bytes (as the example config)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is reported as failed")
    p.add_argument("--out", default=str(RESULTS / "strategy_cpu.md"),
                   help="Markdown output (default benchmarks/results/strategy_cpu.md); the JSON goes next to "
                        "it with the same stem")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the JSON")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2 or not 0 <= args.warmup < args.steps:
        p.error(f"--steps={args.steps}, --warmup={args.warmup}: need steps >= 2 and 0 <= warmup < steps. "
                "HINT: e.g. --steps 60 --warmup 10")
    args.run_list = [r for r in choose(p, "--runs", args.runs, RUNS) if r != "ddp"]
    return args


def run_schedule(args: argparse.Namespace) -> list[dict[str, Any]]:
    """DDP first, the HoloGrad settings, DDP last; every run's parameters against the first DDP's."""
    schedule = [("ddp", "ddp (start)")] + [(r, r) for r in args.run_list] + [("ddp", "ddp (end)")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_strategy_") as tmp:
        result_dir = Path(tmp)
        for run, label in schedule:
            if label == "ddp (end)" and (result_dir / "ddp_params.f32").exists():
                (result_dir / "ddp_params.f32").rename(result_dir / "ddpref_params.f32")  # keep the reference
            row = run_one(run, label, args, result_dir)
            if row["status"] == "ok":
                ref_name = "ddpref" if (result_dir / "ddpref_params.f32").exists() else "ddp"
                if label == "ddp (start)":
                    row["param_reference"] = True  # the parameters every other run is compared with
                else:
                    row["max_param_diff_vs_ddp"] = param_diff(result_dir, run, ref_name)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        worker(args._worker, args.steps, args.warmup, args.max_bytes, Path(args._result_dir))
        return 0
    out_md = Path(args.out)
    if args.report_only:
        payload = read_report(out_md)
        write_report(out_md, render_markdown(payload["meta"], payload["results"]), payload)
        return 0
    meta = run_metadata("bench_strategy", argv, world_size=WORLD_SIZE, steps=args.steps, warmup=args.warmup,
                        model=MODEL_KW, data={**DATA_KW, "max_bytes": args.max_bytes}, seed=SEED)
    print(f"[bench] {len(args.run_list) + 2} runs x {args.steps} steps on {WORLD_SIZE} CPU processes; "
          f"load {meta['loadavg_start']}", flush=True)
    wall0 = time.perf_counter()
    rows = run_schedule(args)
    finish_metadata(meta, wall0)
    add_reference(meta, rows)
    write_report(out_md, render_markdown(meta, rows), {"meta": meta, "results": rows})
    print(f"[bench] wrote {out_md} and its JSON ({meta['total_wall_s']:.0f} s)", flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

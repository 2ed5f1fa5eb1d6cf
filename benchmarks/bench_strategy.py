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
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

_BENCH_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _BENCH_DIR.parent

WORLD_SIZE = 2
SEED = 1337
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
# The tiny GPT-2 of configs/gpt2-tiny-cpu.yaml.
MODEL_KW = {"block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 128, "lr": 3e-3, "min_lr": 3e-4,
            "warmup_steps": 20}
DATA_KW = {"batch_size": 16, "block_size": 128, "val_every": 10}


# =========================================================================== worker side
def _vm_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (VmRSS: current RSS, VmHWM: peak RSS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _make_probe(result_dir: Path, run: str, warmup: int):
    import hashlib
    import resource

    import lightning.pytorch as L
    import torch

    class StepProbe(L.Callback):
        """Per-rank step times, RSS, traffic and losses; written to ``<run>_rank<r>.json``."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []
            self._t0 = 0.0
            self.rss_start_kb: int | None = None
            self.maxrss_start_kb = 0
            self.traffic_at_warmup: tuple[float, int] | None = None

        @staticmethod
        def _traffic(trainer: Any) -> Any:
            exchange = getattr(trainer.strategy, "exchange", None)
            return None if exchange is None else exchange.traffic

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.rss_start_kb = _vm_kb("VmRSS")
            self.maxrss_start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == warmup:
                traffic = self._traffic(trainer)
                if traffic is not None:
                    self.traffic_at_warmup = (traffic.run_wire(), traffic.steps)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.times.append(time.perf_counter() - self._t0)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss.detach()) if loss is not None else math.nan)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            rank = trainer.global_rank
            params = [p.detach().reshape(-1).float() for p in pl_module.parameters() if p.requires_grad]
            flat = torch.cat(params)
            digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
            if rank == 0:
                flat.numpy().tofile(result_dir / f"{run}_params.f32")
            out: dict[str, Any] = {
                "rank": rank,
                "world_size": trainer.world_size,
                "threads": torch.get_num_threads(),
                "step_times_s": self.times,
                "losses": self.losses,
                "global_step": trainer.global_step,
                "num_params": int(flat.numel()),
                "param_sha256": digest,
                "rss_start_kb": self.rss_start_kb,
                "maxrss_start_kb": self.maxrss_start_kb,
                "maxrss_end_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_end_kb": _vm_kb("VmRSS"),
                "hwm_end_kb": _vm_kb("VmHWM"),
            }
            traffic = self._traffic(trainer)
            if traffic is not None:
                out["traffic"] = {
                    "steps": traffic.steps,
                    "run_wire": traffic.run_wire(),
                    "total_wire": dict(traffic.total_wire),
                    "total_payload": dict(traffic.total_payload),
                    "allreduce_bytes_per_step": traffic.allreduce_bytes_per_step,
                    "at_warmup": self.traffic_at_warmup,
                    "num_directions": trainer.strategy.exchange.family.num_directions,
                }
            (result_dir / f"{run}_rank{rank}.json").write_text(json.dumps(out))

    return StepProbe()


def worker(run: str, steps: int, warmup: int, max_bytes: int, result_dir: Path) -> None:
    """One setting: data, model, Trainer(devices=2, fork) and fit; ranks write JSON files."""
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch as L
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_holograd import ADCBootstrap, HoloGradStrategy
    from lightning_holograd.demos.gpt2_data import GPT2DataModule
    from lightning_holograd.demos.gpt2_module import GPT2Module

    spec = dict(RUNS[run])
    bootstrap = spec.pop("bootstrap", 0)
    L.seed_everything(SEED, verbose=False)
    data = GPT2DataModule(max_bytes=max_bytes, **DATA_KW)
    data.setup("fit")  # load the corpus once, before the fork (the ranks inherit it)
    model = GPT2Module(**MODEL_KW)
    if run == "ddp":
        strategy: Any = DDPStrategy(start_method="fork")
    else:
        strategy = HoloGradStrategy(start_method="fork", **spec)
    callbacks: list[Any] = [_make_probe(result_dir, run, warmup)]
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
def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _ring_allreduce_bytes(num_params: int, world_size: int) -> float:
    return 2.0 * (world_size - 1) / world_size * 4 * num_params


def run_one(run: str, label: str, args: argparse.Namespace, result_dir: Path) -> dict[str, Any]:
    """Run one setting in a fresh process and aggregate its ranks' files (max over ranks)."""
    for stale in result_dir.glob(f"{run}_*"):
        stale.unlink()
    row: dict[str, Any] = {"run": label, "setting": run, "strategy": "ddp" if run == "ddp" else "holograd",
                           "config": {k: v for k, v in RUNS[run].items()}, "loadavg_start": _loadavg()}
    cmd = [sys.executable, "-m", "benchmarks.bench_strategy", "--_worker", run, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--max-bytes", str(args.max_bytes), "--_result-dir", str(result_dir)]
    t0 = time.perf_counter()
    # Own process group, so that a timed-out run's rank processes (fork children) go too.
    proc = subprocess.Popen(cmd, cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    rc: int | str
    try:
        _, err = proc.communicate(timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        rc = "timeout"
    row["wall_s"] = time.perf_counter() - t0
    ranks = []
    for r in range(WORLD_SIZE):
        path = result_dir / f"{run}_rank{r}.json"
        if path.exists():
            ranks.append(json.loads(path.read_text()))
    if rc != 0 or len(ranks) != WORLD_SIZE:
        row["status"] = f"error (rc={rc}, {len(ranks)}/{WORLD_SIZE} rank files)"
        row["stderr_tail"] = err[-3000:]
        print(f"[bench] {label}: {row['status']}\n{err[-3000:]}", flush=True)
        return row
    row["status"] = "ok"
    worker_file = result_dir / f"{run}_worker.json"
    if worker_file.exists():
        row["fit_wall_s"] = json.loads(worker_file.read_text())["fit_wall_s"]
    row["ranks"] = ranks
    num_params = ranks[0]["num_params"]
    row["D"] = num_params
    row["threads_per_rank"] = max(r["threads"] for r in ranks)
    timed = [r["step_times_s"][args.warmup:] for r in ranks]
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
    allreduce = _ring_allreduce_bytes(num_params, WORLD_SIZE)
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
        timed_bytes = []
        for t in traffic:
            if t["at_warmup"] is not None and t["steps"] > t["at_warmup"][1]:
                timed_bytes.append((t["run_wire"] - t["at_warmup"][0]) / (t["steps"] - t["at_warmup"][1]))
        row["bytes_per_step_timed"] = max(timed_bytes) if timed_bytes else None
        row["traffic_by_kind"] = traffic[0]["total_wire"]
    row["compression"] = allreduce / row["bytes_per_step"] if row["bytes_per_step"] else None
    print(f"[bench] {label:14s} step {row['step_median_s'] * 1e3:7.1f} ms (median)  peak RSS "
          f"{row['peak_rss_mb']:6.0f} MB (+{row['rss_increase_mb']:.0f})  {row['bytes_per_step']:>12,.0f} B/step  "
          f"loss {row['final_loss']:.3f}  ({row['wall_s']:.0f} s)", flush=True)
    return row


def _param_diff(result_dir: Path, run: str, ref: str) -> float | None:
    import numpy as np

    a, b = result_dir / f"{run}_params.f32", result_dir / f"{ref}_params.f32"
    if not (a.exists() and b.exists()):
        return None
    return float(np.max(np.abs(np.fromfile(a, dtype=np.float32) - np.fromfile(b, dtype=np.float32))))


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _fmt_diff(x: float | None) -> str:
    if x is None:
        return "-"
    return "0 (bitwise)" if x == 0.0 else f"{x:.3g}"


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    ref = meta["ddp_reference"]
    lines = [
        "# Strategy step time and memory: HoloGrad vs DDP (cpu)",
        "",
        f"- machine: {meta['machine']}",
        f"- torch {meta['torch']}, lightning {meta['lightning']}, transformers {meta['transformers']}, "
        f"python {meta['python']}",
        f"- {meta['world_size']} rank processes (gloo, fork), {meta['threads_per_rank']} thread per rank "
        "(OMP_NUM_THREADS=1)",
        f"- model: tiny GPT-2 of `configs/gpt2-tiny-cpu.yaml` (D = {meta['D']:,}), batch 16 x 128 tokens per rank, "
        f"seed {SEED}, same init, data and data order in every run",
        f"- {meta['steps']} optimizer steps per run; step times over the last {meta['steps'] - meta['warmup']} "
        f"(first {meta['warmup']} are warm-up)",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- load average (1/5/15 min) at start: {meta['loadavg_start']}, at end: {meta['loadavg_end']} "
        f"(other jobs on the machine inflate the times); total wall {meta['total_wall_s']:.0f} s",
    ]
    if ref:
        lines.append(f"- DDP reference (mean of the first and last run): {ref['step_median_s'] * 1e3:.1f} ms/step, "
                     f"peak RSS {ref['peak_rss_mb']:.0f} MB, RSS increase {ref['rss_increase_mb']:.0f} MB; "
                     f"the two DDP runs differ by {ref['noise_pct']:.1f} % in step time (noise level)")
    lines += [
        "",
        "| run | K | step ms (median) | x DDP | step ms (mean) | peak RSS MB | x DDP | RSS increase MB | x DDP "
        "| bytes/step/rank | after warm-up | compression vs DDP | final train loss | max abs(theta - theta_DDP) "
        "| load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | - | - | - | - | - | - | - | - | - | - | - | - | - | {r['status']} |")
            continue
        k = "-" if r["K"] is None else f"{r['K']:,}"
        if r["setting"] == "identity":
            k += " (= D)"
        ratio = (lambda key: _fmt(r[key] / ref[key]) if ref else "-")
        timed = "-" if r["bytes_per_step_timed"] is None else f"{r['bytes_per_step_timed']:,.0f}"
        load = r["loadavg_start"][0] if r.get("loadavg_start") else "-"
        diff = "reference" if r.get("param_reference") else _fmt_diff(r.get("max_param_diff_vs_ddp"))
        lines.append(
            f"| {r['run']} | {k} | {r['step_median_s'] * 1e3:.1f} | {ratio('step_median_s')} "
            f"| {r['step_mean_s'] * 1e3:.1f} | {r['peak_rss_mb']:.0f} | {ratio('peak_rss_mb')} "
            f"| {r['rss_increase_mb']:.0f} | {ratio('rss_increase_mb')} | {r['bytes_per_step']:,.0f} | {timed} "
            f"| {_fmt(r['compression'], 1)} | {r['final_loss']:.3f} | {diff} | {load} |"
        )
    lines += [
        "",
        "Columns:",
        "- *step ms*: wall time from `on_train_batch_start` to `on_train_batch_end` (forward, backward, "
        "exchange, optimizer step), median / mean over the timed steps of each rank, max over ranks. "
        "*x DDP*: ratio to the DDP reference.",
        "- *peak RSS*: `ru_maxrss` of each rank process at train end, max over ranks. The ranks are fork "
        "children, so this includes the pages they inherit from the parent (torch, lightning, "
        "transformers, the corpus). *RSS increase*: peak minus the rank's current RSS at "
        "`on_train_start`, i.e. what training itself added (model grads, optimizer state, activations, "
        "the strategy's buffers).",
        "- *bytes/step/rank*: wire bytes one rank sends per optimizer step, ring model, averaged over all "
        "steps (the one-time initial parameter broadcast excluded). HoloGrad: measured by the strategy "
        "(`trainer.strategy.exchange.traffic`: batch hashes + K scalars, plus the all-reduces of "
        "bootstrap steps). DDP: not metered (its all-reduce runs in C++), *computed* as the ring "
        "all-reduce 2(N-1)/N x 4D. *after warm-up*: the same over the timed steps only (for the codebook "
        "run, without its 5 bootstrap all-reduces). *compression* = DDP bytes / the all-steps figure. "
        "Lightning's 8-byte per-batch broadcast is counted in neither.",
        f"- *final train loss*: mean over both ranks of each rank's micro-batch loss over the last "
        f"{rows[0].get('final_loss_window', 10) if rows else 10} steps (nats/byte; ln 256 = 5.55 is a "
        "uniform guess). Short runs: this shows whether a setting learns at all, not its final quality.",
        "- *max abs(theta - theta_DDP)*: largest parameter difference at the end against the first DDP "
        "run. `identity` (K = D, g_hat = mean of the local gradients) is the exactness check: it should "
        "match DDP up to float32 summation order; the second DDP run should give 0.",
        "- *load*: 1-minute load average when the run started (2 cores; above ~2 other jobs compete).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the step times (default 10)")
    p.add_argument("--runs", default=",".join(HOLOGRAD_RUNS),
                   help="comma-separated HoloGrad settings, from " + ", ".join(HOLOGRAD_RUNS)
                        + " (DDP always runs first and last as the reference)")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus bytes (as the example config)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is reported as failed")
    p.add_argument("--out", default=None,
                   help="Markdown output (default benchmarks/results/strategy_cpu.md); the JSON goes next to "
                        "it with the same stem")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2 or not 0 <= args.warmup < args.steps:
        p.error("--steps must be >= 2 and 0 <= --warmup < --steps")
    runs = [s.strip() for s in args.runs.split(",") if s.strip() and s.strip() != "ddp"]
    bad = [s for s in runs if s not in RUNS]
    if bad:
        p.error(f"unknown runs {bad}; choose from {', '.join(HOLOGRAD_RUNS)}")
    args.run_list = runs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        worker(args._worker, args.steps, args.warmup, args.max_bytes, Path(args._result_dir))
        return 0

    out_md = Path(args.out) if args.out else _BENCH_DIR / "results" / "strategy_cpu.md"
    out_json = out_md.with_suffix(".json")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "torch": _version("torch"),
        "lightning": _version("lightning"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "world_size": WORLD_SIZE,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "steps": args.steps,
        "warmup": args.warmup,
        "model": MODEL_KW,
        "data": {**DATA_KW, "max_bytes": args.max_bytes},
        "seed": SEED,
        "loadavg_start": _loadavg(),
    }
    schedule = [("ddp", "ddp (start)")] + [(r, r) for r in args.run_list] + [("ddp", "ddp (end)")]
    print(f"[bench] {len(schedule)} runs x {args.steps} steps on {WORLD_SIZE} CPU processes; "
          f"load {meta['loadavg_start']}", flush=True)
    wall0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_strategy_") as tmp:
        result_dir = Path(tmp)
        for run, label in schedule:
            if label == "ddp (end)":  # keep the first DDP run's parameters as the reference
                ref_params = result_dir / "ddp_params.f32"
                if ref_params.exists():
                    ref_params.rename(result_dir / "ddpref_params.f32")
            row = run_one(run, label, args, result_dir)
            if row["status"] == "ok":
                ref_name = "ddpref" if (result_dir / "ddpref_params.f32").exists() else "ddp"
                if label == "ddp (start)":
                    row["param_reference"] = True  # the parameters every other run is compared with
                else:
                    row["max_param_diff_vs_ddp"] = _param_diff(result_dir, run, ref_name)
            rows.append(row)
    meta["total_wall_s"] = time.perf_counter() - wall0
    meta["loadavg_end"] = _loadavg()

    ok = [r for r in rows if r["status"] == "ok"]
    ddp = [r for r in ok if r["setting"] == "ddp"]
    meta["D"] = ok[0]["D"] if ok else None
    meta["threads_per_rank"] = max((r["threads_per_rank"] for r in ok), default=1)
    if ddp:
        ref = {key: statistics.fmean(r[key] for r in ddp)
               for key in ("step_median_s", "step_mean_s", "peak_rss_mb", "rss_increase_mb")}
        times = [r["step_median_s"] for r in ddp]
        ref["noise_pct"] = 100 * (max(times) - min(times)) / ref["step_median_s"]
        ref["runs"] = len(ddp)
        meta["ddp_reference"] = ref
        for r in ok:
            r["step_ratio"] = r["step_median_s"] / ref["step_median_s"]
            r["rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
            r["rss_increase_ratio"] = r["rss_increase_mb"] / ref["rss_increase_mb"]
    else:
        meta["ddp_reference"] = None
    out_md.write_text(render_markdown(meta, rows))
    out_json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"[bench] wrote {out_md} and {out_json} ({meta['total_wall_s']:.0f} s)", flush=True)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

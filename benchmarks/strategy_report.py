"""The report of ``bench_strategy``: the DDP reference, ratios, and the Markdown table."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import SEED, fmt

def param_diff(result_dir: Path, run: str, ref: str) -> float | None:
    import numpy as np

    a, b = result_dir / f"{run}_params.f32", result_dir / f"{ref}_params.f32"
    if not (a.exists() and b.exists()):
        return None
    return float(np.max(np.abs(np.fromfile(a, dtype=np.float32) - np.fromfile(b, dtype=np.float32))))


def _fmt_diff(x: float | None) -> str:
    if x is None:
        return "-"
    return "0 (bitwise)" if x == 0.0 else f"{x:.3g}"


def _header_lines(meta: dict[str, Any]) -> list[str]:
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
        f"- date: {meta['date']}" + (f"; commit `{meta['commit']}`" if meta.get("commit") else ""),
        f"- command: `{meta['command']}`",
        f"- load average (1/5/15 min) at start: {meta['loadavg_start']}, at end: {meta['loadavg_end']} "
        f"(other jobs on the machine inflate the times); total wall {meta['total_wall_s']:.0f} s",
    ]
    if ref:
        lines.append(f"- DDP reference (mean of the first and last run): {ref['step_median_s'] * 1e3:.1f} ms/step, "
                     f"peak RSS {ref['peak_rss_mb']:.0f} MB, RSS increase {ref['rss_increase_mb']:.0f} MB; "
                     f"the two DDP runs differ by {ref['noise_pct']:.1f} % in step time (noise level)")
    return lines


def _table_row(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    if r["status"] != "ok":
        return f"| {r['run']} | - | - | - | - | - | - | - | - | - | - | - | - | - | {r['status']} |"
    k = "-" if r["K"] is None else f"{r['K']:,}"
    if r["setting"] == "identity":
        k += " (= D)"

    def ratio(key: str) -> str:
        return fmt(r[key] / ref[key]) if ref else "-"

    timed = "-" if r["bytes_per_step_timed"] is None else f"{r['bytes_per_step_timed']:,.0f}"
    load = r["loadavg_start"][0] if r.get("loadavg_start") else "-"
    diff = "reference" if r.get("param_reference") else _fmt_diff(r.get("max_param_diff_vs_ddp"))
    return (f"| {r['run']} | {k} | {r['step_median_s'] * 1e3:.1f} | {ratio('step_median_s')} "
            f"| {r['step_mean_s'] * 1e3:.1f} | {r['peak_rss_mb']:.0f} | {ratio('peak_rss_mb')} "
            f"| {r['rss_increase_mb']:.0f} | {ratio('rss_increase_mb')} | {r['bytes_per_step']:,.0f} | {timed} "
            f"| {fmt(r['compression'], 1)} | {r['final_loss']:.3f} | {diff} | {load} |")


def _column_notes(rows: list[dict[str, Any]]) -> list[str]:
    return [
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


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        *_header_lines(meta),
        "",
        "| run | K | step ms (median) | x DDP | step ms (mean) | peak RSS MB | x DDP | RSS increase MB | x DDP "
        "| bytes/step/rank | after warm-up | compression vs DDP | final train loss | max abs(theta - theta_DDP) "
        "| load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_table_row(r, meta["ddp_reference"]) for r in rows),
        *_column_notes(rows),
    ]
    return "\n".join(lines) + "\n"


def add_reference(meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """D, threads and the DDP reference (mean of the DDP runs) into ``meta``; ratios into the rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    ddp = [r for r in ok if r["setting"] == "ddp"]
    meta["D"] = ok[0]["D"] if ok else None
    meta["threads_per_rank"] = max((r["threads_per_rank"] for r in ok), default=1)
    meta["ddp_reference"] = None
    if not ddp:
        return
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

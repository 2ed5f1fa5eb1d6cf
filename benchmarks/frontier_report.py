"""The frontier's analysis and report: ratios to DDP, per-family headlines, the Markdown table,
the CSV and the plots (``frontier_plots``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.frontier_plots import plot_all
from benchmarks.frontier_runs import LAST_REFERENCE, REFERENCE, RUNS, label
from benchmarks.harness import DATA_KW, provenance, ring_allreduce_bytes, write_csv, write_report
from lightning_holograd.protocol.quantize import row_bytes

WITHIN = 0.02  # "within 2 % of DDP"
TARGET_COMPRESSION = 1000.0
CSV_KEYS = ["run", "family", "status", "final_val_loss", "best_val_loss", "val_ratio", "bytes_train_per_rank",
            "bytes_per_step", "bytes_per_step_after_warmup", "compression", "step_median_s", "step_ratio",
            "peak_rss_mb", "rss_ratio", "wall_s"]


# ============================================================================ analysis
def interpolate_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over (x, y) points in log10(x); None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
            return y0 + t * (y1 - y0)
    return pts[0][1]  # a single point at exactly x


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (compression, loss ratio) points no other point beats on both: a point is dropped
    when another has at least its compression and at most its loss (ties keep the first).
    A setting that is dominated says nothing about what the family reaches at that
    compression, so the frontier is interpolated over these only."""
    kept: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):
        if not kept or y < min(ky for _, ky in kept):
            kept.append((x, y))
    return sorted(kept)


def frontier_at(points: list[tuple[float, float]], x: float) -> float | None:
    """The family's loss ratio at compression ``x`` read off its Pareto frontier: interpolated
    (log x) between the Pareto-optimal runs around ``x``; where every one of them compresses
    more than ``x``, the loss of the least compressing one (a run at >= ``x`` reaches it, and
    spending more bytes is not assumed to cost loss); None above the most compressing run."""
    front = pareto(points)
    if front and x < front[0][0]:
        return front[0][1]
    return interpolate_at(front, x)


def _family_headline(family: str, runs: list[dict[str, Any]], ddp_loss: float, within: float,
                     target: float) -> dict[str, Any]:
    good = [r for r in runs if r["final_val_loss"] <= ddp_loss * (1 + within)]
    best = max(good, key=lambda r: r["compression"]) if good else None
    top = max(runs, key=lambda r: r["compression"])
    return {
        "family": family, "runs": len(runs),
        "best_within": None if best is None else {"run": best["run"], "compression": best["compression"],
                                                  "val_ratio": best["final_val_loss"] / ddp_loss},
        "val_ratio_at_target": frontier_at([(r["compression"], r["final_val_loss"] / ddp_loss) for r in runs],
                                           target),
        "max_compression": {"run": top["run"], "compression": top["compression"],
                            "val_ratio": top["final_val_loss"] / ddp_loss},
    }


def headlines(rows: list[dict[str, Any]], ddp_loss: float, within: float = WITHIN,
              target: float = TARGET_COMPRESSION) -> list[dict[str, Any]]:
    """Per family: the best compression whose final val loss is within ``within`` of DDP's,
    and the val-loss ratio to DDP at ``target`` compression (``frontier_at``: interpolated in
    log compression between the family's Pareto-optimal runs, or the least compressing of them
    where all compress more; None where the runs do not reach it)."""
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["family"] != "ddp":
            families.setdefault(r["family"], []).append(r)
    return [_family_headline(family, runs, ddp_loss, within, target) for family, runs in families.items()]


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The DDP reference (mean of the DDP runs) and every ok row's ratios to it."""
    refs = [r for r in rows if r["run"] in (REFERENCE, LAST_REFERENCE) and r.get("status") == "ok"]
    if not refs:
        raise SystemExit("no successful DDP run: nothing to compare against. HINT: include ddp in --runs.")
    keys = ("bytes_train_per_rank", "step_median_s", "peak_rss_mb", "final_val_loss")
    ref: dict[str, Any] = {key: sum(r[key] for r in refs) / len(refs) for key in keys}
    ref["runs"] = [r["run"] for r in refs]
    ref["step_noise_pct"] = (100 * abs(refs[0]["step_median_s"] - refs[-1]["step_median_s"]) / ref["step_median_s"]
                             if len(refs) == 2 else None)
    for r in rows:
        if r.get("status") == "ok":
            r["compression"] = ref["bytes_train_per_rank"] / r["bytes_train_per_rank"]
            r["val_ratio"] = r["final_val_loss"] / ref["final_val_loss"]
            r["step_ratio"] = r["step_median_s"] / ref["step_median_s"]
            r["rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
    return ref


# ============================================================================ Markdown
def _setup_lines(meta: dict[str, Any], ref: dict[str, Any], d: int) -> list[str]:
    n = meta.get("num_nodes", 2)
    topology = meta.get("topology", "joined by a veth pair with no shaping")
    lr = f", learning rates {meta['lr_note']}" if meta.get("lr_note") else ""
    corpus = (f"; corpus: the first {meta['max_bytes'] / 1e6:.0f} MB of the stdlib's .py files"
              if meta.get("max_bytes", DATA_KW["max_bytes"]) != DATA_KW["max_bytes"] else "")
    return [
        f"- machine: {meta['machine']}; torch {meta['torch']}, lightning {meta['lightning']}",
        f"- model: tiny GPT-2 of `configs/gpt2-tiny-cpu.yaml` (D = {d:,}), AdamW{lr}, {meta['steps']} steps, "
        f"16 x 128 tokens per rank and step, seed 1337, same init, data and data order in every run{corpus}",
        f"- {n} ranks = a {'two' if n == 2 else n}-node torchrun job (gloo), one process per network namespace, "
        f"{topology}; 1 thread per rank",
        f"- validation: {meta['val_batches']} batches x 16 x 128 tokens per rank every {meta['val_every']} steps; "
        "loss in nats per byte",
        f"- bytes: the kernel's tx counter of each rank's veth end from train start to train end (max over the "
        f"{'two' if n == 2 else n} ranks): payload, Lightning's own collectives (metric syncs; "
        "before 2026-12-03 also an 8 B SIGTERM broadcast per step), gloo framing, TCP/IP headers and ACKs. veth offloads segmentation (TSO/GSO): a large message pays "
        "its 66 B of Ethernet/IP/TCP headers once per super-packet of up to 64 KB, not once per 1448-byte segment, "
        "so on a 1500-byte-MTU NIC the large-message runs (DDP, hooks, averaging) would count ~4.6 % more",
        f"- DDP reference = mean of {', '.join(ref['runs'])}: {ref['bytes_train_per_rank'] / meta['steps']:,.0f} B "
        f"per rank and step (ring model 2(N-1)/N x 4D = {ring_allreduce_bytes(d, n):,.0f}), val loss "
        f"{ref['final_val_loss']:.4f}, {ref['step_median_s'] * 1e3:.1f} ms/step, peak RSS "
        f"{ref['peak_rss_mb']:.0f} MB" + (f"; the two DDP runs differ by {ref['step_noise_pct']:.1f} % in step "
                                           "time (noise level)" if ref.get("step_noise_pct") is not None else ""),
    ]


def _headline_lines(heads: list[dict[str, Any]]) -> list[str]:
    lines = [f"| family | best compression within {WITHIN:.0%} of DDP's val loss | val loss ratio at "
             f"{TARGET_COMPRESSION:.0f}x | highest compression measured (val loss ratio) |", "|---|---|---|---|"]
    for h in heads:
        best, at, top = h["best_within"], h["val_ratio_at_target"], h["max_compression"]
        best_txt = "none" if best is None else f"{best['compression']:,.1f}x ({best['run']}, {best['val_ratio']:.3f})"
        at_txt = f"{at:.3f}" if at is not None else f"not reached (max {top['compression']:,.0f}x)"
        lines.append(f"| {h['family']} | {best_txt} | {at_txt} | {top['compression']:,.1f}x "
                     f"({top['run']}, {top['val_ratio']:.3f}) |")
    return lines


def _floor_lines(ok: list[dict[str, Any]], ref: dict[str, Any], num_nodes: int) -> list[str]:
    hg = [r for r in ok if r["spec"].get("kind") == "holograd"]
    if not hg:
        return []
    floor = min(hg, key=lambda r: r["bytes_per_step_after_warmup"])
    local_steps = floor["spec"].get("init_args", {}).get("local_steps", 1)  # one exchange per H steps
    bits = floor["spec"].get("init_args", {}).get("scalar_bits", 32)
    payload_bytes = round((num_nodes - 1) * (33 + row_bytes(floor["spec"]["K"], 0, bits)) / local_steps)
    return [
        "",
        f"Per-step floor: the smallest HoloGrad run ({floor['run']}) sends "
        f"{floor['bytes_per_step_after_warmup']:,.0f} B per rank and step, of which {payload_bytes:,} B are "
        "protocol payload (33 commit bytes + " + ("4K scalar bytes" if bits == 32 else
                                                  f"ceil(K x {bits} / 8) + 4 bytes of {bits}-bit scalars")
        + " per exchange" + (
            f", one exchange per H = {local_steps} steps, plus 4 bytes per public value" if local_steps > 1 else "")
        + (f", to each of N - 1 = {num_nodes - 1} ranks" if num_nodes > 2 else "")
        + "); the rest is per-message cost (TCP/IP headers, ACKs, gloo framing, Lightning's metric syncs). "
        f"At {num_nodes} ranks{' and this H' if local_steps > 1 else ''} this caps the measured compression near "
        f"{ref['bytes_train_per_rank'] / ok[0]['steps'] / floor['bytes_per_step_after_warmup']:,.0f}x whatever K is.",
    ]


def _run_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | family | setting | final val loss | best val loss | x DDP (final) | bytes/rank (train) "
             "| bytes/step | bytes/step after warm-up | compression | step ms | x DDP | peak RSS MB | x DDP | wall s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['run']} | {r['family']} | {label(r)} | {r.get('status')} |||||||||||")
            continue
        lines.append(
            f"| {r['run']} | {r['family']} | {label(r)} | {r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} "
            f"| {r['val_ratio']:.3f} | {r['bytes_train_per_rank']:,} | {r['bytes_per_step']:,.0f} "
            f"| {r['bytes_per_step_after_warmup']:,.0f} | {r['compression']:,.1f} | {r['step_median_s'] * 1e3:.1f} "
            f"| {r['step_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['wall_s']:.0f} |")
    return lines


SETTINGS_NOTE = (
    "Settings: PowerSGD = torch's `powerSGD_hook` (error feedback, warm start, `start_powerSGD_iter=10`; "
    "1-D tensors go uncompressed), each bucket finished before the next (gloo); bf16 = torch's "
    "`bf16_compress_hook`; local SGD = torch's `PeriodicModelAverager` through Lightning's post-local-SGD "
    "support, no gradient traffic, parameters averaged every H steps (AdamW states stay local); DiLoCo = "
    "the same with an outer Nesterov SGD (lr 0.7, momentum 0.9) on the averaged pseudo-gradient every H "
    "steps; HoloGrad = `HoloGradStrategy(directions=..., num_directions=K)` with the defaults otherwise "
    "(mean aggregation, audit every 100 steps); codebook runs add `ADCBootstrap` (true-gradient steps are "
    "full all-reduces and are counted).")


def render(meta: dict[str, Any], rows: list[dict[str, Any]], ref: dict[str, Any], heads: list[dict[str, Any]],
           stem: str = "frontier_cpu") -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    n = meta.get("num_nodes", 2)
    prefix = plot_prefix(stem)
    plots = f"[loss vs bytes]({prefix}_loss_vs_bytes.png), [loss vs step]({prefix}_loss_vs_step.png)"
    if meta.get("wall_clock_plot"):
        plots += f", [loss vs wall clock]({prefix}_loss_vs_time.png)"
    lines = [f"# Frontier: validation loss against bytes sent (cpu, {n} ranks, measured at the interface)", "",
             *_setup_lines(meta, ref, ok[0]["D"]),
             provenance(meta) + f"; total wall {meta['total_wall_s'] / 60:.0f} min",
             "", "## Headline (per family)", "", *_headline_lines(heads), *_floor_lines(ok, ref, n),
             "", "## Every run", "", *_run_lines(rows), "",
             f"Plots: {plots}. CSV: [{stem}.csv]({stem}.csv); JSON with every validation point: [{stem}.json]({stem}.json).",
             "", SETTINGS_NOTE]
    return "\n".join(lines) + "\n"


def plot_prefix(stem: str) -> str:
    """Plot files are named ``<prefix>_loss_vs_*.png``: ``frontier`` for ``frontier_cpu``."""
    return stem[: -len("_cpu")] if stem.endswith("_cpu") else stem


def report(payload: dict[str, Any], out_md: Path, tag: str = "frontier") -> None:
    """Ratios, headlines, Markdown, JSON, CSV and plots of a frontier invocation."""
    order = {name: i for i, name in enumerate([*RUNS, LAST_REFERENCE])}
    payload["rows"].sort(key=lambda r: order.get(r["run"], len(order)))
    rows = payload["rows"]
    ref = add_ratios(rows)
    heads = headlines(rows, ref["final_val_loss"])
    payload["reference"], payload["headlines"] = ref, heads
    write_report(out_md, render(payload["meta"], rows, ref, heads, out_md.stem), payload)
    write_csv(out_md.with_suffix(".csv"), rows, CSV_KEYS)
    plot_all(rows, ref, out_md.parent, plot_prefix(out_md.stem), WITHIN, TARGET_COMPRESSION,
             wall_clock=bool(payload["meta"].get("wall_clock_plot")))
    print(f"[{tag}] wrote {out_md}, .json, .csv and the plots", flush=True)

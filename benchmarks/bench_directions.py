#!/usr/bin/env python3
"""Micro-benchmark of the direction families: project + synthesize time versus D and K.

For every (family, D, K) it times ``family.project(g, seeds)`` and
``family.synthesize(a, seeds)`` separately (median of ``--repeats`` after ``--warmup``
untimed calls; ``torch.cuda.synchronize`` around every call on a GPU) and divides them by
reference costs measured first on the same device, so the tables read as ratios
(docs/PROTOCOL.md §3):
  x copy       one pass over D floats (``dst.copy_(src)``, D float32)
  x index_add  one random-index ``index_add_`` of D floats into K bins (the sketch's floor)
  x K randn    K ``torch.randn(D)`` draws, i.e. one generator draw per (direction,
               coordinate): what the dense families would cost with a plain generator
The header also reports the throughput of the direction hash itself (``hash_words``,
one 32-bit word per coordinate), the primitive every family's values come from.

Families (rows):
  gaussian               O(D K) table lookups, one hash word per 2 values
  rademacher             O(D K / 8): 32 directions per hash word, byte tables
  sketch                 count sketch, O(D) per call for any K
  codebook               codebook_rank = K, no exploration (pure U^T g / U a)
  codebook-halfexp       codebook_rank = K/2 plus K - K/2 Gaussian exploration directions
                         (``--families codebook`` runs both codebook rows)
  momentum               1 momentum direction + K - 1 Gaussian exploration directions
  sketch-compiled        the sketch on the fused torch.compile kernels (bitwise the same values)
  rademacher-compiled    rademacher on the fused kernels (the hash and byte split fused)
  sketch-cached          the eager sketch with its slot cache (on by default for D <= 2^24):
                         synthesize gathers from the slots project stored for the same seed,
                         what a step pays; the sketch and sketch-compiled rows run without it
  subsample              stratified coordinate sampling: K hash words and a gather (project),
                         a scatter into D zeros (synthesize); every call draws its picks
The plain gaussian / rademacher / sketch rows use the eager kernels (direction_kernel="eager");
the compile time of the fused kernels (once per process) is reported in the header, and the
fused kernels are compiled before the references are measured.

For the subspace families (codebook*, momentum) ``full_estimate`` (U a_U + P x, which
``reconstruct`` / ``update`` pay on every step) is timed too; with the default
exploration_weight = 0 ``synthesize`` returns U a_U only.
Their construction (seeded basis + QR, on the CPU) is reported as "setup".

Configurations whose estimated cost (setup + (warmup + repeats) calls) exceeds
``--max-seconds`` are not run and are reported as "skipped (budget)". Estimates come
from the reference costs, rescaled by the measured/estimated ratio of the last
configuration of the same family that did run (configurations run in increasing D, K).

Examples:
  python -m benchmarks.bench_directions                      # defaults, ~1 min on 2 CPU cores
  python -m benchmarks.bench_directions --dims 445952 --ks 64,4096   # the tiny GPT-2's D
  python -m benchmarks.bench_directions --dims 1000 --ks 16 --repeats 1   # smoke test
  python -m benchmarks.bench_directions --device cuda --dims 1000000,10000000,100000000
On CUDA every value is computed by the same integer kernels as on the CPU (bitwise the
same directions); chunks are sized by the device's working-set cap
(``lightning_holograd.protocol.directions._WORK_ELEMENTS``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.directions_timing import (COMPILED_SUFFIX, FAMILIES, compile_seconds, measure_references,
                                         prior_estimates, run_config)
from benchmarks.harness import (RESULTS, csv_ints, finish_metadata, loadavg, make_parser, read_report,
                                run_metadata, write_report)
from lightning_holograd.protocol import DIRECTION_VERSION

# --------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else _fmt(seconds * 1e3)


def _reference_lines(refs: dict[str, Any]) -> list[str]:
    lines = [
        "Reference costs on this device (ms; one call each):",
        "",
        "| D | copy_ (one pass) | randn(D) | hash word per coordinate | index_add_ into K bins |",
        "|---:|---:|---:|---:|---|",
    ]
    for dim in refs["copy_s"]:  # int keys, or str keys after a JSON round trip (--report-only)
        adds = ", ".join(f"K={key.split(',')[1]}: {_ms(value)}" for key, value in refs["index_add_s"].items()
                         if int(key.split(",")[0]) == int(dim))
        lines.append(f"| {int(dim):,} | {_ms(refs['copy_s'][dim])} | {_ms(refs['randn_s'][dim])} "
                     f"| {_ms(refs['hash_s'][dim])} | {adds} |")
    return lines


def render_markdown(meta: dict[str, Any], refs: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Direction generation micro-benchmark ({meta['device']})",
        "",
        f"- device: `{meta['device']}` ({meta['device_name']})",
        f"- torch {meta['torch']}, python {meta['python']}, threads {meta['threads']}",
        f"- direction definition: DIRECTION_VERSION {meta['direction_version']} (counter-based hash)",
        f"- date: {meta['date']}" + (f"; commit `{meta['commit']}`" if meta.get("commit") else ""),
        f"- command: `{meta['command']}`",
        f"- repeats {meta['repeats']} (median reported), warmup {meta['warmup']}, "
        f"per-config budget {meta['max_seconds']} s, total wall {meta['total_wall_s']:.0f} s",
        f"- load average (1 min) at start / end: {meta['loadavg_start']} / {meta['loadavg_end']} "
        f"(on a shared machine, other processes inflate the times; the JSON keeps every repeat)",
        *([] if meta["device"] != "cpu" else [
            "- GPU: not measured here (no GPU was available to this run); on a CUDA machine run "
            "`python -m benchmarks.bench_directions --device cuda` or `python -m benchmarks.gpu_check`"]),
        *([] if "compile_s" not in meta else [
            "- fused kernels (`*-compiled` rows): torch.compile + bitwise probe check "
            + ("failed, so those rows ran eager" if meta["compile_s"] is None else f"took {meta['compile_s']:.1f} s")
            + f" in this process (inductor cache: {meta.get('inductor_cache', 'as found')})"]),
        "",
        *_reference_lines(refs),
        "",
        "| family | D | K | setup s | project ms | synthesize ms | full_est ms | project x copy | "
        "synth x copy | reference | project x ref | synth x ref | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        label = r["family"] + (" (O(D))" if r["family"].startswith("sketch") else
                               " (O(K) + one pass)" if r["family"] == "subsample" else "")
        if r["status"] != "ok":
            est = r.get("estimated_s")
            note = r["status"] + (f", est. {est:.1f} s" if est is not None else "")
            lines.append(f"| {label} | {r['D']:,} | {r['K']} | - | - | - | - | - | - | - | - | - | {note} |")
            continue
        setup = "-" if r.get("setup_s") is None else f"{r['setup_s']:.2f}"
        lines.append(
            f"| {label} | {r['D']:,} | {r['K']} | {setup} | {_ms(r['project_s'])} | {_ms(r['synthesize_s'])} "
            f"| {_ms(r.get('full_estimate_s'))} | {_fmt(r['project_x_copy'])} | {_fmt(r['synthesize_x_copy'])} "
            f"| {r['reference']} | {_fmt(r['project_x_ref'])} | {_fmt(r['synthesize_x_ref'])} | ok |"
        )
    lines += [
        "",
        "Columns:",
        "- *x copy*: time / one `copy_` of D float32 (one pass over the gradient).",
        "- *reference*, *x ref*: time / the family's own floor. sketch: one random-index "
        "`index_add_` of D floats into K bins. gaussian, rademacher: K `torch.randn(D)` draws, one "
        "generator value per (direction, coordinate); subspace families: K' randn(D) for their K' "
        "exploration directions (copy when there are none); subsample: one copy (synthesize writes D "
        "values). Below 1 for rademacher means cheaper "
        "than drawing each sign; the gaussian pays a hash per 2 values and a table lookup per value.",
        "- *synth* ratios use full_est for the subspace families (what reconstruct/update pay).",
        "- codebook: codebook_rank = K, no exploration. codebook-halfexp: rank K/2 plus K/2 Gaussian "
        "exploration directions. momentum: 1 momentum direction + K-1 exploration directions. "
        "*full_est* is full_estimate (U a_U + P x, what reconstruct/update pay every step). With "
        "exploration_weight = 0 (default) *synthesize* returns U a_U.",
        "- *setup*: building the subspace family (seeded basis + QR on the CPU). The codebook repeats "
        "that O(D r^2) QR every qr_every (default 50) basis updates.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def _csv_families(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    allowed = set(FAMILIES) | {"codebook-halfexp"}
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown families {bad}; choose from {', '.join(sorted(allowed))}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--dims", type=csv_ints, default=[100_000, 1_000_000], help="comma-separated D values")
    p.add_argument("--ks", type=csv_ints, default=[16, 64, 256], help="comma-separated K values")
    p.add_argument("--families", type=_csv_families, default=list(FAMILIES),
                   help=f"comma-separated, from {', '.join(FAMILIES)}, codebook-halfexp "
                        "(codebook also runs codebook-halfexp unless --no-codebook-exploration)")
    p.add_argument("--no-codebook-exploration", action="store_true",
                   help="with --families codebook, skip the half-exploration codebook row")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per op; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per op before timing")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="per-config budget: configs estimated to take longer are skipped")
    p.add_argument("--out", default=None,
                   help="Markdown output (default benchmarks/results/directions_<device>.md); "
                        "the JSON goes next to it with the same stem")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables from the JSON (needs --out)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error(f"--repeats={args.repeats}, --threads={args.threads} must be >= 1 and --warmup={args.warmup} >= 0. "
                "HINT: the defaults are 3, 1 and 1.")
    if args.report_only and not args.out:
        p.error("--report-only needs --out. HINT: e.g. --out benchmarks/results/directions_cpu.md")
    return args


def _variants(args: argparse.Namespace) -> list[str]:
    variants: list[str] = []
    for name in args.families:
        for v in ([name, "codebook-halfexp"] if name == "codebook" and not args.no_codebook_exploration else [name]):
            if v not in variants:
                variants.append(v)
    return variants


def _one(variant: str, dim: int, k: int, device: torch.device, args: argparse.Namespace, refs: dict[str, Any],
         scale: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One configuration, or its "skipped" row when its estimate exceeds the budget; ``scale``
    (measured / prior per op) is updated from what ran."""
    tag = f"{variant:17s} D={dim:>10,} K={k:>4}"
    if variant in ("codebook-halfexp", "momentum") and k < 2:
        return {"family": variant, "D": dim, "K": k, "status": "skipped (needs K >= 2)"}
    prior = prior_estimates(variant, dim, k, refs)
    est = {op: prior[op] * scale.get(variant, {}).get(op, 1.0) for op in prior}
    total_est = est["setup"] + (args.warmup + args.repeats) * (est["project"] + est["synthesize"] + est["full_estimate"])
    if total_est > args.max_seconds:
        print(f"[bench] {tag}  skipped (budget): est. {total_est:.1f} s > {args.max_seconds} s", flush=True)
        return {"family": variant, "D": dim, "K": k, "status": "skipped (budget)", "estimated_s": total_est}
    try:
        row = run_config(variant, dim, k, device, args, refs)
    except Exception as exc:  # keep going: one broken config should not lose the table
        print(f"[bench] {tag}  error: {exc!r}", flush=True)
        return {"family": variant, "D": dim, "K": k, "status": f"error: {type(exc).__name__}"}
    row["estimated_s"] = total_est
    scale[variant] = {op: (row[f"{op}_s"] / prior[op]) if prior[op] > 0 and row.get(f"{op}_s") else 1.0
                      for op in ("project", "synthesize", "full_estimate")}
    if row.get("setup_s") and prior["setup"] > 0:
        scale[variant]["setup"] = row["setup_s"] / prior["setup"]
    full = f" full_est {row['full_estimate_s'] * 1e3:8.1f} ms" if "full_estimate_s" in row else ""
    setup = f" setup {row['setup_s']:.2f} s" if row.get("setup_s") else ""
    print(f"[bench] {tag}  project {row['project_s'] * 1e3:8.1f} ms  synthesize "
          f"{row['synthesize_s'] * 1e3:8.1f} ms{full}{setup}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        payload = read_report(Path(args.out))
        write_report(Path(args.out), render_markdown(payload["meta"], payload["references"], payload["results"]),
                     payload)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={args.device!r} but torch.cuda.is_available() is False. HINT: --device cpu")
    out_md = Path(args.out) if args.out else RESULTS / f"directions_{device.type}.md"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    variants = _variants(args)
    meta = run_metadata("bench_directions", argv, device=str(device), device_name=device_name,
                        threads=torch.get_num_threads(), repeats=args.repeats, warmup=args.warmup,
                        max_seconds=args.max_seconds, dims=args.dims, ks=args.ks, families=variants,
                        direction_version=DIRECTION_VERSION)
    meta["loadavg_start"] = (loadavg() or [None])[0]
    wall0 = time.perf_counter()
    print(f"[bench] device={device} ({device_name}) torch={torch.__version__} threads={meta['threads']}", flush=True)
    if any(v.endswith(COMPILED_SUFFIX) for v in variants):
        meta["compile_s"] = compile_seconds(device)
        meta["inductor_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "default directory"
        print(f"[bench] fused kernels compiled in {meta['compile_s']} s", flush=True)
    refs = measure_references(device, sorted(args.dims), sorted(args.ks), args.repeats)
    for dim in sorted(args.dims):
        print(f"[bench] D={dim:,}: copy_ {refs['copy_s'][dim] * 1e3:.2f} ms, "
              f"randn {refs['randn_s'][dim] * 1e3:.2f} ms, hash words {refs['hash_s'][dim] * 1e3:.2f} ms", flush=True)
    scale: dict[str, dict[str, float]] = {}  # variant -> measured/prior ratio per op, from the last run config
    rows = [_one(variant, dim, k, device, args, refs, scale)
            for dim in sorted(args.dims) for k in sorted(args.ks) for variant in variants]
    finish_metadata(meta, wall0)
    meta["loadavg_end"] = (meta["loadavg_end"] or [None])[0]
    write_report(out_md, render_markdown(meta, refs, rows), {"meta": meta, "references": refs, "results": rows})
    print(f"[bench] wrote {out_md} and its JSON ({meta['total_wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

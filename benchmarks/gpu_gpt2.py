"""GPT-2 124M on one GPU: HoloGrad (sketch) against plain single-device training.

Both runs: ``transformers.GPT2Config``'s default shape (12 layers, 12 heads, 768 wide,
1024 positions, vocab 50,257; D = 124,439,808 with the tied head; dropout 0), the demo's
AdamW schedule, bf16-mixed, random tokens, batch ``--batch-size`` x 1024, ``--steps``
steps, the same init and batches. Plain: Lightning's single-device strategy (no exchange
at all). HoloGrad: ``HoloGradStrategy(directions="sketch", num_directions=K)`` on one rank
(a process group of one: NCCL, gloo where NCCL fails). Reported, over the steps after
``--warmup`` (each step timed with the device synchronised):
- step time ratio = median HoloGrad step / median plain step;
- direction share = median exchange time (project, gather, aggregate, synthesize, timed
  around ``exchange_gradients``) / median HoloGrad step; target <= 10 %;
- project and synthesize timed alone at the same D and K (median of 5), as a cross-check.

  python -m benchmarks.gpu_gpt2 --out benchmarks/results/gpu
  python -m benchmarks.gpu_gpt2 --out /tmp/gpt2 --dry-run          # CPU, tiny GPT-2, seconds
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import lightning.pytorch as L
import torch

from benchmarks.gpu_common import (GPT2_124M, GPT2_DRY, RandomTokenGPT2, StepTimer, device_name, median,
                                   results_path, stage_device, stage_parser, sync, trainer_defaults)
from benchmarks.harness import finish_metadata, run_metadata, write_report

TARGET_SHARE = 0.10


def parse_args(argv: list[str] | None) -> Any:
    p = stage_parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 50; dry-run 4)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the medians (default 10; dry 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=1024, help="num_directions of the sketch")
    return p.parse_args(argv)


def _run(args: Any, device: torch.device, shape: dict[str, int], strategy: Any, precision: str) -> dict[str, Any]:
    module = RandomTokenGPT2(shape, args.batch_size, num_batches=args.steps)
    timer = StepTimer()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = L.Trainer(accelerator=device.type, devices=1, strategy=strategy, precision=precision,
                        callbacks=[timer], **trainer_defaults(args.steps))
    trainer.fit(module)
    kept = slice(args.warmup, None)
    row = {"step_s": timer.step_s, "exchange_s": timer.exchange_s, "losses": module.losses,
           "median_step_s": median(timer.step_s[kept]), "median_exchange_s": median(timer.exchange_s[kept]),
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "dim": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    del trainer, module
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _holograd(args: Any, device: torch.device, shape: dict[str, int], precision: str) -> dict[str, Any]:
    """The HoloGrad run; NCCL first on a GPU, gloo if NCCL fails (the error is kept)."""
    from lightning_holograd import HoloGradStrategy

    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    errors: dict[str, str] = {}
    for backend in backends:
        strategy = HoloGradStrategy(directions="sketch", num_directions=args.k, audit_every=0,
                                    process_group_backend=backend)
        try:
            row = _run(args, device, shape, strategy, precision)
        except Exception as exc:  # noqa: BLE001 - recorded, then the next backend
            errors[backend] = f"{type(exc).__name__}: {exc}"
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            continue
        return {**row, "backend": backend, "backend_errors": errors}
    raise RuntimeError(f"HoloGrad run failed on every backend: {errors}")


def isolated_direction_work(dim: int, k: int, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the sketch's project and synthesize alone at (D, K) on ``device``."""
    from lightning_holograd.protocol import direction_seeds, genesis_commitment, make_family

    family = make_family("sketch", dim, k)
    if hasattr(family, "to"):
        family.to(device)
    seeds = direction_seeds(genesis_commitment("gpu-gpt2"), family.num_seeds)
    grad = torch.randn(dim, device=device, generator=torch.Generator(device=device).manual_seed(0))
    times: dict[str, list[float]] = {"project_s": [], "synthesize_s": []}
    scalars = family.project(grad, seeds)  # warm-up of both
    family.synthesize(scalars, seeds)
    for _ in range(repeats):
        for name, call in (("project_s", lambda: family.project(grad, seeds)),
                           ("synthesize_s", lambda: family.synthesize(scalars, seeds))):
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def summarise(plain: dict[str, Any], holo: dict[str, Any], alone: dict[str, float]) -> dict[str, Any]:
    step, base, exch = holo["median_step_s"], plain["median_step_s"], holo["median_exchange_s"]
    share = exch / step if exch is not None and step else None
    alone_share = (alone["project_s"] + alone["synthesize_s"]) / step if step else None
    return {"step_time_ratio": step / base if step and base else None, "direction_share": share,
            "isolated_direction_share": alone_share, "target_share": TARGET_SHARE,
            "meets_target": share is not None and share <= TARGET_SHARE}


def render(meta: dict[str, Any], s: dict[str, Any], plain: dict[str, Any], holo: dict[str, Any],
           alone: dict[str, float]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f}"

    def gb(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f} %"

    ratio = "-" if s["step_time_ratio"] is None else f"{s['step_time_ratio']:.3f}"
    s["headline"] = (f"GPT-2 D={holo['dim']:,} on {meta['device_name']}: HoloGrad sketch K={meta['K']} step "
                     f"{ms(holo['median_step_s'])} ms vs plain {ms(plain['median_step_s'])} ms (ratio {ratio}); "
                     f"direction share {pct(s['direction_share'])} (target <= {pct(TARGET_SHARE)}: "
                     f"{'met' if s['meets_target'] else 'NOT met'})")
    return "\n".join([
        f"# GPT-2 on one device ({meta['device']})", "", f"**{s['headline']}.**", "",
        f"- shape {meta['shape']}, batch {meta['batch_size']} x {meta['shape']['block_size']} tokens, "
        f"precision {meta['precision']}, {meta['steps']} steps, medians over steps >= {meta['warmup']}",
        f"- HoloGrad process group backend: {holo['backend']}" +
        (f" (failed first: {holo['backend_errors']})" if holo["backend_errors"] else ""),
        f"- torch {meta['torch']}, lightning {meta['lightning']}, transformers {meta['transformers']}; "
        f"date {meta['date']}; command `{meta['command']}`", "",
        "| run | median step ms | median exchange ms | peak memory GB | first loss | last loss |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {ms(r['median_step_s'])} | {ms(r['median_exchange_s'])} | {gb(r['peak_memory_gb'])} | "
          f"{r['losses'][0]:.3f} | {r['losses'][-1]:.3f} |" for name, r in (("plain", plain), ("holograd", holo))),
        "",
        f"Sketch alone at D = {holo['dim']:,}, K = {meta['K']}: project {ms(alone['project_s'])} ms, synthesize "
        f"{ms(alone['synthesize_s'])} ms ({pct(s['isolated_direction_share'])} of the HoloGrad step).",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = stage_device(args)
    args.steps = args.steps or (4 if args.dry_run else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 10)
    if args.steps <= args.warmup or args.batch_size < 1 or args.k < 1:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup}; --batch-size={args.batch_size} "
                         f"and --k={args.k} must be >= 1. HINT: the defaults are 50, 10, 8 and 1024.")
    shape = GPT2_DRY if args.dry_run else GPT2_124M
    if args.dry_run:
        args.batch_size, args.k = min(args.batch_size, 2), min(args.k, 16)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    meta = run_metadata("gpu_gpt2", argv, device=str(device), device_name=device_name(device), shape=shape,
                        batch_size=args.batch_size, K=args.k, steps=args.steps, warmup=args.warmup,
                        precision=precision, dry_run=args.dry_run)
    wall0 = time.perf_counter()
    plain = _run(args, device, shape, "auto", precision)
    holo = _holograd(args, device, shape, precision)
    alone = isolated_direction_work(holo["dim"], args.k, device)
    summary = summarise(plain, holo, alone)
    finish_metadata(meta, wall0)
    markdown = render(meta, summary, plain, holo, alone)
    write_report(results_path(args.out, "gpt2"), markdown,
                 {"meta": meta, "summary": summary, "plain": plain, "holograd": holo, "isolated": alone})
    print(f"[gpu_gpt2] {summary['headline']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two ranks on one GPU: which gloo collectives take CUDA tensors, and a two-rank HoloGrad fit.

1. Collectives: two processes join a gloo group and run, on tensors of the device,
   broadcast, all_reduce, all_gather, all_gather_into_tensor, reduce_scatter_tensor,
   gather and send/recv, each checked against its known result; an op gloo refuses for
   CUDA tensors is recorded with its error. (The strategy itself never hands gloo a CUDA
   tensor: with gloo its exchange runs on CPU tensors.)
2. Fit: the toy task with ``HoloGradStrategy(process_group_backend="gloo",
   parallel_devices=[device, device])``; replicas must end bitwise identical.

NCCL with two ranks needs two GPUs (NCCL refuses two ranks on one device), so multi-rank
NCCL stays untested here; the report says so.

  python -m benchmarks.gpu_ranks --out benchmarks/results/gpu
  python -m benchmarks.gpu_ranks --out /tmp/ranks --dry-run           # CPU tensors, seconds
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.gpu_common import device_name, results_path, stage_device, stage_parser
from benchmarks.harness import finish_metadata, run_metadata, write_report

WORLD = 2
NCCL_NOTE = "multi-rank NCCL remains untested: it needs two GPUs (NCCL refuses two ranks on one device)"


def _checks(rank: int, device: torch.device, names: list[str]) -> dict[str, Any]:
    """Each collective on ``device`` tensors -> ok, or the error it raised / the wrong result."""
    def one(op: Any) -> str:
        try:
            return "ok" if op() else "wrong result"
        except Exception as exc:  # noqa: BLE001 - what gloo refuses is the finding
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def t(*values: float) -> torch.Tensor:
        return torch.tensor(values, device=device)

    def broadcast() -> bool:
        x = t(7.0, 8.0) if rank == 0 else t(0.0, 0.0)
        dist.broadcast(x, src=0)
        return x.tolist() == [7.0, 8.0]

    def all_reduce() -> bool:
        x = t(float(rank + 1))
        dist.all_reduce(x)
        return x.item() == 3.0

    def all_gather() -> bool:
        out = [t(0.0) for _ in range(WORLD)]
        dist.all_gather(out, t(float(rank)))
        return [o.item() for o in out] == [0.0, 1.0]

    def all_gather_into_tensor() -> bool:
        out = torch.zeros(WORLD, device=device)
        dist.all_gather_into_tensor(out, t(float(rank)))
        return out.tolist() == [0.0, 1.0]

    def reduce_scatter_tensor() -> bool:
        out = torch.zeros(1, device=device)
        dist.reduce_scatter_tensor(out, t(1.0, 2.0))
        return out.item() == 2.0 * (rank + 1)

    def gather() -> bool:
        out = [t(0.0) for _ in range(WORLD)] if rank == 0 else None
        dist.gather(t(float(rank)), out, dst=0)
        return rank != 0 or [o.item() for o in out] == [0.0, 1.0]

    def send_recv() -> bool:
        if rank == 0:
            dist.send(t(5.0), dst=1)
            return True
        x = t(0.0)
        dist.recv(x, src=0)
        return x.item() == 5.0

    ops = {"broadcast": broadcast, "all_reduce": all_reduce, "all_gather": all_gather,
           "all_gather_into_tensor": all_gather_into_tensor, "reduce_scatter_tensor": reduce_scatter_tensor,
           "gather": gather, "send_recv": send_recv}
    return {name: one(ops[name]) for name in names}


OPS = ["broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "gather",
       "send_recv"]


def _rank_main(rank: int, port: int, device_str: str, out_dir: str, name: str) -> None:
    device = torch.device(device_str)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A bounded wait: an op one rank refuses must not leave the other blocked for the default 30 min.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        results = _checks(rank, device, [name])
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(results))


def _method(device: torch.device, start_method: str | None) -> str:
    return start_method or ("spawn" if device.type == "cuda" else "fork")  # CUDA refuses fork once initialised


def collectives(device: torch.device, start_method: str | None = None) -> dict[str, Any]:
    """Each op in its own pair of processes: gloo aborts the process (no Python exception)
    when it is handed memory it cannot read, and that must not hide the other ops."""
    from lightning_holograd.demos import free_port

    method = _method(device, start_method)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-ranks-") as tmp:
        for name in OPS:
            try:
                mp.start_processes(_rank_main, args=(free_port(), str(device), tmp, name), nprocs=WORLD,
                                   start_method=method)
            except Exception as exc:  # noqa: BLE001 - an aborted rank is the finding
                results[name] = f"rank process died: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
                continue
            per_rank = [json.loads(Path(tmp, f"{name}.rank{r}.json").read_text())[name] for r in range(WORLD)]
            results[name] = per_rank[0] if per_rank[0] == per_rank[1] else f"rank 0: {per_rank[0]}; rank 1: {per_rank[1]}"
    return results


def strategy_fit(device: torch.device, steps: int, start_method: str | None = None) -> dict[str, Any]:
    from lightning_holograd import HoloGradStrategy
    from lightning_holograd.demos import ToyModule, fit

    strategy = HoloGradStrategy(start_method=_method(device, start_method), num_directions=64,
                                process_group_backend="gloo", parallel_devices=[device] * WORLD)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-ranks-fit-") as tmp:
        states = fit(ToyModule(), strategy, tmp, devices=1, accelerator=device.type, max_steps=steps)
    identical = all(torch.equal(s["params"][k], states[0]["params"][k]) for s in states[1:] for k in s["params"])
    losses = states[0]["losses"]
    return {"ranks": len(states), "steps": states[0]["global_step"], "identical_replicas": identical,
            "first_loss": losses[0], "last_loss": losses[-1], "fit_seconds": time.perf_counter() - t0}


def render(meta: dict[str, Any], coll: dict[str, Any], fit_row: dict[str, Any]) -> str:
    ok = [op for op, v in coll.items() if v == "ok"]
    fit_ok = fit_row.get("identical_replicas") and fit_row.get("ranks") == WORLD
    headline = (f"two gloo ranks on {meta['device_name']}: {len(ok)}/{len(coll)} collectives take {meta['device']} "
                f"tensors; HoloGrad fit {'ok, replicas identical' if fit_ok else 'FAILED'}; {NCCL_NOTE}")
    meta["headline"] = headline
    lines = [f"# Two ranks on one device ({meta['device']})", "", f"**{headline}.**", "",
             f"- torch {meta['torch']}; date {meta['date']}; command `{meta['command']}`", "",
             "| collective (gloo, device tensors) | result |", "|---|---|",
             *(f"| {op} | {value} |" for op, value in coll.items()), "",
             f"HoloGrad fit (toy task, gloo, 2 ranks on {meta['device']}): {json.dumps(fit_row)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="steps of the fit (default 32; dry-run 4)")
    p.add_argument("--start-method", choices=["spawn", "fork"], default=None,
                   help="how the two ranks start (default: spawn on CUDA, fork on CPU)")
    args = p.parse_args(argv)
    device = stage_device(args)
    steps = args.steps or (4 if args.dry_run else 32)
    meta = run_metadata("gpu_ranks", argv, device=str(device), device_name=device_name(device), dry_run=args.dry_run)
    wall0 = time.perf_counter()
    coll = collectives(device, args.start_method)
    try:
        fit_row = strategy_fit(device, steps, args.start_method)
    except Exception as exc:  # noqa: BLE001 - the collectives table is still worth writing
        fit_row = {"error": f"{type(exc).__name__}: {exc}"}
    finish_metadata(meta, wall0)
    markdown = render(meta, coll, fit_row)
    write_report(results_path(args.out, "ranks"), markdown,
                 {"meta": meta, "collectives": coll, "fit": fit_row, "nccl": NCCL_NOTE})
    print(f"[gpu_ranks] {meta['headline']}", flush=True)
    return 0 if "error" not in fit_row else 1


if __name__ == "__main__":
    raise SystemExit(main())

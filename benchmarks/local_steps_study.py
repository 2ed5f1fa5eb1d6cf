"""Design study for issue 11 §1-§2: direction groups, and local steps with a verifiable inner state.

This is a DESIGN STUDY, not the frontier: one process simulates N data-parallel workers with
exact per-worker gradients and counts bytes from the protocol's arithmetic (no network, no
strategy). Its job is to rank design options cheaply before they are built; the frontier
(``frontier.py``, real processes, measured bytes) checks the chosen ones.

Workload: the tiny GPT-2 of ``configs/gpt2-tiny-cpu.yaml`` (D = 445,952), the byte-level stdlib
corpus of ``examples/gpt2_data.py`` (max_bytes 4,000,000, val_every 10), 16 x 128 tokens per
worker and step, each worker its own disjoint stream of training windows (reshuffled each
epoch), AdamW (torch's own) lr 3e-3, betas (0.9, 0.95), weight decay 0.1 on matrices, 20 warmup
steps and cosine to 3e-4 (``GPT2Module.lr_factor``). Val loss: 32 fixed batches of 16 windows
spread evenly over the validation split.

Two modes, chosen by ``--local-steps`` (H):

- H = 1, per-step HoloGrad (docs/PROTOCOL.md §2, §9 direction groups): each worker projects its
  gradient onto K count-sketch directions of its group, the estimate is the mean of the
  reconstructions, and one public AdamW applies it. ``--ratio 0`` is DDP (exact mean gradient).
- H > 1, rounds (docs/PROTOCOL.md §9 local steps): every worker starts from the shared theta_r,
  runs H inner AdamW steps on its own batches, sketches its pseudo-gradient
  delta_i = theta_r - theta_i^(H), and the mean reconstruction moves theta by the outer step
  (``avg``: theta -= outer_lr * delta_hat; ``nesterov``: torch SGD's Nesterov momentum).
  ``--ratio 0`` sends delta_i exactly (local SGD / DiLoCo).

Inner optimizer state at a round start (``--inner``), each an edit of torch AdamW's own state
(exp_avg = m, exp_avg_sq = v, one step counter per tensor), so a strategy could apply it to the
user's optimizer:

- ``private``: kept as in plain local SGD; a verifier needs all of it (8 D bytes) per check.
- ``reset``: cleared (step counter too): replayable from public data alone.
- ``keep_v``: m zeroed, v and the step counter kept; a check transfers v (4 D bytes).
- ``factored_v``: m zeroed, v of every matrix replaced by its rank-1 row x column factorisation
  (Adafactor's), vectors kept: a check transfers the factors (here 8,320 floats).
- ``tensor_v``: m zeroed, v replaced by its per-tensor mean (28 floats).
- ``public_v``: as tensor_v, but the per-tensor means are uploaded with the claim and averaged
  over workers, so the state is public (costs 4 bytes per tensor per round on the wire).
A private state is committed by hash each round (32 bytes more per round) and a drawn check
replays the round from it; the replayed end state must hash to the next committed start state.

Bytes (per worker): 4 D per step uncompressed. A round sends 4 K + 32 (scalars and the batch
hash) [+ 32 for a private state's hash, + 4 per tensor for ``public_v``]. A check of a round
moves its H batches (B x T tokens of ``--token-bytes`` bytes each) and the state; at
``--p-verify`` per claim the expected verification bytes per step are
p_verify * (H B T token_bytes + state bytes) / H. ``--budget exchange`` sizes K so the exchange
alone is 4 D / ratio bytes per step; ``--budget total`` so exchange plus verification is.

Run one configuration per command (the tag names it); ``--report`` collects the runs:
  python -m benchmarks.local_steps_study --workers 4 --steps 300 --ratio 0          # DDP
  python -m benchmarks.local_steps_study --workers 4 --steps 300 --ratio 1000 --groups per_rank
  python -m benchmarks.local_steps_study --workers 4 --steps 300 --ratio 1000 --local-steps 16 \
      --groups per_rank --inner factored_v --outer avg
  python -m benchmarks.local_steps_study --report       # tables to stdout, local_steps_study.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import MODEL_KW, SEED

_BENCH_DIR = Path(__file__).resolve().parent

RUNS_DIR = _BENCH_DIR / "results" / "local_steps_study_runs"
BATCH, DATA_SEED = 16, 1234
INNER_OPTIONS = ("private", "reset", "keep_v", "factored_v", "tensor_v", "public_v")
HASH_BYTES = 32


# ============================================================================ workload
class Workload:
    """Model, per-worker batch streams, flat gradients and validation loss of the tiny GPT-2."""

    def __init__(self, workers: int, val_batches: int = 32) -> None:
        from lightning_holograd.demos.gpt2_data import stdlib_corpus
        from lightning_holograd.demos.gpt2_module import GPT2Module

        torch.manual_seed(SEED)  # the example's init
        self.module = GPT2Module(**MODEL_KW)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.decayed = [p.dim() >= 2 for p in self.params]  # weight decay on matrices only
        t = MODEL_KW["block_size"]
        train, val = stdlib_corpus(4_000_000, 10)
        self.train = train[: len(train) // t * t].long().view(-1, t)  # (windows, T)
        val = val[: len(val) // t * t].long().view(-1, t)
        pick = torch.linspace(0, len(val) - 1, val_batches * BATCH).long()
        self.val_batches = val[pick].view(val_batches, BATCH, t)  # fixed, evenly spread
        self.workers = workers
        self._epochs: dict[int, torch.Tensor] = {}

    def initial(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])  # (D,)

    def batch(self, worker: int, step: int) -> torch.Tensor:
        """Worker's batch at ``step``: its share (every N-th window) of a seeded epoch permutation."""
        per_epoch = len(self.train) // self.workers // BATCH
        epoch, i = divmod(step, per_epoch)
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(DATA_SEED + epoch)
            self._epochs[epoch] = torch.randperm(len(self.train), generator=gen)
        share = self._epochs[epoch][worker :: self.workers]
        return self.train[share[i * BATCH : (i + 1) * BATCH]]  # (B, T)

    def _load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, part in zip(self.params, flat.split(self.sizes)):
                p.copy_(part.view_as(p))

    def grad(self, flat: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Flat gradient (D,) and loss of ``GPT2Module.loss`` at parameters ``flat``."""
        self._load(flat)
        loss = self.module.loss(batch)
        grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1) for g in grads]), float(loss.detach())

    @torch.no_grad()
    def val_loss(self, flat: torch.Tensor) -> float:
        self._load(flat)
        return sum(float(self.module.loss(b)) for b in self.val_batches) / len(self.val_batches)


class FlatAdamW:
    """torch.optim.AdamW over views of one flat parameter vector (decay on matrices only)."""

    def __init__(self, work: Workload, flat: torch.Tensor) -> None:
        self.flat = flat
        self.views = [v.view(s) for v, s in zip(flat.split(work.sizes), work.shapes)]
        hp = work.module.hparams
        groups = [{"params": [v for v, d in zip(self.views, work.decayed) if d], "weight_decay": hp.weight_decay},
                  {"params": [v for v, d in zip(self.views, work.decayed) if not d], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)

    def step(self, grad: torch.Tensor, lr: float) -> None:
        for v, g in zip(self.views, grad.split([v.numel() for v in self.views])):
            v.grad = g.view_as(v)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()


# ============================================================================ count sketch
def group_seed(run_seed: int, round_index: int, group: int) -> int:
    """Public seed of one group's directions in one round (docs/PROTOCOL.md §9: hash of c_t, g)."""
    digest = hashlib.sha256(f"local-steps-study/{run_seed}/{round_index}/{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sketch_hash(seed: int, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    buckets = torch.randint(k, (dim,), generator=gen)  # (D,) bucket of each coordinate
    signs = torch.randint(0, 2, (dim,), generator=gen).float().mul_(2).sub_(1)  # (D,) +-1
    return buckets, signs


def sketch_roundtrip(vec: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """Reconstruction s(d) a_{h(d)} of the K scalars a_j = sum_{h(d)=j} s(d) vec_d (unbiased)."""
    buckets, signs = sketch_hash(seed, vec.numel(), k)
    scalars = torch.zeros(k).index_add_(0, buckets, signs * vec)  # (K,) what the worker sends
    return signs * scalars[buckets]


def group_of(worker: int, workers: int, groups: int) -> int:
    return worker * groups // workers


def estimate(vectors: list[torch.Tensor], round_index: int, k: int, args: argparse.Namespace) -> torch.Tensor:
    """Mean over workers of each worker's sketch reconstruction, seeds per group (k = 0: exact)."""
    if k == 0:
        return torch.stack(vectors).mean(0)
    n, g = len(vectors), args.num_groups
    if g == 1:  # shared directions: the sketch is linear, so sketch the mean once
        return sketch_roundtrip(torch.stack(vectors).mean(0), group_seed(args.seed, round_index, 0), k)
    members = [[v for w, v in enumerate(vectors) if group_of(w, n, g) == j] for j in range(g)]
    parts = [sketch_roundtrip(torch.stack(m).mean(0), group_seed(args.seed, round_index, j), k) for j, m in enumerate(members)]
    return torch.stack(parts).mean(0)


# ============================================================================ inner state
def factored(v: torch.Tensor) -> torch.Tensor:
    """Adafactor's rank-1 approximation of a nonnegative matrix: rows x cols / total."""
    rows, cols = v.sum(1, keepdim=True), v.sum(0, keepdim=True)
    return rows * cols / v.sum().clamp_min(1e-30)


def state_floats(work: Workload, option: str) -> int:
    """Floats a verifier must receive to replay a round from this option's start state."""
    if option == "private":
        return 2 * work.dim + len(work.sizes)  # m, v and the step counters
    if option == "keep_v":
        return work.dim + len(work.sizes)
    if option == "factored_v":
        return sum(s[0] + s[1] if len(s) == 2 else s.numel() for s in work.shapes) + len(work.sizes)
    if option == "tensor_v":
        return 2 * len(work.sizes)
    return 0  # reset, public_v: nothing private


def start_round(opts: list[FlatAdamW], option: str) -> None:
    """Edit every worker's AdamW state at a round start (before round 0 there is none)."""
    if option == "private":
        return
    if option == "reset":
        for o in opts:
            o.opt.state.clear()
        return
    public: list[torch.Tensor] | None = None
    if option == "public_v":
        means = [[o.opt.state[v]["exp_avg_sq"].mean() for v in o.views if v in o.opt.state] for o in opts]
        public = [torch.stack(col).mean() for col in zip(*means)]
    for o in opts:
        for i, view in enumerate(v for v in o.views if v in o.opt.state):
            state = o.opt.state[view]
            state["exp_avg"].zero_()
            sq = state["exp_avg_sq"]
            if option == "factored_v" and sq.dim() == 2:
                sq.copy_(factored(sq))
            elif option == "tensor_v":
                sq.fill_(float(sq.mean()))
            elif option == "public_v":
                sq.fill_(float(public[i]))


# ============================================================================ bytes
def private_state(args: argparse.Namespace) -> bool:
    return args.local_steps > 1 and args.inner in ("private", "keep_v", "factored_v", "tensor_v")


def round_costs(work: Workload, args: argparse.Namespace, steps: int) -> dict[str, float]:
    """K and the bytes (per worker) of one round of ``steps`` inner steps under ``args``."""
    state = state_floats(work, args.inner) if args.local_steps > 1 else 0
    check = steps * BATCH * MODEL_KW["block_size"] * args.token_bytes + 4 * state
    verify = args.p_verify * check
    if args.ratio == 0:  # DDP / local SGD: nothing to verify
        return {"k": 0, "exchange": 4.0 * work.dim, "verify": 0.0, "check": 0}
    fixed = HASH_BYTES + (HASH_BYTES if private_state(args) else 0)
    fixed += 4 * len(work.sizes) if args.local_steps > 1 and args.inner == "public_v" else 0
    budget = 4.0 * work.dim * steps / args.ratio - fixed - (verify if args.budget == "total" else 0.0)
    k = math.floor(budget / 4)
    if k < 1:
        raise SystemExit(f"--ratio {args.ratio} leaves {budget:.0f} bytes per round for the scalars "
                         f"(verification {verify:.0f}, fixed {fixed}). HINT: lower --ratio, raise "
                         "--local-steps, or use --budget exchange.")
    return {"k": k, "exchange": 4.0 * k + fixed, "verify": verify, "check": check}


# ============================================================================ training
def lr_at(work: Workload, step: int, total: int) -> float:
    return work.module.hparams.lr * work.module.lr_factor(step, total)


def run_per_step(work: Workload, args: argparse.Namespace, log: dict[str, Any]) -> torch.Tensor:
    """H = 1: every step, the workers' gradient estimate drives one public AdamW."""
    theta = work.initial()
    opt = FlatAdamW(work, theta)
    costs = round_costs(work, args, 1)
    exact_mean_only = args.ratio == 0 or args.num_groups == 1
    for step in range(args.steps):
        batches = [work.batch(w, step) for w in range(args.workers)]
        if exact_mean_only:  # one pass over the concatenated batch gives the mean gradient
            g, loss = work.grad(theta, torch.cat(batches))
            grads = [g]
        else:
            pairs = [work.grad(theta, b) for b in batches]
            grads, loss = [g for g, _ in pairs], sum(l for _, l in pairs) / len(pairs)
        est = estimate(grads, step, int(costs["k"]), args)
        opt.step(est, lr_at(work, step, args.steps))
        account(log, costs, step + 1, loss)
        checkpoint(work, theta, args, log, step, step + 1)
    return theta


def outer_step(theta: torch.Tensor, delta_hat: torch.Tensor, velocity: torch.Tensor, args: argparse.Namespace) -> None:
    if args.outer == "nesterov":  # torch.optim.SGD(nesterov=True) on the pseudo-gradient
        velocity.mul_(args.outer_momentum).add_(delta_hat)
        delta_hat = delta_hat + args.outer_momentum * velocity
    theta.sub_(delta_hat, alpha=args.outer_lr)


def run_rounds(work: Workload, args: argparse.Namespace, log: dict[str, Any]) -> torch.Tensor:
    """H > 1: rounds of H inner AdamW steps per worker, then the sketched outer step."""
    theta = work.initial()
    local = [theta.clone() for _ in range(args.workers)]
    opts = [FlatAdamW(work, flat) for flat in local]
    velocity = torch.zeros_like(theta)
    step, round_index = 0, 0
    while step < args.steps:
        steps = min(args.local_steps, args.steps - step)
        costs = round_costs(work, args, steps)
        start_round(opts, args.inner)
        deltas, loss = [], 0.0
        for w, (flat, opt) in enumerate(zip(local, opts)):
            flat.copy_(theta)
            for i in range(steps):
                g, l_ = work.grad(flat, work.batch(w, step + i))
                opt.step(g, lr_at(work, step + i, args.steps))
                loss += l_ / (steps * args.workers)
            deltas.append(theta - flat)
        outer_step(theta, estimate(deltas, round_index, int(costs["k"]), args), velocity, args)
        account(log, costs, step + steps, loss)
        checkpoint(work, theta, args, log, step, step + steps)
        step, round_index = step + steps, round_index + 1
    return theta


def account(log: dict[str, Any], costs: dict[str, float], step_done: int, loss: float) -> None:
    log["exchange_bytes"] += costs["exchange"]
    log["verify_bytes"] += costs["verify"]
    log["k"] = max(log["k"], int(costs["k"]))
    log["check_bytes"] = max(log["check_bytes"], costs["check"])
    log["train_loss"].append([step_done, loss])
    if not math.isfinite(loss):
        raise SystemExit(f"training loss is {loss} at step {step_done}: the run diverged")


def checkpoint(work: Workload, theta: torch.Tensor, args: argparse.Namespace, log: dict[str, Any],
               first: int, step_done: int) -> None:
    """Validate the synced model when this round (steps first..step_done) crossed an eval point."""
    crossed = step_done // args.eval_every > first // args.eval_every
    if crossed or step_done == args.steps:
        log["val"][str(step_done)] = val = work.val_loss(theta)
        print(f"[{log['tag']}] step {step_done} val {val:.4f} train {log['train_loss'][-1][1]:.4f} "
              f"{time.time() - log['_t0']:.0f}s", flush=True)


# ============================================================================ runs and report
def tag_of(args: argparse.Namespace) -> str:
    name = f"n{args.workers}-s{args.steps}-h{args.local_steps}-r{args.ratio:g}"
    if args.ratio == 0:
        return name if args.local_steps == 1 else f"{name}-{args.inner}-{args.outer}"
    name += f"-{args.budget}-g{args.groups}"
    if args.local_steps > 1:
        name += f"-{args.inner}-{args.outer}"
        if args.outer == "nesterov" or args.outer_lr != 1.0:
            name += f"-lr{args.outer_lr:g}"
    return name + (f"-seed{args.seed}" if args.seed != 0 else "")


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    work = Workload(args.workers, args.val_batches)
    log: dict[str, Any] = {"tag": tag_of(args), "args": vars(args), "dim": work.dim, "k": 0, "check_bytes": 0,
                           "exchange_bytes": 0.0, "verify_bytes": 0.0, "val": {}, "train_loss": [], "_t0": time.time(), "_cpu0": time.process_time()}
    log["command"] = "python -m benchmarks.local_steps_study " + shlex.join(sys.argv[1:])
    (run_per_step if args.local_steps == 1 else run_rounds)(work, args, log)
    full = 4.0 * work.dim * args.steps
    log.update(final_val=log["val"][str(args.steps)], wall_s=round(time.time() - log.pop("_t0"), 1),
               cpu_s=round(time.process_time() - log.pop("_cpu0"), 1),
               state_floats=state_floats(work, args.inner) if args.local_steps > 1 else 0,
               exchange_bytes_per_step=log["exchange_bytes"] / args.steps,
               verify_bytes_per_step=log["verify_bytes"] / args.steps,
               compression_exchange=full / log["exchange_bytes"],
               compression_total=full / (log["exchange_bytes"] + log["verify_bytes"]),
               torch=torch.__version__)
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="simulated ranks N")
    p.add_argument("--steps", type=int, default=300, help="optimizer (inner) steps per worker")
    p.add_argument("--ratio", type=float, default=1000.0, help="target compression; 0 = uncompressed")
    p.add_argument("--budget", choices=("exchange", "total"), default="exchange",
                   help="what --ratio counts: the exchange alone, or exchange + expected verification")
    p.add_argument("--groups", default="1", help="direction groups G (dividing N) or per_rank")
    p.add_argument("--local-steps", type=int, default=1, help="H: inner steps per round (1 = per-step HoloGrad)")
    p.add_argument("--inner", choices=INNER_OPTIONS, default="private", help="inner AdamW state at round start")
    p.add_argument("--outer", choices=("avg", "nesterov"), default="avg")
    p.add_argument("--outer-lr", type=float, default=None, help="default 1.0 (avg), 0.7 (nesterov)")
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--p-verify", type=float, default=0.05, help="probability that a claim is checked")
    p.add_argument("--token-bytes", type=int, default=8, help="bytes per token moved by a check (int64: 8)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=32, help="fixed val batches of 16 windows")
    p.add_argument("--seed", type=int, default=0, help="run seed of the public direction seeds")
    p.add_argument("--out", type=Path, default=RUNS_DIR, help="folder of the per-run JSON files")
    p.add_argument("--report", action="store_true", help="collect the runs in --out into tables")
    args = p.parse_args(argv)
    args.num_groups = args.workers if args.groups == "per_rank" else int(args.groups)
    if args.num_groups < 1 or args.workers % args.num_groups:
        p.error(f"--groups {args.groups} must divide --workers {args.workers}. HINT: 1, a divisor, or per_rank.")
    if args.local_steps < 1 or args.steps < 1 or args.workers < 1:
        p.error("--local-steps, --steps and --workers must be >= 1. HINT: --local-steps 1 is per-step HoloGrad.")
    if args.ratio != 0 and args.ratio < 1:
        p.error(f"--ratio {args.ratio} must be 0 (uncompressed) or >= 1. HINT: --ratio 1000.")
    if args.outer_lr is None:
        args.outer_lr = 0.7 if args.outer == "nesterov" else 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        from benchmarks.local_steps_report import report

        return report(args.out)
    log = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{log['tag']}.json").write_text(json.dumps(log, indent=1, default=str) + "\n")
    print(f"RESULT {log['tag']} val {log['final_val']:.4f} compression exchange {log['compression_exchange']:.0f}x "
          f"total {log['compression_total']:.0f}x K {log['k']} wall {log['wall_s']}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

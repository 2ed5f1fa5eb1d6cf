"""Lightning's ``LightningTransformer`` demo with its own SGD recipe, under DDP and HoloGrad.

The demo (``lightning.pytorch.demos.LightningTransformer``) trains ``torch.optim.SGD(lr=0.1)``
with batch size 1 on WikiText-2 windows of 35 tokens. WikiText-2 needs a download, so
this runs the same model and recipe on byte-level text (vocab 256: D = 1,393,856) from
the Python standard library's sources, which every installation has. 2 CPU ranks (fork
launcher, gloo); the mean training loss of the last ``--window`` steps on rank 0 is
reported for each variant:

- DDP, the recipe as is;
- HoloGrad (sketch) with the default K (D / 100 = 13,955) and with the old default 1,024;
- HoloGrad with the fix the setup warning states (lr / (1 + (D-1)/K)), and with sqrt of it;
- ``estimate_scale="min_variance"`` and ``"norm"``; a larger K (target_compression=10);
  Adam at the demo's lr / 100.

    python -m benchmarks.sgd_recipe                      # ~30 min on 2 CPU cores
    python -m benchmarks.sgd_recipe --variants holograd-norm   # one variant, merged into the results
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.demos import LightningTransformer
from torch.utils.data import DataLoader, Dataset

from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import fit
from lightning_holograd.demos.gpt2_data import stdlib_corpus

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 35  # WikiText2's block_size in the demo


class ByteWindows(Dataset):
    """(inputs, target) windows of ``BLOCK`` bytes, target shifted by one, as the demo's WikiText2."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data.long()

    def __len__(self) -> int:
        return len(self.data) // BLOCK - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * BLOCK
        return self.data[start : start + BLOCK], self.data[start + 1 : start + BLOCK + 1]


class RecipeTransformer(LightningTransformer):
    """The demo with byte-level data; ``lr_divisor`` and ``adam`` change only the optimizer."""

    def __init__(self, lr_divisor: float = 1.0, adam: bool = False, max_bytes: int = 400_000) -> None:
        with torch.random.fork_rng(devices=[]):  # the same init in every process and variant
            torch.manual_seed(0)
            super().__init__(vocab_size=256)
        self.lr_divisor, self.adam, self.max_bytes = lr_divisor, adam, max_bytes
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.adam:
            return torch.optim.Adam(self.model.parameters(), lr=0.1 / 100)
        return torch.optim.SGD(self.model.parameters(), lr=0.1 / self.lr_divisor)

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
        pass

    def train_dataloader(self) -> DataLoader:
        train, _ = stdlib_corpus(self.max_bytes, val_every=10)
        return DataLoader(ByteWindows(train))  # batch size 1, as the demo


def variants(dim: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    k = math.ceil(dim / 100)
    factor = 1 + (dim - 1) / k
    holograd = dict(start_method="fork", directions="sketch")
    return {
        "ddp": ("ddp_fork", {}),
        "holograd": (HoloGradStrategy(**holograd), {}),
        "holograd-k1024": (HoloGradStrategy(num_directions=1024, **holograd), {}),
        "holograd-lr/(1+v)": (HoloGradStrategy(**holograd), {"lr_divisor": factor}),
        "holograd-lr/sqrt(1+v)": (HoloGradStrategy(**holograd), {"lr_divisor": math.sqrt(factor)}),
        "holograd-min_variance": (HoloGradStrategy(estimate_scale="min_variance", **holograd), {}),
        "holograd-norm": (HoloGradStrategy(estimate_scale="norm", **holograd), {}),
        "holograd-c10": (HoloGradStrategy(target_compression=10, **holograd), {}),
        "holograd-c10-norm": (HoloGradStrategy(target_compression=10, estimate_scale="norm", **holograd), {}),
        "holograd-adam": (HoloGradStrategy(**holograd), {"adam": True}),
        "ddp-adam": ("ddp_fork", {"adam": True}),
    }


def num_directions_of(variant: str, dim: int) -> str:
    """K of a variant, for the table ("-" under DDP)."""
    if variant.startswith("ddp"):
        return "-"
    k = 1024 if "k1024" in variant else math.ceil(dim / (10 if "c10" in variant else 100))
    return f"{k:,}"


def write_results(out: Path, steps: int, window: int, dim: int, rows: list[dict[str, Any]]) -> None:
    """The Markdown table (``out``) and the JSON with every loss curve (same stem)."""
    lines = [f"# LightningTransformer + SGD(lr=0.1), byte-level stdlib text, 2 CPU ranks, {steps} steps", "",
             f"D = {dim:,}; final loss = mean of the last {window} steps' training loss on rank 0 (nats/byte). "
             "lr/(1+v) and lr/sqrt(1+v) divide the SGD learning rate by 1 + (D-1)/K = 101.0 and its square root "
             "at the default K; the *-adam rows use Adam(lr=1e-3). `python -m benchmarks.sgd_recipe`.", "",
             "| variant | K | first loss | final loss | min loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {num_directions_of(r['variant'], dim)} | {r['first_loss']:.3f} | "
              f"{r['final_loss']:.4g} | {r['min_loss']:.3f} |" for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"steps": steps, "dim": dim, "rows": rows}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=20, help="steps averaged for the final loss")
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS / "sgd_recipe_cpu.md")
    args = parser.parse_args()
    dim = sum(p.numel() for p in RecipeTransformer().parameters())
    table = variants(dim)
    chosen = args.variants.split(",") if args.variants else list(table)
    previous = args.out.with_suffix(".json")
    kept = {}
    if args.variants and previous.exists():  # re-running a subset keeps the other rows
        saved = json.loads(previous.read_text())
        if saved["steps"] == args.steps:
            kept = {row["variant"]: row for row in saved["rows"]}
    for name in chosen:
        strategy, module_kwargs = table[name]
        torch.manual_seed(0)  # dropout masks: forked ranks inherit this state, so runs repeat exactly
        states = fit(RecipeTransformer(**module_kwargs), strategy, f"/tmp/sgd_recipe/{name}", max_steps=args.steps)
        losses = states[0]["losses"]
        final = sum(losses[-args.window:]) / len(losses[-args.window:])
        kept[name] = {"variant": name, "final_loss": final, "first_loss": losses[0], "min_loss": min(losses),
                      "losses": losses}
        print(f"{name:24s} first {losses[0]:.3f} final {final:.4g} min {min(losses):.3f}", flush=True)
    rows = [kept[name] for name in table if name in kept]
    write_results(args.out, args.steps, args.window, dim, rows)


if __name__ == "__main__":
    main()

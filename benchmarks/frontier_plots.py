"""The frontier's plots: final validation loss against bytes per step (log x), and the
validation curves against the optimizer step and against training seconds (wall clock,
validation excluded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.frontier_runs import label
from benchmarks.harness import figure

STYLES = ["-", "--", "-.", ":", (0, (1, 1)), (0, (5, 1))]


def _families(ok: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in ok))
    return families, {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}


def _by_family(ok: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    return sorted((r for r in ok if r["family"] == family), key=lambda r: r["bytes_train_per_rank"])


def plot_loss_vs_bytes(ok: list[dict[str, Any]], ref: dict[str, Any], path: Path, within: float,
                       target: float) -> None:
    n = ok[0].get("world_size", 2)
    with figure(path) as ax:
        families, colors = _families(ok)
        for family in families:
            runs = _by_family(ok, family)
            xs = [r["bytes_train_per_rank"] / r["steps"] for r in runs]
            ys = [r["final_val_loss"] for r in runs]
            ddp = family == "ddp"
            ax.plot(xs, ys, marker="*" if ddp else "o", ms=12 if ddp else 6, color=colors[family], label=family,
                    lw=0 if ddp else 1)
            for r, x, y in zip(runs, xs, ys):
                if not ddp:
                    ax.annotate(label(r).replace("K=", ""), (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points", color=colors[family])
        ddp_loss = ref["final_val_loss"]
        ax.axhline(ddp_loss * (1 + within), ls="--", color="grey", lw=0.8, label=f"DDP + {within:.0%}")
        ddp_bps = ref["bytes_train_per_rank"] / ok[0]["steps"]
        ax.axvline(ddp_bps / target, ls=":", color="grey", lw=0.8, label=f"{target:.0f}x compression")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per rank and training step (measured at the interface, log scale)")
        ax.set_ylabel(f"final validation loss after {ok[0]['steps']} steps (nats/byte)")
        ax.set_title(f"Tiny GPT-2, {n} ranks: loss vs bytes")
        ax.set_ylim(top=min(max(r["final_val_loss"] for r in ok) + 0.05, ddp_loss * 1.6))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)


def plot_curves(ok: list[dict[str, Any]], ref: dict[str, Any], path: Path, x_key: str) -> None:
    """Validation curves against ``x_key``: ``"step"`` or ``"train_s"`` (wall clock)."""
    n = ok[0].get("world_size", 2)
    with figure(path) as ax:
        families, colors = _families(ok)
        for family in families:
            for i, r in enumerate(_by_family(ok, family)):
                ax.plot([p[x_key] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=colors[family],
                        ls=STYLES[i % len(STYLES)], lw=2 if family == "ddp" else 1, marker=".", label=r["run"])
        if x_key == "step":
            ax.set_xlabel("optimizer step")
            ax.set_title(f"Tiny GPT-2, {n} ranks: loss vs step")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("training seconds, validation excluded (log scale; unshaped link, shared CPU)")
            ax.set_title(f"Tiny GPT-2, {n} ranks: loss vs wall clock")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_ylim(top=min(max(p["val_loss"] for r in ok for p in r["curve"]) + 0.05, ref["final_val_loss"] * 2))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=3)


def plot_all(rows: list[dict[str, Any]], ref: dict[str, Any], out_dir: Path, prefix: str, within: float,
             target: float, wall_clock: bool = False) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    plot_loss_vs_bytes(ok, ref, out_dir / f"{prefix}_loss_vs_bytes.png", within, target)
    plot_curves(ok, ref, out_dir / f"{prefix}_loss_vs_step.png", "step")
    if wall_clock:
        plot_curves(ok, ref, out_dir / f"{prefix}_loss_vs_time.png", "train_s")

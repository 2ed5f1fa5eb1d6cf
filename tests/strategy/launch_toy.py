"""Fit the demo ``ToyModule`` with HoloGrad on CPU/gloo; each rank writes ``rank{R}.pt`` to ``--out``.

Driver for ``test_launch.py``; it runs as a plain script under every launch path:

    python tests/strategy/launch_toy.py --out /tmp/run --devices 2                       # Lightning's launcher
    python tests/strategy/launch_toy.py --out /tmp/run --devices 2 --strategy-name holograd_spawn
    python -m torch.distributed.run --nproc-per-node 2 tests/strategy/launch_toy.py --out /tmp/run --devices 2
    python -m torch.distributed.run --nnodes 2 --node-rank R --nproc-per-node 1 \\
        --master-addr 127.0.0.1 --master-port P tests/strategy/launch_toy.py --out /tmp/run --devices 1 --num-nodes 2

Lightning's subprocess launcher re-runs this file in each child, hence the main guard.
"""

from __future__ import annotations

import argparse
import dataclasses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank{R}.pt")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--directions", default="gaussian")
    parser.add_argument("--num-directions", type=int, default=64)
    strategy = parser.add_mutually_exclusive_group()
    strategy.add_argument("--strategy-name", default=None,
                          help="registered strategy name (default: holograd)")
    strategy.add_argument("--start-method", choices=["popen", "spawn", "fork", "forkserver"], default=None,
                          help="build HoloGradStrategy(start_method=...) instead of using a registered name")
    return parser.parse_args(argv)


def build_strategy(args: argparse.Namespace) -> object:
    """``--start-method``: a ``HoloGradStrategy`` instance; otherwise the registered name itself."""
    if args.start_method is None:
        return args.strategy_name or "holograd"
    from lightning_holograd import HoloGradStrategy

    return HoloGradStrategy(num_directions=args.num_directions, directions=args.directions,
                            start_method=args.start_method)


def configure_named(trainer: object, args: argparse.Namespace) -> None:
    """A name resolves with the registered defaults; set this run's protocol knobs before ``fit``."""
    from lightning_holograd import HoloGradStrategy

    strategy = trainer.strategy  # type: ignore[attr-defined]
    if not isinstance(strategy, HoloGradStrategy):
        raise SystemExit(f"strategy={build_strategy(args)!r} resolved to {type(strategy).__qualname__}, "
                         "not HoloGradStrategy")
    strategy.config = dataclasses.replace(strategy.config, num_directions=args.num_directions,
                                          directions=args.directions)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lightning.pytorch as L

    import lightning_holograd  # noqa: F401  (registers the strategy names)
    from lightning_holograd.demos import SaveRankState, ToyModule

    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=build_strategy(args),
        max_steps=args.max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[SaveRankState(args.out)],
    )
    if args.start_method is None:
        configure_named(trainer, args)
    trainer.fit(ToyModule())


if __name__ == "__main__":
    main()

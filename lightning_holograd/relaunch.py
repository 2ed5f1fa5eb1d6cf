"""Restart a failed training job from its last checkpoint (README "Failure and recovery").

torchrun's own ``--max-restarts`` does not work with gloo here: restarted workers fail in
gloo's ``connectFullMesh`` against peer addresses left in the rendezvous store by the
previous attempt (plain DDP too; a known torch problem). This relauncher restarts the
*whole* launch command instead, each attempt on a fresh rendezvous port, so every
attempt starts from an empty store:

    python -m lightning_holograd.relaunch --max-restarts 3 --port-base 29500 -- \\
        torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port {port} train.py

``{port}`` in the command becomes ``port-base + attempt`` (0, 1, 2, ...): on several
nodes, run one relauncher per node with the same ``--port-base``; a failed job fails on
every node, so the nodes count attempts alike. The training script passes
``ckpt_path="last"`` to ``fit`` with a ``ModelCheckpoint(save_last=True)``, so each attempt
resumes the last checkpoint (protocol state and ledger included); with nothing saved yet
it starts afresh.

The relauncher exits with the command's exit code: 0 at the first success, or the last
failure's once ``--max-restarts`` restarts are spent. SIGTERM or SIGINT to the relauncher
is passed to the running attempt and ends the relaunching.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "run_with_restarts"]

log = logging.getLogger(__name__)


def run_with_restarts(command: Sequence[str], max_restarts: int, port_base: int, pause_s: float = 1.0) -> int:
    """Run ``command`` until it succeeds, at most ``1 + max_restarts`` times; return its exit code."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = 1
        for attempt in range(max_restarts + 1):
            argv = [part.replace("{port}", str(port_base + attempt)) for part in command]
            log.info("attempt %d of %d: %s", attempt + 1, max_restarts + 1, " ".join(argv))
            child = subprocess.Popen(argv)
            code = child.wait()
            if code == 0 or stopping:
                return code
            log.warning("attempt %d failed with exit code %d", attempt + 1, code)
            time.sleep(pause_s)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_holograd.relaunch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts after the first attempt (default 3)")
    parser.add_argument("--port-base", type=int, default=29500, help="{port} of attempt k is port-base + k")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launch command, after --")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[relaunch] %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given. HINT: python -m lightning_holograd.relaunch -- torchrun ... train.py")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts={args.max_restarts} must be >= 0.")
    return run_with_restarts(command, args.max_restarts, args.port_base)


if __name__ == "__main__":
    sys.exit(main())

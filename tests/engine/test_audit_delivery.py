"""An audit verdict reaches a rank that posts its receive late (docs/PROTOCOL.md §6.12).

The verifier sends its verdicts without waiting and moves on. gloo drops a pending send
whose work object is freed, so the transport must keep each send's work, not only its
buffer: before that fix, a rank that reached the audit after the verifier had moved on
waited for a verdict that never came (a 4-rank CI run hung in
test_grouped_sharded_slashes_a_claim_cheater_and_no_honest_rank). Two real gloo ranks: rank
0 sends, drops the handle, collects garbage; rank 1 posts its receive a second later. The
group timeout is 5 s, so the failure is a ``VerificationTimeoutError``, not a hang."""

from __future__ import annotations

import gc
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_sharded import gloo_rank

from lightning_holograd.demos import free_port
from lightning_holograd.engine import Comm, TrafficMeter
from lightning_holograd.engine.audit import _receive_verdict, _send
from lightning_holograd.engine.verification import VerificationTransport

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

TAG = 4 * 7  # step 7, audit verdict kind


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port, out_dir):
        comm = Comm(TrafficMeter(world, 8), timeout=timedelta(seconds=5))
        transport = VerificationTransport(comm, recompute=lambda *args: None)
        transport.open(transfer_timeout=5.0, max_transfer_bytes=1 << 20)
        outcome: object
        if rank == 0:
            _send(transport, {"slash": [[1, "mismatch"]], "block": torch.arange(4.0)}, 1, TAG)  # handle dropped
            gc.collect()
            outcome = "sent"
        else:
            time.sleep(1.0)  # the verifier has moved on before this rank posts its receive
            try:
                outcome = _receive_verdict(transport, 0, TAG, 7, 4096)
            except Exception as error:  # noqa: BLE001 - the assertion shows it
                outcome = f"{type(error).__name__}: {error}"
        dist.barrier()
        torch.save(outcome, Path(out_dir) / f"rank{rank}.pt")


def test_a_verdict_sent_without_waiting_reaches_a_late_receiver(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    body = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert isinstance(body, dict), body
    assert body["slash"] == [[1, "mismatch"]]
    assert torch.equal(body["block"], torch.arange(4.0))

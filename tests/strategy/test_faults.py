"""No hang: silent claimants, silent ranks and SIGTERM, with real gloo ranks (fork launcher, CPU).

Faults are injected by small real injectors, not mocks: a rank sleeps inside a review
hook of its own exchange, which runs after the scalars are gathered and before it would
send its batch to the verifier (the claimant path); SIGTERM is a real signal sent to a
rank process. Wall-time bounds are generous timeouts: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as L
import pytest
from replicas import assert_identical_replicas

from lightning_holograd import HoloGradStrategy, ProofVerifier
from lightning_holograd.demos import ToyModule, fit
from lightning_holograd.protocol import Ledger

pytestmark = [pytest.mark.multiprocess]


def holograd(**kwargs) -> HoloGradStrategy:
    return HoloGradStrategy(start_method="fork", directions="gaussian", num_directions=16, **kwargs)


class SleepInClaimantPath(L.Callback):
    """Rank ``rank`` sleeps ``seconds`` at chain step ``step``, after the scalars are gathered
    and before the verifier's review hook would send its batch."""

    def __init__(self, rank: int, step: int, seconds: float, out: Path) -> None:
        self.rank, self.step, self.seconds, self.out = rank, step, seconds, out

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank != self.rank:
            return

        def sleep(ctx):
            if ctx.step == self.step:
                time.sleep(self.seconds)
                (self.out / "woke").write_text(str(time.time()))

        trainer.strategy.exchange.review_hooks.insert(0, sleep)


class StepClock(L.Callback):
    """Each rank appends (chain step, wall time) at every batch end, and writes its pid at start."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        (self.out / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.out / f"steps{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps([trainer.strategy.exchange.chain.step, time.time()]) + "\n")


def step_times(out: Path, rank: int) -> dict[int, float]:
    path = out / f"steps{rank}.jsonl"
    return dict(json.loads(line) for line in path.read_text().splitlines()) if path.exists() else {}


@pytest.mark.timeout(150)
def test_slow_claimant_is_slashed_missing_and_the_others_do_not_wait(tmp_path):
    """Rank 2 of 3 sleeps 6 s at step 3 with transfer_timeout = 1 s: it is slashed
    ``missing`` at step 3, ranks 0 and 1 finish step 3 while it sleeps, and when it wakes it
    catches up (the verdicts wait for it) and the run completes with identical replicas.
    On the all_gather path: on the sharded path (auto's choice here) the others wait for it
    at the all_to_all (docs/PROTOCOL.md §6.12)."""
    verifier = ProofVerifier(p_verify=1.0, transfer_timeout=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))
    callbacks = [verifier, SleepInClaimantPath(2, 3, 6.0, tmp_path), StepClock(tmp_path)]
    states = fit(ToyModule(), holograd(aggregation_path="all_gather"), tmp_path / "ranks", devices=3, max_steps=6,
                 callbacks=callbacks)
    assert_identical_replicas(states)
    assert [s["exchange"]["slashed"] for s in states] == [[2], [2], [2]]
    slashes = [(r.step, r.rank, r.data["reason"]) for r in Ledger.load(tmp_path / "ledger.jsonl") if r.event == "slash"]
    assert slashes == [(3, 2, "missing")]
    woke = float((tmp_path / "woke").read_text())
    for rank in (0, 1):  # step 3 completed on the on-time ranks before the slow one woke up
        assert step_times(tmp_path, rank)[3] < woke - 3.0, (rank, step_times(tmp_path, rank), woke)


@pytest.mark.timeout(180)
def test_a_rank_that_stops_joining_ends_the_job_with_its_rank_and_step(tmp_path):
    """Rank 2 falls silent for good at step 3 (process-group timeout 5 s): it is slashed
    ``missing`` at step 3, and the job ends at step 4 with an error naming rank 2 and the
    step, well within a minute, instead of hanging. On the all_gather path (on the sharded
    path the others already block in step 3's all_to_all)."""
    verifier = ProofVerifier(p_verify=1.0, transfer_timeout=1.0, ledger_path=str(tmp_path / "ledger.jsonl"))
    strategy = holograd(timeout=timedelta(seconds=5), sigterm_grace=2.0, aggregation_path="all_gather")
    start = time.monotonic()
    with pytest.raises(Exception) as failure:
        fit(ToyModule(), strategy, tmp_path / "ranks", devices=3, max_steps=8,
            callbacks=[verifier, SleepInClaimantPath(2, 3, 600.0, tmp_path), StepClock(tmp_path)])
    elapsed = time.monotonic() - start
    text = str(failure.value)
    assert "RankFailureError" in text and "step 4" in text and "rank 2 did not answer" in text, text[-3000:]
    assert elapsed < 90, elapsed
    slashes = [(r.step, r.rank, r.data["reason"]) for r in Ledger.load(tmp_path / "ledger.jsonl") if r.event == "slash"]
    assert slashes == [(3, 2, "missing")]
    assert 3 in step_times(tmp_path, 0) and 3 in step_times(tmp_path, 1)


def _send_when_running(out: Path, rank: int, after_step: int, signum: int) -> threading.Thread:
    def run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if max(step_times(out, rank), default=0) >= after_step and (out / f"pid{rank}").exists():
                os.kill(int((out / f"pid{rank}").read_text()), signum)
                (out / "signalled").write_text(str(time.time()))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class SlowSteps(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.05)


@pytest.mark.timeout(150)
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM to rank 1 (not rank 0, whose flag is all Lightning's own broadcast carries):
    the flag rides in the next commit, every rank stops before the same step, with exit
    code 143, within seconds."""
    sender = _send_when_running(tmp_path, 1, 3, signal.SIGTERM)
    with pytest.raises(Exception) as failure:
        fit(ToyModule(), holograd(), tmp_path / "ranks", devices=3, max_steps=400, max_epochs=-1,
            callbacks=[StepClock(tmp_path), SlowSteps()])
    ended = time.time()
    sender.join()
    assert "exit code 143" in str(failure.value), str(failure.value)[-2000:]
    assert ended - float((tmp_path / "signalled").read_text()) < 20
    last = [max(step_times(tmp_path, rank)) for rank in range(3)]
    assert len(set(last)) == 1 and last[0] < 400, last


@pytest.mark.timeout(150)
def test_sigterm_ends_a_rank_blocked_in_a_collective(tmp_path):
    """Rank 2 hangs for good at step 3; ranks 0 and 1 block in the next collective (the
    process-group timeout is 10 minutes). SIGTERM to rank 0 cannot run its Python handler
    there; the watchdog exits it after sigterm_grace = 2 s, its peers see the connection
    close, and the whole job ends within a minute. On the all_gather path, where ranks 0 and
    1 finish step 3 without rank 2 (the signal is sent after it)."""
    sender = _send_when_running(tmp_path, 0, 3, signal.SIGTERM)
    strategy = holograd(timeout=timedelta(minutes=10), sigterm_grace=2.0, aggregation_path="all_gather")
    with pytest.raises(Exception) as failure:
        fit(ToyModule(), strategy, tmp_path / "ranks", devices=3, max_steps=8,
            callbacks=[ProofVerifier(p_verify=1.0, transfer_timeout=1.0), SleepInClaimantPath(2, 3, 600.0, tmp_path),
                       StepClock(tmp_path)])
    ended = time.time()
    sender.join()
    assert ended - float((tmp_path / "signalled").read_text()) < 60, str(failure.value)[-2000:]


_ORPHAN_DRIVER = """
import sys, os, time
import lightning.pytorch as L
from pathlib import Path
from lightning_holograd import HoloGradStrategy
from lightning_holograd.demos import ToyModule, fit

out = Path(sys.argv[1])

class Hang(L.Callback):
    def on_train_start(self, trainer, pl_module):
        (out / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            time.sleep(600)

fit(ToyModule(), HoloGradStrategy(start_method="fork", num_directions=8), out / "ranks", devices=2, max_steps=8,
    callbacks=[Hang()])
"""


@pytest.mark.timeout(120)
def test_ranks_die_with_their_killed_parent(tmp_path):
    """The process that called fit (here a driver, as pytest would be) is killed with SIGKILL
    while its ranks are stuck: the ranks die with it instead of staying behind as orphans."""
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(_ORPHAN_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)], start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"pid{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
        time.sleep(2)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 15
        alive = ranks
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in ranks if os.path.exists(f"/proc/{pid}") and
                     "Z" not in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]]
            time.sleep(0.2)
        assert alive == [], f"ranks {alive} outlived their parent"
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.parametrize("bad", [0, -1.0, True, "10", None])
def test_sigterm_grace_is_checked_by_both_strategies(bad):
    from lightning_holograd import HoloGradFabricStrategy, HoloGradStrategy

    for cls in (HoloGradStrategy, HoloGradFabricStrategy):
        with pytest.raises(ValueError, match=r"sigterm_grace=.* must be a number of seconds > 0\. HINT"):
            cls(sigterm_grace=bad)

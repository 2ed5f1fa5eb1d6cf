"""Crash -> restart -> resume, end to end with real torchrun (gloo, CPU).

kill -9 of rank 0 (the verifier, ledger writer and checkpoint writer) mid-run, mid-epoch:
torchrun ends the job, ``python -m lightning_holograd.relaunch`` starts it again on a
fresh port, and ``fit(ckpt_path="last")`` resumes the last checkpoint. The result is
bitwise the uninterrupted run's: parameters, chain, family state, slashed ranks and the
ledger (the crashed run's longer ledger is kept as ``ledger.jsonl.previous.1``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import launch_resume
import pytest
import torch
from test_launch import DRIVER, run_all

from lightning_holograd.demos import free_port, load_ranks
from lightning_holograd.protocol import Ledger

pytestmark = [pytest.mark.multiprocess]

RESUME_DRIVER = str(Path(DRIVER).with_name("launch_resume.py"))
WORLD, STEPS = 3, 10  # 256 samples / 3 ranks / 16 per batch: 6 steps per epoch; checkpoints at 4 and 8


def torchrun(out: Path, port: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
            "127.0.0.1", "--master-port", port, RESUME_DRIVER, "--out", str(out), "--devices", str(WORLD),
            "--max-steps", str(STEPS), "--cheater", "2", *extra]


def assert_same(got: Any, expected: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}/{key}")
    else:
        assert got == expected, where


@pytest.mark.timeout(300)
def test_kill_9_restart_resume_gives_the_uninterrupted_run(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    os.environ["MASTER_PORT"] = str(free_port())  # the reference runs here, with the fork launcher
    launch_resume.main(["--out", str(reference), "--devices", str(WORLD), "--max-steps", str(STEPS), "--cheater", "2",
                        "--start-method", "fork"])
    relaunch = [sys.executable, "-m", "lightning_holograd.relaunch", "--max-restarts", "2", "--port-base",
                str(free_port()), "--", *torchrun(crashed, "{port}", "--kill-rank", "0", "--kill-step", "7")]
    (tmp_path / "c").mkdir()
    logs = run_all([relaunch], tmp_path / "c", timeout=300)
    log = logs[0].read_text(errors="replace")
    assert (crashed / "killed").exists() and "attempt 2 of 3" in log and "attempt 3" not in log, log[-3000:]

    expected, got = load_ranks(reference / "ranks", WORLD), load_ranks(crashed / "ranks", WORLD)
    for rank in range(WORLD):
        assert expected[rank]["exchange"]["slashed"] == [2]
        assert_same(got[rank]["params"], expected[rank]["params"], f"rank {rank} params")
        for part in ("chain", "family", "slashed", "world_size"):  # traffic differs: setup traffic counts again
            assert_same(got[rank]["exchange"][part], expected[rank]["exchange"][part], f"rank {rank} {part}")
    assert Ledger.load(crashed / "ledger.jsonl").records == Ledger.load(reference / "ledger.jsonl").records
    previous = Ledger.load(crashed / "ledger.jsonl.previous.1")  # the crashed attempt's evidence, kept
    assert max(r.step for r in previous) >= 7

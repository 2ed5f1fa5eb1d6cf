"""Evidence is never lost: torn appends, truncation against the anchor, earlier files kept,
and kill -9 during appends and checkpoint writes (real processes)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_holograd.protocol import Ledger, LedgerTamperError


def _ledger(path: Path | None, n: int) -> Ledger:
    ledger = Ledger(path)
    for step in range(1, n + 1):
        ledger.append(step, step % 3, "verify", verdict="accept", reason="ok", claim_digest="ab" * 32)
    return ledger


def test_a_torn_last_line_is_reported_and_the_chain_before_it_loads(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    full = _ledger(path, 5)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the last append was cut short (no newline after it)
    loaded = Ledger.load(path)
    assert loaded.records == full.records[:4]
    assert loaded.torn_tail is not None and "torn append" in caplog.text
    bad_middle = text.splitlines()
    bad_middle[2] = bad_middle[2][:-5]  # a damaged line that is not the last: tampering, not a crash
    path.write_text("\n".join(bad_middle) + "\n")
    with pytest.raises(LedgerTamperError, match="line 3"):
        Ledger.load(path)


def test_truncation_and_an_empty_file_are_caught_by_the_anchor(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, 6)
    anchor = ledger.anchor
    Ledger.load(path, anchor=anchor)  # the file as written reaches its anchor
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]))  # a valid chain, two records short: only the anchor shows it
    assert len(Ledger.load(path)) == 4
    with pytest.raises(LedgerTamperError, match="holds 4 records, but its anchor says 6"):
        Ledger.load(path, anchor=anchor)
    path.write_text("")
    with pytest.raises(LedgerTamperError, match="holds 0 records"):
        Ledger.load(path, anchor=anchor)
    path.unlink()
    forged = Ledger(path)  # a full re-hash: a valid chain of 6 records with other content
    for step in range(1, 7):
        forged.append(step, step % 3, "verify", verdict="reject", reason="mismatch", claim_digest="ab" * 32)
    assert len(Ledger.load(path)) == 6
    with pytest.raises(LedgerTamperError, match="was rewritten"):
        Ledger.load(path, anchor=anchor)


def test_earlier_ledgers_are_kept_under_unique_names(tmp_path):
    path = tmp_path / "ledger.jsonl"
    checkpoint = _ledger(None, 3).records
    _ledger(path, 5)  # a run that went on past its last checkpoint, then crashed
    first = path.read_text()
    resumed = Ledger.open_file(path, checkpoint)
    assert (tmp_path / "ledger.jsonl.previous.1").read_text() == first
    assert Ledger.load(path).records == checkpoint
    resumed.append(4, 1, "verify", verdict="accept", reason="ok")
    second = path.read_text()
    Ledger.open_file(path, checkpoint)  # another crash and resume: nothing overwritten
    assert (tmp_path / "ledger.jsonl.previous.1").read_text() == first
    assert (tmp_path / "ledger.jsonl.previous.2").read_text() == second
    Ledger.open_file(path, checkpoint)  # the file holds exactly the checkpoint: continued as is
    assert not (tmp_path / "ledger.jsonl.previous.3").exists()


REPO = Path(__file__).resolve().parents[2]

# The children load the one module they need by path: importing the package would import
# Lightning, seconds per process on a busy machine.
_LOAD = """
import importlib.util, sys
def load(name, relative):
    spec = importlib.util.spec_from_file_location(name, sys.argv[2] + "/" + relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
"""

_APPENDER = _LOAD + textwrap.dedent("""
    ledger = load("ledger", "lightning_holograd/protocol/ledger.py").Ledger(sys.argv[1])
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        ledger.append(step, 1, "verify", verdict="accept", reason="ok", claim_digest="cd" * 32, pad="x" * 20000)
""")


@pytest.mark.timeout(120)
def test_kill_during_appends_loses_at_most_the_record_in_flight(tmp_path):
    """kill -9 at random moments (fixed seed) of a process appending large records: the
    file always loads, its chain verifies, and at most one (torn) record is lost."""
    rng = random.Random(1234)
    script = tmp_path / "append.py"
    script.write_text(_APPENDER)
    for attempt in range(3):
        path = tmp_path / f"ledger{attempt}.jsonl"
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(REPO)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.2, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = Ledger.load(path)  # never raises: a torn tail is reported, not fatal
        assert len(loaded) >= 1
        complete_lines = path.read_bytes().count(b"\n")
        assert len(loaded) == complete_lines


_WRITER = _LOAD + textwrap.dedent("""
    import torch
    atomic_save = load("checkpoint", "lightning_holograd/strategies/checkpoint.py").atomic_save
    big = {"state_dict": {"w": torch.arange(3_000_000, dtype=torch.float64)}}
    n = 0
    print("ready", flush=True)
    while True:
        n += 1
        big["n"] = n
        atomic_save(big, sys.argv[1])
""")


@pytest.mark.timeout(120)
def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    """The strategy writes checkpoints atomically (temporary file beside it, fsync, rename):
    after kill -9 at random moments of a writer of 24 MB checkpoints, the file always loads."""
    rng = random.Random(99)
    script = tmp_path / "write.py"
    script.write_text(_WRITER)
    path = tmp_path / "last.ckpt"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(REPO)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            checkpoint = torch.load(path, weights_only=True)
            assert checkpoint["state_dict"]["w"].shape == (3_000_000,) and checkpoint["n"] >= 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(leftovers) <= 3  # at most the temporary file of each killed write

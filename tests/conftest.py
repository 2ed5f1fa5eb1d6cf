"""Suite-wide settings.

Ranks forked from the pytest process (the fork launcher) must not inherit a busy OpenMP
thread pool: libgomp is not fork-safe, and a forked child that enters a parallel region
can hang. One intra-op thread everywhere also gives every rank the same reduction order,
which bitwise-identical replicas on CPU need. Lightning's launchers keep an
OMP_NUM_THREADS that is already set.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

# Environment a test may leave behind that changes later runs: seed_everything (the
# LightningCLI example) exports PL_GLOBAL_SEED, which Lightning uses to seed the
# DistributedSampler of every later fit; launchers export the rendezvous variables.
_LEAKY_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK",
              "WORLD_SIZE", "RANK")


@pytest.fixture(autouse=True)
def _restore_leaky_env():
    saved = {name: os.environ.get(name) for name in _LEAKY_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _descendants(root: int) -> set[int]:
    """Pids of every live descendant of ``root`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(autouse=True)
def _no_rank_left_behind():
    """Kill the processes a test started and left running (ranks of a fit that timed out or
    failed), so that a failed or timed-out test never leaves ranks blocked in a collective."""
    import signal

    before = _descendants(os.getpid())
    yield
    for pid in _descendants(os.getpid()) - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""Real 2-process HoloGrad training (gloo, CPU) through every launch path.

Each path trains ``ToyModule`` (via ``launch_toy.py``, in a fresh process: Lightning's
script launcher and spawn would otherwise re-run or re-import pytest) and checks what
data-parallel training must deliver: every rank writes its state, parameters are
bit-identical across ranks, the ranks saw different batches, the loss went down, and
the commitment chain advanced once per optimizer step to the same head on every rank.

Loss criterion: mean of the last 4 losses < 0.5 x mean of the first 4 (rank 0). With
max_steps=24 and K=64 Gaussian directions (D=178) the measured ratio is 0.115, a margin
of about 4x below the threshold.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = str(HERE.relative_to(REPO) / "launch_toy.py")

from lightning_holograd.demos import free_port, load_ranks, make_dataset

MAX_STEPS, NUM_DIRECTIONS, DIRECTIONS = 24, 64, "gaussian"  # launch_toy.py's defaults
LAUNCH_TIMEOUT_S = 180
LOSS_RATIO = 0.5

# Variables through which a parent launcher or cluster would leak its topology into ours.
_TOPOLOGY_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                  "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK",
                  "KUBERNETES_PORT")
_TOPOLOGY_PREFIXES = ("TORCHELASTIC_", "SLURM_", "PL_", "OMPI_COMM_WORLD_", "PMI_", "LSB_", "JSM_NAMESPACE_")


# -- running launchers -------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _TOPOLOGY_VARS and not k.startswith(_TOPOLOGY_PREFIXES)}
    env["OMP_NUM_THREADS"] = "1"  # same thread count on every rank: bitwise-identical reductions
    env["PYTHONUNBUFFERED"] = "1"  # a killed run still leaves its last lines in the log
    return env


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (so its workers can be killed as a group), output to ``log``."""
    with open(log, "wb") as handle:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tails(logs: list[Path], chars: int = 4000) -> str:
    parts = []
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "<no log>"
        parts.append(f"----- {log.name} (last {chars} chars) -----\n{text[-chars:]}")
    return "\n".join(parts)


def run_all(cmds: list[list[str]], tmp_path: Path, timeout: float = LAUNCH_TIMEOUT_S) -> list[Path]:
    """Run ``cmds`` concurrently; fail (killing every process group) on a non-zero exit or timeout."""
    logs = [tmp_path / f"launch{i}.log" for i in range(len(cmds))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd, log in zip(cmds, logs):
            procs.append(start(cmd, log))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                pytest.fail(f"a launcher exited with {failed} while others still ran\n{tails(logs)}")
            if time.monotonic() > deadline:
                pytest.fail(f"launch did not finish within {timeout} s\n{tails(logs)}")
            time.sleep(0.2)
        codes = [p.returncode for p in procs]
        assert codes == [0] * len(procs), f"launcher exit codes {codes}\n{tails(logs)}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return logs


def driver_cmd(out: Path, *extra: str) -> list[str]:
    return [DRIVER, "--out", str(out), *extra]


# -- what every launch path must deliver ----------------------------------------------------
def assert_replicas(out: Path, world_size: int, logs: list[Path], max_steps: int = MAX_STEPS) -> None:
    missing = [r for r in range(world_size) if not (out / f"rank{r}.pt").exists()]
    assert not missing, f"ranks {missing} wrote no state to {out}\n{tails(logs)}"
    ranks = load_ranks(out, world_size)
    reference = ranks[0]
    for rank, state in enumerate(ranks):
        family = state["exchange"]["family"]
        assert (family["name"], family["num_directions"]) == (DIRECTIONS, NUM_DIRECTIONS), (
            f"rank {rank} did not run the requested protocol: {family}")
        assert state["global_step"] == max_steps, f"rank {rank}: global_step={state['global_step']}"
        assert state["params"].keys() == reference["params"].keys()
        differing = [k for k, v in state["params"].items() if not torch.equal(v, reference["params"][k])]
        assert not differing, f"rank {rank} parameters {differing} differ from rank 0\n{tails(logs)}"
        chain = state["exchange"]["chain"]
        assert chain["step"] == max_steps, f"rank {rank}: chain step {chain['step']} != max_steps={max_steps}"
        assert chain == reference["exchange"]["chain"], f"rank {rank} chain {chain} != rank 0 {reference['exchange']}"
    # Data parallel, not replicated: the ranks' batches (hence losses) differ from the first step on.
    assert ranks[0]["losses"][0] != ranks[1]["losses"][0], "ranks saw the same first batch: no distributed sampler?"
    assert_trained(reference["losses"], max_steps)


def assert_trained(losses: list[float], max_steps: int) -> None:
    assert len(losses) == max_steps, f"{len(losses)} training steps recorded, expected {max_steps}"
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < LOSS_RATIO * first, f"loss did not halve: first-4 mean {first:.4f}, last-4 mean {last:.4f}"


# -- launch paths (each a fresh interpreter) ---------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_lightning_script_launcher(tmp_path: Path) -> None:
    """strategy="holograd": Lightning's subprocess launcher re-runs the driver for rank 1."""
    out = tmp_path / "out"
    logs = run_all([[sys.executable, *driver_cmd(out, "--devices", "2")]], tmp_path)
    assert_replicas(out, 2, logs)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", [["--strategy-name", "holograd_spawn"], ["--start-method", "spawn"]],
                         ids=["registered-name", "instance"])
def test_spawn(tmp_path: Path, how: list[str]) -> None:
    """The strategy (registered or user-built) is pickled into two spawned workers."""
    out = tmp_path / "out"
    logs = run_all([[sys.executable, *driver_cmd(out, "--devices", "2", *how)]], tmp_path)
    assert_replicas(out, 2, logs)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_torchrun_single_node(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node=2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *driver_cmd(out, "--devices", "2")]
    logs = run_all([cmd], tmp_path)
    assert_replicas(out, 2, logs)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_torchrun_two_nodes_on_loopback(tmp_path: Path) -> None:
    """Two torchrun agents (node ranks 0 and 1), one worker each, meeting on 127.0.0.1."""
    out, port = tmp_path / "out", str(free_port())
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
             *driver_cmd(out, "--devices", "1", "--num-nodes", "2")] for node in (0, 1)]
    logs = run_all(cmds, tmp_path)
    assert_replicas(out, 2, logs)


# -- registration in both Lightning packages ----------------------------------------------------
def _launch_kind(trainer: Any) -> str:
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher as PLMultiProcessing
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher as PLSubprocessScript

    launcher = trainer.strategy.launcher
    if isinstance(launcher, (_SubprocessScriptLauncher, PLSubprocessScript)):
        return "popen"
    assert isinstance(launcher, (_MultiProcessingLauncher, PLMultiProcessing)), type(launcher)
    return "fork" if launcher.is_interactive_compatible else "spawn"


def _trainer(package: str, strategy: str) -> Any:
    module = importlib.import_module(package)
    return module.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _assert_resolves(strategies: Any) -> None:
    """Every name resolves, in each package, to that package's current HoloGrad class."""
    import lightning.pytorch.strategies as lstrategies
    import pytorch_lightning.strategies as plstrategies

    expected = {"lightning.pytorch": (strategies.HoloGradStrategy, lstrategies.DDPStrategy),
                "pytorch_lightning": (strategies.PLHoloGradStrategy, plstrategies.DDPStrategy)}
    for package, (cls, ddp) in expected.items():
        assert cls is not None and issubclass(cls, ddp), (package, cls)
        for name, start_method in {"holograd": "popen", "holograd_spawn": "spawn", "holograd_fork": "fork"}.items():
            trainer = _trainer(package, name)
            assert type(trainer.strategy) is cls, f"{package} strategy={name!r} -> {type(trainer.strategy)}"
            assert isinstance(trainer.strategy, ddp)
            assert _launch_kind(trainer) == start_method, (package, name)


@pytest.fixture
def restore_registration() -> Any:
    """Undo a reload: put the original classes back in the package and in both registries."""
    import lightning.pytorch.strategies as lstrategies
    import pytorch_lightning.strategies as plstrategies

    import lightning_holograd.strategies as strategies

    saved = dict(vars(strategies))
    yield strategies
    vars(strategies).update(saved)
    saved["HoloGradStrategy"].register_strategies(lstrategies.StrategyRegistry)
    saved["PLHoloGradStrategy"].register_strategies(plstrategies.StrategyRegistry)


def test_registered_names_resolve_in_both_packages() -> None:
    import lightning_holograd

    assert lightning_holograd.PLHoloGradStrategy is lightning_holograd.strategies.PLHoloGradStrategy
    _assert_resolves(lightning_holograd.strategies)


def test_reimport_and_reload_are_harmless(restore_registration: Any) -> None:
    strategies = restore_registration
    from lightning.pytorch.strategies import StrategyRegistry

    first = importlib.import_module("lightning_holograd")
    assert importlib.import_module("lightning_holograd") is first
    strategies.HoloGradStrategy.register_strategies(StrategyRegistry)  # twice: no error
    importlib.reload(strategies)  # registers the classes again
    _assert_resolves(strategies)
    assert {"holograd", "holograd_spawn", "holograd_fork"} <= set(StrategyRegistry)


def test_reload_keeps_public_class_current(restore_registration: Any) -> None:
    import pickle

    import lightning_holograd

    importlib.reload(restore_registration)
    assert type(_trainer("lightning.pytorch", "holograd").strategy) is lightning_holograd.HoloGradStrategy
    pickle.dumps(lightning_holograd.HoloGradStrategy(start_method="spawn"))


# -- pytorch_lightning, fork, in-process ----------------------------------------------------------
def _pl_toy(out: Path) -> Any:
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader

    class PLToy(pl.LightningModule):
        """ToyModule's task as a pytorch_lightning module; each rank saves its state at the end."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_dataset(256), batch_size=16, shuffle=False)

        def on_train_end(self) -> None:
            state = {"params": {k: v.detach().clone() for k, v in self.state_dict().items()},
                     "losses": self.losses, "global_step": self.trainer.global_step,
                     "exchange": self.trainer.strategy.exchange.state_dict()}
            torch.save(state, out / f"rank{self.trainer.global_rank}.pt")

    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return PLToy()


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_pytorch_lightning_fork_fit(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_holograd

    out = tmp_path / "out"
    out.mkdir()
    trainer = pl.Trainer(strategy="holograd_fork", accelerator="cpu", devices=2, max_steps=MAX_STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    assert isinstance(trainer.strategy, lightning_holograd.PLHoloGradStrategy)
    trainer.strategy.config = dataclasses.replace(trainer.strategy.config, num_directions=NUM_DIRECTIONS,
                                                  directions=DIRECTIONS)
    module = _pl_toy(out)
    trainer.fit(module)
    assert_replicas(out, 2, logs=[])
    rank0 = load_ranks(out, 2)[0]
    # The launcher ships rank 0's weights and protocol state back to this (parent) process.
    differing = [k for k, v in module.state_dict().items() if not torch.equal(v, rank0["params"][k])]
    assert not differing, f"parent module {differing} differ from rank 0's final parameters"
    assert trainer.strategy.final_protocol_state["chain"] == rank0["exchange"]["chain"]

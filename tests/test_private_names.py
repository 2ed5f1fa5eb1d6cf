"""Every private torch/Lightning name the package relies on, pinned (issue 15, item 4).

The package keeps them in two small helpers, ``engine/torch_private.py`` and
``strategies/lightning_private.py``; the strategy's ``backward`` keeps a copy of the body
of Lightning's ``Strategy.backward`` (the exchange must run between the precision
plugin's ``backward`` and ``post_backward``, and no hook sits there). Each test here fails
when an upgrade renames, removes or changes what the package uses, before a run does.
"""

from __future__ import annotations

import ast
import inspect
import os
from datetime import timedelta
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_holograd
from lightning_holograd.demos import free_port
from lightning_holograd.engine import Comm, TrafficMeter
from lightning_holograd.strategies import lightning_private

PACKAGE = Path(lightning_holograd.__file__).resolve().parent
NEEDS_PL = pytest.mark.skipif(find_spec("pytorch_lightning") is None,
                              reason="pytorch_lightning is not installed (pip install 'lightning-holograd[pl]')")
HELPERS = {"engine/torch_private.py", "strategies/lightning_private.py"}
LIGHTNING_PRIVATE = ("_MultiProcessingLauncher", "_BackwardSyncControl", "_start_method", "_launcher",
                     "_get_process_group_backend", "_backward_sync_control", "_broadcast_coalesced",
                     "_get_default_group", "_get_default_store", "_DropoutNd", "_signal_connector",
                     "_sigterm_notifier_fn", "_broadcast_sigterm_tensor", "_timeout")


def test_private_names_appear_only_in_the_two_helpers():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in HELPERS:
            continue
        names = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        names |= {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                  for alias in node.names}
        offenders += [f"{relative}: {name}" for name in LIGHTNING_PRIVATE if name in names]
    assert not offenders, offenders


# -- torch ------------------------------------------------------------------------------------


def _broadcast_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(4, 6, generator=gen).t(), torch.randn(5, generator=gen).to(torch.bfloat16),
               torch.arange(3) + rank]  # non-contiguous, bf16, int64: what module state holds
    meter = TrafficMeter(2, 10)
    Comm(meter).broadcast(tensors, kind="buffers")
    torch.save({"tensors": tensors, "bytes": meter.total_payload["buffers"]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_coalesced_broadcast_writes_rank_zeros_values_in_place(tmp_path):
    """torch's ``_broadcast_coalesced`` (DDP's module-state sync) behind ``Comm.broadcast``."""
    mp.start_processes(_broadcast_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    expected = [torch.randn(4, 6, generator=gen).t(), torch.randn(5, generator=gen).to(torch.bfloat16),
                torch.arange(3)]
    for state in got:
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(state["tensors"], expected))
        assert state["bytes"] == 24 * 4 + 5 * 2 + 3 * 8
    assert got[1]["tensors"][0].stride() == (1, 6)  # written into the caller's tensor, not a copy


# -- Lightning --------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["lightning.pytorch", pytest.param("pytorch_lightning", marks=NEEDS_PL)])
def test_trainer_launcher_hooks_that_ship_protocol_state_exist(namespace):
    launcher = (lightning_private.MultiProcessingLauncher if namespace == "lightning.pytorch"
                else lightning_private.pl_multiprocessing_launcher())
    for name, params in (("get_extra_results", ["self", "trainer"]),
                         ("update_main_process_results", ["self", "trainer", "extra"])):
        assert list(inspect.signature(getattr(launcher, name)).parameters) == params


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "lightning.fabric",
                                       pytest.param("pytorch_lightning", marks=NEEDS_PL)])
def test_strategy_private_attributes_exist(namespace):
    module = __import__(f"{namespace}.strategies", fromlist=["DDPStrategy"])
    strategy = module.DDPStrategy(start_method="fork")
    assert lightning_private.start_method(strategy) == "fork"
    assert hasattr(strategy, "_launcher")
    lightning_private.set_launcher(strategy, "sentinel")
    assert strategy.launcher == "sentinel"  # the public property reads the slot we set
    strategy._process_group_backend = "gloo"
    assert lightning_private.process_group_backend(strategy) == "gloo"
    timed = module.DDPStrategy(start_method="fork", timeout=timedelta(seconds=7))
    assert lightning_private.process_group_timeout(timed) == timedelta(seconds=7)


def test_fabric_backward_sync_control_is_what_no_backward_sync_uses():
    from lightning.fabric import Fabric

    control = lightning_private.BackwardSyncControl
    assert inspect.isabstract(control)
    assert list(inspect.signature(control.no_backward_sync).parameters) == ["self", "module", "enabled"]
    assert "_strategy._backward_sync_control" in inspect.getsource(Fabric.no_backward_sync)
    assert issubclass(lightning_private.FabricMultiProcessingLauncher, object)


class _Recorder:
    """A precision plugin and strategy stand-in that records what ``backward`` calls, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs):
            self.calls.append(name)
            return args[0] if args else None
        return record


@pytest.mark.parametrize("namespace", ["lightning.pytorch", pytest.param("pytorch_lightning", marks=NEEDS_PL)])
def test_strategy_backward_body_is_what_the_override_copies(namespace):
    """Lightning's ``Strategy.backward`` must call exactly: pre_backward, precision
    pre_backward, precision backward, precision post_backward, post_backward. The
    override repeats that sequence with the exchange inserted after precision backward."""
    strategies = __import__(f"{namespace}.strategies", fromlist=["Strategy"])
    recorder = _Recorder()

    class Probe:
        precision_plugin = recorder
        lightning_module = object()

        def pre_backward(self, loss):
            recorder.calls.append("strategy.pre_backward")

        def post_backward(self, loss):
            recorder.calls.append("strategy.post_backward")

    strategies.Strategy.backward(Probe(), torch.zeros(()), None)
    assert recorder.calls == ["strategy.pre_backward", "pre_backward", "backward", "post_backward",
                              "strategy.post_backward"]


@pytest.mark.parametrize("projection", ["backward", "jvp"])
def test_the_override_repeats_that_body_with_the_exchange_inserted(projection):
    from types import SimpleNamespace

    from lightning_holograd import HoloGradStrategy

    recorder = _Recorder()
    probe = SimpleNamespace(precision_plugin=recorder, config=SimpleNamespace(projection=projection),
                            lightning_module=SimpleNamespace(automatic_optimization=True), _sync_blocked=False, _rounds=None,
                            exchange=object(), pre_backward=lambda loss: recorder.calls.append("strategy.pre_backward"),
                            post_backward=lambda loss: recorder.calls.append("strategy.post_backward"),
                            exchange_gradients=lambda: recorder.calls.append("exchange"))
    HoloGradStrategy.backward(probe, torch.zeros(()), None)
    local = ["backward"] if projection == "backward" else []  # jvp: no local backward
    assert recorder.calls == ["strategy.pre_backward", "pre_backward", *local, "exchange", "post_backward",
                              "strategy.post_backward"]

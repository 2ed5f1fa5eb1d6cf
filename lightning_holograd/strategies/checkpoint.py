"""The protocol state in Lightning checkpoints, and reading the formats of earlier versions.

Lightning's checkpoint has no slot for strategy state, so the strategy adds one entry,
named like a callback's ``state_key`` (class name and the identifying arguments):

    checkpoint["HoloGradStrategy{'version': 2}"] = {"config": HoloGradConfig.as_dict(),
                                                    "exchange": HoloGradExchange.state_dict()}

Version 1 (lightning-holograd 0.1.0) kept the same two entries under ``"holograd"``, with
the slashed ranks under ``exchange["excluded"]`` and the traffic of true-gradient steps
under the kind ``"bootstrap"``. ``exchange_state`` reads both versions.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["STATE_KEY", "STATE_VERSION", "atomic_save", "config_changes", "exchange_state", "protocol_state",
           "writes_atomically"]

STATE_VERSION = 2
STATE_KEY = f"HoloGradStrategy{ {'version': STATE_VERSION}!r}"
_V1_KEY = "holograd"
_V1_TRAFFIC_KINDS = {"bootstrap": "true_gradient"}


def protocol_state(config: Mapping[str, Any], exchange: Mapping[str, Any]) -> dict[str, Any]:
    """The value stored under ``STATE_KEY``."""
    return {"config": dict(config), "exchange": dict(exchange)}


def exchange_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The exchange state in ``checkpoint`` (any known version, in the current format), or None."""
    if STATE_KEY in checkpoint:
        return dict(checkpoint[STATE_KEY]["exchange"])
    if _V1_KEY in checkpoint:
        return _exchange_from_v1(checkpoint[_V1_KEY]["exchange"])
    newer = sorted(key for key in checkpoint if isinstance(key, str) and key.startswith("HoloGradStrategy{"))
    if newer:
        raise ValueError(f"the checkpoint holds HoloGrad state {newer[0]!r}, which this version "
                         f"(state version {STATE_VERSION}) cannot read. HINT: upgrade lightning-holograd.")
    return None


def _exchange_from_v1(state: Mapping[str, Any]) -> dict[str, Any]:
    traffic = dict(state["traffic"])
    for totals in ("total_payload", "total_wire"):
        traffic[totals] = {_V1_TRAFFIC_KINDS.get(kind, kind): value for kind, value in traffic[totals].items()}
    migrated = {key: value for key, value in state.items() if key != "excluded"}
    return {**migrated, "traffic": traffic, "slashed": list(state["excluded"])}


def config_changes(checkpoint: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Settings that differ between the checkpoint's run and this one, as "name: old -> new"."""
    saved = (checkpoint.get(STATE_KEY) or checkpoint.get(_V1_KEY) or {}).get("config") or {}
    return [f"{name}: {saved[name]!r} -> {value!r}" for name, value in current.items()
            if name in saved and saved[name] != value]


def writes_atomically(checkpoint_io: Any, filepath: Any) -> bool:
    """True when the strategy writes this checkpoint itself (``atomic_save``): Lightning's own
    ``TorchCheckpointIO`` and a local path. Lightning's writer stages the file in the system
    temporary directory and moves it, which is a copy (torn if killed) when that directory
    is on another filesystem, and never fsyncs."""
    return type(checkpoint_io).__name__ == "TorchCheckpointIO" and "://" not in str(filepath)


def atomic_save(checkpoint: Mapping[str, Any], filepath: Any) -> None:
    """``torch.save`` to a temporary file beside ``filepath``, fsync, then rename over it: a
    crash leaves either the old checkpoint or the new one, never a torn file."""
    path = os.path.abspath(os.fspath(filepath))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(dict(checkpoint), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)

"""The protocol state in Lightning checkpoints, and reading the formats of earlier versions.

Lightning's checkpoint has no slot for strategy state, so the strategy adds one entry,
named like a callback's ``state_key`` (class name and the identifying arguments):

    checkpoint["HoloGradStrategy{'version': 2}"] = {"config": HoloGradConfig.as_dict(),
                                                    "exchange": HoloGradExchange.state_dict(),
                                                    "trainable": TrainableSet.state_dict()}

``config`` is the config resolved for the model (K filled in when it was left to the
default); ``trainable`` (D and the digest of the trainable-parameter mask the family
followed) is absent from checkpoints written before it existed.

Version 1 (lightning-holograd 0.1.0) kept the same two entries under ``"holograd"``, with
the slashed ranks under ``exchange["excluded"]`` and the traffic of true-gradient steps
under the kind ``"bootstrap"``. ``exchange_state`` reads both versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["STATE_KEY", "STATE_VERSION", "exchange_state", "protocol_state", "trainable_state"]

STATE_VERSION = 2
STATE_KEY = f"HoloGradStrategy{ {'version': STATE_VERSION}!r}"
_V1_KEY = "holograd"
_V1_TRAFFIC_KINDS = {"bootstrap": "true_gradient"}


def protocol_state(config: Mapping[str, Any], exchange: Mapping[str, Any],
                   trainable: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The value stored under ``STATE_KEY``."""
    state = {"config": dict(config), "exchange": dict(exchange)}
    if trainable is not None:
        state["trainable"] = dict(trainable)
    return state


def trainable_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The trainable set the saved family followed (None: not recorded, as in version 1)."""
    state = checkpoint.get(STATE_KEY)
    return dict(state["trainable"]) if state is not None and "trainable" in state else None


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

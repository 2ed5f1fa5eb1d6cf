"""Communication accounting (docs/PROTOCOL.md §8).

Wire model: the bytes one rank sends (and, symmetrically, receives) under ring
algorithms with N ranks, for a payload of n bytes per rank:
- all_gather:  (N - 1) * n            (every rank forwards the N - 1 other chunks)
- all_reduce:  2 * (N - 1) / N * n    (reduce-scatter + all-gather)
- point-to-point of n bytes: n for the sender, n for the receiver.
``payload`` is what this rank put into collectives (the n above), which a test can
count from outside by wrapping ``torch.distributed``. The compression ratio compares
the wire bytes of a HoloGrad step with a ring all-reduce of the D float32 gradient
coordinates of the same model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["TrafficMeter", "TRAFFIC_KINDS", "ring_wire_bytes"]

# "true_gradient": the all-reduce of a true-gradient step (ADCBootstrap's bootstrap and refresh steps).
TRAFFIC_KINDS = ("hashes", "scalars", "true_gradient", "verification", "audit", "buffers", "setup")
# One-time traffic that DDP pays too (the initial parameter broadcast): reported, but
# left out of the per-step figures and of the compression ratio.
_ONE_TIME_KINDS = ("setup",)
Op = Literal["all_gather", "all_reduce", "p2p"]


def ring_wire_bytes(op: Op, payload_bytes: int, world_size: int) -> float:
    """Bytes one rank sends for ``op`` on a ring of ``world_size`` ranks."""
    if world_size <= 1:
        return 0.0
    if op == "all_gather":
        return float((world_size - 1) * payload_bytes)
    if op == "all_reduce":
        return 2.0 * (world_size - 1) / world_size * payload_bytes
    if op == "p2p":
        return float(payload_bytes)
    raise ValueError(f"op={op!r} is unknown. HINT: one of 'all_gather', 'all_reduce', 'p2p'.")


class TrafficMeter:
    """Per-kind payload and wire bytes, for the current step and for the whole run."""

    def __init__(self, world_size: int, num_params: int) -> None:
        self.world_size = world_size
        self.num_params = num_params
        self.total_payload: dict[str, int] = defaultdict(int)
        self.total_wire: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._step_payload: dict[str, int] = defaultdict(int)
        self._step_wire: dict[str, float] = defaultdict(float)

    def record(self, kind: str, op: Op, payload_bytes: int) -> None:
        if kind not in TRAFFIC_KINDS:
            raise ValueError(f"kind={kind!r} is unknown. HINT: one of {TRAFFIC_KINDS}.")
        wire = ring_wire_bytes(op, payload_bytes, self.world_size)
        self._step_payload[kind] += payload_bytes
        self._step_wire[kind] += wire
        self.total_payload[kind] += payload_bytes
        self.total_wire[kind] += wire

    def start_step(self) -> None:
        self._step_payload = defaultdict(int)
        self._step_wire = defaultdict(float)

    def end_step(self) -> None:
        self.steps += 1

    @property
    def allreduce_bytes_per_step(self) -> float:
        """Wire bytes of one ring all-reduce of the float32 gradient (the DDP baseline)."""
        return ring_wire_bytes("all_reduce", 4 * self.num_params, self.world_size)

    def step_payload(self) -> int:
        return sum(v for k, v in self._step_payload.items() if k not in _ONE_TIME_KINDS)

    def step_wire(self) -> float:
        return sum(v for k, v in self._step_wire.items() if k not in _ONE_TIME_KINDS)

    def run_wire(self) -> float:
        """Wire bytes of all training steps so far (one-time setup traffic excluded)."""
        return sum(v for k, v in self.total_wire.items() if k not in _ONE_TIME_KINDS)

    def compression(self) -> float:
        """All-reduce wire bytes over HoloGrad wire bytes, cumulative over the run."""
        sent = self.run_wire()
        if sent == 0:
            return float("nan")
        return self.allreduce_bytes_per_step * self.steps / sent

    def metrics(self) -> dict[str, float]:
        """Numbers for the Lightning loggers (``holograd/...``)."""
        out = {
            "holograd/bytes_per_step": self.step_wire(),
            "holograd/payload_bytes_per_step": float(self.step_payload()),
            "holograd/bytes_total": self.run_wire(),
        }
        if self.world_size > 1:  # one process sends nothing: no ratio to report
            out["holograd/compression"] = self.compression()
        for kind, value in self._step_wire.items():
            if kind not in _ONE_TIME_KINDS:
                out[f"holograd/bytes_{kind}"] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_payload": dict(self.total_payload),
            "total_wire": dict(self.total_wire),
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_payload = defaultdict(int, {k: int(v) for k, v in state["total_payload"].items()})
        self.total_wire = defaultdict(float, {k: float(v) for k, v in state["total_wire"].items()})
        self.steps = int(state["steps"])

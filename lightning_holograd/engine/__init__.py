"""The engine: HoloGrad over ``torch.distributed``, without Lightning.

``HoloGradExchange`` runs one step of the protocol (batch-hash commit, scalar exchange,
review, aggregation, estimate) through ``Comm``, whose collectives all use the engine's
process group and communication device and are counted by the ``TrafficMeter``. It owns
the ``Slashing`` set and the ``VerificationTransport`` that moves drawn claimants'
batches to their verifiers. What a claim is comes from the layer above, as callables.
"""

from .comm import Comm
from .exchange import HoloGradExchange, ReplicaDivergenceError, StepContext, parameter_digest
from .slashing import Slashing
from .traffic import TRAFFIC_KINDS, TrafficMeter, ring_wire_bytes
from .verification import VerificationTransport, check_claim, verifier_of

__all__ = [
    "Comm",
    "HoloGradExchange",
    "ReplicaDivergenceError",
    "Slashing",
    "StepContext",
    "TRAFFIC_KINDS",
    "TrafficMeter",
    "VerificationTransport",
    "check_claim",
    "parameter_digest",
    "ring_wire_bytes",
    "verifier_of",
]

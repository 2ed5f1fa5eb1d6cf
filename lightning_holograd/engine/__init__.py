"""The engine: HoloGrad over ``torch.distributed``, without Lightning.

``HoloGradExchange`` runs one step of the protocol (batch-hash commit, scalar exchange,
review, aggregation, estimate) through ``Comm``, whose collectives all use the engine's
process group and communication device and are counted by the ``TrafficMeter``. It owns
the ``Slashing`` set and the ``VerificationTransport`` that moves drawn claimants'
batches to their verifiers. What a claim is comes from the layer above, as callables.
"""

from .bundle import BundleError, decode_bundle, encode_bundle
from .comm import Comm, RankFailureError
from .exchange import (
    HoloGradExchange,
    NonFiniteError,
    ReplicaDivergenceError,
    StepContext,
    StopRequested,
    parameter_digest,
)
from .slashing import Slashing, TooManySlashedError, remap_slashed
from .traffic import TRAFFIC_KINDS, TrafficMeter, ring_wire_bytes
from .verification import VerificationTimeoutError, VerificationTransport, check_claim, verifier_of

__all__ = [
    "BundleError",
    "Comm",
    "NonFiniteError",
    "RankFailureError",
    "StopRequested",
    "TooManySlashedError",
    "VerificationTimeoutError",
    "decode_bundle",
    "encode_bundle",
    "remap_slashed",
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

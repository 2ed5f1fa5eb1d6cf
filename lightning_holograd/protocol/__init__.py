"""Pure-torch HoloGrad protocol core (docs/PROTOCOL.md §1-§8).

No Lightning and no ``torch.distributed`` here: every function is a pure computation on
tensors, bytes and seeds, identical on every rank that calls it with the same inputs.
"""

from .aggregators import (
    AGGREGATION_NAMES,
    AggregationResult,
    Aggregator,
    KrumAggregator,
    MeanAggregator,
    MedianAggregator,
    NotEnoughRanksError,
    TrimmedMeanAggregator,
    make_aggregator,
)
from .attacks import ATTACK_NAMES, AttackName, attack_generator, attack_row, evasive_liars
from .chain import CommitmentChain, direction_seeds, genesis_commitment, hash_batch, scalars_digest, step_batch_hash
from .directions import (
    DIRECTION_VERSION,
    DirectionFamily,
    GaussianDirections,
    IdentityDirections,
    RademacherDirections,
    SketchDirections,
)
from .factory import FAMILY_NAMES, FamilyName, make_family, resume_settings
from .ledger import Ledger, LedgerRecord, LedgerTamperError
from .codebook_fit import CODEBOOK_FITS, CODEBOOK_STRUCTURES, CodebookFit, CodebookStructure
from .subspace import CodebookDirections, MomentumDirections, captured_energy
from .verification import Reason, Verdict, claim_digest, draw_claims, judge_claim

__all__ = [
    "AGGREGATION_NAMES",
    "ATTACK_NAMES",
    "AttackName",
    "DIRECTION_VERSION",
    "AggregationResult",
    "Aggregator",
    "CODEBOOK_FITS",
    "CODEBOOK_STRUCTURES",
    "CodebookFit",
    "CodebookStructure",
    "CodebookDirections",
    "CommitmentChain",
    "DirectionFamily",
    "FAMILY_NAMES",
    "FamilyName",
    "GaussianDirections",
    "IdentityDirections",
    "KrumAggregator",
    "Ledger",
    "LedgerRecord",
    "LedgerTamperError",
    "MeanAggregator",
    "MedianAggregator",
    "MomentumDirections",
    "NotEnoughRanksError",
    "RademacherDirections",
    "Reason",
    "SketchDirections",
    "TrimmedMeanAggregator",
    "Verdict",
    "attack_generator",
    "attack_row",
    "captured_energy",
    "claim_digest",
    "direction_seeds",
    "draw_claims",
    "evasive_liars",
    "genesis_commitment",
    "hash_batch",
    "judge_claim",
    "make_aggregator",
    "make_family",
    "resume_settings",
    "scalars_digest",
    "step_batch_hash",
]

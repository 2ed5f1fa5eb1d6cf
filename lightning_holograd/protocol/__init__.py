"""Pure-torch HoloGrad protocol core: no Lightning imports here (see PROTOCOL.md)."""

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
from .chain import CommitmentChain, direction_seeds, genesis_commitment, hash_batch, scalars_digest
from .directions import (
    DirectionFamily,
    GaussianDirections,
    IdentityDirections,
    RademacherDirections,
    SketchDirections,
)
from .families import FAMILY_NAMES, FamilyName, make_family
from .ledger import Ledger, LedgerRecord, LedgerTamperError
from .codebook_fit import CODEBOOK_FITS, CODEBOOK_STRUCTURES, CodebookFit, CodebookStructure
from .subspace import CodebookDirections, MomentumDirections, captured_energy
from .verification import Reason, Verdict, claim_digest, draw_claims, judge_claim

__all__ = [
    "AGGREGATION_NAMES",
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
    "captured_energy",
    "claim_digest",
    "direction_seeds",
    "draw_claims",
    "genesis_commitment",
    "hash_batch",
    "judge_claim",
    "make_aggregator",
    "make_family",
    "scalars_digest",
]

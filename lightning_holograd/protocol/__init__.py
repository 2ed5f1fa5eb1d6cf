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
)
from .factory import FAMILY_NAMES, FamilyName, make_family, resume_settings
from .groups import DirectionGroups, GroupedAggregation, aggregate_groups, group_of, synthesize_groups
from .ledger import Ledger, LedgerRecord, LedgerTamperError
from .codebook_fit import CODEBOOK_FITS, CODEBOOK_STRUCTURES, CodebookFit, CodebookStructure
from .rounds import INNER_STATE_NAMES, InnerState, OuterStep, make_inner_state, round_batch_hash
from .sketch import SketchDirections
from .subsample import SubsampleDirections
from .subspace import CodebookDirections, MomentumDirections, captured_energy
from .verification import Reason, Verdict, claim_digest, draw_claims, judge_claim, judge_quantized_claim

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
    "DirectionGroups",
    "FAMILY_NAMES",
    "FamilyName",
    "GaussianDirections",
    "GroupedAggregation",
    "INNER_STATE_NAMES",
    "IdentityDirections",
    "InnerState",
    "KrumAggregator",
    "Ledger",
    "LedgerRecord",
    "LedgerTamperError",
    "MeanAggregator",
    "MedianAggregator",
    "MomentumDirections",
    "NotEnoughRanksError",
    "OuterStep",
    "RademacherDirections",
    "Reason",
    "SketchDirections",
    "SubsampleDirections",
    "TrimmedMeanAggregator",
    "Verdict",
    "aggregate_groups",
    "attack_generator",
    "attack_row",
    "captured_energy",
    "claim_digest",
    "direction_seeds",
    "draw_claims",
    "evasive_liars",
    "genesis_commitment",
    "group_of",
    "hash_batch",
    "judge_claim",
    "judge_quantized_claim",
    "make_aggregator",
    "make_family",
    "make_inner_state",
    "resume_settings",
    "round_batch_hash",
    "scalars_digest",
    "step_batch_hash",
    "synthesize_groups",
]

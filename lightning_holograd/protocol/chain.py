"""Commitment chain, batch hashing and per-direction seeds (docs/PROTOCOL.md §2).

Symbols: N is the number of ranks, K the number of directions per step, t the step
index (1 for the first step), c_t the step commitment (32 bytes).

- Genesis: c_0 = SHA256("holograd/v2/dirs2" || S_0), S_0 the run's seed string. The tag
  names the direction-function version (DIRECTION_VERSION), so runs whose directions are
  defined differently never share a chain; a resumed lightning-holograd 0.1.x run
  (direction version 1) keeps its tag "holograd/v1".
- Step: c_t = SHA256(c_{t-1} || t || h_{t,0} || ... || h_{t,N-1} || d_{t-1}), where t is
  encoded as 8 bytes little-endian, h_{t,i} is rank i's batch hash and d_{t-1} the
  digest of the aggregated scalars of step t-1 (d_0 is 32 zero bytes).
- Step batch hash h_{t,i}: ``hash_batch`` of rank i's one micro-batch, or of the list
  of its micro-batches under gradient accumulation (``step_batch_hash``).
- Direction seed: s_{t,j} = first 8 bytes of SHA256(c_t || j) read as an unsigned
  little-endian 64-bit integer, j encoded as 8 bytes little-endian. One hash per
  direction: no seed is a prefix-derived variant of another.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .direction_hash import DIRECTION_VERSION
from .direction_versions import GENESIS_TAGS, genesis_tag

__all__ = [
    "DIGEST_SIZE",
    "GENESIS_TAG",
    "CommitmentChain",
    "hash_batch",
    "step_batch_hash",
    "scalars_digest",
    "direction_seeds",
    "genesis_commitment",
]

GENESIS_TAG = genesis_tag(DIRECTION_VERSION)  # b"holograd/v2/dirs2"; version 1: b"holograd/v1"
DIGEST_SIZE = 32
_ZERO_DIGEST = bytes(DIGEST_SIZE)


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def genesis_commitment(seed: str, direction_version: int = DIRECTION_VERSION) -> bytes:
    """c_0 = SHA256(tag || seed); the tag is "holograd/v2/dirs2" (GENESIS_TAG) for new runs,
    "holograd/v1" for a resumed run of direction version 1."""
    if not isinstance(seed, str):
        raise TypeError(f"seed={seed!r} must be a str. HINT: pass the run's seed string, e.g. seed='run-1'.")
    return hashlib.sha256(genesis_tag(direction_version) + seed.encode("utf-8")).digest()


def direction_seeds(commitment: bytes, num_directions: int, offset: int = 0) -> list[int]:
    """Seeds s_j = uint64(SHA256(commitment || j)[:8]) for j in [offset, offset + num_directions)."""
    if num_directions < 0:
        raise ValueError(f"num_directions={num_directions} must be >= 0.")
    return [
        int.from_bytes(hashlib.sha256(commitment + _u64(j)).digest()[:8], "little")
        for j in range(offset, offset + num_directions)
    ]


def scalars_digest(scalars: torch.Tensor) -> bytes:
    """SHA256 of a tensor of scalars as float32 little-endian bytes (d_t of the spec)."""
    flat = scalars.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
    return hashlib.sha256(_tensor_bytes(flat)).digest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    # numpy has no bfloat16: reinterpret any dtype as raw bytes first.
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _update_batch_hash(hasher: Any, obj: Any) -> None:
    """Feed a type-tagged, order-fixed serialisation of ``obj`` into ``hasher``."""
    if isinstance(obj, torch.Tensor):
        header = f"T|{obj.dtype}|{tuple(obj.shape)}|".encode()
        hasher.update(header)
        hasher.update(_tensor_bytes(obj))
    elif isinstance(obj, Mapping):
        hasher.update(f"M|{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            hasher.update(f"K|{key!r}|".encode())
            _update_batch_hash(hasher, obj[key])
    elif isinstance(obj, (list, tuple)):
        hasher.update(f"L|{type(obj).__name__}|{len(obj)}|".encode())
        for item in obj:
            _update_batch_hash(hasher, item)
    elif isinstance(obj, (bytes, bytearray)):
        hasher.update(f"B|{len(obj)}|".encode())
        hasher.update(bytes(obj))
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        hasher.update(f"S|{type(obj).__name__}|{obj!r}|".encode())
    else:
        raise TypeError(
            f"cannot hash a batch element of type {type(obj).__name__}. HINT: batches must be "
            "(nested) tensors, dicts, lists, tuples, str, bytes, numbers or None."
        )


def hash_batch(batch: Any) -> bytes:
    """h = SHA256 over dtype, shape and bytes of every tensor in a (nested) batch."""
    hasher = hashlib.sha256()
    _update_batch_hash(hasher, batch)
    return hasher.digest()


def step_batch_hash(batches: Sequence[Any]) -> bytes:
    """h_{t,i}: the hash a rank commits to for its micro-batches of one optimizer step.

    One micro-batch is hashed as itself, several (gradient accumulation) as their list.
    The claimant commits with it and the verifier checks the received batches with it,
    so both must call this one function.
    """
    if not batches:
        raise ValueError("batches is empty. HINT: pass the step's micro-batches, at least one.")
    return hash_batch(batches[0] if len(batches) == 1 else list(batches))


class CommitmentChain:
    """The run's hash chain: one commitment per optimizer step, identical on every rank.

    Call contract (every rank, every step, same order):
      ``seeds = chain.advance(batch_hashes)`` then, after aggregation,
      ``chain.record_scalars(aggregated)``.
    ``direction_version`` picks the genesis tag: the direction family's version.
    """

    def __init__(self, seed: str, direction_version: int = DIRECTION_VERSION) -> None:
        self.seed = seed
        self.tag = genesis_tag(direction_version).decode()
        self.genesis = genesis_commitment(seed, direction_version)
        self.head = self.genesis  # c_t of the last advanced step
        self.step = 0  # t of the last advanced step
        self.last_scalars_digest = _ZERO_DIGEST  # d_{t}

    def advance(self, batch_hashes: Sequence[bytes]) -> bytes:
        """Compute c_{t+1} from every rank's batch hash (in rank order) and return it."""
        if not batch_hashes:
            raise ValueError("batch_hashes is empty. HINT: pass one 32-byte hash per rank.")
        for rank, digest in enumerate(batch_hashes):
            if len(digest) != DIGEST_SIZE:
                raise ValueError(f"batch_hashes[{rank}] has {len(digest)} bytes, expected {DIGEST_SIZE}.")
        step = self.step + 1
        payload = self.head + _u64(step) + b"".join(batch_hashes) + self.last_scalars_digest
        self.head = hashlib.sha256(payload).digest()
        self.step = step
        return self.head

    def record_scalars(self, aggregated: torch.Tensor) -> bytes:
        """Set d_t, the digest of the aggregated scalars of the current step."""
        self.last_scalars_digest = scalars_digest(aggregated)
        return self.last_scalars_digest

    def seeds(self, num_directions: int, offset: int = 0) -> list[int]:
        """Direction seeds of the current step."""
        if self.step == 0:
            raise RuntimeError("seeds() called before advance(). HINT: advance the chain once per step first.")
        return direction_seeds(self.head, num_directions, offset)

    def state_dict(self) -> dict[str, Any]:
        """A version-1 chain keeps lightning-holograd 0.1.x's format: no ``genesis_tag``, which
        ``load_state_dict`` reads as "holograd/v1"."""
        tag = {} if self.tag == GENESIS_TAGS[1].decode() else {"genesis_tag": self.tag}
        return {
            **tag,
            "seed": self.seed,
            "head": self.head.hex(),
            "step": self.step,
            "last_scalars_digest": self.last_scalars_digest.hex(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tag = state.get("genesis_tag", GENESIS_TAGS[1].decode())  # version 1 stores no tag
        if tag != self.tag:
            written = "lightning-holograd 0.1.x" if "genesis_tag" not in state else f"genesis tag {tag!r}"
            raise ValueError(
                f"checkpoint chain has genesis_tag={state.get('genesis_tag')!r} (written by {written}, tag "
                f"{tag!r}); this chain starts from {self.tag!r}, whose directions are defined differently. "
                "HINT: build the chain with the checkpoint's direction_version (CommitmentChain(seed, "
                "direction_version=...)); HoloGradStrategy does so when it resumes."
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint chain seed={state['seed']!r} differs from this run's seed={self.seed!r}. "
                "HINT: resume with the seed the checkpoint was trained with."
            )
        self.head = bytes.fromhex(state["head"])
        self.step = int(state["step"])
        self.last_scalars_digest = bytes.fromhex(state["last_scalars_digest"])

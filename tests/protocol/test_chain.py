"""Commitment chain, batch hashing and direction seeds (docs/PROTOCOL.md §2)."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from lightning_holograd.protocol import (
    CommitmentChain,
    direction_seeds,
    genesis_commitment,
    hash_batch,
    scalars_digest,
)


def _h(label: str) -> bytes:
    """A stand-in 32-byte batch hash."""
    return hashlib.sha256(label.encode()).digest()


def _run(seed: str, batch_hashes: list[list[bytes]], scalars: list[torch.Tensor]) -> list[bytes]:
    """Advance a fresh chain through the given steps and return every c_t."""
    chain = CommitmentChain(seed)
    heads = []
    for hashes, aggregated in zip(batch_hashes, scalars):
        heads.append(chain.advance(hashes))
        chain.record_scalars(aggregated)
    return heads


HASHES = [[_h(f"step{t}/rank{i}") for i in range(3)] for t in range(1, 5)]
SCALARS = [torch.arange(4, dtype=torch.float32) * t for t in range(1, 5)]


# -- genesis and the step formula ------------------------------------------------------


def test_genesis_is_the_spec_hash_and_deterministic():
    expected = hashlib.sha256(b"holograd/v2/dirs2" + "run-1".encode()).digest()
    assert genesis_commitment("run-1") == expected
    assert CommitmentChain("run-1").head == expected
    assert genesis_commitment("run-1") != genesis_commitment("run-2")


def test_genesis_rejects_non_string_seed():
    with pytest.raises(TypeError, match="seed=1234"):
        genesis_commitment(1234)  # type: ignore[arg-type]


def test_advance_follows_the_spec_formula():
    """c_t = SHA256(c_{t-1} || t (u64 LE) || h_0 .. h_{N-1} || d_{t-1}), d_0 = 32 zero bytes."""
    chain = CommitmentChain("run-1")
    c1 = chain.advance(HASHES[0])
    expected_c1 = hashlib.sha256(
        genesis_commitment("run-1") + struct.pack("<Q", 1) + b"".join(HASHES[0]) + bytes(32)
    ).digest()
    assert c1 == expected_c1
    digest = chain.record_scalars(SCALARS[0])
    assert digest == hashlib.sha256(SCALARS[0].numpy().astype("<f4").tobytes()).digest()
    c2 = chain.advance(HASHES[1])
    assert c2 == hashlib.sha256(c1 + struct.pack("<Q", 2) + b"".join(HASHES[1]) + digest).digest()
    assert chain.step == 2


def test_runs_are_deterministic():
    assert _run("s", HASHES, SCALARS) == _run("s", HASHES, SCALARS)
    assert len(set(_run("s", HASHES, SCALARS))) == len(HASHES)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_commitment_depends_on_every_batch_hash(rank):
    base = _run("s", HASHES, SCALARS)
    hashes = [list(step) for step in HASHES]
    hashes[1][rank] = _h("a different batch")
    changed = _run("s", hashes, SCALARS)
    assert changed[0] == base[0]  # step 1 untouched
    assert all(a != b for a, b in zip(changed[1:], base[1:]))  # step 2 and everything after


def test_commitment_depends_on_rank_order():
    hashes = [list(step) for step in HASHES]
    hashes[0] = [hashes[0][1], hashes[0][0], hashes[0][2]]
    assert _run("s", hashes, SCALARS)[0] != _run("s", HASHES, SCALARS)[0]


def test_commitment_depends_on_previous_scalars():
    base = _run("s", HASHES, SCALARS)
    scalars = list(SCALARS)
    scalars[1] = SCALARS[1].clone()
    scalars[1][3] = torch.nextafter(scalars[1][3], torch.tensor(1e9))  # one ulp in one scalar
    changed = _run("s", HASHES, scalars)
    assert changed[:2] == base[:2]  # d_2 first enters c_3
    assert changed[2] != base[2] and changed[3] != base[3]


def test_commitment_depends_on_step_index():
    """Same previous head, hashes and scalar digest, different t -> different c_t."""
    chain = CommitmentChain("s")
    chain.advance(HASHES[0])
    state = chain.state_dict()
    other = CommitmentChain("s")
    other.load_state_dict({**state, "step": state["step"] + 5})
    assert chain.advance(HASHES[1]) != other.advance(HASHES[1])


def test_commitment_depends_on_seed():
    assert _run("s", HASHES, SCALARS)[-1] != _run("t", HASHES, SCALARS)[-1]


def test_scalars_digest_is_float32_little_endian():
    values = torch.tensor([0.1, -2.5, 3.0], dtype=torch.float64)
    expected = hashlib.sha256(values.numpy().astype("<f4").tobytes()).digest()
    assert scalars_digest(values) == expected
    assert scalars_digest(values.float()) == expected
    assert scalars_digest(values.float() + 1) != expected


def test_advance_rejects_bad_hashes():
    chain = CommitmentChain("s")
    with pytest.raises(ValueError, match="batch_hashes is empty"):
        chain.advance([])
    with pytest.raises(ValueError, match=r"batch_hashes\[1\] has 31 bytes"):
        chain.advance([_h("a"), _h("b")[:31]])
    assert chain.step == 0 and chain.head == genesis_commitment("s")  # nothing advanced


def test_seeds_before_advance_rejected():
    with pytest.raises(RuntimeError, match="before advance"):
        CommitmentChain("s").seeds(4)


# -- checkpointing ---------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    chain = CommitmentChain("s")
    for hashes, scalars in zip(HASHES[:2], SCALARS[:2]):
        chain.advance(hashes)
        chain.record_scalars(scalars)
    state = json.loads(json.dumps(chain.state_dict()))  # survives a text checkpoint
    resumed = CommitmentChain("s")
    resumed.load_state_dict(state)
    for hashes, scalars in zip(HASHES[2:], SCALARS[2:]):
        assert resumed.advance(hashes) == chain.advance(hashes)
        assert resumed.seeds(8) == chain.seeds(8)
        resumed.record_scalars(scalars)
        chain.record_scalars(scalars)
    assert resumed.state_dict() == chain.state_dict()
    assert resumed.head == _run("s", HASHES, SCALARS)[-1]


def test_load_state_dict_with_other_seed_rejected():
    state = CommitmentChain("run-a").state_dict()
    other = CommitmentChain("run-b")
    with pytest.raises(ValueError, match="seed='run-a'.*seed='run-b'"):
        other.load_state_dict(state)
    assert other.head == genesis_commitment("run-b")


def test_genesis_tag_names_the_direction_version_and_old_chains_are_refused():
    """The tag carries DIRECTION_VERSION, so two direction definitions never share a chain; a
    0.1.x chain state (no tag, genesis "holograd/v1") or another tag is refused, untouched, by
    a version-2 chain (a version-1 chain resumes it: test_directions_v1.py)."""
    from lightning_holograd.protocol.chain import GENESIS_TAG
    from lightning_holograd.protocol.directions import DIRECTION_VERSION

    assert GENESIS_TAG == f"holograd/v2/dirs{DIRECTION_VERSION}".encode()
    chain = CommitmentChain("s")
    chain.advance(HASHES[0])
    state = chain.state_dict()
    assert state["genesis_tag"] == "holograd/v2/dirs2"
    old = {key: value for key, value in state.items() if key != "genesis_tag"}
    for bad, shown in ((old, "genesis_tag=None"), ({**state, "genesis_tag": "holograd/v2/dirs3"}, "dirs3")):
        fresh = CommitmentChain("s")
        with pytest.raises(ValueError, match=f"{shown}.*HINT: build the chain with the checkpoint's direction_version"):
            fresh.load_state_dict(bad)
        assert fresh.step == 0 and fresh.head == genesis_commitment("s")


# -- direction seeds -------------------------------------------------------------------


def test_direction_seeds_follow_the_spec_formula():
    commitment = _h("c_t")
    seeds = direction_seeds(commitment, 3)
    for j, seed in enumerate(seeds):
        digest = hashlib.sha256(commitment + struct.pack("<Q", j)).digest()
        assert seed == int.from_bytes(digest[:8], "little")
    assert all(0 <= s < 2**64 for s in seeds)


def test_direction_seeds_are_distinct_per_index_and_commitment():
    """Distinct j must never share a seed (the reference code derived them from prefixes
    and got K identical directions). 10^4 uniform 64-bit values collide with probability
    ~ 10^8 / 2^65 ~ 3e-12, so any collision here is a bug."""
    seeds = direction_seeds(_h("c_t"), 10_000)
    assert len(set(seeds)) == len(seeds)
    other = direction_seeds(_h("c_t+1"), 10_000)
    assert not set(seeds) & set(other)


def test_direction_seeds_offset_is_a_slice():
    commitment = _h("c_t")
    assert direction_seeds(commitment, 5, offset=3) == direction_seeds(commitment, 8)[3:]
    assert direction_seeds(commitment, 0) == []
    with pytest.raises(ValueError, match="num_directions=-1"):
        direction_seeds(commitment, -1)


def test_chain_seeds_come_from_the_current_head():
    chain = CommitmentChain("s")
    head = chain.advance(HASHES[0])
    assert chain.seeds(6) == direction_seeds(head, 6)
    assert chain.seeds(2, offset=4) == direction_seeds(head, 6)[4:]


# -- batch hashing ---------------------------------------------------------------------


def test_hash_batch_is_deterministic_and_value_sensitive():
    batch = {"x": torch.arange(12.0).reshape(3, 4), "y": torch.tensor([1, 0, 2])}
    assert hash_batch(batch) == hash_batch({"x": batch["x"].clone(), "y": batch["y"].clone()})
    changed = {"x": batch["x"].clone(), "y": batch["y"]}
    changed["x"][2, 3] += 1
    assert hash_batch(changed) != hash_batch(batch)
    assert len(hash_batch(batch)) == 32


def test_hash_batch_covers_dtype():
    ints = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    floats = ints.view(torch.float32)  # the very same bytes
    assert ints.numpy().tobytes() == floats.numpy().tobytes()
    assert hash_batch(ints) != hash_batch(floats)


def test_hash_batch_covers_shape():
    flat = torch.arange(6, dtype=torch.int64)
    assert hash_batch(flat) != hash_batch(flat.reshape(2, 3))
    assert hash_batch(flat.reshape(2, 3)) != hash_batch(flat.reshape(3, 2))


def test_hash_batch_uses_logical_values_not_strides():
    matrix = torch.arange(6.0).reshape(2, 3)
    assert hash_batch(matrix.t()) == hash_batch(matrix.t().contiguous())
    assert hash_batch(matrix.t()) != hash_batch(matrix)


def test_hash_batch_bfloat16():
    values = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    assert hash_batch(values) == hash_batch(values.clone())
    assert hash_batch(values) != hash_batch(values.to(torch.float16))
    bumped = values.clone()
    bumped[1] = 3.0
    assert hash_batch(bumped) != hash_batch(values)
    assert hash_batch(torch.empty(0, dtype=torch.bfloat16)) != hash_batch(torch.empty(0))


def test_hash_batch_nested_containers():
    x, y = torch.ones(2), torch.zeros(2)
    assert hash_batch([x, y]) != hash_batch([y, x])  # order of a sequence matters
    assert hash_batch([x, y]) != hash_batch((x, y))  # list vs tuple
    assert hash_batch([[x], y]) != hash_batch([x, [y]])  # nesting matters
    assert hash_batch({"a": [x, {"b": (y, 3)}]}) == hash_batch({"a": [x.clone(), {"b": (y.clone(), 3)}]})
    assert hash_batch({"a": [x, {"b": (y, 3)}]}) != hash_batch({"a": [x, {"b": (y, 4)}]})
    assert hash_batch({"a": x}) != hash_batch({"b": x})  # keys are hashed


def test_hash_batch_dict_key_order_independent():
    x, y = torch.ones(2), torch.zeros(3)
    assert hash_batch({"input_ids": x, "labels": y}) == hash_batch({"labels": y, "input_ids": x})
    assert hash_batch({"input_ids": x, "labels": y}) != hash_batch({"input_ids": y, "labels": x})


def test_hash_batch_scalars_are_type_tagged():
    assert hash_batch(1) != hash_batch(True)
    assert hash_batch(1) != hash_batch(1.0)
    assert hash_batch(1) != hash_batch("1")
    assert hash_batch(b"ab") != hash_batch("ab")
    assert hash_batch(None) != hash_batch("None")


@pytest.mark.parametrize("bad", [object(), {1, 2}, [torch.ones(1), object()], {"x": 1 + 2j}])
def test_hash_batch_rejects_unknown_types(bad):
    with pytest.raises(TypeError, match="cannot hash a batch element of type"):
        hash_batch(bad)

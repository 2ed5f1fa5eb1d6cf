"""Direction definition 1 (lightning-holograd 0.1.x), kept to resume its checkpoints (docs/PROTOCOL.md §3.8).

The pinned digests below were computed with lightning-holograd 0.1.0's own directions module
(commit 99511df) on a CPU: version 1 draws from torch's CPU generator, so, as in 0.1.x, they
hold for the torch build that computes them (``tests/strategy/test_checkpoint_versions.py``
checks the whole resume against a 0.1.0 run end to end).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lightning_holograd.protocol import (
    DIRECTION_VERSION,
    CommitmentChain,
    direction_seeds,
    genesis_commitment,
    make_family,
    resume_settings,
)
from lightning_holograd.protocol.directions_v1 import V1_BLOCK_SIZE, V1_CHUNK_SIZE, block_seed

V1_NAMES = ["gaussian", "rademacher", "sketch"]
# sha256(...)[:16] of the (K, D) directions, of project(g) and of synthesize(project(g)) for
# D = 20000 (three blocks of 8192, two chunks of 16384), K = 5, seeds of genesis "v1/<name>".
PINNED = {
    "gaussian": ("9ba8f2a50434be08", "6a6ebebdaaa3c59a", "850cfad599215192"),
    "rademacher": ("6daded3c07bddbee", "76e951627050e1dc", "a554171c900a8de9"),
    "sketch": ("a104b32a6a3322f8", "113ce07d54ee78fd", "721477bdd2c3edd3"),
}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", V1_NAMES)
def test_version_1_families_reproduce_0_1_bitwise(name):
    dim, num_directions = 20000, 5
    family = make_family(name, dim, num_directions, direction_version=1, block_size=8192, chunk_size=16384)
    seeds = direction_seeds(genesis_commitment(f"v1/{name}"), family.num_seeds)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    scalars = family.project(grad, seeds)
    directions = torch.stack([family.direction(seeds, j) for j in range(num_directions)])
    assert (_digest(directions), _digest(scalars), _digest(family.synthesize(scalars, seeds))) == PINNED[name]


def test_block_seed_is_splitmix64_of_the_seed_and_block():
    """block_seed(s, b) = splitmix64(s + (b + 1) G mod 2^64), written out here with Python ints."""
    golden, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1

    def splitmix64(x: int) -> int:
        z = (x + golden) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seed = 0x0123456789ABCDEF
    assert block_seed(seed, 0) == splitmix64((seed + golden) & mask) == 15380727978956804243
    assert block_seed(seed, 7) == 17979736744472337947


@pytest.mark.parametrize("name", V1_NAMES)
def test_chunk_size_does_not_change_version_1_directions(name):
    """0.1.x's contract: values depend on block_size, not on chunk_size (a multiple of it)."""
    seeds = direction_seeds(genesis_commitment(f"v1-chunks/{name}"), 1 if name == "sketch" else 3)
    small, large = (make_family(name, 5000, 3, direction_version=1, block_size=64, chunk_size=c) for c in (64, 4096))
    for j in range(3):
        assert torch.equal(small.direction(seeds, j), large.direction(seeds, j))
    other = make_family(name, 5000, 3, direction_version=1, block_size=128, chunk_size=4096)
    assert not torch.equal(other.direction(seeds, 1), large.direction(seeds, 1))


def test_version_1_defaults_are_0_1s():
    family = make_family("gaussian", 100, 2, direction_version=1)
    assert (family.block_size, family.chunk_size) == (V1_BLOCK_SIZE, V1_CHUNK_SIZE) == (8192, 32768)
    assert make_family("sketch", 100, 2, direction_version=1, block_size=24576).chunk_size == 49152  # whole blocks


def test_version_1_rejects_bad_block_and_chunk_sizes():
    with pytest.raises(ValueError, match="block_size=12 must be a multiple of 8"):
        make_family("gaussian", 100, 2, direction_version=1, block_size=12)
    with pytest.raises(ValueError, match="block_size=-8 must be a positive integer"):
        make_family("sketch", 100, 2, direction_version=1, block_size=-8)
    with pytest.raises(ValueError, match="chunk_size=1000 must be a multiple of block_size=512.*HINT"):
        make_family("rademacher", 100, 2, direction_version=1, block_size=512, chunk_size=1000)


# -- which version is built, and what is refused ------------------------------------------


@pytest.mark.parametrize("name", [*V1_NAMES, "identity"])
def test_a_0_1_family_state_builds_and_loads_a_version_1_family(name):
    """A 0.1.x state has no direction_version (and block_size for the generated families);
    resume_settings turns it into make_family arguments, and the family writes version 1 back."""
    num_directions = 64 if name == "identity" else 4
    old = {"name": name, "dim": 64, "num_directions": num_directions}
    if name != "identity":
        old["block_size"] = 256
    family = make_family(name, 64, num_directions, **resume_settings(old))
    family.load_state_dict(old)
    assert family.direction_version == 1
    assert family.state_dict() == {**old, "direction_version": 1}
    again = make_family(name, 64, num_directions, **resume_settings(family.state_dict()))
    assert type(again) is type(family) and again.state_dict() == family.state_dict()


def test_new_families_are_version_2_and_states_pick_their_version():
    assert DIRECTION_VERSION == 2
    family = make_family("sketch", 64, 4)
    assert family.direction_version == 2 and family.state_dict()["direction_version"] == 2
    assert resume_settings(None) == {}
    assert resume_settings(family.state_dict()) == {"direction_version": 2}


def test_versions_refuse_each_others_state():
    v1 = make_family("gaussian", 64, 4, direction_version=1, block_size=64)
    v2 = make_family("gaussian", 64, 4)
    with pytest.raises(ValueError, match=r"direction_version=1 .*generates direction_version=2.*"
                                         r"HINT: build the family with make_family\(\.\.\., direction_version=1\)"):
        v2.load_state_dict(v1.state_dict())
    with pytest.raises(ValueError, match=r"direction_version=2 .*generates direction_version=1.*"
                                         r"make_family\(\.\.\., direction_version=2\)"):
        v1.load_state_dict(v2.state_dict())
    with pytest.raises(ValueError, match="checkpoint block_size=128 differs from block_size=64"):
        v1.load_state_dict({**v1.state_dict(), "block_size": 128})


@pytest.mark.parametrize("name", ["codebook", "momentum"])
def test_version_1_codebook_and_momentum_are_refused(name):
    """Their 0.1.x state (basis, Oja counter) belongs to a rewritten algorithm."""
    state = {"name": name, "dim": 64, "num_directions": 4, "basis": torch.zeros(64, 4), "num_updates": 3}
    hint = "HINT: start a new run or finish it with lightning-holograd 0.1.x"
    with pytest.raises(ValueError, match=f"directions='{name}' with direction_version=1.*{hint}"):
        make_family(name, 64, 4, **resume_settings(state))
    with pytest.raises(ValueError, match=f"direction_version=None \\(written by lightning-holograd 0.1.x\\).*{hint}"):
        make_family(name, 64, 4).load_state_dict(state)


def test_unknown_versions_and_stray_block_sizes_are_refused():
    with pytest.raises(ValueError, match="direction_version=3 is unknown.*HINT"):
        make_family("sketch", 64, 4, direction_version=3)
    with pytest.raises(ValueError, match="block_size=512 applies to direction_version=1 only"):
        make_family("sketch", 64, 4, block_size=512)
    with pytest.raises(ValueError, match="directions='gausian' is unknown"):
        make_family("gausian", 64, 4, direction_version=1)


# -- the chain of a version-1 run ----------------------------------------------------------


def test_version_1_chain_has_0_1s_genesis_and_state_format():
    chain = CommitmentChain("run", direction_version=1)
    assert chain.genesis == genesis_commitment("run", 1) == hashlib.sha256(b"holograd/v1run").digest()
    assert genesis_commitment("run") == hashlib.sha256(b"holograd/v2/dirs2run").digest()
    chain.advance([bytes(32)])
    state = chain.state_dict()
    assert "genesis_tag" not in state  # 0.1.x's format, read back as "holograd/v1"
    resumed = CommitmentChain("run", direction_version=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and resumed.seeds(2) == chain.seeds(2)
    with pytest.raises(ValueError, match="genesis_tag=None .*'holograd/v1'.*'holograd/v2/dirs2'.*HINT"):
        CommitmentChain("run").load_state_dict(state)
    with pytest.raises(ValueError, match="'holograd/v2/dirs2'.*starts from 'holograd/v1'"):
        resumed.load_state_dict(CommitmentChain("run").state_dict())
    with pytest.raises(ValueError, match="direction_version=7 is unknown"):
        CommitmentChain("run", direction_version=7)

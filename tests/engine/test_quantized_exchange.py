"""The exchange with quantized scalars (docs/PROTOCOL.md §9.5), in one process (world size 1:
the collectives move nothing but the traffic meter records every payload)."""

from __future__ import annotations

import pytest
import torch

from lightning_holograd.engine import Comm, HoloGradExchange, TrafficMeter
from lightning_holograd.protocol import CommitmentChain, make_aggregator, make_family
from lightning_holograd.protocol.quantize import (
    decode_rows,
    dither,
    encode_row,
    row_bytes,
)

DIM, K = 40, 13  # K b not a multiple of 8 at b = 2 and 4


class _FourRanks(Comm):
    """A Comm that reports 4 ranks, for the path decision only (no collective is run)."""

    world_size = 4  # type: ignore[assignment]


def _exchange(bits: int, path: str = "auto", comm: Comm | None = None, block: int = 0) -> HoloGradExchange:
    return HoloGradExchange(make_family("sketch", DIM, K), make_aggregator("mean"), CommitmentChain("quant"),
                            comm or Comm(TrafficMeter(1, DIM)), aggregation_path=path, scalar_bits=bits,
                            scalar_block=block)


def _step(exchange: HoloGradExchange, public: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gradient = torch.randn(DIM, generator=torch.Generator().manual_seed(exchange.chain.step))
    rows = []

    def project(seeds):
        rows.append(torch.cat([exchange.family.project(gradient, seeds), torch.arange(public, dtype=torch.float32)]))
        return rows[-1]

    estimate = exchange.step(b"h" * 32, project)
    return rows[0], estimate


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("public", [0, 3])
@pytest.mark.parametrize("block", [0, 5])  # 5: three blocks of 5, 5 and 3 scalars
def test_the_wire_row_is_the_quantized_row_and_the_meter_counts_it(bits, public, block):
    exchange = _exchange(bits, block=block)
    exchange.num_public_values = public
    scales = 1 if block == 0 else 3
    for step in range(1, 3):
        row, estimate = _step(exchange, public)
        ctx = exchange.last_context
        assert ctx.path == "all_gather" and ctx.quantized is not None
        wire = encode_row(row, K, bits, dither(ctx.commitment, 0, K), block)
        assert wire.numel() == row_bytes(K, public, bits, block) == -(-K * bits // 8) + 4 * scales + 4 * public
        assert torch.equal(ctx.matrix, decode_rows(wire.unsqueeze(0), K, public, bits, block).matrix)
        assert not torch.equal(ctx.matrix[0, :K], row[:K])  # quantized, not the float row
        assert torch.equal(ctx.public_values, row[K:])
        assert torch.equal(estimate, exchange.family.reconstruct(ctx.matrix[0, :K], ctx.seeds))
        assert exchange.traffic.total_payload["scalars"] == step * wire.numel()


def test_32_bits_sends_the_float_row():
    exchange = _exchange(32)
    row, _ = _step(exchange)
    assert exchange.last_context.quantized is None
    assert torch.equal(exchange.last_context.matrix[0], row)
    assert exchange.traffic.total_payload["scalars"] == 4 * K


def test_auto_takes_all_gather_with_quantized_rows():
    """On 4 ranks with the mean and no review hook, auto picks all_reduce for float32 rows
    (docs/PROTOCOL.md §4.5), and all_gather for quantized ones."""
    assert _exchange(32, comm=_FourRanks(TrafficMeter(4, DIM))).current_path() == "all_reduce"
    assert _exchange(4, comm=_FourRanks(TrafficMeter(4, DIM))).current_path() == "all_gather"


def test_auto_takes_all_gather_with_quantized_rows_of_direction_groups():
    """2 groups of 2 on 4 ranks at K = 1024: auto shards float32 rows within the groups
    (docs/PROTOCOL.md §4.5: fewer bytes than all_gather there), and gathers quantized ones."""
    def grouped(bits: int) -> HoloGradExchange:
        return HoloGradExchange(make_family("sketch", 4096, 1024), make_aggregator("mean"), CommitmentChain("q"),
                                _FourRanks(TrafficMeter(4, 4096)), aggregation_path="auto", num_groups=2,
                                scalar_bits=bits)
    assert grouped(32).current_path() == "sharded"
    assert grouped(4).current_path() == "all_gather"


@pytest.mark.parametrize("path", ["sharded", "all_reduce"])
def test_quantized_rows_on_other_paths_are_refused(path):
    with pytest.raises(ValueError, match=rf"aggregation_path='{path}' with scalar_bits=4.*HINT"):
        _exchange(4, path)
    with pytest.raises(ValueError, match=r"scalar_bits=5 is not supported.*HINT"):
        _exchange(5)

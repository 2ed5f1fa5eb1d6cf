"""TrafficMeter arithmetic (no processes): the ring model of engine/traffic.py's docstring."""

import pytest

from lightning_holograd.engine import TrafficMeter, ring_wire_bytes


def test_ring_model():
    assert ring_wire_bytes("all_gather", 100, 4) == 300  # forwards the 3 other chunks
    assert ring_wire_bytes("all_reduce", 100, 4) == pytest.approx(150)  # 2 (N-1)/N n
    assert ring_wire_bytes("p2p", 100, 4) == 100
    assert ring_wire_bytes("all_gather", 100, 1) == 0
    with pytest.raises(ValueError, match="op='scatter'"):
        ring_wire_bytes("scatter", 1, 2)


def test_compression_per_step_and_one_time_setup_traffic():
    meter = TrafficMeter(world_size=4, num_params=1000)
    meter.record("setup", "p2p", 4000)  # initial broadcast: DDP pays it too, left out
    for _ in range(3):
        meter.start_step()
        meter.record("hashes", "all_gather", 32)
        meter.record("scalars", "all_gather", 64)
        meter.end_step()
    metrics = meter.metrics()
    assert metrics["holograd/bytes_per_step"] == 3 * (32 + 64)
    assert metrics["holograd/payload_bytes_per_step"] == 32 + 64
    assert metrics["holograd/bytes_total"] == 3 * 3 * (32 + 64)
    assert metrics["holograd/compression"] == pytest.approx(2 * 3 / 4 * 4000 / (3 * 96))
    with pytest.raises(ValueError, match="kind='gradients'"):
        meter.record("gradients", "all_reduce", 1)


def test_single_process_reports_no_compression():
    meter = TrafficMeter(world_size=1, num_params=10)
    meter.start_step()
    meter.record("scalars", "all_gather", 8)
    meter.end_step()
    assert "holograd/compression" not in meter.metrics()
    assert meter.metrics()["holograd/bytes_per_step"] == 0.0

"""Measuring (vqdna.bench.measure): the device limits are measured positive, a row states exactly one kind
of work, and timed calls of competing functions alternate."""

import time

import pytest
import torch

from vqdna.bench import measure


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_limits_are_measured_positive(dtype):
    assert measure.matmul_peak_gflops("cpu", dtype, n=256) > 0
    assert measure.copy_bandwidth_gbps("cpu", dtype, numel=1 << 20) > 0


def test_make_row_rejects_ambiguous_work():
    with pytest.raises(ValueError, match="exactly one of"):
        measure.make_row("lookup", "native", "cpu", torch.float32, {"N": 1}, 1.0, flops=1.0, bytes_moved=1.0)


def test_time_interleaved_takes_calls_in_turn(monkeypatch):
    """Each function is warmed up, then the timed calls alternate (a, b, a, b, ...), each function gets
    at least its rounds, and the result is the best time per function."""
    monkeypatch.setattr(measure, "_MIN_TOTAL_S", 0.0)  # exactly the requested rounds
    order = []
    fns = [lambda: order.append("a"), lambda: (order.append("b"), time.sleep(0.002))]
    best = measure.time_interleaved(fns, "cpu", rounds=[3, 2])
    assert order == ["a", "b", "a", "b", "a", "b", "a"]
    assert 0 <= best[0] < best[1] and best[1] >= 0.002

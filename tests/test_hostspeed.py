"""The host-speed yardstick: its arithmetic on a fake clock, and its place in the report."""

from __future__ import annotations

from distalign import hostspeed
from distalign.pipeline.report import stage_times


def test_median_ignores_one_preempted_repeat(monkeypatch):
    # perf_counter readings: start/stop pairs of 2, 2, 1000 (preempted), 2 and 2 ms
    readings = iter([0.0, 0.002, 1.0, 1.002, 2.0, 3.0, 4.0, 4.002, 5.0, 5.002])
    monkeypatch.setattr(hostspeed.time, "perf_counter", lambda: next(readings))
    calls = []
    assert abs(hostspeed._median_seconds(lambda: calls.append(1), 5) - 0.002) < 1e-12
    assert len(calls) == 5


def test_host_speed_divides_the_work_by_the_median_time(monkeypatch):
    seconds = {"matmul": 0.004, "copy": 0.01}
    monkeypatch.setattr(hostspeed, "_median_seconds",
                        lambda fn, repeats: seconds["matmul" if repeats == 5 else "copy"])
    speed = hostspeed.host_speed(size=64, stack=8, copy_mib=8, repeats=5)
    assert speed["gflops"] == round(8 * 2 * 64**3 / 0.004 / 1e9, 1)  # 2n³ flops per product
    assert speed["gbps"] == round(2 * 8 * 2**20 / 0.01 / 1e9, 2)  # read + write


def test_host_speed_is_measured_and_reported():
    speed = hostspeed.host_speed(size=32, stack=8, copy_mib=8, repeats=3)
    assert speed["gflops"] > 0.1 and speed["gbps"] > 0.01
    table = stage_times({"train/dpo-s0": {"seconds": 12.0, "cpu_seconds": 20.0,
                                          "load": [1.0, 2.0], "host": {"gflops": 41.2,
                                                                      "gbps": 9.84}},
                         "report": {"seconds": 1.0}})
    assert "| train/dpo-s0 | 12.0 | 20.0 | 1.0 → 2.0 | 41 GFLOP/s/core, 9.8 GB/s |" in table
    assert "| report | 1.0 | – | – | – |" in table

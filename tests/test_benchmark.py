"""Tests of measurement (utils.benchmark, utils.roofline), display (utils.plotting) and
the production INT8 wrappers (utils.production)."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

from utils import benchmark, models, plotting, production, roofline


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_macs_match_pytorch_flop_counter(name):
    """FLOPs counted by PyTorch's own FlopCounterMode are exactly 2 × our MACs."""
    m = models.build_model(name).eval()
    x = torch.zeros(1, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        m(x)
    assert counter.get_total_flops() == 2 * benchmark.count_macs(m, x)


def test_macs_hand_checked():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 8x8 out, 4 ch, 2*3*3 per output
    assert benchmark.count_macs(conv, torch.zeros(1, 2, 8, 8)) == 4 * 8 * 8 * 18
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert benchmark.count_macs(dw, torch.zeros(1, 4, 8, 8)) == 4 * 8 * 8 * 9
    assert benchmark.count_macs(nn.Linear(5, 3), torch.zeros(2, 5)) == 2 * 3 * 5


def test_size_and_counts():
    lin = nn.Linear(100, 10)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    assert benchmark.state_dict_bytes(lin) == buf.getbuffer().nbytes
    assert benchmark.state_dict_bytes(lin) > 1010 * 4
    assert benchmark.count_parameters(lin) == 1010
    with torch.no_grad():
        lin.weight[:5].zero_()
    assert benchmark.count_nonzero(lin) == 1010 - 500


def test_nonzero_counts_pruning_masks():
    lin = nn.Linear(10, 10)
    prune.l1_unstructured(lin, "weight", amount=0.3)
    assert benchmark.count_nonzero(lin) == 70 + 10


def test_latency_reports_median_and_threads():
    lat = benchmark.measure_latency(
        nn.Linear(8, 8), torch.zeros(4, 8), warmup=1, repeats=7, threads=1
    )
    assert lat.repeats == 7 and lat.threads == 1 and lat.batch_size == 4
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    assert lat.throughput == pytest.approx(4000 / lat.median_ms)
    assert torch.get_num_threads() >= 1


def test_time_callable_warms_up_before_timing():
    calls = []
    times = benchmark.time_callable(lambda: calls.append(1), warmup=3, repeats=5)
    assert len(calls) == 8 and len(times) == 5


def test_summarize_percentiles():
    lat = benchmark.summarize([5.0, 1.0, 3.0, 2.0, 4.0], batch_size=1, threads=2)
    assert (lat.median_ms, lat.p10_ms, lat.p90_ms) == (3.0, 1.0, 5.0)
    with pytest.raises(ValueError, match="times_ms"):
        benchmark.summarize([], 1, 1)


def test_benchmark_bad_input():
    with pytest.raises(TypeError, match="example"):
        benchmark.measure_latency(nn.Linear(2, 2), [1, 2])
    with pytest.raises(ValueError, match="repeats"):
        benchmark.time_callable(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="threads"):
        benchmark.measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), threads=0)
    with pytest.raises(TypeError, match="model"):
        benchmark.state_dict_bytes("model")


def test_benchmark_model_row():
    row = benchmark.benchmark_model(
        models.LeNet300100(), (1, 28, 28), batch_sizes=(1, 4), repeats=3, warmup=1
    )
    assert {
        "size_kb",
        "params",
        "nonzero",
        "macs",
        "latency_b1_ms",
        "latency_b4_ms",
        "threads",
    } <= set(row)
    assert row["macs"] == 266_200


def test_layer_table_intensity():
    df = benchmark.layer_table(models.LeNet300100(), torch.zeros(1, 1, 28, 28))
    assert list(df["layer"]) == ["fc1", "fc2", "fc3"]
    fc1 = df.iloc[0]
    assert fc1["weight_bytes"] == (784 * 300 + 300) * 4
    assert fc1["intensity"] == pytest.approx(
        2 * 784 * 300 / (fc1["weight_bytes"] + (784 + 300) * 4)
    )


# --- roofline ---------------------------------------------------------------
def test_roofline_model():
    peak = roofline.MachinePeak(gflops=100.0, bandwidth_gbs=10.0, threads=2)
    assert peak.ridge_point == 10.0
    assert roofline.attainable_gflops(peak, 1.0) == 10.0
    assert roofline.attainable_gflops(peak, 1000.0) == 100.0
    with pytest.raises(ValueError, match="intensity"):
        roofline.attainable_gflops(peak, -1.0)
    with pytest.raises(TypeError, match="peak"):
        roofline.plot_roofline({"gflops": 1})
    fig = roofline.plot_roofline(roofline.MachinePeak(100.0, 10.0, 2, 40.0), {"layer": (1.0, 5.0)})
    assert len(fig.axes[0].lines) >= 2  # DRAM and cache roofs
    plt.close(fig)


def test_roofline_measurements_are_positive():
    peak = roofline.measure_peak(matmul_size=256, copy_mb=8, repeats=3)
    assert peak.gflops > 0 and peak.bandwidth_gbs > 0


# --- plotting ---------------------------------------------------------------
def test_show_helpers_check_captions(capsys):
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="caption must look like"):
        plotting.show_figure(fig, "Figure 1: no")
    plotting.show_figure(fig, "图1: 推理加速的基本原理示意图")
    df = pd.DataFrame({"a": [1.234]})
    assert plotting.show_table(df, "表1: x") is None
    assert "表1: x" in capsys.readouterr().out
    with pytest.raises(TypeError, match="df"):
        plotting.show_table([1], "表1: x")


# --- production -------------------------------------------------------------
def test_static_int8_close_to_float_and_smaller():
    torch.manual_seed(0)
    m = models.SmallResNet().eval()
    calib = [(torch.randn(16, 1, 28, 28), None) for _ in range(4)]
    q = production.quantize_static_int8(m, calib)
    x = calib[0][0]
    ref, out = m(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel
    assert benchmark.state_dict_bytes(q) < benchmark.state_dict_bytes(m) / 2.5
    assert any(".quantized" in type(mod).__module__ for mod in q.modules())
    assert all(isinstance(p, nn.Parameter) for p in m.parameters())  # input untouched


def test_dynamic_int8_linear():
    m = models.LeNet300100().eval()
    q = production.quantize_dynamic_int8(m)
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(q(x), m(x), atol=0.05 * m(x).abs().max().item())
    assert benchmark.state_dict_bytes(q) < benchmark.state_dict_bytes(m) / 3.5


def test_production_bad_input():
    with pytest.raises(ValueError, match="backend"):
        production.quantize_static_int8(models.LeNet5(), [], backend="arm")
    with pytest.raises(TypeError, match="fuse_groups"):
        production.quantize_static_int8(nn.Linear(2, 2), [])
    with pytest.raises(TypeError, match="model"):
        production.quantize_dynamic_int8(None)


def test_layer_latency_names_every_layer():
    m = models.LeNet5()
    times = benchmark.layer_latency(m, torch.zeros(2, 1, 28, 28), warmup=1, repeats=3)
    assert list(times) == ["conv1", "conv2", "fc1", "fc2"]
    assert all(t > 0 for t in times.values())


class FakeClock:
    """A clock that only moves when a fake model runs: timings are exact and instant."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def model(self, name: str, ms, log: list | None = None):
        """A callable that takes ``ms`` milliseconds (a number or an iterator of numbers)."""
        steps = iter(ms) if not isinstance(ms, (int, float)) else None

        def run(x):
            self.now += (next(steps) if steps is not None else ms) / 1000
            if log is not None:
                log.append(name)
            return x

        return run


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(benchmark, "clock", clock)
    return clock


def test_interleaved_latency_runs_every_variant_in_turns(fake_clock):
    order = []
    lat = benchmark.measure_latency_interleaved(
        {"a": fake_clock.model("a", 2.0, order), "b": fake_clock.model("b", 1.0, order)},
        torch.zeros(3, 2),
        rounds=3,
        repeats=2,
        warmup=1,
        threads=1,
    )
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up each, then 3 rounds of 2
    assert lat["a"].repeats == 6 and lat["b"].batch_size == 3
    assert (lat["a"].median_ms, lat["b"].median_ms) == pytest.approx((2.0, 1.0))
    assert not lat["a"].noisy and lat["a"].attempts == 1
    with pytest.raises(ValueError, match="models"):
        benchmark.measure_latency_interleaved({}, torch.zeros(1))
    with pytest.raises(ValueError, match="rounds"):
        benchmark.measure_latency_interleaved(
            {"a": fake_clock.model("a", 1.0)}, torch.zeros(1), rounds=0
        )

"""Tests of measurement (utils.benchmark, utils.roofline), display (utils.plotting) and
the production INT8 wrappers (utils.production).

Timing tests never time the real machine: a fake clock (``benchmark.clock``) moves
only when a fake model runs, so medians, percentiles, the noise guard and the order
of interleaved calls are exact, instant and deterministic.
"""

from __future__ import annotations

import io
import itertools
import random

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from utils import benchmark, data, models, plotting, production, pruning, roofline
from utils.benchmark import Latency


class FakeClock:
    """A clock (in seconds) that only moves when a fake model or a fake sync runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000

    def model(self, name: str, ms, log: list | None = None):
        """A callable that takes ``ms`` milliseconds (a number, or an iterable of numbers per call)."""
        steps = None if isinstance(ms, (int, float)) else iter(ms)

        def run(x):
            self.advance(next(steps) if steps is not None else ms)
            if log is not None:
                log.append(name)
            return x

        return run


class FakeNet(nn.Module):
    """A real module (weights, eval/train, inference mode) whose forward takes ``ms`` on the fake clock."""

    def __init__(self, clock: FakeClock, ms: float, log: list | None = None, out: int = 3):
        super().__init__()
        self.fc = nn.Linear(4, out)
        self.clock, self.ms, self.log = clock, ms, log
        self.seen: list[tuple[bool, bool, int]] = []  # (training, inference mode, threads)

    def forward(self, x):
        self.seen.append(
            (self.training, torch.is_inference_mode_enabled(), torch.get_num_threads())
        )
        self.clock.advance(self.ms)
        if self.log is not None:
            self.log.append(self)
        return self.fc(x)


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(benchmark, "clock", clock)
    return clock


def heavy_tailed(seed: int, n: int = 10_000) -> list[float]:
    """Timings of an oversubscribed machine: mostly 1 ms, a third of them 50–150 ms (seeded)."""
    rng = random.Random(seed)
    return [
        rng.uniform(50, 150) if rng.random() < 0.35 else rng.uniform(1.0, 1.1) for _ in range(n)
    ]


# --- MACs -------------------------------------------------------------------
def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_macs_match_pytorch_flop_counter(name):
    """FLOPs counted by PyTorch's own FlopCounterMode are exactly 2 × our MACs."""
    m = models.build_model(name).eval()
    x = torch.zeros(1, 1, 28, 28)
    assert _flops(m, x) == 2 * benchmark.count_macs(m, x)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(3, 6, 5, stride=2, padding=1), (2, 3, 17)),
        (nn.Conv1d(4, 8, 3, groups=2), (1, 4, 9)),
        (nn.ConvTranspose2d(3, 4, (3, 2), stride=2), (2, 3, 5, 6)),
        (nn.ConvTranspose2d(4, 6, 3, groups=2, padding=1), (1, 4, 5, 5)),
        (nn.ConvTranspose1d(2, 3, 4, stride=3), (1, 2, 7)),
        (nn.Conv3d(2, 3, (1, 2, 3)), (1, 2, 4, 5, 6)),
        (nn.Conv2d(6, 6, (3, 1), groups=3, stride=(2, 1)), (2, 6, 9, 7)),
    ],
)
def test_macs_of_every_convolution_match_flop_counter(layer, shape):
    """Conv1d/3d and transposed convolutions were counted as 0; now they match PyTorch."""
    x = torch.randn(*shape)
    macs = benchmark.count_macs(layer, x)
    assert macs > 0 and _flops(layer, x) == 2 * macs


def test_macs_hand_checked():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 8x8 out, 4 ch, 2*3*3 per output
    assert benchmark.count_macs(conv, torch.zeros(1, 2, 8, 8)) == 4 * 8 * 8 * 18
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert benchmark.count_macs(dw, torch.zeros(1, 4, 8, 8)) == 4 * 8 * 8 * 9
    assert benchmark.count_macs(nn.Linear(5, 3), torch.zeros(2, 5)) == 2 * 3 * 5
    c1 = nn.Conv1d(2, 3, 4)  # length 10 -> 7 outputs, 3 channels, 2*4 MACs each
    assert benchmark.count_macs(c1, torch.zeros(1, 2, 10)) == 3 * 7 * 2 * 4
    # transposed: every input element meets C_out/groups * k_h * k_w weights
    ct = nn.ConvTranspose2d(2, 6, (3, 2), groups=2)
    assert benchmark.count_macs(ct, torch.zeros(1, 2, 4, 5)) == (2 * 4 * 5) * 3 * 6


def test_macs_refuse_layers_they_cannot_count():
    lstm = nn.Sequential(nn.Linear(3, 3))
    lstm.add_module("rnn", nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="LSTM at 'rnn'"):
        benchmark.count_macs(lstm, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="model"):
        benchmark.count_macs("lenet", torch.zeros(1))
    with pytest.raises(TypeError, match="example"):
        benchmark.count_macs(nn.Linear(2, 2), [0.0, 1.0])


def test_layer_table_intensity():
    df = benchmark.layer_table(models.LeNet300100(), torch.zeros(1, 1, 28, 28))
    assert list(df["layer"]) == ["fc1", "fc2", "fc3"]
    fc1 = df.iloc[0]
    assert fc1["weight_bytes"] == (784 * 300 + 300) * 4
    assert fc1["intensity"] == pytest.approx(
        2 * 784 * 300 / (fc1["weight_bytes"] + (784 + 300) * 4)
    )


# --- size and counts --------------------------------------------------------
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
    with pytest.raises(TypeError, match="model"):
        benchmark.state_dict_bytes("model")
    with pytest.raises(TypeError, match="model"):
        benchmark.count_nonzero(None)
    with pytest.raises(TypeError, match="model"):
        benchmark.count_parameters([lin])


def test_nonzero_counts_torch_prune_masks():
    lin = nn.Linear(10, 10)
    prune.l1_unstructured(lin, "weight", amount=0.3)
    assert benchmark.count_nonzero(lin) == 70 + 10
    assert benchmark.count_parameters(lin) == 110


def test_nonzero_counts_the_package_masks():
    """Issue 9 #7: a 100×100 Linear pruned to 90% by utils.pruning read 10,100 non-zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    pruning.magnitude_prune(model, 0.9, layers=["0"])
    assert benchmark.count_nonzero(model) == 1_000 + 100 + 1_000 + 10
    assert benchmark.count_parameters(model) == 10_100 + 1_010  # the originals are still there
    pruning.make_permanent(model)
    assert benchmark.count_nonzero(model) == 1_000 + 100 + 1_000 + 10


def test_nonzero_counts_quantized_weights():
    m = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        m[0].weight[:2].zero_()
    q = production.quantize_dynamic_int8(m)
    assert benchmark.count_parameters(q) == 36
    assert benchmark.count_nonzero(q) == 16 + int((q[0].bias() != 0).sum())


# --- threads and conditions -------------------------------------------------
@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 1), (3, 1), (16, 8)])
def test_default_threads_is_half_the_cpus(monkeypatch, cpus, expected):
    monkeypatch.delenv(benchmark.THREADS_ENV, raising=False)
    monkeypatch.setattr(benchmark, "_usable_cpus", lambda: cpus)
    assert benchmark.default_threads() == expected


def test_default_threads_reads_the_environment(monkeypatch):
    monkeypatch.setattr(benchmark, "_usable_cpus", lambda: 16)
    monkeypatch.setenv("COURSE_THREADS", "3")
    assert benchmark.default_threads() == 3
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("COURSE_THREADS", bad)
        with pytest.raises(ValueError, match="COURSE_THREADS must be a positive integer"):
            benchmark.default_threads()


def test_usable_cpus_is_the_affinity():
    assert benchmark._usable_cpus() == len(__import__("os").sched_getaffinity(0))


def test_num_threads_sets_and_restores(monkeypatch):
    monkeypatch.setattr(benchmark, "default_threads", lambda: 2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with benchmark.num_threads(1) as used:
            assert used == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        with benchmark.num_threads(None) as used:
            assert used == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        with pytest.raises(RuntimeError), benchmark.num_threads(1):
            raise RuntimeError("a failing model")
        assert torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="threads"):
            with benchmark.num_threads(0):
                pass
    finally:
        torch.set_num_threads(old)


def test_cpu_features_detected():
    feats = benchmark.cpu_features()
    assert list(feats) == list(benchmark.CPU_FLAGS)
    assert all(isinstance(v, bool) for v in feats.values())
    capability = torch.backends.cpu.get_cpu_capability()  # PyTorch's own detection
    if capability.startswith("AVX512"):
        assert feats["AVX-512"] and feats["AVX2"]
    elif capability.startswith("AVX2"):
        assert feats["AVX2"] and not feats["AVX-512"]
    _, flags = benchmark._cpuinfo()
    if flags:
        assert feats == {name: flag in flags for name, flag in benchmark.CPU_FLAGS.items()}


def test_measurement_conditions_states_threads_device_cpu_isa(monkeypatch):
    monkeypatch.setattr(benchmark, "cpu_features", lambda: {"AVX2": True, "AMX-INT8": False})
    monkeypatch.setattr(benchmark, "_cpuinfo", lambda: ("Fake CPU 9000", frozenset()))
    monkeypatch.setattr(benchmark, "_usable_cpus", lambda: 4)
    monkeypatch.setenv("COURSE_THREADS", "3")
    line = benchmark.measurement_conditions()
    assert "\n" not in line
    assert "3 个线程" in line and "4 个逻辑 CPU" in line
    assert "Fake CPU 9000" in line and "AVX2" in line and "AMX" not in line
    assert torch.__version__ in line and "CPU" in line
    assert "2 个线程" in benchmark.measurement_conditions(threads=2)
    with pytest.raises(ValueError, match="threads"):
        benchmark.measurement_conditions(threads=0)
    with pytest.raises(TypeError, match="device"):
        benchmark.measurement_conditions(device=0)


# --- timing: the exact mechanics, on the fake clock ---------------------------
def test_time_callable_warms_up_then_times_blocks(fake_clock):
    calls = []
    durations = iter([50.0] * 3 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

    def fn():
        calls.append(1)
        fake_clock.advance(next(durations))

    times = benchmark.time_callable(fn, warmup=3, repeats=3, number=2)
    assert len(calls) == 3 + 3 * 2
    assert times == pytest.approx([1.5, 3.5, 5.5])  # mean of each block, warm-up not timed
    with pytest.raises(ValueError, match="repeats"):
        benchmark.time_callable(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="number"):
        benchmark.time_callable(lambda: None, number=0)
    with pytest.raises(TypeError, match="fn"):
        benchmark.time_callable(None)


def test_time_callable_waits_for_cuda(fake_clock, monkeypatch):
    """Without ``torch.cuda.synchronize`` inside the timed region, GPU time goes unmeasured."""
    synced = []

    def fake_sync(device):
        synced.append(device)
        fake_clock.advance(4.0)  # the queued kernels finish

    monkeypatch.setattr(torch.cuda, "synchronize", fake_sync)
    cuda = torch.device("cuda")
    times = benchmark.time_callable(
        lambda: fake_clock.advance(1.0), warmup=2, repeats=3, device=cuda
    )
    assert times == pytest.approx([5.0, 5.0, 5.0])
    assert synced == [cuda] * 4  # after the warm-up, and after every timed block
    synced.clear()
    benchmark.time_callable(lambda: None, warmup=1, repeats=2)
    assert synced == []  # never on CPU


def test_calls_per_timing():
    assert benchmark.calls_per_timing(2.0) == 1
    assert benchmark.calls_per_timing(1.0) == 1
    assert benchmark.calls_per_timing(0.3) == 4  # ceil(1 / 0.3)
    assert benchmark.calls_per_timing(0.01) == 100
    assert benchmark.calls_per_timing(1e-9) == 1000  # capped
    assert benchmark.calls_per_timing(0.0) == 1000
    assert benchmark.calls_per_timing(1.0, min_block_ms=5.0) == 5
    with pytest.raises(ValueError, match="call_ms"):
        benchmark.calls_per_timing(-1.0)
    with pytest.raises(ValueError, match="min_block_ms"):
        benchmark.calls_per_timing(1.0, min_block_ms=0.0)


def test_summarize_percentiles():
    """Median (not mean, not p90), nearest-rank p10/p90 (not min/max) of unsorted timings."""
    times = [7.0, 100.0, 1.0, 9.0, 3.0, 5.0, 2.0, 10.0, 4.0, 8.0, 6.0]
    lat = benchmark.summarize(times, batch_size=4, threads=2)
    assert (lat.median_ms, lat.p10_ms, lat.p90_ms) == (6.0, 2.0, 10.0)
    assert (lat.batch_size, lat.threads, lat.repeats, lat.noisy) == (4, 2, 11, False)
    assert lat.throughput == pytest.approx(4000 / 6.0)
    assert lat.spread == 5.0
    assert benchmark.summarize([1.0, 2.0], 1, 1).median_ms == 1.5
    with pytest.raises(ValueError, match="times_ms"):
        benchmark.summarize([], 1, 1)
    with pytest.raises(ValueError, match="times_ms"):
        benchmark.summarize([1.0, -1.0], 1, 1)


def test_latency_spread_and_dict():
    lat = Latency(2.0, 1.0, 3.0, batch_size=8, threads=1, repeats=5)
    assert lat.spread == 3.0 and lat.throughput == 4000.0
    assert lat.as_dict()["throughput"] == 4000.0 and lat.as_dict()["noisy"] is False
    assert Latency(1.0, 0.0, 2.0, 1, 1, 3).spread == float("inf")


def test_measure_latency_policy(fake_clock, monkeypatch):
    """Eval mode, inference mode, the default threads, warm-up excluded, exact median and throughput."""
    monkeypatch.setenv("COURSE_THREADS", "1")
    net = FakeNet(fake_clock, ms=2.0).train()
    old = torch.get_num_threads()
    lat = benchmark.measure_latency(net, torch.zeros(4, 4), warmup=3, repeats=7)
    assert torch.get_num_threads() == old
    assert len(net.seen) == 3 + 7 and set(net.seen) == {(False, True, 1)}
    assert (lat.median_ms, lat.p10_ms, lat.p90_ms) == pytest.approx((2.0, 2.0, 2.0))
    assert (lat.repeats, lat.threads, lat.batch_size, lat.noisy, lat.attempts) == (
        7,
        1,
        4,
        False,
        1,
    )
    assert lat.throughput == pytest.approx(2000.0)
    lat = benchmark.measure_latency(net, torch.zeros(1, 4), warmup=1, repeats=3, threads=2)
    assert lat.threads == 2 and net.seen[-1] == (False, True, 2)


def test_measure_latency_excludes_a_slow_first_call(fake_clock):
    slow_start = fake_clock.model("m", [500.0, 500.0] + [3.0] * 10)
    lat = benchmark.measure_latency(slow_start, torch.zeros(1, 2), warmup=2, repeats=10, threads=1)
    assert (lat.p90_ms, lat.noisy) == (pytest.approx(3.0), False)


def test_measure_latency_blocks_fast_calls(fake_clock):
    """A 0.1 ms call is timed in blocks of 10 calls (≥ MIN_BLOCK_MS); each timing is per call."""
    log = []
    lat = benchmark.measure_latency(
        fake_clock.model("m", 0.1, log), torch.zeros(1, 2), warmup=2, repeats=5, threads=1
    )
    assert len(log) == 2 + 5 * 10
    assert lat.median_ms == pytest.approx(0.1)


def test_measure_latency_bad_input():
    with pytest.raises(TypeError, match="example"):
        benchmark.measure_latency(nn.Linear(2, 2), [1, 2])
    with pytest.raises(TypeError, match="model"):
        benchmark.measure_latency("lenet", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="threads"):
        benchmark.measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), threads=0)
    with pytest.raises(ValueError, match="repeats"):
        benchmark.measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        benchmark.measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), warmup=-1)


# --- the noise guard ----------------------------------------------------------
def test_instability_thresholds():
    assert benchmark.instability([1.0] * 10) is None
    assert benchmark.instability([1.0, 2.0] * 10) is None  # spread exactly 2.0 is allowed
    assert "spread" in benchmark.instability([1.0, 2.1] * 10)
    assert "spread" in benchmark.instability([1.0] * 5 + [0.23] * 2 + [107.0] * 5)
    # two halves that disagree: 1.5x is allowed, 1.6x is not
    assert benchmark.instability([2.0] * 5 + [3.0] * 5) is None
    assert "halves" in benchmark.instability([2.0] * 5 + [3.2] * 5)
    assert "halves" in benchmark.instability([3.2] * 5 + [2.0] * 5)
    assert benchmark.instability([1.0, 1.9, 1.0]) is None  # too short to split


def test_guard_remeasures_a_drifting_measurement(fake_clock):
    """First attempt drifts 2 ms → 4 ms (spread 2.0, halves 2×); the re-measurement is stable."""
    log = []
    durations = [2.0] * 2 + [2.0] * 5 + [4.0] * 5 + [3.0] * 10
    lat = benchmark.measure_latency(
        fake_clock.model("m", durations, log), torch.zeros(1, 2), warmup=2, repeats=10, threads=1
    )
    assert (lat.noisy, lat.attempts, lat.median_ms) == (False, 2, pytest.approx(3.0))
    assert len(log) == 2 + 10 + 10


def test_guard_marks_a_noisy_callable(fake_clock):
    """The oversubscription pattern (p10 ≈ 1 ms under a median of ~50 ms) is re-measured, then marked."""
    log = []
    noisy = fake_clock.model("m", heavy_tailed(seed=1), log)
    lat = benchmark.measure_latency(noisy, torch.zeros(1, 2), warmup=2, repeats=20, threads=1)
    assert lat.noisy and lat.attempts == 1 + benchmark.NOISE_RETRIES == 3
    assert lat.spread > benchmark.NOISE_MAX_SPREAD
    assert len(log) == 2 + 3 * 20
    quiet = fake_clock.model("q", [1.0] * 2 + [1.0, 1.05, 1.1] * 10)
    assert not benchmark.measure_latency(quiet, torch.zeros(1, 2), warmup=2, repeats=20).noisy


def test_guard_keeps_the_least_noisy_attempt(fake_clock):
    spreads = [1.0] * 2 + [1.0, 10.0] * 5 + [1.0, 3.0] * 5 + [1.0, 30.0] * 5
    lat = benchmark.measure_latency(
        fake_clock.model("m", spreads), torch.zeros(1, 2), warmup=2, repeats=10, threads=1
    )
    assert lat.noisy and lat.attempts == 3 and lat.p90_ms == pytest.approx(3.0)


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
    assert not lat["a"].noisy and lat["a"].attempts == 1 and lat["a"].threads == 1


def test_interleaved_guard_remeasures_all_and_marks_only_the_noisy(fake_clock):
    order = []
    models_ = {
        "steady": fake_clock.model("steady", 2.0, order),
        "noisy": fake_clock.model("noisy", itertools.cycle([1.0, 1.05, 100.0]), order),
    }
    lat = benchmark.measure_latency_interleaved(
        models_, torch.zeros(1, 2), rounds=4, repeats=5, warmup=1, threads=1
    )
    assert lat["noisy"].noisy and not lat["steady"].noisy
    assert lat["noisy"].attempts == lat["steady"].attempts == 3
    assert order.count("steady") == 1 + 3 * 4 * 5  # re-measured together, still in turns
    assert order[:12] == ["steady", "noisy"] + ["steady"] * 5 + ["noisy"] * 5
    assert benchmark.ratio_text(lat["steady"], lat["noisy"]).endswith("(noisy)")


def test_interleaved_bad_input():
    with pytest.raises(ValueError, match="models"):
        benchmark.measure_latency_interleaved({}, torch.zeros(1))
    with pytest.raises(TypeError, match="models"):
        benchmark.measure_latency_interleaved([nn.Linear(1, 1)], torch.zeros(1))
    with pytest.raises(ValueError, match="models"):
        benchmark.measure_latency_interleaved({"a": "not callable"}, torch.zeros(1))
    with pytest.raises(ValueError, match="rounds"):
        benchmark.measure_latency_interleaved({"a": abs}, torch.zeros(1), rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        benchmark.measure_latency_interleaved({"a": abs}, torch.zeros(1), warmup=-1)
    with pytest.raises(TypeError, match="example"):
        benchmark.measure_latency_interleaved({"a": abs}, 1.0)


# --- ratios for generated prose -------------------------------------------------
def test_speedup_and_ratio_text():
    base = Latency(10.0, 9.0, 11.0, 1, 1, 20)
    fast = Latency(2.0, 1.9, 2.2, 1, 1, 20)
    assert benchmark.speedup(base, fast) == 5.0 and benchmark.speedup(fast, base) == 0.2
    assert benchmark.ratio_text(base, fast) == "5.0×"
    assert benchmark.ratio_text(fast, base) == "0.20×"
    assert benchmark.ratio_text(Latency(62.0, 60.0, 64.0, 1, 1, 20), fast) == "31×"
    close = Latency(10.5, 8.0, 12.0, 1, 1, 20)
    assert benchmark.ratio_text(base, close) == "≈1×（差异在噪声内）"
    touching = Latency(5.0, 4.0, 9.0, 1, 1, 20)  # its p90 is base's p10
    assert benchmark.ratio_text(base, touching) == "≈1×（差异在噪声内）"
    apart = Latency(5.0, 4.0, 8.9, 1, 1, 20)
    assert benchmark.ratio_text(base, apart) == "2.0×"
    noisy = Latency(2.0, 1.9, 2.2, 1, 1, 20, noisy=True)
    assert benchmark.ratio_text(base, noisy) == "5.0× (noisy)"
    assert benchmark.ratio_text(noisy, base) == "0.20× (noisy)"
    with pytest.raises(TypeError, match="base"):
        benchmark.speedup(10.0, fast)
    with pytest.raises(TypeError, match="other"):
        benchmark.ratio_text(base, 2.0)
    with pytest.raises(ValueError, match="ratio"):
        benchmark.format_ratio(0.0)


# --- tables ------------------------------------------------------------------
def test_benchmark_models_table(fake_clock):
    log = []
    slow, fast = FakeNet(fake_clock, 4.0, log), FakeNet(fake_clock, 1.0, log)
    with torch.no_grad():
        fast.fc.weight[0].zero_()
    fn = fake_clock.model("fn", itertools.cycle([2.0, 2.0, 3.0]))  # timings 2, 3, 2, 2 at batch 1
    variants = {"slow": slow, "fast": fast, "fn": fn}
    df = benchmark.benchmark_models(
        variants, (4,), batch_sizes=(1, 3), threads=1, rounds=2, repeats=2, warmup=1
    )
    per_batch = ["latency_b{}_ms", "p10_b{}_ms", "p90_b{}_ms", "speedup_b{}", "noisy_b{}"]
    expected = ["size_kb", "params", "nonzero", "macs"]
    expected += [c.format(n) for n in (1, 3) for c in per_batch] + ["threads"]
    assert list(df.columns) == expected and list(df.index) == ["slow", "fast", "fn"]
    assert df.loc["slow", "size_kb"] == benchmark.state_dict_bytes(slow) / 1024
    assert (df.loc["slow", "params"], df.loc["fast", "nonzero"], df.loc["slow", "macs"]) == (
        15,
        11,
        12,
    )
    assert df.loc["fn", ["size_kb", "params", "nonzero", "macs"]].isna().all()
    assert list(df["latency_b3_ms"]) == pytest.approx([4.0, 1.0, 2.0])
    assert list(df["p90_b1_ms"]) == pytest.approx([4.0, 1.0, 3.0])
    assert list(df["p10_b1_ms"]) == pytest.approx([4.0, 1.0, 2.0])
    assert list(df["speedup_b1"]) == pytest.approx([1.0, 4.0, 2.0])
    assert not df["noisy_b3"].any() and set(df["threads"]) == {1}
    # interleaved: slow, fast (warm-up), then in every round 2 of slow, 2 of fast
    assert log[2:8] == [slow, fast, slow, slow, fast, fast]  # after the MAC count's passes
    assert all(seen == (False, True, 1) for seen in slow.seen[1:])
    other = benchmark.benchmark_models(
        variants, (4,), batch_sizes=(2,), threads=1, baseline="fast", macs=False, rounds=1
    )
    assert "macs" not in other and list(other["speedup_b2"]) == pytest.approx([0.25, 1.0, 0.5])


def test_benchmark_models_accuracy(fake_clock):
    x = torch.eye(4)[:, :4].repeat(2, 1)
    y = torch.tensor([0, 1, 2, 0] * 2)
    loader = data.make_loader(TensorDataset(x, y), batch_size=3)
    perfect = FakeNet(fake_clock, 2.0, out=4)
    with torch.no_grad():
        perfect.fc.weight.copy_(torch.eye(4))  # logits = x: picks 0, 1, 2, 3
        perfect.fc.bias.zero_()
    df = benchmark.benchmark_models(
        {"eye": perfect, "zeros": fake_clock.model("z", 1.0)},
        (4,),
        loader=loader,
        batch_sizes=(1,),
        threads=1,
        rounds=1,
        repeats=2,
    )
    # eye: 3 of 4 right (label 0 for the last); callable returns x itself: the same
    assert list(df["accuracy"]) == pytest.approx([75.0, 75.0])


def test_benchmark_models_bad_input():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="baseline must be one of"):
        benchmark.benchmark_models({"a": lin}, (2,), baseline="b")
    with pytest.raises(TypeError, match="models"):
        benchmark.benchmark_models(lin, (2,))
    with pytest.raises(ValueError, match="models"):
        benchmark.benchmark_models({}, (2,))
    with pytest.raises(TypeError, match="input_shape"):
        benchmark.benchmark_models({"a": lin}, 2)
    with pytest.raises(ValueError, match="batch size"):
        benchmark.benchmark_models({"a": lin}, (2,), batch_sizes=(0,))
    with pytest.raises(ValueError, match="batch_sizes"):
        benchmark.benchmark_models({"a": lin}, (2,), batch_sizes=())
    with pytest.raises(TypeError, match="loader"):
        benchmark.benchmark_models({"a": lin}, (2,), loader=[(torch.zeros(1, 2), 0)])


def test_benchmark_model_row():
    row = benchmark.benchmark_model(
        models.LeNet300100(), (1, 28, 28), batch_sizes=(1, 4), repeats=3, warmup=1, threads=1
    )
    assert list(row) == [
        "size_kb",
        "params",
        "nonzero",
        "macs",
        "latency_b1_ms",
        "p10_b1_ms",
        "p90_b1_ms",
        "noisy_b1",
        "latency_b4_ms",
        "p10_b4_ms",
        "p90_b4_ms",
        "noisy_b4",
        "threads",
    ]
    assert row["macs"] == 266_200 and row["params"] == 266_610 and row["threads"] == 1
    assert 0 < row["p10_b4_ms"] <= row["latency_b4_ms"] <= row["p90_b4_ms"]
    with pytest.raises(TypeError, match="model"):
        benchmark.benchmark_model(lambda x: x, (2,))


def test_layer_latency_names_every_layer():
    m = models.LeNet5()
    times = benchmark.layer_latency(m, torch.zeros(2, 1, 28, 28), warmup=1, repeats=3, threads=1)
    assert list(times) == ["conv1", "conv2", "fc1", "fc2"]
    assert all(t > 0 for t in times.values())
    assert benchmark.layer_latency(nn.ReLU(), torch.zeros(1)) == {}


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
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "roofline (DRAM)" in labels and "roofline (cache, 40 GB/s)" in labels
    plt.close(fig)


def test_points_above_roof():
    peak = roofline.MachinePeak(
        gflops=100.0, bandwidth_gbs=10.0, threads=1, cache_bandwidth_gbs=40.0
    )
    assert roofline.roof_gflops(peak, 1.0) == 40.0  # the cache roof, above DRAM's 10
    assert roofline.roof_gflops(peak, 1000.0) == 100.0
    points = {
        "ok": (1.0, 43.0),
        "cache": (1.0, 45.0),
        "compute": (1000.0, 120.0),
        "low": (0.1, 1.0),
    }
    assert roofline.points_above_roof(peak, points) == {
        "cache": pytest.approx(1.125),
        "compute": pytest.approx(1.2),
    }
    assert roofline.points_above_roof(peak, points, margin=0.25) == {}
    dram_only = roofline.MachinePeak(100.0, 10.0, 1)
    assert list(roofline.points_above_roof(dram_only, {"a": (1.0, 12.0)})) == ["a"]
    with pytest.raises(ValueError, match="margin"):
        roofline.points_above_roof(peak, points, margin=-0.1)
    with pytest.raises(TypeError, match="points"):
        roofline.points_above_roof(peak, [(1.0, 2.0)])


def test_measure_peak_formulas_use_the_best_timing(monkeypatch):
    """Peaks are best-of-N: with timings [5, 4, 6] ms the 4 ms one counts."""
    calls = []

    def fake_time(fn, *, warmup=5, repeats=20, device=None, number=1):
        calls.append((repeats, number, torch.get_num_threads()))
        return [5.0, 4.0, 6.0]

    monkeypatch.setattr(roofline, "time_callable", fake_time)
    monkeypatch.setattr(roofline, "calls_per_timing", lambda ms, block: 7)
    bw = roofline.copy_bandwidth_gbs(1000, repeats=3)
    assert bw == pytest.approx(2 * 4 * 1000 / 0.004 / 1e9)
    assert calls[-1][:2] == (3, 7)
    calls.clear()
    peak = roofline.measure_peak(matmul_size=100, copy_mb=1, repeats=3, threads=1)
    assert peak.gflops == pytest.approx(2 * 100**3 / 0.004 / 1e9)
    assert peak.bandwidth_gbs == pytest.approx(2 * 2**20 / 0.004 / 1e9)
    assert peak.cache_bandwidth_gbs == pytest.approx(2 * 1024 * 1024 / 0.004 / 1e9)
    assert peak.threads == 1 and {c[2] for c in calls} == {1}


def test_roofline_measurements_use_the_policy_threads(monkeypatch):
    monkeypatch.setenv("COURSE_THREADS", "1")
    old = torch.get_num_threads()
    peak = roofline.measure_peak(matmul_size=128, copy_mb=4, repeats=2)
    assert peak.threads == 1 and torch.get_num_threads() == old
    assert peak.gflops > 0 and peak.bandwidth_gbs > 0 and peak.cache_bandwidth_gbs > 0
    with pytest.raises(ValueError, match="copy_mb"):
        roofline.measure_peak(copy_mb=0)


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


def test_latency_of_reads_one_row_of_a_table_and_names_bad_arguments():
    import pandas as pd

    table = pd.DataFrame(
        {
            "latency_b8_ms": [2.0, 0.5],
            "p10_b8_ms": [1.5, 0.4],
            "p90_b8_ms": [3.0, 0.7],
            "noisy_b8": [False, True],
            "threads": [1, 1],
        },
        index=["fp32", "int8"],
    )
    lat = benchmark.latency_of(table, "int8", 8)
    assert (lat.median_ms, lat.p10_ms, lat.p90_ms, lat.batch_size, lat.noisy) == (
        0.5,
        0.4,
        0.7,
        8,
        True,
    )
    assert benchmark.speedup(benchmark.latency_of(table, "fp32", 8), lat) == 4.0
    with pytest.raises(ValueError, match="name must be a row"):
        benchmark.latency_of(table, "bf16", 8)
    with pytest.raises(ValueError, match="batch_size must be one"):
        benchmark.latency_of(table, "int8", 1)

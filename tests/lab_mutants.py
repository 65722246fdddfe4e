"""The mutation suite of the labs: plausible wrong answers that the check cells must catch.

Each :class:`LabMutant` replaces ``old`` (once, inside a solution region) of the code cell
that contains ``cell`` by ``new``. ``tests/test_labs.py`` runs the mutated cell in the
solution's live kernel, then the cells after it up to the first check cell (or up to the
cell containing ``until``), and requires a check cell to fail.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabMutant:
    """One wrong answer: in the code cell containing ``cell``, replace ``old`` by ``new``."""

    name: str
    cell: str
    old: str
    new: str
    until: str | None = None  # a marker of the last cell to run; default: the next check cell


_TIMED_LOOP = """    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    return times"""

_STATS = """    return {
        "median": statistics.median(ordered),
        "p10": ordered[round(0.1 * (n - 1))],
        "p90": ordered[round(0.9 * (n - 1))],
    }"""

_LAB01 = [
    LabMutant(
        "times a loop once and averages",
        "def time_it(",
        _TIMED_LOOP,
        """    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return [1000.0 * (time.perf_counter() - start) / repeats] * repeats""",
    ),
    LabMutant(
        "time.time instead of time.perf_counter",
        "def time_it(",
        _TIMED_LOOP,
        _TIMED_LOOP.replace("time.perf_counter()", "time.time()"),
    ),
    LabMutant(
        "seconds instead of milliseconds",
        "def time_it(",
        "times.append(1000.0 * (",
        "times.append((",
    ),
    LabMutant(
        "no warm-up",
        "def time_it(",
        "    for _ in range(warmup):\n        fn()\n",
        "",
    ),
    LabMutant(
        "warm-up calls timed too",
        "def time_it(",
        "    for _ in range(warmup):\n        fn()\n    times = []\n    for _ in range(repeats):",
        "    times = []\n    for _ in range(warmup + repeats):",
    ),
    LabMutant(
        "one start for all calls (cumulative times)",
        "def time_it(",
        "    for _ in range(repeats):\n        start = time.perf_counter()",
        "    start = time.perf_counter()\n    for _ in range(repeats):",
    ),
    LabMutant(
        "percentile index floor(q * n)",
        "def latency_stats(",
        _STATS,
        _STATS.replace("round(0.1 * (n - 1))", "int(0.1 * n)").replace(
            "round(0.9 * (n - 1))", "int(0.9 * n)"
        ),
    ),
    LabMutant(
        "percentile index round(q * n), off by one",
        "def latency_stats(",
        _STATS,
        _STATS.replace("round(0.1 * (n - 1))", "round(0.1 * n)").replace(
            "round(0.9 * (n - 1))", "min(round(0.9 * n), n - 1)"
        ),
    ),
    LabMutant(
        "mean instead of median",
        "def latency_stats(",
        "statistics.median(ordered)",
        "statistics.mean(ordered)",
    ),
    LabMutant(
        "percentiles of the unsorted list",
        "def latency_stats(",
        _STATS,
        _STATS.replace("ordered[round", "times[round"),
    ),
    LabMutant(
        "linear-interpolation percentiles (numpy default)",
        "def latency_stats(",
        _STATS,
        """    import numpy as np

    return {
        "median": statistics.median(ordered),
        "p10": float(np.percentile(ordered, 10)),
        "p90": float(np.percentile(ordered, 90)),
    }""",
    ),
    LabMutant(
        "calls the reference state_dict_bytes",
        "def model_size_bytes(",
        "    buffer = io.BytesIO()\n    torch.save(model.state_dict(), buffer)\n    return len(buffer.getvalue())",
        "    return state_dict_bytes(model)",
    ),
    LabMutant(
        "4 bytes per parameter instead of the file",
        "def model_size_bytes(",
        "    buffer = io.BytesIO()\n    torch.save(model.state_dict(), buffer)\n    return len(buffer.getvalue())",
        "    return 4 * sum(p.numel() for p in model.parameters())",
    ),
    LabMutant(
        "saves the whole module instead of the state_dict",
        "def model_size_bytes(",
        "torch.save(model.state_dict(), buffer)",
        "torch.save(model, buffer)",
    ),
    LabMutant(
        "conv MACs ignore groups",
        "def conv2d_macs(",
        "(c_in // groups)",
        "c_in",
    ),
    LabMutant(
        "conv MACs ignore the batch",
        "def conv2d_macs(",
        "return batch * c_out",
        "return c_out",
    ),
    LabMutant(
        "Linear layers not counted",
        "def conv2d_macs(",
        "if isinstance(m, CONV + LINEAR)",
        "if isinstance(m, CONV)",
    ),
    LabMutant(
        "MACs of the INT8 model counted as 0 (float layers only)",
        "def conv2d_macs(",
        "if isinstance(m, CONV + LINEAR)",
        "if isinstance(m, (nn.Conv2d, nn.Linear))",
    ),
    LabMutant(
        "calls the reference count_macs",
        "def conv2d_macs(",
        "    total = 0\n",
        "    return count_macs(model, x)\n    total = 0\n",
    ),
    LabMutant(
        "no_grad instead of inference_mode",
        "def correct_latency(",
        "with torch.inference_mode():",
        "with torch.no_grad():",
    ),
    LabMutant(
        "model left in training mode",
        "def correct_latency(",
        "        model.eval()\n",
        "",
    ),
    LabMutant(
        "thread count not restored",
        "def correct_latency(",
        "    finally:\n        torch.set_num_threads(old)",
        "    finally:\n        pass",
    ),
    LabMutant(
        "threads argument ignored",
        "def correct_latency(",
        "    if threads is not None:\n        torch.set_num_threads(threads)\n",
        "",
    ),
    LabMutant(
        "reports the previous thread count",
        "def correct_latency(",
        '"threads": used',
        '"threads": old',
    ),
    LabMutant(
        "own loop timed once with time.time and averaged",
        "def correct_latency(",
        "            times = time_it(lambda: model(x), warmup=warmup, repeats=repeats)",
        """            start = time.time()
            for _ in range(warmup + repeats):
                model(x)
            times = [1000 * (time.time() - start) / (warmup + repeats)] * repeats""",
    ),
    LabMutant(
        "no warm-up in correct_latency",
        "def correct_latency(",
        "time_it(lambda: model(x), warmup=warmup,",
        "time_it(lambda: model(x), warmup=0,",
    ),
    LabMutant(
        "batch-32 column timed at batch 1",
        "def compare(",
        'correct_latency(m, x32)["median"]',
        'correct_latency(m, x1)["median"]',
    ),
    LabMutant(
        "MACs of the first model for every row",
        "def compare(",
        '"macs": model_macs(m, x1)',
        '"macs": model_macs(next(iter(models.values())), x1)',
    ),
    LabMutant(
        "size of the first model for every row",
        "def compare(",
        '"size_kb": model_size_bytes(m) / 1024',
        '"size_kb": model_size_bytes(next(iter(models.values()))) / 1024',
    ),
    LabMutant(
        "MACs of the whole batch-32 input",
        "def compare(",
        '"macs": model_macs(m, x1)',
        '"macs": model_macs(m, x32)',
    ),
]

_LAB02 = [
    LabMutant(
        "restricted signed range [-127, 127]",
        "def my_qrange(",
        "return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1",
        "return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1",
    ),
    LabMutant(
        "missing scale floor (affine)",
        "def my_qrange(",
        "scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)",
        "scale = (hi - lo) / (qmax - qmin)",
    ),
    LabMutant(
        "missing scale floor (symmetric)",
        "def my_qrange(",
        "scale = torch.clamp(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), min=EPS)",
        "scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)",
    ),
    LabMutant(
        "symmetric scale over the full range",
        "def my_qrange(",
        "torch.maximum(-lo, hi) / ((qmax - qmin) / 2)",
        "torch.maximum(-lo, hi) / (qmax - qmin)",
    ),
    LabMutant(
        "zero point floored",
        "def my_qrange(",
        "qmin - torch.round(lo / scale)",
        "qmin - torch.floor(lo / scale)",
    ),
    LabMutant(
        "symmetric unsigned zero point 0",
        "def my_qrange(",
        "0 if signed else 2 ** (bits - 1)",
        "0",
    ),
    LabMutant(
        "calls the reference calc_qparams",
        "def my_qrange(",
        "    if symmetric:\n        scale = torch.clamp(",
        "    return ref.calc_qparams(lo, hi, bits, signed, symmetric)\n    if symmetric:\n        scale = torch.clamp(",
    ),
    LabMutant(
        "x / S instead of x * (1 / S) (off by one ulp)",
        "def my_quantize(",
        "torch.round(x * (1.0 / s))",
        "torch.round(x / s)",
    ),
    LabMutant(
        "floor instead of round",
        "def my_quantize(",
        "torch.round(x * (1.0 / s))",
        "torch.floor(x * (1.0 / s))",
    ),
    LabMutant(
        "round half away from zero",
        "def my_quantize(",
        "torch.round(x * (1.0 / s))",
        "torch.sign(x) * torch.floor((x * (1.0 / s)).abs() + 0.5)",
    ),
    LabMutant(
        "no clamp",
        "def my_quantize(",
        "(torch.round(x * (1.0 / s)) + z).clamp(qmin, qmax).to(torch.int32)",
        "(torch.round(x * (1.0 / s)) + z).to(torch.int32)",
    ),
    LabMutant(
        "broadcast ignores the axis",
        "def my_quantize(",
        "    shape = [1] * x.dim()\n    shape[axis] = -1\n    return t.reshape(shape)",
        "    return t.reshape(-1, *([1] * (x.dim() - 1)))",
    ),
    LabMutant(
        "dequantize forgets the zero point",
        "def my_quantize(",
        "return (q.to(torch.int64) - z).float() * s",
        "return q.float() * s",
    ),
    LabMutant(
        "calls the reference quantize",
        "def my_quantize(",
        "    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), x, axis)\n",
        "    return ref.quantize(x, scale, zero_point, bits, signed, axis=axis)\n",
    ),
    LabMutant(
        "observer forgets the previous range",
        "class MyMinMaxObserver",
        "        if self.min_val is None:\n            self.min_val, self.max_val = lo, hi",
        "        if True:\n            self.min_val, self.max_val = lo, hi",
    ),
    LabMutant(
        "observer reshapes without moving the axis",
        "class MyMinMaxObserver",
        "x.detach().movedim(self.axis, 0).flatten(1)",
        "x.detach().reshape(x.shape[self.axis], -1)",
    ),
    LabMutant(
        "multiplier mantissa overflow not renormalised",
        "def my_quantize_multiplier(",
        "    if m0 == 2**31:\n        m0, n = m0 // 2, n - 1\n",
        "",
    ),
    LabMutant(
        "multiplier in float32",
        "def my_quantize_multiplier(",
        "torch.tensor(m, dtype=torch.float64)",
        "torch.tensor(m, dtype=torch.float32)",
    ),
    LabMutant(
        "int32 fixed-point product overflows",
        "def my_quantize_multiplier(",
        "acc.to(torch.int64) * m0",
        "acc * m0.to(torch.int32)",
    ),
    LabMutant(
        "shift without rounding (truncation)",
        "def my_quantize_multiplier(",
        "(acc.to(torch.int64) * m0 + (torch.ones_like(k) << (k - 1))) >> k",
        "(acc.to(torch.int64) * m0) >> k",
    ),
    LabMutant(
        "input zero point not subtracted",
        "def my_quantize_multiplier(",
        "(q_x.to(torch.int32) - z_x) @",
        "q_x.to(torch.int32) @",
    ),
    LabMutant(
        "ReLU clamp at 0 instead of Z_y",
        "def my_quantize_multiplier(",
        ".clamp(z_y if relu else 0, 255)",
        ".clamp(0, 255)",
    ),
    LabMutant(
        "calls the reference requantize",
        "def my_quantize_multiplier(",
        "    y = (acc.to(torch.int64) * m0 + (torch.ones_like(k) << (k - 1))) >> k\n    return (y + z_y).clamp(z_y if relu else 0, 255).to(torch.int32)",
        "    return ref.requantize(acc, m0, k - 31, z_y, z_y if relu else 0, 255)",
    ),
    LabMutant(
        "bias at the weight scale only",
        "def build_integer_mlp(",
        "lin.bias.detach() / (s_x * s_w)",
        "lin.bias.detach() / s_w",
    ),
    LabMutant(
        "one multiplier for all channels",
        "def build_integer_mlp(",
        "float(s_x) * float(s_w[c]) / float(s_y)",
        "float(s_x) * float(s_w.max()) / float(s_y)",
    ),
    LabMutant(
        "multiplier S_y / (S_x S_w) upside down",
        "def build_integer_mlp(",
        "float(s_x) * float(s_w[c]) / float(s_y)",
        "float(s_y) / (float(s_x) * float(s_w[c]))",
    ),
    LabMutant(
        "float32 bias",
        "def build_integer_mlp(",
        "q_b = torch.round(lin.bias.detach() / (s_x * s_w)).to(torch.int32)",
        "q_b = torch.round(lin.bias.detach() / (s_x * s_w))",
    ),
]

MUTANTS: dict[str, list[LabMutant]] = {
    "01_benchmarking": _LAB01,
    "02_quantization": _LAB02,
    "03_pruning": [],
    "04_distillation": [],
    "05_deep_compression": [],
}

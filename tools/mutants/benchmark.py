"""Mutants of ``utils/benchmark.py`` and ``utils/roofline.py``: the course's measurement policy.

Each is a bug that would print a plausible but wrong number in a table: a column
that is not the median, a guard that never fires, a thread count that leaks into
the next cell, a MAC formula that forgets a term.
"""

from mutate import Mutant

TESTS = ["tests/test_benchmark.py"]

B = "utils/benchmark.py"
R = "utils/roofline.py"

MUTANTS = [
    # --- what a latency column reports
    Mutant(
        "latency column reports p90 instead of the median",
        B,
        'rows[name][f"latency_b{n}_ms"] = lat.median_ms',
        'rows[name][f"latency_b{n}_ms"] = lat.p90_ms',
    ),
    Mutant(
        "median replaced by the mean",
        B,
        "        statistics.median(ordered),\n        _percentile(ordered, 0.1),",
        "        statistics.mean(ordered),\n        _percentile(ordered, 0.1),",
    ),
    Mutant(
        "percentile index off by one",
        B,
        "ordered[int(round(q * (len(ordered) - 1)))]",
        "ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))) + 1)]",
    ),
    Mutant(
        "p10 is the minimum",
        B,
        "        _percentile(ordered, 0.1),",
        "        _percentile(ordered, 0.0),",
    ),
    Mutant(
        "throughput formula forgets ms -> s",
        B,
        "return 1000.0 * self.batch_size / self.median_ms",
        "return self.batch_size / self.median_ms",
    ),
    Mutant(
        "spread is p90 / median",
        B,
        "return self.p90_ms / self.p10_ms if self.p10_ms > 0 else math.inf",
        "return self.p90_ms / self.median_ms if self.median_ms > 0 else math.inf",
    ),
    # --- the timing loop
    Mutant(
        "thread count not restored after a measurement",
        B,
        "        torch.set_num_threads(old)",
        "        pass",
    ),
    Mutant(
        "threads=None keeps the current threads instead of default_threads()",
        B,
        "    if threads is None:\n        threads = default_threads()\n    check_int",
        "    if threads is None:\n        threads = torch.get_num_threads()\n    check_int",
    ),
    Mutant(
        "default threads = all CPUs (oversubscribed on a shared 2-core machine)",
        B,
        "return max(1, _usable_cpus() // 2)",
        "return max(1, _usable_cpus())",
    ),
    Mutant(
        "no warm-up in time_callable",
        B,
        "    for _ in range(warmup):\n        fn()",
        "    for _ in range(0):\n        fn()",
    ),
    Mutant(
        "no warm-up before interleaved timings",
        B,
        "warmup=0, repeats=max(1, warmup), device=device",
        "warmup=0, repeats=1, device=device",
    ),
    Mutant(
        "no CUDA synchronisation",
        B,
        "        torch.cuda.synchronize(device)",
        "        pass",
    ),
    Mutant(
        "the clock stops before the GPU has finished",
        B,
        "            fn()\n        _sync(device)\n        times.append",
        "            fn()\n        times.append",
    ),
    Mutant(
        "model not put in eval mode",
        B,
        "            model.eval()\n        except NotImplementedError",
        "            pass\n        except NotImplementedError",
    ),
    Mutant(
        "a block's time is not divided by its number of calls",
        B,
        "times.append(1000.0 * (clock() - start) / number)",
        "times.append(1000.0 * (clock() - start))",
    ),
    Mutant(
        "calls per block truncated instead of rounded up",
        B,
        "math.ceil(min_block_ms / call_ms - 1e-9)",
        "int(min_block_ms / call_ms)",
    ),
    Mutant(
        "interleaving order: each variant's rounds run back to back",
        B,
        "            for _ in range(rounds):\n                for name, m in models.items():",
        "            for name, m in models.items():\n                for _ in range(rounds):",
    ),
    Mutant(
        "benchmark_models times variants one after the other",
        B,
        "        lats = measure_latency_interleaved(\n"
        "            models, x, rounds=rounds, repeats=repeats, warmup=warmup, threads=threads\n"
        "        )",
        "        lats = {\n"
        "            k: measure_latency_interleaved(\n"
        "                {k: v}, x, rounds=rounds, repeats=repeats, warmup=warmup, threads=threads\n"
        "            )[k]\n"
        "            for k, v in models.items()\n"
        "        }",
    ),
    # --- the noise guard
    Mutant("spread threshold loosened to 3", B, "NOISE_MAX_SPREAD = 2.0", "NOISE_MAX_SPREAD = 3.0"),
    Mutant(
        "spread threshold off by the boundary",
        B,
        "if lat.spread > NOISE_MAX_SPREAD:",
        "if lat.spread >= NOISE_MAX_SPREAD:",
    ),
    Mutant("drift threshold loosened to 2.5", B, "NOISE_MAX_DRIFT = 1.5", "NOISE_MAX_DRIFT = 2.5"),
    Mutant(
        "drift compared on sorted timings (halves always differ)",
        B,
        "first = statistics.median(times_ms[:half])",
        "first = statistics.median(sorted(times_ms)[:half])",
    ),
    Mutant("no re-measurement", B, "NOISE_RETRIES = 2", "NOISE_RETRIES = 0"),
    Mutant(
        "one re-measurement fewer",
        B,
        "for attempt in range(1, NOISE_RETRIES + 2):",
        "for attempt in range(1, NOISE_RETRIES + 1):",
    ),
    Mutant(
        "an unstable measurement is never marked",
        B,
        "noisy=instability(t) is not None",
        "noisy=False",
    ),
    Mutant(
        "the noisiest attempt is kept",
        B,
        "lat.spread < old.spread",
        "lat.spread > old.spread",
    ),
    # --- ratios
    Mutant(
        "speed-up inverted",
        B,
        "return base.median_ms / other.median_ms",
        "return other.median_ms / base.median_ms",
    ),
    Mutant(
        "speed-up always against the first variant",
        B,
        "speedup(lats[baseline], lat)",
        "speedup(lats[next(iter(models))], lat)",
    ),
    Mutant(
        "overlap test with 'or'",
        B,
        "if base.p10_ms <= other.p90_ms and other.p10_ms <= base.p90_ms:",
        "if base.p10_ms <= other.p90_ms or other.p10_ms <= base.p90_ms:",
    ),
    Mutant(
        "touching intervals not counted as overlapping",
        B,
        "if base.p10_ms <= other.p90_ms and other.p10_ms <= base.p90_ms:",
        "if base.p10_ms < other.p90_ms and other.p10_ms < base.p90_ms:",
    ),
    Mutant(
        "a noisy ratio printed as a fact",
        B,
        "    if base.noisy or other.noisy:",
        "    if base.noisy and other.noisy:",
    ),
    # --- size, counts, MACs
    Mutant(
        "size in units of 1000 bytes",
        B,
        '"size_kb": state_dict_bytes(model) / 1024',
        '"size_kb": state_dict_bytes(model) / 1000',
    ),
    Mutant(
        "size from numel × 4 instead of the serialised bytes",
        B,
        "    return buffer.getbuffer().nbytes",
        "    return sum(t.numel() * 4 for t in model.state_dict().values())",
    ),
    Mutant(
        "non-zeros count the original behind utils.pruning's mask too",
        B,
        "        if isinstance(mod, torch.nn.utils.parametrize.ParametrizationList):\n            continue",
        "        if isinstance(mod, torch.nn.utils.parametrize.ParametrizationList):\n            pass",
    ),
    Mutant(
        "non-zeros count torch.prune's weight_orig",
        B,
        'if name.endswith("_orig") and hasattr(mod, name[: -len("_orig")] + "_mask"):',
        "if False:",
    ),
    Mutant(
        "MACs forget groups",
        B,
        "return int(out.numel() * kernel * (mod.in_channels // mod.groups))",
        "return int(out.numel() * kernel * mod.in_channels)",
    ),
    Mutant(
        "MACs count only the first kernel dimension",
        B,
        "kernel = math.prod(mod.kernel_size)",
        "kernel = mod.kernel_size[0]",
    ),
    Mutant(
        "transposed conv counted like a conv",
        B,
        'if "Transpose" in type(mod).__name__:',
        "if False:",
    ),
    Mutant(
        "RNNs silently counted as 0 MACs",
        B,
        "        if isinstance(mod, UNCOUNTED_LAYERS):",
        "        if False:",
    ),
    # --- roofline
    Mutant(
        "peak compute from the median, not the best",
        R,
        "mm = min(time_callable(",
        "mm = np.median(time_callable(",
    ),
    Mutant(
        "copy moves only the bytes read",
        R,
        "return 2 * 4 * numel / (best_ms / 1000) / 1e9",
        "return 4 * numel / (best_ms / 1000) / 1e9",
    ),
    Mutant(
        "cache roof the worst in-cache size",
        R,
        "cache_bw = max(copy_bandwidth_gbs(",
        "cache_bw = min(copy_bandwidth_gbs(",
    ),
    Mutant(
        "roof check ignores the cache roof",
        R,
        "bandwidth = max(peak.bandwidth_gbs, peak.cache_bandwidth_gbs or 0.0)",
        "bandwidth = peak.bandwidth_gbs",
    ),
    Mutant(
        "roof check without margin",
        R,
        "if achieved > roof * (1 + margin):",
        "if achieved > roof:",
    ),
    Mutant(
        "copies timed one call at a time",
        R,
        "best_ms = min(time_callable(lambda: dst.copy_(src), warmup=0, repeats=repeats, number=number))",
        "best_ms = min(time_callable(lambda: dst.copy_(src), warmup=0, repeats=repeats))",
    ),
]

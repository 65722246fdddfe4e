"""Mutants of ``utils/quantization.py``: plausible bugs that ``tests/test_quantization.py``
must catch (issue 18). Each is a real mistake of the kind made when writing a quantizer:
rounding, integer range, zero-point sign, clamping, observer constants, per-channel axis,
STE mask boundaries, BN folding, fixed-point requantization, integer bias, KL calibration,
k-means, and argument checks removed.

Last measured 2026-11-27 (issue 18): 59/59 killed, none marked equivalent. On a shared,
overloaded 2-core machine the full runner took ~75-800 s per mutant, so 19 mutants ran
through ``tools/mutate.py`` itself, 8 through its helpers in parallel workers, and 32 were
run against the test(s) aimed at them (``pytest -k``); rerun ``python tools/mutate.py
quantization`` on a quiet machine to confirm the score end to end."""

from mutate import Mutant

F = "utils/quantization.py"
TESTS = ["tests/test_quantization.py"]

MUTANTS = [
    # ---- integer range and qparams
    Mutant(
        "signed q_max off by one (2^(b-1))",
        F,
        "return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1",
        "return -(2 ** (bits - 1)), 2 ** (bits - 1)",
    ),
    Mutant(
        "unsigned q_max off by one (2^b - 2)", F, "return 0, 2**bits - 1", "return 0, 2**bits - 2"
    ),
    Mutant(
        "zero point sign flipped (q_min + round(min/S))",
        F,
        "zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)",
        "zp = torch.clamp(qmin + torch.round(lo / scale), qmin, qmax)",
    ),
    Mutant(
        "affine scale divides by the number of levels (q_max - q_min + 1)",
        F,
        "scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)",
        "scale = torch.clamp((hi - lo) / float(qmax - qmin + 1), min=_EPS)",
    ),
    Mutant(
        "symmetric scale divides by q_max (127) instead of (q_max - q_min) / 2 (127.5)",
        F,
        "scale = torch.clamp(amax / ((qmax - qmin) / 2), min=_EPS)",
        "scale = torch.clamp(amax / float(qmax), min=_EPS)",
    ),
    Mutant(
        "unsigned symmetric zero point 127 instead of 128",
        F,
        "0 if signed else (qmin + qmax + 1) // 2",
        "0 if signed else (qmin + qmax) // 2",
    ),
    Mutant(
        "range not widened to contain zero",
        F,
        "lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)",
        "lo, hi = lo, hi",
    ),
    Mutant(
        "zero range keeps the eps scale (affine; issue 9.1)",
        F,
        "    scale = torch.where(empty, torch.ones_like(scale), scale)\n    zp = torch.clamp",
        "    zp = torch.clamp",
    ),
    Mutant(
        "zero range keeps the eps scale (symmetric; issue 9.1)",
        F,
        "        scale = torch.where(empty, torch.ones_like(scale), scale)\n        zp = torch.full_like",
        "        zp = torch.full_like",
    ),
    # ---- quantize / dequantize / fake_quantize
    Mutant(
        "round half up instead of half to even",
        F,
        "q = torch.round(x.float() * inv) + z",
        "q = torch.floor(x.float() * inv + 0.5) + z",
    ),
    Mutant(
        "x / S instead of PyTorch's x * (1/S)",
        F,
        "q = torch.round(x.float() * inv) + z",
        "q = torch.round(x.float() / s) + z",
    ),
    Mutant(
        "quantize forgets the clamp",
        F,
        "return q.clamp(qmin, qmax).to(torch.int32)",
        "return q.to(torch.int32)",
    ),
    Mutant(
        "dequantize adds the zero point",
        F,
        "return (q.to(torch.int64) - z).float() * s",
        "return (q.to(torch.int64) + z).float() * s",
    ),
    Mutant(
        "fake_quantize forgets the clamp",
        F,
        "return (q.clamp(qmin, qmax) - z) * s",
        "return (q - z) * s",
    ),
    Mutant(
        "STE mask excludes q_min (> instead of >=)",
        F,
        "ctx.save_for_backward((q >= qmin) & (q <= qmax))",
        "ctx.save_for_backward((q > qmin) & (q <= qmax))",
    ),
    Mutant(
        "STE mask excludes q_max (< instead of <=)",
        F,
        "ctx.save_for_backward((q >= qmin) & (q <= qmax))",
        "ctx.save_for_backward((q >= qmin) & (q < qmax))",
    ),
    Mutant(
        "STE passes the gradient of clipped values",
        F,
        "return grad * inside, None, None, None, None",
        "return grad, None, None, None, None",
    ),
    Mutant(
        "fake_quantize computes in half precision (issue 9.4)",
        F,
        "return _FakeQuantSTE.apply(x.float(), s, z, qmin, qmax).to(x.dtype)",
        "return _FakeQuantSTE.apply(x, s.to(x.dtype), z.to(x.dtype), qmin, qmax)",
    ),
    Mutant(
        "per-channel parameters broadcast along dim 0 whatever the axis",
        F,
        "    shape[axis] = n\n",
        "    shape[0] = n\n",
    ),
    Mutant(
        "per-channel statistics forget movedim (wrong axis)",
        F,
        "return x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).float()",
        "return x.detach().reshape(x.shape[axis], -1).float()",
    ),
    # ---- observers
    Mutant(
        "moving average: min formula swapped (weight on the old value)",
        F,
        "self.min_val = self.min_val + self.c * (lo - self.min_val)",
        "self.min_val = lo + self.c * (self.min_val - lo)",
    ),
    Mutant(
        "moving average: max formula swapped (weight on the old value)",
        F,
        "self.max_val = self.max_val + self.c * (hi - self.max_val)",
        "self.max_val = hi + self.c * (self.max_val - hi)",
    ),
    Mutant(
        "percentile off by one point",
        F,
        "p = self.percentile / 100.0",
        "p = (self.percentile - 1.0) / 100.0",
    ),
    Mutant(
        "percentile lower bound not clipped",
        F,
        "return torch.quantile(v, 1.0 - p, dim=1), torch.quantile(v, p, dim=1)",
        "return v.min(dim=1).values, torch.quantile(v, p, dim=1)",
    ),
    Mutant(
        "sample re-drawn after every batch (issue 9.2: last batches dominate)",
        F,
        "torch.cat([self._keys, keys])",
        "torch.cat([torch.rand(self._keys.shape, generator=self._gen), keys])",
    ),
    Mutant(
        "MSE observer minimises the absolute error",
        F,
        "- z) * s - v).pow(2).mean(dim=1)",
        "- z) * s - v).abs().mean(dim=1)",
    ),
    Mutant(
        "MSE observer grid misses alpha = 1",
        F,
        "torch.linspace(1.0 / self.grid, 1.0, self.grid)",
        "torch.linspace(1.0 / self.grid, 1.0 - 1.0 / self.grid, self.grid)",
    ),
    Mutant(
        "entropy observer clips non-negative data at -T",
        F,
        "lo.append(0.0 if nonneg else -t)",
        "lo.append(-t)",
    ),
    # ---- KL calibration
    Mutant(
        "KL direction reversed (KL(Q || P))",
        F,
        "return float(np.sum(ps * np.log(ps / qs)))",
        "return float(np.sum(qs * np.log(qs / ps)))",
    ),
    Mutant(
        "KL counts non-empty bins before folding the outliers (issue 9.3)",
        F,
        "    p[-1] += hist[i:].sum()  # outliers folded into the last kept bin\n    nonzero = p != 0",
        "    nonzero = p != 0\n    p[-1] += hist[i:].sum()",
    ),
    Mutant(
        "KL outliers not folded into the last bin",
        F,
        "    p[-1] += hist[i:].sum()  # outliers folded into the last kept bin\n",
        "",
    ),
    Mutant("KL steps by 16 bins (issue 9.3)", F, "stride: int = 1", "stride: int = 16"),
    Mutant(
        "KL merge drops the remainder bins",
        F,
        "    merged[-1] += hist[levels * width : i].sum()\n",
        "",
    ),
    Mutant(
        "KL threshold one bin low",
        F,
        "return float(edges[best])",
        "return float(edges[best - 1])",
    ),
    # ---- BN folding
    Mutant("BN folding forgets eps", F, "bn.running_var + bn.eps", "bn.running_var"),
    Mutant(
        "BN folding scales only the mean in the bias",
        F,
        "(bias - bn.running_mean) * factor + beta",
        "bias - bn.running_mean * factor + beta",
    ),
    Mutant(
        "BN folding drops beta",
        F,
        "(bias - bn.running_mean) * factor + beta",
        "(bias - bn.running_mean) * factor",
    ),
    # ---- fixed point and integer-only inference
    Mutant(
        "quantize_multiplier truncates M0",
        F,
        "m0 = torch.round(mant * 2**31).to(torch.int64)",
        "m0 = torch.floor(mant * 2**31).to(torch.int64)",
    ),
    Mutant(
        "quantize_multiplier forgets to renormalise a carry",
        F,
        "m0 = torch.where(carry, m0 // 2, m0)",
        "m0 = torch.where(carry, m0 - 1, m0)",
    ),
    Mutant(
        "requantize rounds half up (not away from zero)",
        F,
        "rounded = torch.where(prod < 0, -magnitude, magnitude)",
        "rounded = (prod + half) >> total",
    ),
    Mutant(
        "requantize shift off by one",
        F,
        "(31 + shift.to(torch.int64))",
        "(30 + shift.to(torch.int64))",
    ),
    Mutant(
        "requantize forgets the output zero point",
        F,
        "return (rounded + zero_point).clamp(qmin, qmax).to(torch.int32)",
        "return rounded.clamp(qmin, qmax).to(torch.int32)",
    ),
    Mutant(
        "requantize per-channel multipliers along dim 0",
        F,
        "shape = [1, -1] + [1] * (acc.dim() - 2)",
        "shape = [-1] + [1] * (acc.dim() - 1)",
    ),
    Mutant(
        "integer bias scaled by S_w only (not S_x S_w)",
        F,
        "torch.round(bias / (s_x * s_w)).to(torch.int32)",
        "torch.round(bias / s_w).to(torch.int32)",
    ),
    Mutant(
        "no bias headroom for tiny weight scales",
        F,
        "s_w = torch.maximum(s_w, bias.abs() / (s_x * _BIAS_LIMIT))",
        "s_w = s_w",
    ),
    Mutant(
        "integer multiplier forgets S_x",
        F,
        "(s_x.double() * s_w.double()) / s_y.double()",
        "s_w.double() / s_y.double()",
    ),
    Mutant(
        "integer layer forgets the input zero point",
        F,
        "x = q_x.to(torch.int32) - self.z_x",
        "x = q_x.to(torch.int32)",
    ),
    Mutant(
        "fused ReLU not clamped at Z_y", F, "self.qmin = self.z_y if relu else 0", "self.qmin = 0"
    ),
    # ---- fake-quant layers
    Mutant(
        "FakeQuantLayer ignores per_channel",
        F,
        "axis = 0 if self.per_channel else None",
        "axis = None",
    ),
    Mutant(
        "static mode uses per-batch (dynamic) ranges",
        F,
        'if self.mode == "dynamic":',
        "if True:",
    ),
    # ---- k-means
    Mutant(
        "k-means centroid update divides by count + 1",
        F,
        "sums / counts.clamp_min(1)",
        "sums / (counts + 1)",
    ),
    Mutant(
        "k-means never re-seeds empty clusters (issue 9)",
        F,
        "        if len(empty):",
        "        if False:",
    ),
    Mutant(
        "k-means stops after 30 iterations (issue 9)",
        F,
        "for _ in range(iters):",
        "for _ in range(min(iters, 30)):",
    ),
    # ---- argument checks removed
    Mutant(
        "zero point range check removed (issue 9.5)",
        F,
        "if qmin is not None and qmax is not None and ((z < qmin) | (z > qmax)).any():",
        "if False:",
    ),
    Mutant(
        "zero point check rejects q_max itself",
        F,
        "((z < qmin) | (z > qmax)).any()",
        "((z < qmin) | (z >= qmax)).any()",
    ),
    Mutant("scale > 0 check removed", F, "    if (s <= 0).any():\n", "    if False:\n"),
    Mutant("min_val <= max_val check removed", F, "    if (lo > hi).any():\n", "    if False:\n"),
    Mutant(
        "observer empty-input check removed (issue 9.12)",
        F,
        '        if x.numel() == 0:\n            raise ValueError(f"x must be non-empty',
        '        if False:\n            raise ValueError(f"x must be non-empty',
    ),
    Mutant(
        "dequantize q range check removed",
        F,
        "if q.numel() and (q.min() < qmin or q.max() > qmax):",
        "if False:",
    ),
]

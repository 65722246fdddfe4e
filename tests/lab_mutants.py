"""The mutation suite of the labs: plausible wrong answers that the check cells must catch.

Each :class:`LabMutant` replaces ``old`` (once, inside a solution region) of the code cell
that contains ``cell`` by ``new``. ``tests/test_labs.py`` runs the mutated cell in the
solution's live kernel, then the cells after it through the run of check cells that follows
(or up to the cell containing ``until``), and requires a check cell to fail.
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
    until: str | None = None  # marker of the last cell to run; default: the next run of checks


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
        "y = torch.where(p >= 0, (p + half) >> k, -((half - p) >> k))",
        "y = p >> k",
    ),
    LabMutant(
        "round half up (arithmetic shift after adding half: -2.5 -> -2)",
        "def my_quantize_multiplier(",
        "y = torch.where(p >= 0, (p + half) >> k, -((half - p) >> k))",
        "y = (p + half) >> k",
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
        "    y = torch.where(p >= 0, (p + half) >> k, -((half - p) >> k))\n    return (y + z_y).clamp(z_y if relu else 0, 255).to(torch.int32)",
        "    return ref.requantize(acc, m0, k - 31, z_y, z_y if relu else 0, 255)",
    ),
    LabMutant(
        "bias at the weight scale only",
        "def integer_layer_params(",
        "bias.detach() / (s_x * s_w)",
        "bias.detach() / s_w",
    ),
    LabMutant(
        "one multiplier for all channels",
        "def integer_layer_params(",
        "float(s_x) * float(s_w[c]) / float(s_y)",
        "float(s_x) * float(s_w.max()) / float(s_y)",
    ),
    LabMutant(
        "multiplier S_y / (S_x S_w) upside down",
        "def integer_layer_params(",
        "float(s_x) * float(s_w[c]) / float(s_y)",
        "float(s_y) / (float(s_x) * float(s_w[c]))",
    ),
    LabMutant(
        "float32 bias",
        "def integer_layer_params(",
        "q_b = torch.round(bias.detach() / (s_x * s_w)).to(torch.int32)",
        "q_b = torch.round(bias.detach() / (s_x * s_w))",
    ),
]

_LAB03 = [
    LabMutant(
        "prunes the largest |w|",
        "def magnitude_mask(",
        "k, largest=False)",
        "k, largest=True)",
    ),
    LabMutant(
        "k = floor(amount * n)",
        "def magnitude_mask(",
        "    mask = torch.ones_like(w)\n    k = round(amount * w.numel())",
        "    mask = torch.ones_like(w)\n    k = int(amount * w.numel())",
    ),
    LabMutant(
        "signed w instead of |w|",
        "def magnitude_mask(",
        "torch.topk(w.detach().abs().flatten()",
        "torch.topk(w.detach().flatten()",
    ),
    LabMutant(
        "no ValueError for a bad amount",
        "def magnitude_mask(",
        'raise ValueError(f"amount must be in [0, 1), got {amount}")',
        "pass",
    ),
    LabMutant(
        "calls the reference magnitude_mask",
        "def magnitude_mask(",
        "    mask = torch.ones_like(w)\n",
        "    return pruning.magnitude_mask(w, amount)\n    mask = torch.ones_like(w)\n",
    ),
    LabMutant(
        "threshold one rank too high",
        "def global_threshold(",
        "torch.kthvalue(flat, k)",
        "torch.kthvalue(flat, min(k + 1, flat.numel()))",
    ),
    LabMutant(
        "per-layer instead of global masks",
        "def global_threshold(",
        "    t = global_threshold(weights, amount)\n    return [(w.detach().abs() > t).to(w.dtype) for w in weights]",
        "    return [(w.detach().abs() > global_threshold([w], amount)).to(w.dtype) for w in weights]",
    ),
    LabMutant(
        ">= keeps the weights at the threshold",
        "def global_threshold(",
        "(w.detach().abs() > t)",
        "(w.detach().abs() >= t)",
    ),
    LabMutant(
        "boolean masks",
        "def global_threshold(",
        "(w.detach().abs() > t).to(w.dtype)",
        "(w.detach().abs() > t)",
    ),
    LabMutant(
        "BN running statistics not copied",
        "def prune_conv_bn_conv(",
        "        new_bn.running_mean.copy_(bn.running_mean[keep])\n        new_bn.running_var.copy_(bn.running_var[keep])\n",
        "",
    ),
    LabMutant(
        "keep not sorted",
        "def prune_conv_bn_conv(",
        "keep = torch.as_tensor(keep, dtype=torch.long).sort().values",
        "keep = torch.as_tensor(keep, dtype=torch.long)",
    ),
    LabMutant(
        "conv2 bias dropped",
        "def prune_conv_bn_conv(",
        "        if conv2.bias is not None:\n            new2.bias.copy_(conv2.bias)\n",
        "",
    ),
    LabMutant(
        "empty keep accepted",
        "def prune_conv_bn_conv(",
        'raise ValueError("keep is empty: a width of 0 disconnects the network")',
        "pass",
    ),
    LabMutant(
        "calls the reference prune_group",
        "def prune_conv_bn_conv(",
        "    n = len(keep)\n",
        "    new = copy.deepcopy([conv1, bn, conv2])\n"
        '    prune_group(ChannelGroup("c", [new[0]], [new[1]], [], [(new[2], 1)]), keep)\n'
        "    return tuple(new)\n    n = len(keep)\n",
    ),
    LabMutant(
        "L2 norm instead of L1",
        "def prune_conv_bn_conv(",
        "conv.weight.detach().abs().sum(dim=(1, 2, 3))",
        "conv.weight.detach().pow(2).sum(dim=(1, 2, 3))",
    ),
    LabMutant(
        "keeps the smallest filters",
        "def prune_conv_bn_conv(",
        "torch.topk(norms, n_keep).indices",
        "torch.topk(norms, n_keep, largest=False).indices",
    ),
    LabMutant(
        "rounds the number kept",
        "def prune_conv_bn_conv(",
        "n_keep = int(conv.out_channels * (1 - amount) + 1e-9)",
        "n_keep = round(conv.out_channels * (1 - amount))",
    ),
    LabMutant(
        "indices in norm order, not ascending",
        "def prune_conv_bn_conv(",
        "return torch.topk(norms, n_keep).indices.sort().values",
        "return torch.topk(norms, n_keep).indices",
    ),
]

_LAB04 = [
    LabMutant(
        "no T² factor",
        "def my_kd_loss(",
        ".mean() * temperature**2",
        ".mean()",
    ),
    LabMutant(
        "teacher logits not detached",
        "def my_kd_loss(",
        "teacher_logits.detach() / temperature",
        "teacher_logits / temperature",
    ),
    LabMutant(
        "log of softmax instead of log_softmax",
        "def my_kd_loss(",
        "log_q = F.log_softmax(student_logits / temperature, dim=1)",
        "log_q = torch.log(F.softmax(student_logits / temperature, dim=1))",
    ),
    LabMutant(
        "KL in the wrong direction",
        "def my_kd_loss(",
        "(log_p.exp() * (log_p - log_q))",
        "(log_q.exp() * (log_q - log_p))",
    ),
    LabMutant(
        "kl_div averaged over batch × classes",
        "def my_kd_loss(",
        "soft = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * temperature**2",
        'soft = F.kl_div(log_q, log_p, log_target=True, reduction="mean") * temperature**2',
    ),
    LabMutant(
        "teacher logits not softened by T",
        "def my_kd_loss(",
        "F.log_softmax(teacher_logits.detach() / temperature, dim=1)",
        "F.log_softmax(teacher_logits.detach(), dim=1)",
    ),
    LabMutant(
        "alpha on the cross-entropy",
        "def my_kd_loss(",
        "return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)",
        "return (1 - alpha) * soft + alpha * F.cross_entropy(student_logits, labels)",
    ),
    LabMutant(
        "cross-entropy on softened logits",
        "def my_kd_loss(",
        "F.cross_entropy(student_logits, labels)",
        "F.cross_entropy(student_logits / temperature, labels)",
    ),
    LabMutant(
        "calls the reference kd_loss",
        "def my_kd_loss(",
        "    log_q = F.log_softmax(student_logits / temperature, dim=1)\n",
        "    return kd_loss(student_logits, teacher_logits, temperature, labels, alpha)\n",
    ),
    LabMutant(
        "step ignores its temperature and alpha",
        "def make_distill_step(",
        "return my_kd_loss(model(x), teacher_logits, temperature, y, alpha)",
        "return my_kd_loss(model(x), teacher_logits, 4.0, y, 0.9)",
    ),
    LabMutant(
        "student and teacher logits swapped",
        "def make_distill_step(",
        "return my_kd_loss(model(x), teacher_logits, temperature, y, alpha)",
        "return my_kd_loss(teacher_logits, model(x), temperature, y, alpha)",
    ),
    LabMutant(
        "step without the hard labels",
        "def make_distill_step(",
        "return my_kd_loss(model(x), teacher_logits, temperature, y, alpha)",
        "return my_kd_loss(model(x), teacher_logits, temperature)",
    ),
    LabMutant(
        "calls the reference make_kd_loss",
        "def make_distill_step(",
        "        with torch.no_grad():\n            teacher_logits = teacher(x)\n",
        "        return make_kd_loss(teacher, temperature, alpha)(model, x, y)\n",
    ),
    LabMutant(
        "trains on the hard labels only",
        "def train_distilled(",
        "        compute_loss=make_distill_step(teacher, 4.0, 0.9),\n",
        "",
        until="distilled_acc = evaluate(",
    ),
    LabMutant(
        "calls the reference distill",
        "def train_distilled(",
        "    fit(\n        student,",
        '    distill(student, teacher, loader, method="kd", epochs=epochs)\n    return\n    fit(\n        student,',
        until="distilled_acc = evaluate(",
    ),
]

_LAB05 = [
    LabMutant(
        "k-means started from the first k values",
        "def kmeans_1d(",
        "c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)",
        "c = x[:k].clone()",
    ),
    LabMutant(
        "one Lloyd iteration only",
        "def kmeans_1d(",
        "for _ in range(iters):",
        "for _ in range(1):",
    ),
    LabMutant(
        "empty clusters moved to 0",
        "def kmeans_1d(",
        "c = torch.where(counts > 0, sums / counts.clamp(min=1), c)",
        "c = sums / counts.clamp(min=1)",
    ),
    LabMutant(
        "zeros clustered with the rest",
        "def share_weight(",
        "    nz = w != 0\n",
        "    nz = torch.ones_like(w, dtype=torch.bool)\n",
    ),
    LabMutant(
        "cluster labels not shifted past the pruned index",
        "def share_weight(",
        "indices[nz] = labels + 1",
        "indices[nz] = labels",
    ),
    LabMutant(
        "calls the reference share_weight",
        "def share_weight(",
        "    nz = w != 0\n",
        "    ref = C.share_weight(weight, bits)\n    return ref.centroids, ref.indices\n",
    ),
    LabMutant(
        "pruned weights' gradients counted",
        "def centroid_gradient(",
        "weight_grad.flatten())[1:]",
        "weight_grad.flatten())[1:] + weight_grad[indices == 0].sum()",
    ),
    LabMutant(
        "mean instead of sum of the gradients",
        "def centroid_gradient(",
        "return sums.index_add_(0, indices.flatten(), weight_grad.flatten())[1:]",
        "counts = torch.bincount(indices.flatten(), minlength=num_centroids + 1).clamp(min=1)\n"
        "    return (sums.index_add_(0, indices.flatten(), weight_grad.flatten()) / counts)[1:]",
    ),
    LabMutant(
        "no centroid fine-tuning",
        "def finetune_centroids(",
        "            for name, layer in layers.items():\n                codebooks[name].grad = centroid_gradient(\n                    layer.weight.grad, shared[name][1], codebooks[name].numel()\n                )\n            opt.step()",
        "            pass",
    ),
    LabMutant(
        "centroid gradients set but no optimizer step",
        "def finetune_centroids(",
        "            opt.step()",
        "            pass",
    ),
    LabMutant(
        "dense weights trained instead of the codebook",
        "def finetune_centroids(",
        "            for name, layer in layers.items():\n                codebooks[name].grad = centroid_gradient(\n                    layer.weight.grad, shared[name][1], codebooks[name].numel()\n                )\n            opt.step()",
        "            with torch.no_grad():\n                for layer in layers.values():\n                    layer.weight -= lr * layer.weight.grad",
    ),
    LabMutant(
        "merge adds length to one tree only",
        "def huffman_code_lengths(",
        "for s in t1 + t2:",
        "for s in t1:",
    ),
    LabMutant(
        "a single symbol gets length 0",
        "def huffman_code_lengths(",
        "        lengths[heap[0][1]] = 1\n",
        "",
    ),
    LabMutant(
        "calls the reference huffman_code_lengths",
        "def huffman_code_lengths(",
        "    heap = [(c, s, [s]) for s, c in enumerate(counts) if c > 0]\n",
        "    return C.huffman_code_lengths(counts)\n",
    ),
    LabMutant(
        "least significant bit first",
        "def huffman_code_lengths(",
        'return int(bits, 2).to_bytes(len(bits) // 8, "big")',
        'return int(bits[::-1], 2).to_bytes(len(bits) // 8, "little")',
    ),
    LabMutant(
        "no padding to whole bytes",
        "def huffman_code_lengths(",
        '    bits += "0" * (-len(bits) % 8)\n',
        "",
    ),
    LabMutant(
        "decoder keeps the prefix after a match",
        "def huffman_code_lengths(",
        '                out.append(decoder[prefix])\n                prefix = ""\n',
        "                out.append(decoder[prefix])\n",
    ),
    LabMutant(
        "calls the reference huffman_encode",
        "def huffman_code_lengths(",
        '    bits = "".join(codes[int(s)] for s in symbols)\n',
        "    return C.huffman_encode(symbols, lengths)\n",
    ),
]

MUTANTS: dict[str, list[LabMutant]] = {
    "01_benchmarking": _LAB01,
    "02_quantization": _LAB02,
    "03_pruning": _LAB03,
    "04_distillation": _LAB04,
    "05_deep_compression": _LAB05,
}


def _later_labs() -> dict[str, list[LabMutant]]:
    """Labs of chapter 6 onwards keep their mutants beside this file, one module per lab:
    ``tests/lab_mutants_NN.py`` with ``LAB`` (the solution's stem) and ``MUTANTS``."""
    import importlib
    from pathlib import Path

    found: dict[str, list[LabMutant]] = {}
    for path in sorted(Path(__file__).parent.glob("lab_mutants_*.py")):
        module = importlib.import_module(path.stem)
        found[module.LAB] = module.MUTANTS
    return found


MUTANTS.update(_later_labs())

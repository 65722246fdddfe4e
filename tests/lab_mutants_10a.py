"""Mutants of lab 10 (part A): the plausible wrong answers to the LSQ and systolic-array exercises."""

from lab_mutants import LabMutant

LAB = "10_a_lowbit_hardware"

_LSQ = "def my_lsq_forward("
_TILE = "def my_systolic_tile("
_TILES = "def my_systolic_matmul("

MUTANTS = [
    # ---- exercise 1: LSQ forward and gradients
    LabMutant(
        "LSQ forward without the clamp",
        _LSQ,
        "return torch.round((x / step).clamp(-qn, qp)) * step",
        "return torch.round(x / step) * step",
    ),
    LabMutant(
        "LSQ forward floors instead of rounding",
        _LSQ,
        "return torch.round((x / step).clamp(-qn, qp)) * step",
        "return torch.floor((x / step).clamp(-qn, qp)) * step",
    ),
    LabMutant(
        "step gradient inside the range with the sign flipped (v/s - round(v/s))",
        _LSQ,
        "torch.where(inside, torch.round(ratio) - ratio, torch.zeros_like(ratio))",
        "torch.where(inside, ratio - torch.round(ratio), torch.zeros_like(ratio))",
    ),
    LabMutant(
        "step gradient ignores the clipped elements",
        _LSQ,
        "dstep = dstep - qn * low.float() + qp * high.float()",
        "dstep = dstep",
    ),
    LabMutant(
        "clipped terms with the wrong sign (+Qn below)",
        _LSQ,
        "dstep = dstep - qn * low.float() + qp * high.float()",
        "dstep = dstep + qn * low.float() + qp * high.float()",
    ),
    LabMutant(
        "step gradient without the gradient scale g",
        _LSQ,
        "grad_step = (grad_out * dstep).sum().reshape(1) * g",
        "grad_step = (grad_out * dstep).sum().reshape(1)",
    ),
    LabMutant(
        "step gradient not weighted by the incoming gradient",
        _LSQ,
        "grad_step = (grad_out * dstep).sum().reshape(1) * g",
        "grad_step = dstep.sum().reshape(1) * g",
    ),
    LabMutant(
        "plain STE: the gradient of x passes everywhere, also where clipped",
        _LSQ,
        "grad_x = grad_out * inside.float()",
        "grad_x = grad_out",
    ),
    LabMutant(
        "gradient scale 1/sqrt(N) without Q_P",
        _LSQ,
        "g = 1.0 / math.sqrt(x.numel() * qp)",
        "g = 1.0 / math.sqrt(x.numel())",
    ),
    LabMutant(
        "calls the reference lsq_fake_quant",
        _LSQ,
        "return torch.round((x / step).clamp(-qn, qp)) * step",
        "return ref.lsq_fake_quant(x, step, int(math.log2(qn)) + 1)",
    ),
    # ---- exercise 2: one tile, cycle by cycle
    LabMutant(
        "one cycle too many (M + K + N - 1)",
        _TILE,
        "cycles = m + k + n - 2",
        "cycles = m + k + n - 1",
    ),
    LabMutant(
        "no skew: every row is fed A[t, k] at the same cycle",
        _TILE,
        "a_reg[:, 0] = np.where(ok, a[np.clip(src, 0, m - 1), rows], 0)",
        "a_reg[:, 0] = np.where(t < m, a[min(t, m - 1), rows], 0)",
    ),
    LabMutant(
        "activations not passed to the right (broadcast to the whole row at once)",
        _TILE,
        "a_reg[:, 1:] = a_reg[:, :-1].copy()",
        "a_reg[:, 1:] = np.where(ok, a[np.clip(src, 0, m - 1), rows], 0)[:, None]",
    ),
    LabMutant(
        "partial sums stay in place (output-stationary accumulation)",
        _TILE,
        "psum = above + a_reg * w",
        "psum = psum + a_reg * w",
    ),
    LabMutant(
        "outputs read without the column delay",
        _TILE,
        "row = t - (k - 1) - j",
        "row = t - (k - 1)",
    ),
    LabMutant(
        "calls the reference systolic_tile",
        _TILE,
        "        above = np.vstack([np.zeros((1, n)), psum[:-1]])\n",
        "        out[:] = ref_sys.systolic_tile(a, w)[0]\n        above = np.vstack([np.zeros((1, n)), psum[:-1]])\n",
    ),
    # ---- exercise 3: tiles, cycles, utilization
    LabMutant(
        "tiles overwrite C instead of adding along K",
        _TILES,
        "c[:, n0 : n0 + cols] += part",
        "c[:, n0 : n0 + cols] = part",
    ),
    LabMutant(
        "weight loading not counted",
        _TILES,
        "total += rows + cycles",
        "total += cycles",
    ),
    LabMutant(
        "utilization over the streaming cycles only (loads left out)",
        _TILES,
        "utilization = m * k * n / (rows * cols * total)",
        "utilization = m * k * n / (rows * cols * (total - rows))",
    ),
    LabMutant(
        "calls the reference systolic_cycles for the count",
        _TILES,
        "total += rows + cycles",
        "total = ref_sys.systolic_cycles(m, k, n, rows, cols).cycles",
    ),
]

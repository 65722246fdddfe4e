"""Mutants of ``utils/deploy.py``: exporting to backends and checking them against eager.

Each is a bug that would let a deployment table show a backend as correct when it is
not (a tolerance too loose, INT8 judged on the wrong quantity, a model exported in
training mode, a calibration reader that feeds one batch) or fuse a graph wrongly.
"""

from mutate import Mutant

TESTS = ["tests/test_deploy.py"]

D = "utils/deploy.py"

MUTANTS = [
    # --- the agreement criteria
    Mutant(
        "FP32 tolerance ten times looser",
        D,
        "FP32_ATOL = 1e-3",
        "FP32_ATOL = 1e-2",
    ),
    Mutant(
        "INT8 agreement threshold 98 %",
        D,
        "INT8_MIN_AGREEMENT = 0.99",
        "INT8_MIN_AGREEMENT = 0.98",
    ),
    Mutant(
        "FP32 backend judged on predictions, not logits",
        D,
        'ok = result["max_abs_diff"] <= atol',
        'ok = result["agreement"] >= min_agreement',
    ),
    Mutant(
        "INT8 backend judged on logits, not predictions",
        D,
        '        ok = result["agreement"] >= min_agreement\n',
        '        ok = result["max_abs_diff"] <= atol\n',
    ),
    Mutant(
        "agreement computed on logits instead of predictions",
        D,
        '"agreement": (pred == ref_pred).sum().item() / len(pred),',
        '"agreement": (got == ref).all(1).sum().item() / len(pred),',
    ),
    Mutant(
        "accuracy drop bound with the wrong sign",
        D,
        'ok = ok and result["accuracy_delta"] >= -max_acc_drop',
        'ok = ok and result["accuracy_delta"] <= max_acc_drop',
    ),
    Mutant(
        "accuracy delta reversed (reference - runner)",
        D,
        'result["accuracy_delta"] = result["accuracy"] - result["reference_accuracy"]',
        'result["accuracy_delta"] = result["reference_accuracy"] - result["accuracy"]',
    ),
    # --- the model that is exported
    Mutant(
        "model exported without eval() (BN uses batch statistics)",
        D,
        "net = copy.deepcopy(model).cpu().eval()",
        "net = copy.deepcopy(model).cpu()",
    ),
    Mutant(
        "caller's model changed in place instead of a copy",
        D,
        "net = copy.deepcopy(model).cpu().eval()",
        "net = model.cpu().eval()",
    ),
    Mutant(
        "runner does not check the input shape",
        D,
        "if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:",
        "if x.dim() < 1:",
    ),
    # --- calibration
    Mutant(
        "calibration reader yields the same batch every time",
        D,
        "self.batches = [b.numpy() for b in batches]",
        "self.batches = [batches[0].numpy()] * len(batches)",
    ),
    Mutant(
        "calibration uses only the first batch",
        D,
        "        if i >= max_batches:\n",
        "        if i >= 1:\n",
    ),
    Mutant(
        "INT8 weights per tensor instead of per channel",
        D,
        "per_channel=True,",
        "per_channel=False,",
    ),
    # --- graph optimisation
    Mutant(
        "ORT level 'extended' runs as 'basic'",
        D,
        '"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,',
        '"extended": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,',
    ),
    Mutant(
        "BN folding forgets eps",
        D,
        "scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)",
        "scale = bn.weight.detach() / torch.sqrt(bn.running_var)",
    ),
    Mutant(
        "BN folding forgets the running mean",
        D,
        "fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())",
        "fused.bias = nn.Parameter(bias * scale + bn.bias.detach())",
    ),
    Mutant(
        "BN folding forgets beta",
        D,
        "fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())",
        "fused.bias = nn.Parameter((bias - bn.running_mean) * scale)",
    ),
    Mutant(
        "BN scale applied along the input channels",
        D,
        "conv.weight.detach() * scale.reshape(-1, 1, 1, 1)",
        "conv.weight.detach() * scale.reshape(1, -1, 1, 1)",
    ),
    Mutant(
        "BN folded (or ReLU fused) into a conv that also feeds another node",
        D,
        'src.op == "call_module" and _only_user(src)):',
        'src.op == "call_module"):',
    ),
    Mutant(
        "no-op removal misses Identity",
        D,
        "_NOOP_MODULES = (nn.Identity, nn.Dropout,",
        "_NOOP_MODULES = (nn.Dropout,",
    ),
    # --- threads and targets of the compilers
    Mutant(
        "TVM compiled for AVX2 without checking FMA",
        D,
        'if features.get("AVX2") and features.get("FMA"):',
        'if features.get("AVX2"):',
    ),
    Mutant(
        "TVM ignores AVX-512 VNNI",
        D,
        '    if features.get("AVX-512 VNNI"):\n        return "cascadelake"\n',
        "",
    ),
    Mutant(
        "ExecuTorch keeps its default thread pool",
        D,
        "        lib._unsafe_reset_threadpool(threads)\n",
        "        pass\n",
    ),
    Mutant(
        "ExecuTorch threads not checked",
        D,
        '    check_int("threads", threads, minimum=1)\n    lib = importlib',
        "    lib = importlib",
    ),
]
